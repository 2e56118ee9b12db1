"""The in-process cache: sizes measured, not guessed, and entries that go when they expire."""

from __future__ import annotations

import gc
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from imageshare.v1 import image_share_pb2
from imageshare_emulator import Emulator
from imageshare_server.cache import MAX_MESSAGE_VARIANTS, CachePolicy, Freshness, ShareCache
from imageshare_server.core.errors import UpstreamApiError, UpstreamErrorData
from imageshare_server.core.types import ShareKey, ShareList, ShareQuery
from imageshare_server.grpcapi.messages import build_cached_messages
from imageshare_server.upstream.client import parse_page
from tests.support.clock import ManualClock
from tests.support.images import new_image
from tests.support.inprocess import running

REGION = "cn-hangzhou"


def parsed_list(key: ShareKey, accounts: int, *, times: bool, clock: ManualClock) -> ShareList:
    """A list built the way the service builds one: parsed from an upstream body."""
    body = json.dumps(
        {
            "RequestId": "4F0C8D3B-7F4E-4B3A-9A2E-1C5D6E7F8A9B",
            "TotalCount": accounts,
            "PageNumber": 1,
            "PageSize": 100,
            "ShareGroups": {"ShareGroup": [{"Group": "all"}]},
            "Accounts": {
                "Account": [
                    {
                        "AliyunId": str(1_500_000_000_000_000 + 7919 * i),
                        **({"SharedTime": "2025-01-01T00:00:00Z"} if times else {}),
                    }
                    for i in range(accounts)
                ]
            },
        }
    )
    page = parse_page(json.loads(body))
    return ShareList(
        key=key,
        accounts=page.accounts,
        share_groups=page.share_groups,
        request_ids=(page.request_id,),
        read_time=clock.time(),
        read_monotonic=clock.monotonic(),
    )


def measured(build: Callable[[], Any]) -> tuple[Any, int]:
    """What ``build`` returns, and the bytes it left allocated (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        value = build()
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    return value, grown


@pytest.mark.parametrize(
    ("accounts", "times", "page_sizes"),
    [
        (0, False, ()),
        (1, True, ()),
        (137, True, (50,)),
        (137, False, (1, 100)),
        (20_000, True, (50,)),
    ],
)
def test_accounted_size_of_an_entry_is_within_2x_of_its_real_size(
    accounts: int, times: bool, page_sizes: tuple[int, ...]
) -> None:
    clock = ManualClock()
    cache = ShareCache(CachePolicy(max_bytes=10**10), clock=clock)
    # Small entries are measured twenty at a time: tracemalloc also sees what other
    # threads of the test session allocate meanwhile, a few KiB that would swamp one.
    keys = [
        ShareKey(REGION, f"m-size{accounts}x{len(page_sizes)}n{n}")
        for n in range(1 if accounts > 1000 else 20)
    ]

    def fill(cache: ShareCache, keys: list[ShareKey]) -> None:
        for key in keys:
            entry = cache.put(parsed_list(key, accounts, times=times, clock=clock))
            assert entry is not None
            for size in page_sizes:
                query = ShareQuery(key, size, bypass_cache=False)
                cache.messages(entry, size, build_cached_messages(entry, query))

    # The same path once on a cache of its own first: what the interpreter allocates on
    # first use (type caches, interned strings) is not the entries'.
    fill(ShareCache(CachePolicy(max_bytes=10**10), clock=clock), [ShareKey(REGION, "m-warm")])
    _, real = measured(lambda: fill(cache, keys))
    assert real / 2 <= cache.total_bytes <= real * 2, (cache.total_bytes, real)


def test_negative_entries_keep_only_the_error_data_and_are_accounted_within_2x() -> None:
    clock = ManualClock()
    cache = ShareCache(CachePolicy(max_bytes=10**10), clock=clock)

    def fill() -> None:
        for i in range(1000):
            try:  # an error with a traceback, as the service meets it
                raise UpstreamApiError(
                    "InvalidImageId.NotFound",
                    "The specified ImageId does not exist.",
                    http_status=404,
                    request_id=f"5A9E6F2B-0C1D-4E3F-8A7B-{i:012d}",
                )
            except UpstreamApiError as exc:
                cache.put_negative(ShareKey(REGION, f"m-made-up{i:06d}"), exc.data())

    _, real = measured(fill)
    assert real / 2 <= cache.total_bytes <= real * 2, (cache.total_bytes, real)
    entry = cache.get(ShareKey(REGION, "m-made-up000007"))
    assert entry is not None
    assert type(entry.error) is UpstreamErrorData


def test_made_up_ids_cannot_grow_the_cache_past_its_bound() -> None:
    clock = ManualClock()
    cache = ShareCache(CachePolicy(max_bytes=1024 * 1024), clock=clock)
    error = UpstreamErrorData("InvalidImageId.NotFound", "gone", 404, "R")

    def fill() -> None:
        for i in range(10_000):
            cache.put_negative(ShareKey(REGION, f"m-made-up{i:06d}"), error)

    _, real = measured(fill)
    assert cache.total_bytes <= 1024 * 1024
    assert real <= 2 * 1024 * 1024


def test_expired_entries_are_swept_without_being_asked_for() -> None:
    clock = ManualClock()
    cache = ShareCache(CachePolicy(negative_ttl=5, ttl=60, stale_if_error=600), clock=clock)
    error = UpstreamErrorData("InvalidImageId.NotFound", "gone", 404, "R")
    for i in range(100):
        cache.put_negative(ShareKey(REGION, f"m-gone{i}"), error)
    cache.put(parsed_list(ShareKey(REGION, "m-kept"), 3, times=False, clock=clock))
    assert len(cache) == 101
    clock.advance(30)  # negatives expired, the list still fresh-ish; one sweep interval later:
    cache.get(ShareKey(REGION, "m-other"))
    assert len(cache) == 1
    assert cache.total_bytes == cache.get(ShareKey(REGION, "m-kept")).size  # type: ignore[union-attr]


def test_message_variants_per_entry_are_bounded_and_accounted() -> None:
    clock = ManualClock()
    cache = ShareCache(CachePolicy(), clock=clock)
    key = ShareKey(REGION, "m-variants")
    entry = cache.put(parsed_list(key, 500, times=True, clock=clock))
    assert entry is not None
    base = cache.total_bytes
    for size in range(1, 101):
        cache.messages(entry, size, build_cached_messages(entry, ShareQuery(key, size, False)))
    assert len(entry.messages) == MAX_MESSAGE_VARIANTS
    assert cache.total_bytes == entry.size
    assert cache.total_bytes < base * 2 * (1 + MAX_MESSAGE_VARIANTS)


def test_an_error_never_replaces_a_list_that_is_still_served() -> None:
    clock = ManualClock()
    cache = ShareCache(
        CachePolicy(ttl=10, stale_while_revalidate=10, stale_if_error=600), clock=clock
    )
    key = ShareKey(REGION, "m-kept")
    cache.put(parsed_list(key, 3, times=False, clock=clock))
    gone = UpstreamErrorData("InvalidImageId.NotFound", "gone", 404, "R")
    assert cache.put_negative(key, gone) is None
    clock.advance(15)  # stale, revalidating: still served
    assert cache.put_negative(key, gone) is None
    clock.advance(10)  # kept only for stale-if-error: a NotFound now wins
    entry = cache.put_negative(key, gone)
    assert entry is not None
    assert entry.negative
    assert cache.freshness(entry) is Freshness.FRESH


def test_an_older_read_never_replaces_a_newer_list() -> None:
    clock = ManualClock()
    cache = ShareCache(CachePolicy(), clock=clock)
    key = ShareKey(REGION, "m-order")
    older = parsed_list(key, 1, times=False, clock=clock)
    clock.advance(1)
    newer = parsed_list(key, 2, times=False, clock=clock)
    cache.put(newer)
    cache.put(older)
    entry = cache.get(key)
    assert entry is not None
    assert entry.shares is newer


async def test_a_rejected_access_key_on_a_bypass_read_keeps_the_good_list(ecs: Emulator) -> None:
    """Key rotation: one bypass_cache read is refused with InvalidAccessKeyId.NotFound.

    Only an image that does not exist is cached as negative; a credentials error is the
    service's own fault and must not replace a good list for everyone.
    """
    image, ids = new_image(ecs.knobs, 3)
    async with running(ecs, "--cache-ttl", "60", "--cache-negative-ttl", "60") as app:
        first = await app.list(region_id=REGION, image_id=image)
        assert first[0].cache_status == image_share_pb2.CACHE_STATUS_MISS
        rejected = {
            "RequestId": "R-1",
            "Code": "InvalidAccessKeyId.NotFound",
            "Message": "Specified access key is not found.",
        }
        ecs.knobs.fault("raw", count=1, status=404, body=json.dumps(rejected))
        error = await app.error(region_id=REGION, image_id=image, bypass_cache=True)
        assert error.code is grpc.StatusCode.INTERNAL
        for _ in range(3):
            again = await app.list(region_id=REGION, image_id=image)
            assert again[0].cache_status == image_share_pb2.CACHE_STATUS_HIT
            assert [a.aliyun_id for a in again[0].accounts] == ids
        assert app.metric("imageshare_cache_requests_total", result="negative_hit") == 0
        assert app.metric("imageshare_cache_requests_total", result="hit") == 3
        assert app.upstream_calls(image) == 2


async def test_an_image_that_does_not_exist_is_cached_as_negative_and_counted_apart(
    ecs: Emulator,
) -> None:
    async with running(ecs, "--cache-negative-ttl", "60") as app:
        for _ in range(3):
            error = await app.error(region_id=REGION, image_id="m-doesnotexist1")
            assert error.code is grpc.StatusCode.NOT_FOUND
        assert app.upstream_calls("m-doesnotexist1") == 1
        assert app.metric("imageshare_cache_requests_total", result="negative_hit") == 2
        assert app.metric("imageshare_cache_requests_total", result="hit") == 0
