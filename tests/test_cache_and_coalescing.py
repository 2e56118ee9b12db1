"""Issue 3 end to end: cache, single-flight, parallel pages, rate limit, retry budget, overload.

Each test uploads its own image to the emulator so cache entries never leak
between tests, and counts upstream calls with the emulator's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time

import grpc
import pytest

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from tests.support.processes import ServerProcess
from tests.support.rpc import Request, account_ids, details, list_all, list_error

REGION = "cn-hangzhou"
_ids = itertools.count(1)
HIT = image_share_pb2.CACHE_STATUS_HIT
MISS = image_share_pb2.CACHE_STATUS_MISS
STALE = image_share_pb2.CACHE_STATUS_STALE
BYPASS = image_share_pb2.CACHE_STATUS_BYPASS
COALESCED = image_share_pb2.CACHE_STATUS_COALESCED


def new_image(emulator: EmulatorAdmin, accounts: int, prefix: str = "1") -> tuple[str, list[str]]:
    image_id = f"m-cache{next(_ids):06d}{int(time.time() * 1000) % 100000}"
    ids = [f"{prefix}{i:015d}" for i in range(accounts)]
    emulator.upsert_image(
        {"region_id": REGION, "image_id": image_id, "accounts": [{"aliyun_id": i} for i in ids]}
    )
    return image_id, ids


def calls(emulator: EmulatorAdmin, image_id: str | None = None) -> int:
    counters = emulator.counters()
    if image_id is None:
        return int(counters["calls_by_action"].get("DescribeImageSharePermission", 0))
    return sum(p["count"] for p in counters["calls_by_page"] if p["image_id"] == image_id)


def wait_until(predicate, timeout: float = 10.0) -> None:
    """Poll a condition the test cannot be notified of (an emulator counter)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def cached(emulator_process):
    process = ServerProcess(
        "--cache-ttl",
        "60",
        "--cache-negative-ttl",
        "60",
        upstream=emulator_process.url,
    )
    yield process
    process.stop()


@pytest.fixture
def cached_stub(cached):
    with grpc.insecure_channel(cached.target) as channel:
        yield image_share_pb2_grpc.ImageShareServiceStub(channel)


def test_second_call_is_a_hit_without_upstream_calls(cached_stub, emulator):
    image_id, ids = new_image(emulator, 150)
    first = list_all(cached_stub, region_id=REGION, image_id=image_id)
    assert {m.cache_status for m in first} == {MISS}
    assert calls(emulator, image_id) == 2
    responses = cached_stub.ListImageShares(Request(region_id=REGION, image_id=image_id))
    second = list(responses)
    trailing = dict(responses.trailing_metadata())
    assert account_ids(second) == ids
    assert {m.cache_status for m in second} == {HIT}
    assert trailing["x-imageshare-cache"] == "hit"
    assert int(trailing["x-imageshare-cache-age-ms"]) >= 0
    assert all(m.HasField("cache_age") for m in second)
    assert second[0].read_time == first[0].read_time
    assert calls(emulator, image_id) == 2
    # Another page size is built from the same entry, still without upstream calls.
    third = list_all(cached_stub, region_id=REGION, image_id=image_id, page_size=7)
    assert account_ids(third) == ids
    assert len(third) == 22
    assert calls(emulator, image_id) == 2


def test_owner_account_is_part_of_the_cache_key(cached_stub, emulator):
    image_id, _ = new_image(emulator, 3)
    list_all(cached_stub, region_id=REGION, image_id=image_id)
    other = list_all(cached_stub, region_id=REGION, image_id=image_id, owner_account="ops@example")
    assert {m.cache_status for m in other} == {MISS}
    assert calls(emulator, image_id) == 2


def test_bypass_cache_reads_upstream_and_refreshes_the_entry(cached_stub, emulator):
    image_id, ids = new_image(emulator, 5)
    list_all(cached_stub, region_id=REGION, image_id=image_id)
    emulator.change_after(REGION, image_id, 0, [{"aliyun_id": "777"}])
    assert account_ids(list_all(cached_stub, region_id=REGION, image_id=image_id)) == ids
    fresh = list_all(cached_stub, region_id=REGION, image_id=image_id, bypass_cache=True)
    assert account_ids(fresh) == ["777"]
    assert fresh[0].cache_status == BYPASS
    after = list_all(cached_stub, region_id=REGION, image_id=image_id)
    assert account_ids(after) == ["777"]
    assert after[0].cache_status == HIT
    assert calls(emulator, image_id) == 2


def test_not_found_is_cached_briefly(cached_stub, emulator):
    for _ in range(3):
        error = list_error(cached_stub, region_id=REGION, image_id="m-negative0001")
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert error.error_info is not None
        assert error.error_info.reason == "INVALID_IMAGE_ID_NOT_FOUND"
    assert calls(emulator, "m-negative0001") == 1


def test_stale_while_revalidate_serves_stale_and_refreshes_once(start_server, emulator):
    server: ServerProcess = start_server(
        "--cache-ttl", "0.3", "--cache-stale-while-revalidate", "60"
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        image_id, ids = new_image(emulator, 3)
        list_all(stub, region_id=REGION, image_id=image_id)
        emulator.change_after(REGION, image_id, 0, [{"aliyun_id": "888"}])
        time.sleep(0.35)  # let the entry pass its TTL: the behaviour under test is time-based
        stale = list_all(stub, region_id=REGION, image_id=image_id)
        assert account_ids(stale) == ids
        assert stale[0].cache_status == STALE
        assert stale[0].cache_age.ToMilliseconds() >= 300
        wait_until(lambda: calls(emulator, image_id) == 2)
        # The refresh landed: the next call is served fresh from the cache.
        wait_until(
            lambda: list_all(stub, region_id=REGION, image_id=image_id)[0].cache_status == HIT
        )
        assert account_ids(list_all(stub, region_id=REGION, image_id=image_id)) == ["888"]
        assert calls(emulator, image_id) == 2


def test_stale_if_error_serves_the_last_good_list_when_upstream_is_down(start_server, emulator):
    server: ServerProcess = start_server(
        "--cache-ttl",
        "0.2",
        "--cache-stale-while-revalidate",
        "0",
        "--cache-stale-if-error",
        "600",
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        image_id, ids = new_image(emulator, 120)
        list_all(stub, region_id=REGION, image_id=image_id)
        time.sleep(0.25)  # past the TTL and the (zero) revalidate window
        emulator.set(down=True)
        stale = list_all(stub, region_id=REGION, image_id=image_id)
        assert account_ids(stale) == ids
        assert {m.cache_status for m in stale} == {STALE}
        # Without a cached list the same outage is UNAVAILABLE.
        other, _ = new_image(emulator, 1)
        assert list_error(stub, region_id=REGION, image_id=other).code is (
            grpc.StatusCode.UNAVAILABLE
        )
        emulator.set(down=False)
        fresh = list_all(stub, region_id=REGION, image_id=image_id)
        assert fresh[0].cache_status == MISS


async def _list_async(stub, image_id: str, deadline: float = 20.0):
    call = stub.ListImageShares(Request(region_id=REGION, image_id=image_id), timeout=deadline)
    return [m async for m in call]


async def test_200_identical_cold_callers_make_one_upstream_call_per_page(start_server, emulator):
    server: ServerProcess = start_server("--cache-ttl", "60")
    image_id, ids = new_image(emulator, 250)
    emulator.set(latency_ms=300)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        results = await asyncio.gather(*(_list_async(stub, image_id) for _ in range(200)))
    assert all(account_ids(r) == ids for r in results)
    pages = [p for p in emulator.counters()["calls_by_page"] if p["image_id"] == image_id]
    assert sorted((p["page_number"], p["count"]) for p in pages) == [(1, 1), (2, 1), (3, 1)]
    statuses = [r[0].cache_status for r in results]
    assert statuses.count(MISS) == 1
    assert set(statuses) <= {MISS, COALESCED, HIT}


async def test_a_cancelling_caller_does_not_cancel_the_shared_read(start_server, emulator):
    server: ServerProcess = start_server("--cache-ttl", "0")
    image_id, ids = new_image(emulator, 150)
    emulator.set(latency_ms=400)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        quitter = stub.ListImageShares(Request(region_id=REGION, image_id=image_id))
        stayer = asyncio.ensure_future(_list_async(stub, image_id))
        await asyncio.get_running_loop().run_in_executor(
            None, wait_until, lambda: calls(emulator, image_id) >= 1
        )
        quitter.cancel()
        result = await stayer
    assert account_ids(result) == ids
    assert calls(emulator, image_id) == 2


def test_pages_after_the_first_are_read_in_parallel(start_server, emulator):
    server: ServerProcess = start_server("--cache-ttl", "0", "--upstream-parallel-pages", "4")
    image_id, ids = new_image(emulator, 1000)
    emulator.set(latency_ms=100)
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        assert account_ids(list_all(stub, region_id=REGION, image_id=image_id)) == ids
    counters = emulator.counters()
    # 10 pages; after page 1, at most 4 at a time (the per-listing bound), and more than 1.
    assert calls(emulator, image_id) == 10
    assert 1 < counters["max_in_flight"] <= 4


def test_upstream_rate_limit_refuses_what_cannot_be_served_before_the_deadline(
    start_server, emulator
):
    server: ServerProcess = start_server(
        "--cache-ttl", "0", "--upstream-qps", "4", "--upstream-burst", "1"
    )
    images = [new_image(emulator, 1)[0] for _ in range(12)]

    async def run() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = image_share_pb2_grpc.ImageShareServiceStub(channel)

            async def one(image_id: str) -> grpc.StatusCode:
                try:
                    await _list_async(stub, image_id, deadline=1.0)
                except grpc.aio.AioRpcError as exc:
                    info = details(exc)
                    assert info.error_info is not None
                    assert info.error_info.reason == "UPSTREAM_RATE_LIMITED"
                    assert info.retry_info is not None
                    return exc.code()
                return grpc.StatusCode.OK

            return await asyncio.gather(*(one(i) for i in images))

    codes = asyncio.run(run())
    ok = codes.count(grpc.StatusCode.OK)
    # 4 per second with no burst: within a 1 s deadline about 4 or 5 slots exist.
    assert 3 <= ok <= 6
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == len(images) - ok
    assert calls(emulator) == ok


def test_retry_budget_bounds_upstream_calls_in_a_full_outage(start_server, emulator):
    server: ServerProcess = start_server("--cache-ttl", "0", "--retry-budget-refill", "0")
    emulator.fault("error_code", rate=1.0, code="ServiceUnavailable", status=503)
    requests = 60
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        for _ in range(requests):
            error = list_error(stub, region_id=REGION, image_id="m-demo0000003")
            assert error.code is grpc.StatusCode.UNAVAILABLE
    # Without the budget: 4 attempts each = 240. With it: retries stop once half of the
    # 20 tokens are gone: 3 + 3 + 1 retries for the first three listings, none after.
    assert calls(emulator) == requests + 7


def test_retries_never_reuse_a_nonce(start_server, emulator):
    server: ServerProcess = start_server("--cache-ttl", "0")
    emulator.fault("error_code", rate=0.5, code="InternalError", status=500)
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        for _ in range(10):
            with contextlib.suppress(grpc.RpcError):
                list_all(stub, region_id=REGION, image_id="m-demo0000001")
    nonces = emulator.counters()["nonces"]
    assert len(nonces) > 10
    assert len(set(nonces)) == len(nonces)


async def test_calls_beyond_the_concurrency_limit_are_refused_at_once(start_server, emulator):
    server: ServerProcess = start_server("--cache-ttl", "0", "--max-concurrent-rpcs", "2")
    image_id, _ = new_image(emulator, 1)
    emulator.set(latency_ms=1500)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        busy = [asyncio.ensure_future(_list_async(stub, image_id)) for _ in range(2)]
        await asyncio.get_running_loop().run_in_executor(
            None, wait_until, lambda: emulator.counters()["in_flight"] >= 1
        )
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _list_async(stub, image_id)
        assert time.monotonic() - started < 1.0  # refused, not queued behind the busy calls
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        info = details(refused.value)
        assert info.error_info is not None
        assert info.error_info.reason == "TOO_MANY_CONCURRENT_CALLS"
        await asyncio.gather(*busy)


def test_upstream_page_size_falls_back_when_rejected(start_server, emulator):
    server: ServerProcess = start_server("--cache-ttl", "0")
    image_id, ids = new_image(emulator, 120)
    emulator.fault(
        "error_code",
        count=1,
        code="InvalidParameter",
        status=400,
        message="The specified parameter PageSize is not valid.",
    )
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        assert account_ids(list_all(stub, region_id=REGION, image_id=image_id)) == ids
    sizes = {
        p["page_size"] for p in emulator.counters()["calls_by_page"] if p["image_id"] == image_id
    }
    assert 50 in sizes
