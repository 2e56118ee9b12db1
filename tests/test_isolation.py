"""No caller can hurt another: each test reproduces one attack from a buggy or hostile caller
(or a broken upstream), bounded in count and time, on loopback, and asserts the outcome.

The app runs in this process against an in-process emulator; the attackers
are real sockets (a raw HTTP/2 client for zero-window streams, grpcio
channels that stop reading).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import threading
import time
from collections.abc import Callable

import grpc
import pytest

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import Emulator
from imageshare_server.core.deadline import FixedDeadline
from imageshare_server.core.errors import DeadlineExceededError
from imageshare_server.core.types import ShareKey, ShareQuery
from imageshare_server.grpcapi.status import to_status
from imageshare_server.ratelimit import JITTER_GUARD
from tests.support.attacks import ZeroWindowAttacker
from tests.support.clock import ManualClock
from tests.support.inprocess import InProcessApp, Request, running
from tests.support.waiting import until, wait_until

REGION = "cn-hangzhou"
DEMO = "m-demo0000001"
_ids = itertools.count(1)
OK = grpc.StatusCode.OK


def new_image(emulator: Emulator, accounts: int) -> str:
    image_id = f"m-iso{next(_ids):05d}{int(time.time() * 1000) % 100000}"
    emulator.knobs.upsert_image(
        {
            "region_id": REGION,
            "image_id": image_id,
            "accounts": [{"aliyun_id": f"{7 * 10**15 + i}"} for i in range(accounts)],
        }
    )
    return image_id


async def timed_error(
    app: InProcessApp, rpc_timeout: float | None, **fields: object
) -> tuple[object, float]:
    started = time.monotonic()
    error = await app.error(rpc_timeout=rpc_timeout, **fields)
    return error, time.monotonic() - started


# --- stalled streams -------------------------------------------------------------------


@pytest.mark.slow
async def test_one_connection_of_zero_window_streams_cannot_lock_out_other_callers(
    ecs: Emulator,
) -> None:
    async with running(ecs, "--cache-ttl", "60", "--stream-stall-timeout", "1") as app:
        await app.list(region_id=REGION, image_id=DEMO)  # the attacker's streams are cache hits
        service = app.runtime.service
        attacker = await asyncio.to_thread(
            ZeroWindowAttacker, "127.0.0.1", app.runtime.grpc_port, 1000
        )
        try:
            # One connection gets the per-connection limit; the rest are refused at once.
            await until(lambda: attacker.refused >= 900 and service.active == 100)
            assert len(asyncio.all_tasks()) < 600
            # Meanwhile every other caller is served: a cache hit and a cold read.
            hit = await app.list(region_id=REGION, image_id=DEMO, rpc_timeout=5)
            assert hit[0].cache_status == image_share_pb2.CACHE_STATUS_HIT
            cold = new_image(ecs, 3)
            listed = await app.list(region_id=REGION, image_id=cold, rpc_timeout=5)
            assert len(listed[0].accounts) == 3
            # The streams the attacker never reads are let go after the stall timeout (the
            # connection's age, the other way they could end, is far longer).
            await until(lambda: service.active == 0, within=10)
        finally:
            await asyncio.to_thread(attacker.close)
        stalled = [
            line
            for line in app.logs.rpc_lines()
            if line["code"] == "Unavailable" and "read nothing" in str(line.get("error"))
        ]
        assert len(stalled) == 100


@pytest.mark.slow
async def test_callers_that_stop_reading_large_streams_are_let_go(ecs: Emulator) -> None:
    big = new_image(ecs, 20_000)
    async with running(
        ecs, "--cache-ttl", "60", "--upstream-qps", "0", "--stream-stall-timeout", "1"
    ) as app:
        assert (
            sum(len(m.accounts) for m in await app.list(region_id=REGION, image_id=big)) == 20_000
        )
        service = app.runtime.service
        # grpcio callers with a fixed 64 KiB window that read one message and stop.
        calls = []
        for _ in range(50):
            stub = app.stub(("grpc.http2.bdp_probe", 0))
            call = stub.ListImageShares(Request(region_id=REGION, image_id=big, page_size=1))
            await call.read()
            calls.append(call)
        await until(lambda: service.active == 50)
        hit = await app.list(region_id=REGION, image_id=DEMO, rpc_timeout=5)
        assert len(hit[-1].accounts) > 0
        await until(lambda: service.active == 0, within=10)
        for call in calls:
            call.cancel()
        stalled = [
            line
            for line in app.logs.rpc_lines()
            if line["code"] == "Unavailable" and "read nothing" in str(line.get("error"))
        ]
        assert len(stalled) == 50


# --- reads die with their callers --------------------------------------------------------


def _cancel_storm(
    target: str, waves: int, per_wave: int, halfway: threading.Event, started: Callable[[], float]
) -> None:
    """From a thread of its own: waves of calls, each cancelled once the service has it."""
    with grpc.insecure_channel(target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        for wave in range(waves):
            calls = [
                stub.ListImageShares(
                    Request(region_id=REGION, image_id=f"m-gone{wave:02d}{i:04d}"), timeout=10
                )
                for i in range(per_wave)
            ]
            # Cancelled calls the service never saw would test nothing: wait (a bounded
            # while) until most of the wave is being served, as a real storm's would be.
            wait_until(functools.partial(_reached, started, (wave + 1) * per_wave * 9 // 10), 30)
            for call in calls:
                call.cancel()
            if wave == waves // 2:
                halfway.set()
            time.sleep(0.01)


def _reached(count: Callable[[], float], goal: int) -> bool:
    return count() >= goal


def started_calls(app: InProcessApp) -> Callable[[], float]:
    """How many ListImageShares calls the app has started, as its own metrics count them."""
    return lambda: app.metric(
        "grpc_server_started_total",
        grpc_type="server_stream",
        grpc_service="imageshare.v1.ImageShareService",
        grpc_method="ListImageShares",
    )


@pytest.mark.slow
async def test_a_cancel_storm_cannot_spend_the_quota_or_starve_cold_reads(ecs: Emulator) -> None:
    ecs.knobs.set(latency_ms=200)
    burst, orphans = 20, 8
    async with running(
        ecs,
        "--cache-ttl", "60",
        "--upstream-qps", "20",
        "--upstream-burst", str(burst),
        "--max-orphan-reads", str(orphans),
    ) as app:  # fmt: skip
        legit = [new_image(ecs, 2) for _ in range(3)]
        halfway = threading.Event()
        started = time.monotonic()
        storm = asyncio.create_task(
            asyncio.to_thread(_cancel_storm, app.target, 8, 100, halfway, started_calls(app))
        )
        await asyncio.to_thread(halfway.wait, 10)
        cold = [
            asyncio.create_task(app.list(region_id=REGION, image_id=image, rpc_timeout=5))
            for image in legit
        ]
        for task in cold:  # cold reads started in the middle of the storm complete normally
            assert len((await task)[0].accounts) == 2
        await storm
        storm_took = time.monotonic() - started
        await until(lambda: app.runtime.source.flights == 0)

        # The storm reached the service (most of every wave started), and every call that
        # started has ended: whatever it still sent upstream is counted below.
        started_now = started_calls(app)
        assert started_now() >= 8 * 90
        await until(
            lambda: (
                app.total("grpc_server_handled_total", grpc_method="ListImageShares")
                >= started_now()
            )
        )
        # Sent while callers were still there: at most the burst plus the tokens the storm's
        # duration refilled; after they left, only the orphan reads went on.
        allowed = burst + int(20 * storm_took) + 1 + orphans + len(legit)
        assert app.upstream_calls() <= allowed


@pytest.mark.parametrize("cache_ttl", ["0", "60"])
async def test_no_rate_limit_slot_before_the_deadline_is_resource_exhausted_at_once(
    ecs: Emulator, cache_ttl: str
) -> None:
    async with running(
        ecs, "--cache-ttl", cache_ttl, "--upstream-qps", "1", "--upstream-burst", "1"
    ) as app:
        await app.list(region_id=REGION, image_id=new_image(ecs, 1))  # takes the only token
        cold = new_image(ecs, 1)
        error, took = await timed_error(app, 0.5, region_id=REGION, image_id=cold)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert error.error_info.reason == "UPSTREAM_RATE_LIMITED"  # type: ignore[attr-defined]
        # One call a second, plus the send window's guard for transit jitter.
        delay = error.retry_info.retry_delay.ToNanoseconds() / 1e9  # type: ignore[attr-defined]
        assert 0.5 < delay <= 1.0 + JITTER_GUARD
        assert took < 0.3


async def test_busy_upstream_slots_are_resource_exhausted_before_the_deadline(
    ecs: Emulator,
) -> None:
    ecs.knobs.set(latency_ms=1500)
    async with running(ecs, "--upstream-max-in-flight", "1", "--upstream-qps", "0") as app:
        holder = asyncio.create_task(app.list(region_id=REGION, image_id=new_image(ecs, 1)))
        await until(lambda: ecs.knobs.counters()["in_flight"] == 1)
        error, took = await timed_error(app, 0.5, region_id=REGION, image_id=new_image(ecs, 1))
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert error.error_info.reason == "UPSTREAM_BUSY"  # type: ignore[attr-defined]
        assert error.retry_info is not None  # type: ignore[attr-defined]
        assert took < 0.5
        await holder


# --- deadlines hold ---------------------------------------------------------------------


async def test_a_read_without_a_caller_deadline_ends_at_the_listing_timeout(ecs: Emulator) -> None:
    ecs.knobs.set(latency_ms=3000)
    async with running(ecs, "--cache-ttl", "0", "--listing-timeout", "0.5") as app:
        error, took = await timed_error(app, None, region_id=REGION, image_id=new_image(ecs, 1))
        assert error.code is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert error.error_info.reason == "LISTING_TIMEOUT"  # type: ignore[attr-defined]
        assert took < 1.5


async def test_a_short_deadline_starter_does_not_fail_the_callers_who_joined(
    ecs: Emulator,
) -> None:
    ecs.knobs.set(latency_ms=400)
    async with running(ecs, "--cache-ttl", "60") as app:
        for _ in range(3):
            image = new_image(ecs, 5)
            starter = asyncio.create_task(
                app.error(rpc_timeout=0.1, region_id=REGION, image_id=image)
            )
            await asyncio.sleep(0.02)
            followers = [
                asyncio.create_task(app.list(rpc_timeout=10, region_id=REGION, image_id=image))
                for _ in range(2)
            ]
            assert (await starter).code is grpc.StatusCode.DEADLINE_EXCEEDED
            for follower in followers:
                messages = await follower
                assert len(messages[0].accounts) == 5
                assert messages[0].cache_status == image_share_pb2.CACHE_STATUS_COALESCED
            assert app.upstream_calls(image) == 1


async def test_a_deadline_that_cuts_a_read_short_falls_back_to_the_stale_list(
    ecs: Emulator,
) -> None:
    clock = ManualClock()
    image = new_image(ecs, 4)
    async with running(
        ecs,
        "--cache-ttl", "1",
        "--cache-stale-while-revalidate", "0",
        "--cache-stale-if-error", "600",
        clock=clock,
    ) as app:  # fmt: skip
        await app.list(region_id=REGION, image_id=image)
        clock.advance(5)  # past the TTL: served only if a read fails
        ecs.knobs.set(latency_ms=2000)
        started = time.monotonic()
        stale = await app.list(rpc_timeout=0.5, region_id=REGION, image_id=image)
        assert time.monotonic() - started < 0.5
        assert stale[0].cache_status == image_share_pb2.CACHE_STATUS_STALE
        assert len(stale[0].accounts) == 4


async def test_an_upstream_attempt_cut_short_by_the_deadline_is_deadline_too_short(
    ecs: Emulator,
) -> None:
    ecs.knobs.set(latency_ms=2000)
    async with running(ecs, "--cache-ttl", "0") as app:
        image = new_image(ecs, 1)
        error, took = await timed_error(app, 1.0, region_id=REGION, image_id=image)
        # The server's own status (with its details), before the caller gives up.
        assert error.code is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
        assert error.error_info.reason == "DEADLINE_TOO_SHORT"  # type: ignore[attr-defined]
        assert took < 1.0
        assert app.upstream_calls(image) == 1  # never retried


async def test_an_expired_or_tiny_deadline_is_deadline_exceeded_not_rate_limited(
    ecs: Emulator,
) -> None:
    """What the service answers when a call arrives with (almost) no time left.

    Driven below the gRPC layer: over a socket, such a call often expires
    before it reaches the handler, and the caller hears its own timeout.
    """
    clock = ManualClock()
    async with running(ecs, "--cache-ttl", "60", clock=clock) as app:
        image = new_image(ecs, 1)
        for left in (-1.0, 0.0, 0.001, 0.009):
            query = ShareQuery(ShareKey(REGION, image), 50, bypass_cache=False)
            with pytest.raises(DeadlineExceededError) as refused:
                _ = [
                    c
                    async for c in app.runtime.source.stream(
                        query, deadline=clock.monotonic() + left
                    )
                ]
            status = to_status(refused.value)
            assert status.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert app.upstream_calls(image) == 0
        # The limiter, idle, says the same of a deadline already gone.
        with pytest.raises(DeadlineExceededError):
            await app.runtime.limiter.acquire(REGION, FixedDeadline(clock.monotonic()))


# --- region ids -------------------------------------------------------------------------


async def test_made_up_regions_share_one_bucket_behind_one_endpoint(ecs: Emulator) -> None:
    async with running(ecs, "--upstream-qps", "5", "--upstream-burst", "5") as app:
        started = time.monotonic()
        await asyncio.gather(
            *(
                app.error(rpc_timeout=0.5, region_id=f"xx-made-up{i}", image_id="m-nowhere1")
                for i in range(100)
            )
        )
        took = time.monotonic() - started
        assert app.upstream_calls() <= 5 + int(5 * took) + 1
        assert app.runtime.limiter.bucket_count == 1


async def test_region_ids_longer_than_a_dns_label_are_invalid(ecs: Emulator) -> None:
    async with running(ecs) as app:
        longest = "cn-" + "-".join(["a" * 19] * 3)  # 62 characters
        assert len(longest + "1") == 63
        error = await app.error(region_id=longest + "1", image_id="m-x")
        assert (
            error.error_info is not None
        )  # valid: the upstream is asked, and knows no such region
        assert error.error_info.reason == "INVALID_REGION_ID_NOT_FOUND"
        too_long = "cn-" + "-".join(["a" * 20] * 4)
        error = await app.error(region_id=too_long, image_id="m-x")
        assert error.code is grpc.StatusCode.INVALID_ARGUMENT
        assert error.bad_request is not None
        assert error.bad_request.field_violations[0].field == "region_id"
        assert "63 characters" in error.bad_request.field_violations[0].description
        assert app.upstream_calls() == 1


# --- large lists ------------------------------------------------------------------------


async def test_a_list_too_large_to_read_in_time_is_refused_after_one_page(ecs: Emulator) -> None:
    image = new_image(ecs, 60_000)
    async with running(ecs, "--upstream-qps", "20") as app:
        error = await app.error(region_id=REGION, image_id=image)
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        assert error.error_info is not None
        assert error.error_info.reason == "SHARE_LIST_TOO_LARGE"
        assert error.error_info.metadata["totalCount"] == "60000"
        assert "--upstream-qps" in error.message
        assert app.upstream_calls(image) == 1


async def test_a_read_longer_than_its_callers_deadline_fills_the_cache_for_the_retry(
    ecs: Emulator,
) -> None:
    image = new_image(ecs, 300)
    async with running(
        ecs, "--cache-ttl", "60", "--upstream-qps", "4", "--upstream-burst", "1"
    ) as app:
        await app.list(region_id=REGION, image_id=new_image(ecs, 1))  # spend the burst
        error, took = await timed_error(app, 0.4, region_id=REGION, image_id=image)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        assert took < 0.4
        await until(lambda: app.runtime.source.flights == 0)
        retry = await app.list(region_id=REGION, image_id=image)
        assert retry[0].cache_status == image_share_pb2.CACHE_STATUS_HIT
        assert sum(len(m.accounts) for m in retry) == 300
        assert app.upstream_calls(image) == 3


# --- malformed request bytes ------------------------------------------------------------


async def test_malformed_request_bytes_are_invalid_argument_counted_and_logged_once(
    ecs: Emulator,
) -> None:
    async with running(ecs) as app:
        raw = app.channel().unary_stream(
            "/imageshare.v1.ImageShareService/ListImageShares",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            _ = [m async for m in raw(b"\xff\xff\xff\xff", timeout=5)]
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        handled = app.metric(
            "grpc_server_handled_total",
            grpc_type="server_stream",
            grpc_service="imageshare.v1.ImageShareService",
            grpc_method="ListImageShares",
            grpc_code="InvalidArgument",
        )
        assert handled == 1
        lines = [line for line in app.logs.rpc_lines() if line["code"] == "InvalidArgument"]
        assert len(lines) == 1
        assert lines[0]["error"] == "malformed request"
        assert not [r for r in app.logs.records if r.exc_info]
        assert app.upstream_calls() == 0


# --- connection age ---------------------------------------------------------------------


async def test_connections_past_their_age_reconnect_without_a_failed_call(ecs: Emulator) -> None:
    async with running(
        ecs, "--max-connection-age", "0.3", "--max-connection-age-grace", "5"
    ) as app:
        stub = app.stub()
        for _ in range(25):
            messages = [
                m
                async for m in stub.ListImageShares(
                    Request(region_id=REGION, image_id=DEMO), timeout=5
                )
            ]
            assert messages
            await asyncio.sleep(0.04)
        peers = {line["peer"] for line in app.logs.rpc_lines()}
        assert len(peers) >= 2


# --- hostile upstream answers -------------------------------------------------------------

_PAGE = {"RequestId": "R-1", "PageNumber": 1, "PageSize": 100, "ShareGroups": {"ShareGroup": []}}
HOSTILE_BODIES = {
    "too_deep": {"body": "[" * 100_000 + "]" * 100_000},
    "too_large": {"body": '{"TotalCount": 0, "Pad": "' + "a" * (5 * 1024 * 1024) + '"}'},
    "bad_gzip": {"body": "this is not gzip", "headers": {"Content-Encoding": "gzip"}},
    "account_not_digits": {
        "body": json.dumps(
            {**_PAGE, "TotalCount": 1, "Accounts": {"Account": [{"AliyunId": "../etc"}]}}
        )
    },
    "absurd_total": {"body": json.dumps({**_PAGE, "TotalCount": 10**12, "Accounts": {}})},
}


@pytest.mark.parametrize("kind", sorted(HOSTILE_BODIES))
async def test_hostile_answers_are_unavailable_retried_and_fall_back_to_stale(
    ecs: Emulator, kind: str
) -> None:
    clock = ManualClock()
    image = new_image(ecs, 2)
    async with running(
        ecs, "--cache-ttl", "1", "--cache-stale-while-revalidate", "0", clock=clock
    ) as app:
        # Once: retried away.
        ecs.knobs.fault("raw", count=1, status=200, **HOSTILE_BODIES[kind])  # type: ignore[arg-type]
        assert len((await app.list(region_id=REGION, image_id=image))[0].accounts) == 2
        # Every attempt: UNAVAILABLE, and the list kept for stale-if-error is served instead.
        ecs.knobs.fault("raw", rate=1.0, status=200, **HOSTILE_BODIES[kind])  # type: ignore[arg-type]
        error = await app.error(region_id=REGION, image_id=new_image(ecs, 1))
        assert error.code is grpc.StatusCode.UNAVAILABLE
        assert error.error_info is not None
        assert error.error_info.reason == "UPSTREAM_MALFORMED_RESPONSE"
        clock.advance(5)
        stale = await app.list(region_id=REGION, image_id=image)
        assert stale[0].cache_status == image_share_pb2.CACHE_STATUS_STALE


async def test_upstream_text_and_hints_reaching_callers_are_bounded(ecs: Emulator) -> None:
    async with running(ecs, "--cache-ttl", "0", "--upstream-max-attempts", "1") as app:
        huge = json.dumps({"RequestId": "R-2", "Code": "Forbidden.RAM", "Message": "x" * 20_000})
        ecs.knobs.fault("raw", count=1, status=403, body=huge)
        error = await app.error(region_id=REGION, image_id=DEMO)
        assert error.code is grpc.StatusCode.PERMISSION_DENIED
        assert 1024 < len(error.message) < 1200
        throttled = json.dumps({"RequestId": "R-3", "Code": "Throttling.User", "Message": "slow"})
        ecs.knobs.fault(
            "raw",
            count=1,
            status=400,
            body=throttled,
            headers={"x-acs-retry-after": "1000000000"},  # 11.6 days, in ms
        )
        error = await app.error(region_id=REGION, image_id=DEMO)
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error.retry_info is not None
        assert error.retry_info.retry_delay.seconds == 60
        before = app.metric(
            "imageshare_upstream_requests_total",
            action="DescribeImageSharePermission",
            region=REGION,
            outcome="other",
        )
        made_up = json.dumps({"RequestId": "R-4", "Code": "Made.Up.Code0042", "Message": "?"})
        ecs.knobs.fault("raw", count=1, status=400, body=made_up)
        error = await app.error(region_id=REGION, image_id=DEMO)
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION
        after = app.metric(
            "imageshare_upstream_requests_total",
            action="DescribeImageSharePermission",
            region=REGION,
            outcome="other",
        )
        assert after == before + 1
