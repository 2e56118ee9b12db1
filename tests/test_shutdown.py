"""Graceful shutdown of the real server process under load.

These tests keep the server a process of its own: what they test is what the
process does on SIGTERM (and a second SIGTERM), what it logs on stderr while
draining, and the exit code. The emulator runs in this process, so its knobs
and counters are read directly.

Streams are kept in flight by the emulator's latency knob: 500 accounts read
10 per upstream page, one page at a time, at 100 ms a page take five seconds,
so SIGTERM always lands mid-listing. Progress is observed (upstream calls
counted by the emulator, ``draining`` logged, health watch updated), never
slept for. Watches (WatchImageShares) never end by themselves: SIGTERM ends them at
once, UNAVAILABLE, so that their callers reconnect to another replica, while the
listings drain.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import pytest

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import Emulator
from tests.support import client_health
from tests.support.processes import ServerProcess
from tests.support.rpc import details
from tests.support.waiting import until

if TYPE_CHECKING:
    from imageshare.v1.image_share_pb2_grpc import ImageShareServiceAsyncStub

StartServer = Callable[..., ServerProcess]
Listing = grpc.aio.UnaryStreamCall[
    image_share_pb2.ListImageSharesRequest, image_share_pb2.ListImageSharesResponse
]
ShareWatch = grpc.aio.UnaryStreamCall[
    image_share_pb2.WatchImageSharesRequest, image_share_pb2.WatchImageSharesResponse
]
HealthRequest = client_health.CheckRequest
HealthResponse = client_health.CheckResponse
REGION = "cn-hangzhou"
SLOW = "m-slowdrain01"
PUBLIC = "m-demo0000002"  # the demo data's public image
ACCOUNTS = [str(700_000_000 + i) for i in range(500)]
SERVING = HealthResponse.SERVING
NOT_SERVING = HealthResponse.NOT_SERVING
# A channel of its own connection: grpc shares connections between a process's channels
# to the same target, and a call meant to open a new one could ride a draining one.
NEW_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
# Upstream pages of 10 read one at a time: 50 sequential upstream calls per listing.
SLOW_SERVER_ARGS = (
    "--cache-ttl",
    "0",
    "--upstream-page-size",
    "10",
    "--upstream-parallel-pages",
    "1",
    "--upstream-qps",
    "0",
)


@pytest.fixture
def start_server(ecs: Emulator) -> Iterator[StartServer]:
    """Server processes against the in-process emulator, stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        process = ServerProcess(*args, upstream=ecs.url)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def slow_image(ecs: Emulator) -> Emulator:
    ecs.knobs.upsert_image(
        {"region_id": REGION, "image_id": SLOW, "accounts": [{"aliyun_id": a} for a in ACCOUNTS]}
    )
    ecs.knobs.set(latency_ms=100)
    return ecs


def _listing(channel: grpc.aio.Channel) -> Listing:
    stub: ImageShareServiceAsyncStub = image_share_pb2_grpc.ImageShareServiceStub(channel)
    request = image_share_pb2.ListImageSharesRequest(
        region_id=REGION, image_id=SLOW, page_size=10, bypass_cache=True
    )
    return stub.ListImageShares(request, timeout=60)


async def _drain(call: Listing) -> list[str]:
    ids: list[str] = []
    while (message := await call.read()) is not grpc.aio.EOF:
        assert isinstance(message, image_share_pb2.ListImageSharesResponse)
        ids.extend(a.aliyun_id for a in message.accounts)
    return ids


def _share_watch(channel: grpc.aio.Channel) -> ShareWatch:
    stub: ImageShareServiceAsyncStub = image_share_pb2_grpc.ImageShareServiceStub(channel)
    return stub.WatchImageShares(
        image_share_pb2.WatchImageSharesRequest(region_id=REGION, image_id=PUBLIC)
    )


async def _share_watch_ended(call: ShareWatch, within: float = 5.0) -> grpc.aio.AioRpcError:
    """The error a watch ended with (it sends nothing more: the list does not change)."""
    try:
        message = await asyncio.wait_for(call.read(), within)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"the watch did not end with an error: {message!r}")


def _watch(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamCall[HealthRequest, HealthResponse]:
    return client_health.watch(channel)(HealthRequest())


async def _next_status(
    watch: grpc.aio.UnaryStreamCall[HealthRequest, HealthResponse], within: float = 5.0
) -> int:
    message = await asyncio.wait_for(watch.read(), within)
    assert isinstance(message, HealthResponse)
    return int(message.status)


async def _upstream_reached(ecs: Emulator, calls: int) -> None:
    """Wait until the emulator has counted ``calls``: the server's paging is under way."""
    await until(lambda: ecs.knobs.counters()["total"] >= calls, within=15)


async def _exit_code(server: ServerProcess, limit: float) -> tuple[int, float]:
    started = time.monotonic()
    code = await asyncio.to_thread(server.proc.wait, limit)
    return code, time.monotonic() - started


async def _refused_once_draining(target: str) -> grpc.StatusCode:
    """Probe new connections until the listener has closed; until then, Check says NOT_SERVING.

    ``draining`` is logged just before the listener closes, so a probe or two may still get in.
    """
    for _ in range(200):
        async with grpc.aio.insecure_channel(target, options=NEW_CONNECTION) as channel:
            try:
                response = await client_health.check(channel)(HealthRequest(), timeout=2)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            assert response.status == NOT_SERVING
    raise AssertionError("the listener kept accepting new connections while draining")


async def _new_call_code(target: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target, options=NEW_CONNECTION) as channel:
        try:
            await _drain(_listing(channel))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.subprocess
async def test_sigterm_drains_in_flight_streams_and_exits_zero(
    start_server: StartServer, slow_image: Emulator
) -> None:
    server = start_server(*SLOW_SERVER_ARGS, "--grace-period", "30")
    async with grpc.aio.insecure_channel(server.target) as channel:
        watch = _watch(channel)
        assert await _next_status(watch) == SERVING
        share_watches = [_share_watch(channel) for _ in range(2)]
        for share_watch in share_watches:
            snapshot = await asyncio.wait_for(share_watch.read(), 15)
            assert isinstance(snapshot, image_share_pb2.WatchImageSharesResponse)
            assert snapshot.snapshot
            assert [g.group for g in snapshot.share_groups] == ["all"]
        read_by_watches = slow_image.knobs.counters()["total"]
        streams = [_listing(channel) for _ in range(3)]
        await _upstream_reached(slow_image, read_by_watches + 3)

        server.signal(signal.SIGTERM)
        # Load balancers watching health see NOT_SERVING before anything else changes.
        assert await _next_status(watch) == NOT_SERVING
        watch.cancel()
        # Watches end at once, UNAVAILABLE, so that their callers reconnect elsewhere...
        for share_watch in share_watches:
            error = details(await _share_watch_ended(share_watch))
            assert error.code is grpc.StatusCode.UNAVAILABLE
            assert error.error_info is not None
            assert error.error_info.reason == "SHUTTING_DOWN"
        assert not any(s.done() for s in streams)  # ...while the listings are still streaming
        await asyncio.to_thread(server.wait_for, "draining", 5)
        # New calls are refused once draining, on a new connection...
        assert await _refused_once_draining(server.target) is grpc.StatusCode.UNAVAILABLE
        assert await _new_call_code(server.target) is grpc.StatusCode.UNAVAILABLE
        # ...while every stream that was under way completes, whole and in order.
        listed = await asyncio.gather(*(_drain(s) for s in streams))
        assert listed == [ACCOUNTS] * 3
        assert [await s.code() for s in streams] == [grpc.StatusCode.OK] * 3
    code, _ = await _exit_code(server, 10)
    assert code == 0
    events = [r.get("event") for r in server.records()]
    assert events.index("draining") < events.index("stopped")
    assert "forced_stop" not in events


@pytest.mark.subprocess
async def test_health_watchers_do_not_hold_the_drain_open(start_server: StartServer) -> None:
    """A client-side health watch is an RPC that never ends by itself; it must not make every
    shutdown last the whole grace period."""
    server = start_server("--grace-period", "30")
    async with grpc.aio.insecure_channel(server.target) as channel:
        watch = _watch(channel)
        assert await _next_status(watch) == SERVING
        server.signal(signal.SIGTERM)
        assert await _next_status(watch) == NOT_SERVING
        code, took = await _exit_code(server, 30)
    assert code == 0
    assert took < 5, f"shutdown waited {took:.1f}s for an idle health watch"


@pytest.mark.subprocess
async def test_grace_period_running_out_cancels_the_rest_cleanly(
    start_server: StartServer, slow_image: Emulator
) -> None:
    server = start_server(*SLOW_SERVER_ARGS, "--grace-period", "1")
    slow_image.knobs.set(latency_ms=300)  # 50 pages at 300 ms: far longer than the grace period
    async with grpc.aio.insecure_channel(server.target) as channel:
        stream = _listing(channel)
        await _upstream_reached(slow_image, 1)
        server.signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _drain(stream)
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        code, took = await _exit_code(server, 15)
    assert code == 0
    assert took < 5
    assert "Traceback" not in server.log_text
    # Paging stopped with the cancelled stream: far fewer than the listing's 50 pages were read.
    assert slow_image.knobs.counters()["total"] < len(ACCOUNTS) // 10 // 2


@pytest.mark.subprocess
async def test_second_sigterm_cancels_in_flight_streams_at_once(
    start_server: StartServer, slow_image: Emulator
) -> None:
    server = start_server(*SLOW_SERVER_ARGS, "--grace-period", "60")
    slow_image.knobs.set(latency_ms=300)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stream = _listing(channel)
        await _upstream_reached(slow_image, 1)
        server.signal(signal.SIGTERM)
        await asyncio.to_thread(server.wait_for, "draining", 5)
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _drain(stream)
        assert caught.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        code = await asyncio.to_thread(server.proc.wait, 15)
    assert code == 0
    assert time.monotonic() - started < 5
    assert "forced_stop" in [r.get("event") for r in server.records()]
    assert "Traceback" not in server.log_text
