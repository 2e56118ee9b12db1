"""Unit tests for the pure logic under the request path: no sockets needed."""

from __future__ import annotations

import datetime
import time

import pytest
from google.protobuf import timestamp_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from imageshare.v1 import image_share_pb2
from imageshare_server.cache import CachePolicy, Freshness, ShareCache
from imageshare_server.config import parse_settings, split_host_port
from imageshare_server.core.clock import SYSTEM_CLOCK
from imageshare_server.core.errors import (
    InvalidRequestError,
    ListingUnstableError,
    UpstreamApiError,
    UpstreamTransportError,
)
from imageshare_server.core.types import (
    Account,
    CacheStatus,
    ShareKey,
    ShareList,
    SharePage,
    ShareQuery,
)
from imageshare_server.grpcapi import validation
from imageshare_server.grpcapi.messages import (
    PROTO_CACHE_STATUS,
    MessageBuilder,
    account_message,
    build_cached_messages,
    hit_suffix,
)
from imageshare_server.grpcapi.status import aip193_reason
from imageshare_server.listing.flight import Flight, FlightOptions, FlightSpec
from imageshare_server.listing.snapshot import SnapshotChecker
from imageshare_server.listing.source import ShareChunk
from imageshare_server.redaction import redact
from imageshare_server.upstream.endpoints import EndpointResolver, official_host, region_label
from imageshare_server.upstream.retry import RetryBudget, RetryPolicy

KEY = ShareKey("cn-hangzhou", "m-unit0001")
MISS = CacheStatus.MISS


def page(ids: list[str], total: int, number: int = 1, groups: tuple[str, ...] = ()) -> SharePage:
    return SharePage(
        request_id=f"req-{number}",
        page_number=number,
        page_size=100,
        total_count=total,
        accounts=tuple(Account(i) for i in ids),
        share_groups=groups,
    )


# --- endpoints -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("region", "host"),
    [
        ("cn-hangzhou", "ecs-cn-hangzhou.aliyuncs.com"),
        ("cn-wuhan", "ecs.aliyuncs.com"),
        ("eu-central-1", "ecs.eu-central-1.aliyuncs.com"),
    ],
)
def test_official_endpoint_rules(region: str, host: str) -> None:
    assert official_host(region) == host
    endpoint = EndpointResolver().resolve(region)
    assert (endpoint.base_url, endpoint.host) == (f"https://{host}", host)


def test_vpc_endpoint_and_override() -> None:
    assert (
        EndpointResolver(vpc=True).resolve("cn-shanghai").host == "ecs-vpc.cn-shanghai.aliyuncs.com"
    )
    override = EndpointResolver("http://127.0.0.1:8080").resolve("cn-shanghai")
    assert (override.base_url, override.host) == ("http://127.0.0.1:8080", "127.0.0.1:8080")
    with pytest.raises(ValueError, match="http"):
        EndpointResolver("ftp://example.invalid")


def test_region_label_is_bounded() -> None:
    assert region_label("cn-hangzhou") == "cn-hangzhou"
    assert region_label("xx-made-up-9") == "other"


# --- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("InvalidImageId.NotFound", "INVALID_IMAGE_ID_NOT_FOUND"),
        ("Throttling.User", "THROTTLING_USER"),
        ("Forbidden.RAM", "FORBIDDEN_RAM"),
        ("SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH"),
        ("InvalidAccessKeyId.NotFound", "INVALID_ACCESS_KEY_ID_NOT_FOUND"),
        ("HTTP503", "HTTP503"),
    ],
)
def test_aip193_reasons(code: str, reason: str) -> None:
    assert aip193_reason(code) == reason


def test_upstream_errors_classify_retries_and_redact_string_to_sign() -> None:
    assert UpstreamApiError("Throttling.User", "x", http_status=400).retryable
    assert UpstreamApiError("ServiceUnavailable", "x", http_status=503).retryable
    assert not UpstreamApiError("InvalidImageId.NotFound", "x", http_status=404).retryable
    assert UpstreamTransportError("timeout", "ReadTimeout").retryable
    echoed = (
        "Specified signature is not matched. server string to sign is:GET&%2F&AccessKeyId%3DLTAI"
    )
    assert "LTAI" not in redact(echoed)
    error = UpstreamApiError("SignatureDoesNotMatch", echoed, http_status=400)
    assert error.is_credentials
    assert "LTAI" not in str(error)


# --- retries and rate limit ----------------------------------------------------------


def test_backoff_is_capped_jittered_and_honours_retry_after() -> None:
    policy = RetryPolicy(base_delay=0.1, max_delay=1.0)
    transient = UpstreamTransportError("timeout", "x")
    assert all(0 <= policy.delay(n, transient) <= min(1.0, 0.1 * 2 ** (n - 1)) for n in range(1, 8))
    hinted = UpstreamApiError("Throttling", "x", http_status=400, retry_after=0.25)
    assert policy.delay(1, hinted) == 0.25


def test_retry_budget_absorbs_sparse_failures_and_stops_in_an_outage() -> None:
    budget = RetryBudget(max_tokens=10, token_ratio=1.0)
    for _ in range(100):  # 30% failures, interleaved: retries always allowed
        budget.on_failure("r")
        assert budget.allow_retry("r")
        budget.on_success("r")
        budget.on_success("r")
    outage_retries = 0
    for _ in range(100):
        budget.on_failure("r")
        if budget.allow_retry("r"):
            outage_retries += 1
    assert outage_retries == 4  # 10 -> 6 tokens: then half or fewer are left


# --- snapshot rules ------------------------------------------------------------------


def test_snapshot_checker_rejects_changed_totals_overlaps_and_short_pages() -> None:
    checker = SnapshotChecker(page([str(i) for i in range(100)], 150), 100)
    assert checker.pages == 2
    with pytest.raises(ListingUnstableError, match="TotalCount"):
        checker.add(page([str(i) for i in range(100, 151)], 151, 2), 2)
    with pytest.raises(ListingUnstableError, match="repeats"):
        SnapshotChecker(page([str(i) for i in range(100)], 150), 100).add(
            page([str(i) for i in range(99, 149)], 150, 2), 2
        )
    with pytest.raises(ListingUnstableError, match="expected 50"):
        SnapshotChecker(page([str(i) for i in range(100)], 150), 100).add(
            page([str(i) for i in range(100, 140)], 150, 2), 2
        )


class ShiftingClient:
    """Our own upstream client's interface, answering a list that changes on every read."""

    def __init__(self) -> None:
        self.calls = 0

    async def describe_image_share_permission(self, *_: object, **kw: object) -> SharePage:
        self.calls += 1
        number = int(kw["page_number"])  # type: ignore[call-overload]
        ids = [f"{self.calls}-{i}" for i in range(150)]  # new ids every call: overlap-free
        total = 150 + self.calls  # ...but a TotalCount that never holds still
        return page(ids[(number - 1) * 100 : number * 100], total, number)


async def test_a_list_that_never_settles_ends_aborted_after_bounded_rereads() -> None:
    client = ShiftingClient()
    flight = Flight(client, FlightSpec(KEY), FlightOptions(page_size=100, max_attempts=3))
    landed: list[Flight] = []
    flight.start(landed.append)
    with pytest.raises(ListingUnstableError):
        await flight.wait_result()
    assert landed == [flight]
    assert not flight.pages
    assert client.calls == 6  # three reads of two pages, nothing published


# --- cache ---------------------------------------------------------------------------


def shares(key: ShareKey, n: int, read_monotonic: float | None = None) -> ShareList:
    return ShareList(
        key=key,
        accounts=tuple(Account(f"{i:016d}") for i in range(n)),
        share_groups=(),
        request_ids=("r",),
        read_time=time.time(),
        read_monotonic=time.monotonic() if read_monotonic is None else read_monotonic,
    )


def test_cache_windows() -> None:
    cache = ShareCache(CachePolicy(ttl=10, stale_while_revalidate=5, stale_if_error=60))
    entry = cache.put(shares(KEY, 3, read_monotonic=1000.0))
    assert entry is not None
    assert cache.freshness(entry, now=1009) is Freshness.FRESH
    assert cache.freshness(entry, now=1012) is Freshness.STALE
    assert cache.freshness(entry, now=1030) is Freshness.ERROR_ONLY
    assert cache.freshness(entry, now=1071) is Freshness.EXPIRED


def test_cache_evicts_least_recently_used_by_entries_and_bytes() -> None:
    cache = ShareCache(CachePolicy(max_entries=2, max_bytes=10**9))
    keys = [ShareKey("cn-hangzhou", f"m-lru{i}") for i in range(3)]
    cache.put(shares(keys[0], 1))
    cache.put(shares(keys[1], 1))
    assert cache.get(keys[0]) is not None  # 0 is now the most recently used
    cache.put(shares(keys[2], 1))
    assert cache.get(keys[1]) is None
    assert cache.get(keys[0]) is not None
    assert len(cache) == 2
    small = ShareCache(CachePolicy(max_bytes=20_000))
    small.put(shares(keys[0], 100))
    small.put(shares(keys[1], 100))
    assert len(small) == 1
    assert small.total_bytes <= 20_000
    assert ShareCache(CachePolicy(ttl=0)).put(shares(keys[0], 1)) is None  # disabled


# --- messages ------------------------------------------------------------------------


def query(page_size: int) -> ShareQuery:
    return ShareQuery(KEY, page_size, bypass_cache=False)


def test_messages_regroup_pages_and_carry_groups_once() -> None:
    builder = MessageBuilder(query(3))
    chunks = [
        ShareChunk([Account(str(i)) for i in range(4)], ["all"], 6, ["a"], MISS, time.time()),
        ShareChunk([Account(str(i)) for i in range(4, 6)], ["all"], 6, ["b"], MISS, time.time()),
    ]
    out = [m for c in chunks for m in builder.feed(c)] + list(builder.finish())
    assert [len(m.accounts) for m in out] == [3, 3]
    assert [g.group for g in out[0].share_groups] == ["all"]
    assert not out[1].share_groups
    assert list(out[0].upstream_request_ids) == ["a"]
    assert list(out[1].upstream_request_ids) == ["b"]
    assert not out[0].HasField("cache_age")  # a fresh read has no age


def test_cached_hit_bytes_plus_suffix_parse_as_a_whole_message() -> None:
    cache = ShareCache(CachePolicy())
    entry = cache.put(shares(KEY, 7))
    assert entry is not None
    prebuilt = cache.messages(entry, 5, build_cached_messages(entry, query(5)))
    assert cache.messages(entry, 5, build_cached_messages(entry, query(5))) is prebuilt
    suffix = hit_suffix(CacheStatus.HIT, entry.stored, SYSTEM_CLOCK)
    messages = [image_share_pb2.ListImageSharesResponse.FromString(b + suffix) for b in prebuilt]
    assert [len(m.accounts) for m in messages] == [5, 2]
    assert {m.cache_status for m in messages} == {image_share_pb2.CACHE_STATUS_HIT}
    assert all(m.total_count == 7 and m.region_id == "cn-hangzhou" for m in messages)


@pytest.mark.parametrize("status", list(CacheStatus))
@pytest.mark.parametrize(
    "age_ns", [0, 1, 127, 128, 999_999_999, 1_000_000_000, 1_500_000_000, 86_400 * 10**9 + 7]
)
def test_hit_suffix_is_what_protobuf_serializes(status: CacheStatus, age_ns: int) -> None:
    class Clock:
        def monotonic(self) -> float:
            return 100.0 + age_ns / 1e9

    clock = Clock()
    expected = image_share_pb2.ListImageSharesResponse(cache_status=PROTO_CACHE_STATUS[status])
    expected.cache_age.FromNanoseconds(max(0, int((clock.monotonic() - 100.0) * 1e9)))
    assert hit_suffix(status, 100.0, clock) == expected.SerializeToString()  # type: ignore[arg-type]


def test_validation_remembers_valid_queries_only_and_within_its_bound() -> None:
    request = image_share_pb2.ListImageSharesRequest
    good = request(region_id="cn-hangzhou", image_id="m-memo0001", page_size=7)
    assert validation.validate(good) is validation.validate(good)
    assert validation.validate(good).page_size == 7
    with pytest.raises(InvalidRequestError):
        validation.validate(request(region_id="cn-hangzhou", image_id="nope"))
    for i in range(validation._MAX_VALID + 10):
        validation.validate(request(region_id="cn-hangzhou", image_id=f"m-memo{i}"))
    assert len(validation._VALID) <= validation._MAX_VALID


# --- configuration -------------------------------------------------------------------


def test_flags_win_over_environment_and_bad_values_are_named() -> None:
    env = {"IMAGESHARE_CACHE_TTL": "5", "IMAGESHARE_EMULATOR": "yes"}
    settings = parse_settings(["--cache-ttl", "7"], env)
    assert (settings.cache_ttl, settings.emulator) == (7.0, True)
    with pytest.raises(ValueError, match="IMAGESHARE_UPSTREAM_QPS"):
        parse_settings([], {"IMAGESHARE_UPSTREAM_QPS": "fast"})
    with pytest.raises(ValueError, match="upstream_page_size"):
        parse_settings(["--upstream-page-size", "101"], {})
    assert split_host_port(":50051") == ("", 50051)
    assert split_host_port("[::1]:9") == ("::1", 9)


_EARLIEST, _LATEST = datetime.datetime(1, 1, 2), datetime.datetime(9999, 12, 30)


@given(
    when=st.datetimes(_EARLIEST, _LATEST)
    | st.datetimes(_EARLIEST, _LATEST, timezones=st.timezones() | st.just(datetime.UTC))
)
@settings(max_examples=300, deadline=None)
def test_account_time_is_what_protobuf_makes_of_the_datetime(when: datetime.datetime) -> None:
    """The hand-made conversion equals ``Timestamp.FromDatetime``: naive is UTC, aware is
    converted, before 1970 the seconds are negative and the nanos positive."""
    expected = timestamp_pb2.Timestamp()
    expected.FromDatetime(when)
    message = account_message(Account("1234567890123456", when))
    assert message.shared_time == expected
    assert not account_message(Account("1", None)).HasField("shared_time")
