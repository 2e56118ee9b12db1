"""Graceful shutdown of the real server process under load.

Streams are kept in flight by the emulator's latency knob: 500 accounts read
10 per upstream page, one page at a time, at 100 ms a page take five seconds,
so SIGTERM always lands mid-listing. Progress is observed (upstream calls
counted by the emulator, ``draining`` logged, health watch updated), never
slept for. Watches (WatchImageShares) end at once with UNAVAILABLE while the
listings drain.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from tests.support.processes import ServerProcess
from tests.support.rpc import details

StartServer = Callable[..., ServerProcess]
REGION = "cn-hangzhou"
SLOW = "m-slowdrain01"
ACCOUNTS = [str(700_000_000 + i) for i in range(500)]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
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
def slow_image(emulator: EmulatorAdmin) -> EmulatorAdmin:
    emulator.upsert_image(
        {"region_id": REGION, "image_id": SLOW, "accounts": [{"aliyun_id": a} for a in ACCOUNTS]}
    )
    emulator.set(latency_ms=100)
    return emulator


def _listing(channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamCall[Any, Any]:
    stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
    request = image_share_pb2.ListImageSharesRequest(
        region_id=REGION, image_id=SLOW, page_size=10, bypass_cache=True
    )
    call: grpc.aio.UnaryStreamCall[Any, Any] = stub.ListImageShares(request, timeout=60)
    return call


def _health(channel: grpc.aio.Channel) -> Any:
    """The health stub (grpcio-health-checking's stubs declare none of its methods)."""
    return cast(Any, health_pb2_grpc.HealthStub(channel))


async def _drain(call: grpc.aio.UnaryStreamCall[Any, Any]) -> list[str]:
    ids: list[str] = []
    while (message := await call.read()) is not grpc.aio.EOF:
        assert isinstance(message, image_share_pb2.ListImageSharesResponse)
        ids.extend(a.aliyun_id for a in message.accounts)
    return ids


async def _upstream_reached(emulator: EmulatorAdmin, calls: int) -> None:
    """Probe the emulator's counters until the server's paging is under way."""
    deadline = time.monotonic() + 15
    while (await asyncio.to_thread(emulator.counters))["total"] < calls:
        assert time.monotonic() < deadline, "the listing never reached the upstream"
        await asyncio.sleep(0.02)  # probe interval, not synchronisation


async def _exit_code(server: ServerProcess, limit: float) -> tuple[int, float]:
    started = time.monotonic()
    code = await asyncio.to_thread(server.proc.wait, limit)
    return code, time.monotonic() - started


async def _refused_once_draining(target: str) -> grpc.StatusCode:
    """Probe new connections until the listener has closed; until then, Check says NOT_SERVING.

    ``draining`` is logged just before the listener closes, so a probe or two may still get in.
    """
    for _ in range(200):
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                response = await _health(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            assert response.status == NOT_SERVING
    raise AssertionError("the listener kept accepting new connections while draining")


async def _new_call_code(target: str) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            await _drain(_listing(channel))
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def test_sigterm_drains_in_flight_streams_and_exits_zero(
    start_server: StartServer, slow_image: EmulatorAdmin
) -> None:
    server = start_server(*SLOW_SERVER_ARGS, "--grace-period", "30")
    async with grpc.aio.insecure_channel(server.target) as channel:
        watch = _health(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        watches = [
            stub.WatchImageShares(
                image_share_pb2.WatchImageSharesRequest(region_id=REGION, image_id="m-demo0000002")
            )
            for _ in range(2)
        ]
        for share_watch in watches:
            snapshot = await asyncio.wait_for(share_watch.read(), 15)
            assert isinstance(snapshot, image_share_pb2.WatchImageSharesResponse)
            assert snapshot.snapshot
            assert snapshot.share_groups[0].group == "all"
        streams = [_listing(channel) for _ in range(3)]
        await _upstream_reached(slow_image, 1 + 3)  # the watches' one read, then the listings'

        server.signal(signal.SIGTERM)
        # Load balancers watching health see NOT_SERVING before anything else changes.
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        watch.cancel()
        # Watches end at once, UNAVAILABLE, so their callers reconnect to another replica...
        for share_watch in watches:
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(share_watch.read(), 2)
            error = details(ended.value)
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


async def test_health_watchers_do_not_hold_the_drain_open(
    start_server: StartServer, emulator: EmulatorAdmin
) -> None:
    """A client-side health watch is an RPC that never ends by itself; it must not make every
    shutdown last the whole grace period."""
    server = start_server("--grace-period", "30")
    async with grpc.aio.insecure_channel(server.target) as channel:
        watch = _health(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == SERVING
        server.signal(signal.SIGTERM)
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        code, took = await _exit_code(server, 30)
    assert code == 0
    assert took < 5, f"shutdown waited {took:.1f}s for an idle health watch"


async def test_grace_period_running_out_cancels_the_rest_cleanly(
    start_server: StartServer, slow_image: EmulatorAdmin
) -> None:
    server = start_server(*SLOW_SERVER_ARGS, "--grace-period", "1")
    slow_image.set(latency_ms=300)  # 50 pages at 300 ms: far longer than the grace period
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
    assert slow_image.counters()["total"] < len(ACCOUNTS) // 10 // 2


async def test_second_sigterm_cancels_in_flight_streams_at_once(
    start_server: StartServer, slow_image: EmulatorAdmin
) -> None:
    server = start_server(*SLOW_SERVER_ARGS, "--grace-period", "60")
    slow_image.set(latency_ms=300)
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
