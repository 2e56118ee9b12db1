"""End to end: cache, single-flight, parallel pages, rate limit, overload.

The app runs in the test's process against the in-process emulator. Each test uploads
its own image, so cache entries never leak between tests, and counts upstream calls with
the emulator's counters. Cache windows (TTL, stale-while-revalidate, stale-if-error,
negative TTL) are crossed by moving a ``ManualClock``, never by sleeping. The retry budget
and the fault cases are in ``test_faults``.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc
import pytest

from imageshare.v1 import image_share_pb2
from imageshare_emulator import Emulator
from tests.support.clock import FastClock, ManualClock
from tests.support.faults_common import OK
from tests.support.images import REGION, new_image
from tests.support.inprocess import Request, Response, running
from tests.support.rpc import account_ids, details
from tests.support.waiting import until

if TYPE_CHECKING:
    from imageshare.v1.image_share_pb2_grpc import ImageShareServiceAsyncStub

HIT = image_share_pb2.CACHE_STATUS_HIT
MISS = image_share_pb2.CACHE_STATUS_MISS
STALE = image_share_pb2.CACHE_STATUS_STALE
BYPASS = image_share_pb2.CACHE_STATUS_BYPASS
COALESCED = image_share_pb2.CACHE_STATUS_COALESCED
CACHED = ("--cache-ttl", "60", "--cache-negative-ttl", "60")


async def list_on(
    stub: ImageShareServiceAsyncStub, image_id: str, deadline: float | None = 20.0
) -> list[Response]:
    call = stub.ListImageShares(Request(region_id=REGION, image_id=image_id), timeout=deadline)
    return [m async for m in call]


async def test_second_call_is_a_hit_without_upstream_calls(ecs: Emulator) -> None:
    clock = ManualClock()
    image_id, ids = new_image(ecs.knobs, 150)
    async with running(ecs, *CACHED, clock=clock) as app:
        first = await app.list(region_id=REGION, image_id=image_id)
        assert {m.cache_status for m in first} == {MISS}
        assert app.upstream_calls(image_id) == 2
        clock.advance(2.5)
        call = app.stub().ListImageShares(Request(region_id=REGION, image_id=image_id))
        second = [m async for m in call]
        trailing = dict(await call.trailing_metadata())
        assert account_ids(second) == ids
        assert {m.cache_status for m in second} == {HIT}
        assert trailing["x-imageshare-cache"] == "hit"
        # The entry's age on the app's clock, in the trailers and on every message.
        assert trailing["x-imageshare-cache-age-ms"] == "2500"
        assert all(m.HasField("cache_age") for m in second)
        assert {m.cache_age.ToMilliseconds() for m in second} == {2500}
        assert second[0].read_time == first[0].read_time
        assert app.upstream_calls(image_id) == 2
        # Another page size is built from the same entry, still without upstream calls.
        third = await app.list(region_id=REGION, image_id=image_id, page_size=7)
        assert account_ids(third) == ids
        assert len(third) == 22
        assert app.upstream_calls(image_id) == 2


async def test_owner_account_is_part_of_the_cache_key(ecs: Emulator) -> None:
    image_id, _ = new_image(ecs.knobs, 3)
    async with running(ecs, *CACHED) as app:
        await app.list(region_id=REGION, image_id=image_id)
        other = await app.list(region_id=REGION, image_id=image_id, owner_account="ops@example")
        assert {m.cache_status for m in other} == {MISS}
        assert app.upstream_calls(image_id) == 2


async def test_bypass_cache_reads_upstream_and_refreshes_the_entry(ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 5)
    async with running(ecs, *CACHED) as app:
        await app.list(region_id=REGION, image_id=image_id)
        ecs.knobs.change_after(REGION, image_id, 0, [{"aliyun_id": "777"}])
        assert account_ids(await app.list(region_id=REGION, image_id=image_id)) == ids
        fresh = await app.list(region_id=REGION, image_id=image_id, bypass_cache=True)
        assert account_ids(fresh) == ["777"]
        assert fresh[0].cache_status == BYPASS
        after = await app.list(region_id=REGION, image_id=image_id)
        assert account_ids(after) == ["777"]
        assert after[0].cache_status == HIT
        assert app.upstream_calls(image_id) == 2


async def test_not_found_is_cached_for_the_negative_ttl(ecs: Emulator) -> None:
    clock = ManualClock()
    missing = "m-negative0001"
    async with running(ecs, *CACHED, clock=clock) as app:
        for _ in range(3):
            error = await app.error(region_id=REGION, image_id=missing)
            assert error.code is grpc.StatusCode.NOT_FOUND
            assert error.error_info is not None
            assert error.error_info.reason == "INVALID_IMAGE_ID_NOT_FOUND"
        assert app.upstream_calls(missing) == 1
        clock.advance(59.9)  # still within the negative TTL of 60 s
        assert (await app.error(region_id=REGION, image_id=missing)).code is (
            grpc.StatusCode.NOT_FOUND
        )
        assert app.upstream_calls(missing) == 1
        clock.advance(0.2)  # past it: the upstream is asked again
        assert (await app.error(region_id=REGION, image_id=missing)).code is (
            grpc.StatusCode.NOT_FOUND
        )
        assert app.upstream_calls(missing) == 2
        assert app.metric("imageshare_cache_requests_total", result="negative_hit") == 3


async def test_stale_while_revalidate_serves_stale_and_refreshes_once(ecs: Emulator) -> None:
    clock = ManualClock()
    image_id, ids = new_image(ecs.knobs, 3)
    async with running(
        ecs, "--cache-ttl", "10", "--cache-stale-while-revalidate", "60", clock=clock
    ) as app:
        await app.list(region_id=REGION, image_id=image_id)
        ecs.knobs.change_after(REGION, image_id, 0, [{"aliyun_id": "888"}])
        clock.advance(10.5)  # past the TTL, within the revalidate window
        stale = await app.list(region_id=REGION, image_id=image_id)
        assert account_ids(stale) == ids
        assert stale[0].cache_status == STALE
        assert stale[0].cache_age.ToMilliseconds() == 10_500
        # One background refresh, and the next call is served fresh from the cache.
        await until(lambda: app.runtime.source.flights == 0 and app.upstream_calls(image_id) == 2)
        refreshed = await app.list(region_id=REGION, image_id=image_id)
        assert refreshed[0].cache_status == HIT
        assert account_ids(refreshed) == ["888"]
        assert app.upstream_calls(image_id) == 2
        assert app.metric("imageshare_cache_stale_served_total", reason="revalidating") == 1


async def test_stale_if_error_serves_the_last_good_list_when_upstream_is_down(
    ecs: Emulator,
) -> None:
    # FastClock is a ManualClock whose sleeps (the failing reads' back-offs) take no real time.
    clock = FastClock()
    image_id, ids = new_image(ecs.knobs, 120)
    async with running(
        ecs,
        "--cache-ttl", "10",
        "--cache-stale-while-revalidate", "0",
        "--cache-stale-if-error", "600",
        clock=clock,
    ) as app:  # fmt: skip
        await app.list(region_id=REGION, image_id=image_id)
        clock.advance(11)  # past the TTL and the (zero) revalidate window
        ecs.knobs.set(down=True)
        stubs = [app.stub() for _ in range(10)]
        results = await asyncio.gather(*(list_on(stub, image_id) for stub in stubs))
        for stale in results:
            assert account_ids(stale) == ids
            assert {m.cache_status for m in stale} == {STALE}
        assert app.metric("imageshare_cache_stale_served_total", reason="upstream_error") == 10
        # Without a cached list the same outage is UNAVAILABLE.
        other, _ = new_image(ecs.knobs, 1)
        error = await app.error(region_id=REGION, image_id=other)
        assert error.code is grpc.StatusCode.UNAVAILABLE
        ecs.knobs.set(down=False)
        fresh = await app.list(region_id=REGION, image_id=image_id)
        assert account_ids(fresh) == ids
        assert fresh[0].cache_status == MISS


async def test_200_identical_cold_callers_make_one_upstream_call_per_page(ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 250)
    ecs.knobs.set(latency_ms=300)
    async with running(ecs, "--cache-ttl", "60") as app:
        stub = app.stub()
        results = await asyncio.gather(*(list_on(stub, image_id) for _ in range(200)))
        assert all(account_ids(r) == ids for r in results)
        pages = [p for p in ecs.knobs.counters()["calls_by_page"] if p["image_id"] == image_id]
        assert sorted((p["page_number"], p["count"]) for p in pages) == [(1, 1), (2, 1), (3, 1)]
        statuses = [r[0].cache_status for r in results]
        assert statuses.count(MISS) == 1
        assert set(statuses) <= {MISS, COALESCED, HIT}


async def test_a_cancelling_caller_does_not_cancel_the_shared_read(ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 150)
    ecs.knobs.set(latency_ms=400)
    async with running(ecs, "--cache-ttl", "0") as app:
        stub = app.stub()
        quitter = stub.ListImageShares(Request(region_id=REGION, image_id=image_id))
        stayer = asyncio.create_task(list_on(stub, image_id))
        # Both follow the one read, which is under way upstream.
        await until(lambda: app.runtime.service.active == 2 and app.upstream_calls(image_id) >= 1)
        assert app.runtime.source.flights == 1
        quitter.cancel()
        result = await stayer
        assert account_ids(result) == ids
        assert {m.cache_status for m in result} <= {MISS, COALESCED}
        assert app.upstream_calls(image_id) == 2
        await until(lambda: len(app.logs.rpc_lines()) == 2)
        assert sorted(line["code"] for line in app.logs.rpc_lines()) == ["Canceled", "OK"]


async def test_pages_beyond_the_burst_are_read_a_bounded_number_at_a_time(ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 1000)
    ecs.knobs.set(latency_ms=100)
    async with running(
        ecs, "--cache-ttl", "0", "--upstream-parallel-pages", "4", "--upstream-burst", "5"
    ) as app:
        assert account_ids(await app.list(region_id=REGION, image_id=image_id)) == ids
        counters = ecs.knobs.counters()
        # 10 pages, 9 after page 1: more than the burst, so at most 4 at a time.
        assert app.upstream_calls(image_id) == 10
        assert 1 < counters["max_in_flight"] <= 4


async def test_pages_that_fit_in_the_burst_are_read_in_one_wave(ecs: Emulator) -> None:
    """Default settings: a 2,000-account list is page 1, then the other 19 pages at once."""
    image_id, ids = new_image(ecs.knobs, 2000)
    ecs.knobs.set(latency_ms=500)  # every page call overlaps the others, even on a busy CPU
    async with running(ecs, "--cache-ttl", "0") as app:
        assert account_ids(await app.list(region_id=REGION, image_id=image_id)) == ids
        assert app.upstream_calls(image_id) == 20
        assert ecs.knobs.counters()["max_in_flight"] == 19


async def test_upstream_rate_limit_refuses_what_cannot_be_served_before_the_deadline(
    ecs: Emulator,
) -> None:
    """On the real clock: the subject is how many calls fit in one real second."""
    images = [new_image(ecs.knobs, 1)[0] for _ in range(12)]
    async with running(
        ecs, "--cache-ttl", "0", "--upstream-qps", "4", "--upstream-burst", "1"
    ) as app:
        stub = app.stub()

        async def one(image_id: str) -> grpc.StatusCode:
            try:
                await list_on(stub, image_id, deadline=1.0)
            except grpc.aio.AioRpcError as exc:
                info = details(exc)
                assert info.error_info is not None
                assert info.error_info.reason == "UPSTREAM_RATE_LIMITED"
                assert info.retry_info is not None
                return exc.code()
            return OK

        codes = await asyncio.gather(*(one(i) for i in images))
        ok = codes.count(OK)
        # 4 per second with no burst: within a 1 s deadline about 4 or 5 slots exist.
        assert 3 <= ok <= 6
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(images) - ok
        assert app.upstream_calls() == ok


async def test_calls_beyond_the_concurrency_limit_are_refused_at_once(ecs: Emulator) -> None:
    image_id, _ = new_image(ecs.knobs, 1)
    ecs.knobs.set(latency_ms=500)  # every page call overlaps the others, even on a busy CPU
    async with running(ecs, "--cache-ttl", "0", "--max-concurrent-rpcs", "2") as app:
        stub = app.stub()
        busy = [asyncio.create_task(list_on(stub, image_id)) for _ in range(2)]
        await until(lambda: app.runtime.service.active == 2)
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await list_on(stub, image_id)
        # Refused, not queued behind the busy calls: they are still waiting for the upstream.
        assert time.monotonic() - started < 1.0
        assert not any(task.done() for task in busy)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        info = details(refused.value)
        assert info.error_info is not None
        assert info.error_info.reason == "TOO_MANY_CONCURRENT_CALLS"
        assert info.retry_info is not None
        for messages in await asyncio.gather(*busy):
            assert len(messages[0].accounts) == 1


async def test_upstream_page_size_falls_back_when_rejected(ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 120)
    ecs.knobs.fault(
        "error_code",
        count=1,
        code="InvalidParameter",
        status=400,
        message="The specified parameter PageSize is not valid.",
    )
    async with running(ecs, "--cache-ttl", "0") as app:
        assert account_ids(await app.list(region_id=REGION, image_id=image_id)) == ids

        def calls_by_size() -> dict[int, int]:
            by_size: dict[int, int] = {}
            for p in ecs.knobs.counters()["calls_by_page"]:
                if p["image_id"] == image_id:
                    by_size[p["page_size"]] = by_size.get(p["page_size"], 0) + p["count"]
            return by_size

        # PageSize 100 refused once; the list read again in pages of 50.
        assert calls_by_size() == {100: 1, 50: 3}
        # Later reads start with the page size that worked.
        assert account_ids(await app.list(region_id=REGION, image_id=image_id)) == ids
        assert calls_by_size() == {100: 1, 50: 6}
