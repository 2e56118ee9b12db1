"""Fault matrix: what callers see when the upstream misbehaves, and that the server holds.

Each case injects one fault with the emulator's knobs, asserts the caller-visible
result, then proves the server still answers a plain call correctly. Upstream
attempts are counted twice: by the emulator (calls it answered) and by the
server's own ``imageshare_upstream_requests_total`` (which also counts
connections the emulator refused while down).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from imageshare_emulator.data import demo_accounts
from imageshare_server.core.credentials import Credentials
from imageshare_server.core.deadline import FixedDeadline
from imageshare_server.core.errors import DeadlineExceededError
from imageshare_server.credentials._base import StaticCredentialsProvider
from imageshare_server.upstream.client import EcsClient
from imageshare_server.upstream.endpoints import EndpointResolver
from tests.support.processes import DEMO_ENV, EmulatorProcess, ServerProcess
from tests.support.rpc import details, list_error

StartServer = Callable[..., ServerProcess]
REGION = "cn-hangzhou"
BIG = "m-demo0000001"
DEMO_IDS = [a.aliyun_id for a in demo_accounts()]
OK = grpc.StatusCode.OK


def upstream_attempts(server: ServerProcess) -> int:
    """Upstream attempts the server made, whatever their outcome."""
    text = httpx.get(server.metrics_url, timeout=5).text
    return int(
        sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "imageshare_upstream_requests"
            for sample in family.samples
            if sample.name == "imageshare_upstream_requests_total"
        )
    )


async def call(
    target: str, image_id: str = BIG, deadline: float = 20.0
) -> tuple[grpc.StatusCode, list[str], float]:
    """One listing: its status, the accounts it streamed, and how long it took."""
    started = time.monotonic()
    ids: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        request = image_share_pb2.ListImageSharesRequest(region_id=REGION, image_id=image_id)
        try:
            async for message in stub.ListImageShares(request, timeout=deadline):
                ids.extend(a.aliyun_id for a in message.accounts)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), ids, time.monotonic() - started
    return OK, ids, time.monotonic() - started


async def calls(
    target: str, n: int, concurrency: int = 6, **kwargs: object
) -> list[tuple[grpc.StatusCode, list[str], float]]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> tuple[grpc.StatusCode, list[str], float]:
        async with gate:
            return await call(target, **kwargs)  # type: ignore[arg-type]

    return await asyncio.gather(*(one() for _ in range(n)))


async def assert_healthy(server: ServerProcess, emulator: EmulatorAdmin) -> None:
    emulator.reset()
    code, ids, _ = await call(server.target)
    assert (code, ids) == (OK, DEMO_IDS)


async def test_added_latency_is_passed_through(
    server: ServerProcess, emulator: EmulatorAdmin
) -> None:
    emulator.set(latency_ms=400)
    results = await calls(server.target, 4)
    assert [(code, ids) for code, ids, _ in results] == [(OK, DEMO_IDS)] * 4
    # Two upstream pages, read in parallel after the first: at least two latencies.
    assert all(took >= 0.8 for *_, took in results)
    await assert_healthy(server, emulator)


async def test_latency_spikes_do_not_break_listings(
    server: ServerProcess, emulator: EmulatorAdmin
) -> None:
    emulator.set(latency_ms=150, latency_jitter_ms=150)
    results = await calls(server.target, 12)
    assert [(code, ids) for code, ids, _ in results] == [(OK, DEMO_IDS)] * 12
    await assert_healthy(server, emulator)


async def test_latency_beyond_the_callers_deadline_is_deadline_exceeded(
    server: ServerProcess, emulator: EmulatorAdmin
) -> None:
    emulator.set(latency_ms=2000)
    started = time.monotonic()
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        error = list_error(stub, timeout=0.5, region_id=REGION, image_id=BIG)
    assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED, error
    assert time.monotonic() - started < 1.5
    await assert_healthy(server, emulator)


async def test_throttling_burst_is_absorbed_by_retries(
    server: ServerProcess, emulator: EmulatorAdmin
) -> None:
    # Concurrent callers share one upstream read, so the burst lands on one page's attempts.
    emulator.throttle_next(2)
    results = await calls(server.target, 3, concurrency=3)
    assert [(code, ids) for code, ids, _ in results] == [(OK, DEMO_IDS)] * 3
    assert emulator.counters()["outcomes"]["Throttling.User"] == 2
    await assert_healthy(server, emulator)


async def test_sustained_throttling_is_resource_exhausted_with_retry_info(
    server: ServerProcess, emulator: EmulatorAdmin
) -> None:
    emulator.throttle_next(1000)
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        request = image_share_pb2.ListImageSharesRequest(region_id=REGION, image_id=BIG)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ListImageShares(request, timeout=20))
    error = details(caught.value)
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.retry_info is not None
    assert error.retry_info.retry_delay.ToNanoseconds() > 0
    await assert_healthy(server, emulator)


async def test_random_server_errors_at_30_percent_leave_95_percent_of_calls_whole(
    start_server: StartServer, emulator: EmulatorAdmin
) -> None:
    """The issue's target, with the server's defaults. Callers go one at a time so that every
    call is its own upstream read (concurrent ones would share reads and their fate)."""
    server = start_server("--cache-ttl", "0")
    # Seeded: the same 30% of upstream answers fail on every run, so the test replays one
    # sample instead of being a coin toss. (Simulated over 4,000 runs of 100 listings with
    # the default budget, 95% or more succeed in 99% of them.)
    emulator.set(error_rate=0.3, seed=7)
    results = await calls(server.target, 100, concurrency=1)
    codes = Counter(code for code, _, _ in results)
    succeeded = [ids for code, ids, _ in results if code is OK]
    assert len(succeeded) >= 95, codes
    assert all(ids == DEMO_IDS for ids in succeeded)
    assert set(codes) <= {OK, grpc.StatusCode.UNAVAILABLE}, codes
    await assert_healthy(server, emulator)


@pytest.mark.parametrize("mode", ["reset", "truncated", "malformed"])
async def test_one_broken_answer_is_retried_away(
    server: ServerProcess, emulator: EmulatorAdmin, mode: str
) -> None:
    emulator.fault(mode, count=1)
    code, ids, _ = await call(server.target)
    assert (code, ids) == (OK, DEMO_IDS)
    assert emulator.counters()["outcomes"][f"fault:{mode}"] == 1
    await assert_healthy(server, emulator)


@pytest.mark.parametrize("mode", ["reset", "truncated", "malformed"])
async def test_persistently_broken_answers_are_unavailable(
    server: ServerProcess, emulator: EmulatorAdmin, mode: str
) -> None:
    emulator.fault(mode, count=100)
    code, _, took = await call(server.target)
    assert code is grpc.StatusCode.UNAVAILABLE
    assert took < 5
    await assert_healthy(server, emulator)


async def test_slow_body_within_the_deadline_is_read_whole(
    server: ServerProcess, emulator: EmulatorAdmin
) -> None:
    emulator.fault("slow_body", count=2, interval_ms=100)
    code, ids, _ = await call(server.target)
    assert (code, ids) == (OK, DEMO_IDS)
    await assert_healthy(server, emulator)


async def test_upstream_timeout_cut_short_by_the_deadline_is_the_deadline(
    emulator: EmulatorAdmin, emulator_process: EmulatorProcess
) -> None:
    """Not an upstream timeout: no retry, and never UNAVAILABLE racing the caller's deadline."""
    emulator.set(latency_ms=2000)
    credentials = Credentials(
        DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_ID"], DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]
    )
    async with httpx.AsyncClient() as http:
        client = EcsClient(
            http,
            StaticCredentialsProvider(credentials),
            EndpointResolver(emulator_process.url, vpc=False),
        )
        with pytest.raises(DeadlineExceededError, match="during the upstream call"):
            await client.describe_image_share_permission(
                REGION,
                BIG,
                page_number=1,
                page_size=10,
                deadline=FixedDeadline(time.monotonic() + 0.3),
            )


async def test_slow_body_beyond_the_deadline_is_deadline_exceeded(
    server: ServerProcess, emulator: EmulatorAdmin
) -> None:
    emulator.fault("slow_body", count=2, interval_ms=2000)
    code, _, took = await call(server.target, deadline=1.0)
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 2.5
    await assert_healthy(server, emulator)


async def test_full_outage_fails_fast_without_amplification_and_recovers_calmly(
    start_server: StartServer, emulator: EmulatorAdmin
) -> None:
    server = start_server("--cache-ttl", "0")
    # A healthy period first, so whatever retry allowance it earns is there to be spent.
    healthy = await calls(server.target, 20, concurrency=1)
    assert {code for code, _, _ in healthy} == {OK}
    before = upstream_attempts(server)

    emulator.set(down=True)
    results = await calls(server.target, 60)
    assert {code for code, _, _ in results} == {grpc.StatusCode.UNAVAILABLE}
    assert max(took for *_, took in results) < 3
    during = upstream_attempts(server) - before
    # Each listing's first page fails: one attempt per request plus a bounded few retries.
    assert during <= 1.5 * 60, during

    emulator.set(down=False)
    emulator.reset()
    results = await calls(server.target, 30)
    assert [(code, ids) for code, ids, _ in results] == [(OK, DEMO_IDS)] * 30
    # At most two pages per listing (concurrent ones share reads): no backlog of retries
    # lands on the upstream once it is back.
    assert 2 <= emulator.counters()["total"] <= 2 * 30
    assert set(emulator.counters()["outcomes"]) == {"Success"}


async def test_outage_with_cached_data_serves_stale_lists(
    start_server: StartServer, emulator: EmulatorAdmin
) -> None:
    server = start_server(
        "--cache-ttl", "0.2", "--cache-stale-while-revalidate", "0", "--cache-stale-if-error", "600"
    )
    await assert_healthy(server, emulator)
    fresh_until = time.monotonic() + 0.2
    emulator.set(down=True)
    # Wait out the freshness the test itself configured (the thing under test, not a sync).
    await asyncio.sleep(max(0.0, fresh_until - time.monotonic()) + 0.05)
    results = await calls(server.target, 10)
    assert [(code, ids) for code, ids, _ in results] == [(OK, DEMO_IDS)] * 10
    uncached = await call(server.target, image_id="m-demo0000002")
    assert uncached[0] is grpc.StatusCode.UNAVAILABLE
    emulator.set(down=False)
    await assert_healthy(server, emulator)
