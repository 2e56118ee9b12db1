"""SIGUSR1 writes every thread's stack and every asyncio task's await chain to stderr.

For a process that hangs in a pod: the real server (a subprocess: signals are the
point) is caught while a call waits for a slow upstream; the dump must show the
threads, the main task and the read (flight) down to the upstream request it waits
on, and the server must go on serving (SIGUSR1's default action would kill it).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from imageshare.v1 import image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from tests.support.processes import ServerProcess
from tests.support.rpc import Request
from tests.support.waiting import wait_until

pytestmark = pytest.mark.subprocess


def test_sigusr1_dumps_every_thread_and_task_and_the_server_goes_on(
    start_server: Callable[..., ServerProcess], emulator: EmulatorAdmin
) -> None:
    server = start_server("--cache-ttl", "0")
    emulator.set(latency_ms=1500)
    answers: list[Any] = []
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        request = Request(region_id="cn-hangzhou", image_id="m-demo0000003")
        waiting = threading.Thread(
            target=lambda: answers.extend(stub.ListImageShares(request, timeout=20))
        )
        waiting.start()
        wait_until(lambda: emulator.counters()["in_flight"] == 1)

        server.signal(signal.SIGUSR1)
        dump = server.wait_for("stack_dump")

        emulator.set(latency_ms=0)
        waiting.join(20)
    assert len(answers) == 1  # the call in flight during the dump completed
    assert server.proc.poll() is None  # SIGUSR1 did not end the process

    threads = {t["name"]: t for t in dump["threads"]}
    assert {"MainThread", "metrics-http"} <= set(threads)
    assert "run_forever" in threads["MainThread"]["stack"]
    assert all(t["stack"].startswith("  File ") for t in dump["threads"])

    tasks = dump["tasks"]
    (main,) = [t for t in tasks if t["coro"] == "serve"]
    assert "await first.wait()" in main["stack"]
    (flight,) = [t for t in tasks if t["name"].startswith("flight ")]
    # The whole await chain, from the flight down to the HTTP exchange it waits on.
    for frame in ("run", "read_upstream", "describe_image_share_permission", "_send"):
        assert f", in {frame}\n" in flight["stack"], frame
    assert flight["awaiting"]
    assert dump["msg"] == f"stack dump: {len(dump['threads'])} threads, {len(tasks)} tasks"

    assert server.stop() == 0
