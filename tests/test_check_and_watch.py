"""CheckImageShare and WatchImageShares end to end, the app in this process.

Watches poll every ``--watch-interval`` seconds; these tests run the app on a
``SteppedClock``, so an interval passes when the test says so (``advance``)
and each poll happens exactly when the test expects it, without waiting.
Every test uploads images of its own and counts upstream calls with the
emulator's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from imageshare.v1 import image_share_pb2 as pb
from imageshare.v1 import image_share_pb2_grpc
from imageshare_client import AsyncImageShareClient, RetryPolicy
from imageshare_emulator import Emulator
from imageshare_server import app as app_module
from imageshare_server.core.types import Account, ShareKey, ShareList
from imageshare_server.grpcapi.service import SERVICE_NAME
from imageshare_server.listing.source import ShareChunk
from imageshare_server.watch.hub import WatchHub, next_poll, phase
from tests.support.attacks import WATCH_PATH, ZeroWindowAttacker, grpc_frame
from tests.support.clock import SteppedClock
from tests.support.images import REGION, new_image
from tests.support.inprocess import InProcessApp, running
from tests.support.redis_server import RedisServer, free_port
from tests.support.rpc import Details, details
from tests.support.waiting import until

INTERVAL = 60.0
CheckRequest = pb.CheckImageShareRequest
WatchRequest = pb.WatchImageSharesRequest
WatchCall = grpc.aio.UnaryStreamCall[WatchRequest, pb.WatchImageSharesResponse]


async def check(
    app: InProcessApp, image_id: str, aliyun_id: str, *, bypass_cache: bool = False
) -> pb.CheckImageShareResponse:
    request = CheckRequest(
        region_id=REGION, image_id=image_id, aliyun_id=aliyun_id, bypass_cache=bypass_cache
    )
    return await app.stub().CheckImageShare(request, timeout=10)


async def check_error(app: InProcessApp, region_id: str, image_id: str, aliyun_id: str) -> Details:
    request = CheckRequest(region_id=region_id, image_id=image_id, aliyun_id=aliyun_id)
    try:
        await app.stub().CheckImageShare(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return details(exc)
    raise AssertionError("the check succeeded")


def watch(app: InProcessApp, image_id: str, channel: grpc.aio.Channel | None = None) -> WatchCall:
    stub = app.stub() if channel is None else image_share_pb2_grpc.ImageShareServiceStub(channel)
    return stub.WatchImageShares(WatchRequest(region_id=REGION, image_id=image_id))


async def next_message(call: WatchCall, within: float = 5.0) -> pb.WatchImageSharesResponse:
    message = await asyncio.wait_for(call.read(), within)
    assert isinstance(message, pb.WatchImageSharesResponse), message
    return message


async def ended(call: WatchCall, within: float = 5.0) -> Details:
    """The status the stream ended with (reading whatever was still on the way)."""
    try:
        while True:
            message = await asyncio.wait_for(call.read(), within)
            if message is grpc.aio.EOF:
                raise AssertionError("the watch ended with OK")
    except grpc.aio.AioRpcError as exc:
        return details(exc)


def reason(error: Details) -> str:
    assert error.error_info is not None
    return error.error_info.reason


def fields_named(error: Details) -> list[str]:
    assert error.bad_request is not None
    return [v.field for v in error.bad_request.field_violations]


def polls(app: InProcessApp, outcome: str) -> float:
    return app.metric("imageshare_watch_polls_total", outcome=outcome)


async def interval_passes(app: InProcessApp, clock: SteppedClock, pollers: int = 1) -> None:
    """One watch interval: wait until every poller sleeps, move the clock, wait for the polls."""
    await until(lambda: clock.sleepers >= pollers)
    done = sum(polls(app, o) for o in ("changed", "unchanged", "failed", "ended"))
    clock.advance(INTERVAL)
    await until(
        lambda: (
            sum(polls(app, o) for o in ("changed", "unchanged", "failed", "ended"))
            >= done + pollers
        )
    )


def apply(
    state: tuple[dict[str, pb.SharedAccount], set[str]], message: pb.WatchImageSharesResponse
) -> None:
    accounts, groups = state
    if message.snapshot:
        accounts.clear()
        groups.clear()
    for gone in message.removed_aliyun_ids:
        del accounts[gone]
    groups.difference_update(message.removed_share_groups)
    accounts.update({a.aliyun_id: a for a in message.accounts})
    groups.update(g.group for g in message.share_groups)
    assert len(accounts) == message.total_count


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


@pytest.fixture
async def watched(ecs: Emulator, clock: SteppedClock) -> AsyncIterator[InProcessApp]:
    async with running(ecs, "--watch-interval", str(INTERVAL), clock=clock) as app:
        yield app


# --- CheckImageShare ---------------------------------------------------------------------


async def test_check_via_account_names_the_shared_time(ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 3, groups=("all",))
    ecs.knobs.modify_share(
        REGION,
        image_id,
        add_accounts=[{"aliyun_id": ids[1], "shared_time": "2025-03-04T05:06:07Z"}],
    )
    async with running(ecs) as app:
        answer = await check(app, image_id, ids[1])
    assert answer.shared
    assert answer.via == pb.SHARE_VIA_ACCOUNT  # listed wins over public
    assert answer.shared_time.ToJsonString() == "2025-03-04T05:06:07Z"
    assert answer.cache_status == pb.CACHE_STATUS_MISS
    assert answer.HasField("read_time")
    assert answer.total_count == 3
    assert answer.upstream_request_ids


async def test_check_via_public_when_the_account_is_not_listed(ecs: Emulator) -> None:
    image_id, _ = new_image(ecs.knobs, 2, groups=("all",))
    async with running(ecs) as app:
        answer = await check(app, image_id, "999")
    assert answer.shared
    assert answer.via == pb.SHARE_VIA_PUBLIC
    assert not answer.HasField("shared_time")


async def test_check_not_shared(ecs: Emulator) -> None:
    image_id, _ = new_image(ecs.knobs, 2)
    async with running(ecs) as app:
        answer = await check(app, image_id, "999")
    assert not answer.shared
    assert answer.via == pb.SHARE_VIA_UNSPECIFIED
    assert not answer.HasField("shared_time")
    assert answer.total_count == 2


async def test_check_of_an_unknown_image_is_not_found(ecs: Emulator) -> None:
    async with running(ecs) as app:
        error = await check_error(app, region_id=REGION, image_id="m-nosuchimage0", aliyun_id="1")
    assert error.code is grpc.StatusCode.NOT_FOUND
    assert reason(error) == "INVALID_IMAGE_ID_NOT_FOUND"


@pytest.mark.parametrize("aliyun_id", ["", "12a4", "1" * 33, "-1", " 123", "\uff11\uff12\uff13"])
async def test_a_bad_aliyun_id_is_invalid_argument_before_any_upstream_call(
    ecs: Emulator, aliyun_id: str
) -> None:
    image_id, _ = new_image(ecs.knobs, 1)
    async with running(ecs) as app:
        error = await check_error(app, region_id=REGION, image_id=image_id, aliyun_id=aliyun_id)
        assert app.upstream_calls() == 0
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == "INVALID_REQUEST"
    fields = fields_named(error)
    assert fields == ["aliyun_id"]


async def test_check_validates_the_image_like_a_listing(ecs: Emulator) -> None:
    async with running(ecs) as app:
        error = await check_error(app, region_id="Not a region", image_id="x", aliyun_id="1")
        assert app.upstream_calls() == 0
    fields = set(fields_named(error))
    assert fields == {"region_id", "image_id"}


async def test_a_check_of_a_cached_image_costs_no_upstream_call_and_one_lookup(
    ecs: Emulator,
) -> None:
    image_id, ids = new_image(ecs.knobs, 5000)
    async with running(ecs, "--upstream-qps", "0") as app:
        listed = await app.list(region_id=REGION, image_id=image_id, page_size=100)
        assert sum(len(m.accounts) for m in listed) == 5000
        calls = app.upstream_calls()
        before = app.metric("imageshare_cache_bytes")
        first = await check(app, image_id, ids[4321])
        indexed = app.metric("imageshare_cache_bytes")
        answers = [await check(app, image_id, i) for i in (ids[0], ids[-1], "42")]
        assert app.upstream_calls() == calls  # no upstream call for any check
        # The index was built once, by the first check, and counted in the cache's size.
        assert indexed > before
        assert app.metric("imageshare_cache_bytes") == indexed
    assert first.shared
    assert first.cache_status == pb.CACHE_STATUS_HIT
    assert first.HasField("cache_age")
    assert [a.shared for a in answers] == [True, True, False]


async def test_concurrent_checks_of_a_cold_image_share_one_read(ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 3)
    ecs.knobs.set(latency_ms=200)
    async with running(ecs) as app:
        answers = await asyncio.gather(*(check(app, image_id, ids[i % 3]) for i in range(20)))
        assert app.upstream_calls(image_id) == 1
    assert all(a.shared for a in answers)
    statuses = sorted(a.cache_status for a in answers)
    assert statuses == [pb.CACHE_STATUS_MISS] + [pb.CACHE_STATUS_COALESCED] * 19


async def test_check_bypass_cache_reads_the_upstream_again(ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 2)
    async with running(ecs) as app:
        await check(app, image_id, ids[0])
        ecs.knobs.modify_share(REGION, image_id, remove_accounts=[ids[0]])
        assert (await check(app, image_id, ids[0])).shared  # the cached list
        fresh = await check(app, image_id, ids[0], bypass_cache=True)
        assert app.upstream_calls(image_id) == 2
    assert not fresh.shared
    assert fresh.cache_status == pb.CACHE_STATUS_BYPASS


async def test_check_waits_its_turn_for_the_upstream_rate_limit(ecs: Emulator) -> None:
    async with running(ecs, "--upstream-qps", "1", "--upstream-burst", "1") as app:
        await check(app, new_image(ecs.knobs, 1)[0], "1")  # takes the only token
        cold, _ = new_image(ecs.knobs, 1)
        try:
            await app.stub().CheckImageShare(
                CheckRequest(region_id=REGION, image_id=cold, aliyun_id="1"), timeout=0.5
            )
        except grpc.aio.AioRpcError as exc:
            error = details(exc)
        else:
            raise AssertionError("the check was not rate limited")
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.error_info is not None
    assert reason(error) == "UPSTREAM_RATE_LIMITED"
    assert error.retry_info is not None


async def test_check_request_bytes_that_are_not_a_request_are_invalid_argument(
    ecs: Emulator,
) -> None:
    async with running(ecs) as app:
        method = app.channel().unary_unary(
            "/imageshare.v1.ImageShareService/CheckImageShare",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await method(b"\xff\xff\xff", timeout=5)
    error = details(caught.value)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.error_info is not None
    assert reason(error) == "MALFORMED_REQUEST"


# --- WatchImageShares --------------------------------------------------------------------


async def test_watch_sends_a_snapshot_then_exactly_each_change(
    ecs: Emulator, watched: InProcessApp, clock: SteppedClock
) -> None:
    image_id, ids = new_image(ecs.knobs, 3)
    call = watch(watched, image_id)
    snapshot = await next_message(call)
    assert snapshot.snapshot
    assert [a.aliyun_id for a in snapshot.accounts] == ids
    assert snapshot.total_count == 3
    assert (snapshot.region_id, snapshot.image_id) == (REGION, image_id)
    assert snapshot.HasField("read_time")
    state: tuple[dict[str, pb.SharedAccount], set[str]] = ({}, set())
    apply(state, snapshot)

    ecs.knobs.modify_share(REGION, image_id, add_accounts=["8000000000000001", "8000000000000002"])
    await interval_passes(watched, clock)
    added = await next_message(call)
    assert not added.snapshot
    assert [a.aliyun_id for a in added.accounts] == ["8000000000000001", "8000000000000002"]
    assert all(a.HasField("shared_time") for a in added.accounts)
    assert list(added.removed_aliyun_ids) == []
    assert added.total_count == 5
    assert added.read_time.ToSeconds() >= snapshot.read_time.ToSeconds() + INTERVAL - 1
    apply(state, added)

    ecs.knobs.modify_share(REGION, image_id, remove_accounts=[ids[0]], add_groups=["all"])
    await interval_passes(watched, clock)
    public = await next_message(call)
    assert list(public.removed_aliyun_ids) == [ids[0]]
    assert [g.group for g in public.share_groups] == ["all"]
    assert list(public.accounts) == []
    assert public.total_count == 4
    apply(state, public)

    await interval_passes(watched, clock)  # nothing changed: nothing is sent
    assert polls(watched, "unchanged") == 1

    ecs.knobs.modify_share(REGION, image_id, remove_groups=["all"], add_accounts=[ids[0]])
    await interval_passes(watched, clock)
    private = await next_message(call)  # the next message is this change, not an empty one
    assert list(private.removed_share_groups) == ["all"]
    assert [a.aliyun_id for a in private.accounts] == [ids[0]]
    apply(state, private)
    call.cancel()

    # The messages applied in order give the list the upstream has.
    image = ecs.data.get(REGION, image_id)
    assert image is not None
    assert set(state[0]) == {a.aliyun_id for a in image.accounts}
    assert state[1] == set(image.share_groups)
    changes = {
        change: watched.metric("imageshare_share_changes_total", change=change)
        for change in (
            "account_added",
            "account_removed",
            "group_added",
            "group_removed",
            "became_public",
            "became_private",
        )
    }
    assert changes == {
        "account_added": 3,
        "account_removed": 1,
        "group_added": 1,
        "group_removed": 1,
        "became_public": 1,
        "became_private": 1,
    }
    lines = [r for r in watched.logs.records if getattr(r, "event", None) == "share_change"]
    assert len(lines) == 3
    assert all(getattr(r, "image", None) == image_id for r in lines)
    public_line = lines[1]
    assert public_line.levelname == "WARNING"
    assert getattr(public_line, "became_public", None) is True
    assert getattr(public_line, "removed_ids", None) == [ids[0]]


async def test_fifty_watchers_of_one_image_cost_one_upstream_read_per_interval(
    ecs: Emulator, watched: InProcessApp, clock: SteppedClock
) -> None:
    image_id, _ = new_image(ecs.knobs, 120)  # two upstream pages
    channel = watched.channel()
    calls = [watch(watched, image_id, channel) for _ in range(50)]
    snapshots = await asyncio.gather(*(next_message(c) for c in calls))
    assert all(s.snapshot and s.total_count == 120 for s in snapshots)
    assert watched.upstream_calls(image_id) == 2  # one read of two pages for all fifty
    assert watched.metric("imageshare_watchers") == 50
    assert watched.metric("imageshare_watched_images") == 1
    for n in range(1, 4):
        ecs.knobs.modify_share(REGION, image_id, add_accounts=[f"810000000000000{n}"])
        await interval_passes(watched, clock)
        changes = await asyncio.gather(*(next_message(c) for c in calls))
        assert {tuple(a.aliyun_id for a in c.accounts) for c in changes} == {
            (f"810000000000000{n}",)
        }
        assert watched.upstream_calls(image_id) == 2 * (n + 1)  # one read (2 pages) each
        assert polls(watched, "changed") == n  # by one poller for all fifty
    for call in calls:
        call.cancel()
    # The last watcher gone, the poll stops: another interval reads nothing.
    await until(lambda: watched.metric("imageshare_watched_images") == 0)
    assert watched.metric("imageshare_watchers") == 0
    await until(lambda: clock.sleepers == 0)  # the poller's wait was cancelled with it
    clock.advance(INTERVAL)
    assert watched.upstream_calls(image_id) == 8


async def test_a_listing_read_just_before_the_poll_spares_it_the_upstream_read(
    ecs: Emulator, watched: InProcessApp, clock: SteppedClock
) -> None:
    image_id, _ = new_image(ecs.knobs, 2)
    key = ShareKey(REGION, image_id)
    poll_at = next_poll(clock.time(), INTERVAL, phase(key, INTERVAL))
    call = watch(watched, image_id)
    await next_message(call)
    await until(lambda: clock.sleepers >= 1)
    clock.advance(poll_at - 0.5 - clock.time())
    ecs.knobs.modify_share(REGION, image_id, add_accounts=["8200000000000001"])
    await watched.list(region_id=REGION, image_id=image_id, bypass_cache=True)
    assert watched.upstream_calls(image_id) == 2
    clock.advance(0.5)
    # The poll takes the list that listing read half a second before: no read of its own.
    change = await next_message(call)
    assert [a.aliyun_id for a in change.accounts] == ["8200000000000001"]
    assert watched.upstream_calls(image_id) == 2
    call.cancel()


async def test_a_deleted_image_ends_its_watches_with_not_found(
    ecs: Emulator, watched: InProcessApp, clock: SteppedClock
) -> None:
    image_id, _ = new_image(ecs.knobs, 2)
    calls = [watch(watched, image_id) for _ in range(3)]
    for call in calls:
        await next_message(call)
    ecs.knobs.delete_image(REGION, image_id)
    await interval_passes(watched, clock)
    for call in calls:
        error = await ended(call)
        assert error.code is grpc.StatusCode.NOT_FOUND
        assert reason(error) == "INVALID_IMAGE_ID_NOT_FOUND"
    assert polls(watched, "ended") == 1
    await until(lambda: watched.metric("imageshare_watchers") == 0)
    assert watched.metric("imageshare_watched_images") == 0


async def test_an_image_the_service_may_no_longer_read_ends_its_watch(
    ecs: Emulator, watched: InProcessApp, clock: SteppedClock
) -> None:
    image_id, _ = new_image(ecs.knobs, 2)
    call = watch(watched, image_id)
    await next_message(call)
    ecs.knobs.fault("error_code", count=1, status=403, code="Forbidden.RAM")
    await interval_passes(watched, clock)
    error = await ended(call)
    assert error.code is grpc.StatusCode.PERMISSION_DENIED
    assert reason(error) == "FORBIDDEN_RAM"


async def test_a_failed_poll_sends_nothing_and_the_watch_goes_on(
    ecs: Emulator, clock: SteppedClock
) -> None:
    image_id, _ = new_image(ecs.knobs, 2)
    async with running(ecs, "--upstream-max-attempts", "1", clock=clock) as app:
        call = watch(app, image_id)
        await next_message(call)
        ecs.knobs.fault("error_code", count=1, status=503, code="ServiceUnavailable")
        ecs.knobs.modify_share(REGION, image_id, add_accounts=["8300000000000001"])
        await interval_passes(app, clock)
        assert polls(app, "failed") == 1
        await interval_passes(app, clock)
        change = await next_message(call)
        assert [a.aliyun_id for a in change.accounts] == ["8300000000000001"]
        failed = [r for r in app.logs.records if getattr(r, "event", None) == "watch_poll_failed"]
        assert [getattr(r, "image", None) for r in failed] == [image_id]
        call.cancel()


async def test_watches_beyond_max_watchers_are_refused_and_do_not_count_as_calls(
    ecs: Emulator, clock: SteppedClock
) -> None:
    image_id, _ = new_image(ecs.knobs, 1)
    async with running(
        ecs, "--max-watchers", "2", "--max-concurrent-rpcs", "1", clock=clock
    ) as app:
        calls = [watch(app, image_id), watch(app, image_id)]
        for call in calls:
            await next_message(call)
        error = await ended(watch(app, image_id))
        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(error) == "TOO_MANY_WATCHERS"
        assert error.retry_info is not None
        # Two watches open, one concurrent call allowed: listings and checks still pass.
        assert (await app.list(region_id=REGION, image_id=image_id))[0].total_count == 1
        assert (await check(app, image_id, "1")).total_count == 1
        calls[0].cancel()
        await until(lambda: app.metric("imageshare_watchers") == 1)
        another = watch(app, image_id)
        assert (await next_message(another)).snapshot
        for call in (calls[1], another):
            call.cancel()


async def test_watchers_that_read_nothing_are_ended_and_let_go(
    ecs: Emulator, clock: SteppedClock
) -> None:
    """Zero-window streams never take a message: each ends after the stall timeout, and
    with the last of them the image's poller."""
    image_id, _ = new_image(ecs.knobs, 2)
    body = grpc_frame(WatchRequest(region_id=REGION, image_id=image_id).SerializeToString())
    async with running(ecs, "--stream-stall-timeout", "0.5", clock=clock) as app:
        attacker = await asyncio.to_thread(
            ZeroWindowAttacker, "127.0.0.1", app.runtime.grpc_port, 5, body=body, path=WATCH_PATH
        )
        try:
            await until(lambda: app.metric("imageshare_watchers") == 5)
            took = await until(lambda: app.metric("imageshare_watchers") == 0, within=5)
            assert took < 2.5
            assert app.metric("imageshare_watched_images") == 0
        finally:
            await asyncio.to_thread(attacker.close)
        stalled = [
            line
            for line in app.logs.rpc_lines()
            if line["method"].endswith("/WatchImageShares") and line["code"] == "Unavailable"
        ]
        assert len(stalled) == 5
        assert all("read nothing" in str(line.get("error")) for line in stalled)


async def test_a_watch_of_an_invalid_image_is_invalid_argument(watched: InProcessApp) -> None:
    call = watched.stub().WatchImageShares(WatchRequest(region_id=REGION, image_id="nope"))
    error = await ended(call)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert fields_named(error) == ["image_id"]
    assert watched.upstream_calls() == 0


async def test_drain_ends_watches_with_unavailable_at_once_while_listings_finish(
    ecs: Emulator, clock: SteppedClock
) -> None:
    image_id, _ = new_image(ecs.knobs, 2)
    slow, _ = new_image(ecs.knobs, 2)
    async with running(ecs, "--grace-period", "10", clock=clock) as app:
        calls = [watch(app, image_id) for _ in range(3)]
        for call in calls:
            await next_message(call)
        ecs.knobs.set(latency_ms=1000)
        listing = asyncio.create_task(app.list(region_id=REGION, image_id=slow))
        await until(lambda: ecs.knobs.counters()["in_flight"] == 1)
        started = time.monotonic()
        drain = asyncio.create_task(app_module.shutdown(app.runtime))
        for call in calls:
            error = await ended(call)
            assert error.code is grpc.StatusCode.UNAVAILABLE
            assert reason(error) == "SHUTTING_DOWN"
        assert time.monotonic() - started < 0.5  # at once, not after the grace period
        assert not listing.done()  # the listing is still being served
        assert (await listing)[0].total_count == 2
        await drain
        # Ended as a drain is meant to end them: their RPC lines are INFO, not WARNING
        # (UNAVAILABLE otherwise means a server fault), and they are counted as they are.
        ended_watches = [
            r
            for r in app.logs.records
            if r.name == "imageshare.rpc" and r.fields["method"].endswith("/WatchImageShares")  # type: ignore[attr-defined]
        ]
        assert len(ended_watches) == 3
        assert {(r.levelno, r.fields["code"]) for r in ended_watches} == {  # type: ignore[attr-defined]
            (logging.INFO, "Unavailable")
        }
        watch_labels = {"grpc_service": SERVICE_NAME, "grpc_method": "WatchImageShares"}
        assert (
            app.metric(
                "grpc_server_handled_total",
                grpc_type="server_stream",
                grpc_code="Unavailable",
                **watch_labels,
            )
            == 3
        )


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.mark.redis
async def test_replicas_sharing_redis_make_one_upstream_read_per_interval(
    ecs: Emulator, clock: SteppedClock, redis_server: RedisServer
) -> None:
    image_id, _ = new_image(ecs.knobs, 2)
    async with contextlib.AsyncExitStack() as stack:
        replicas = [
            await stack.enter_async_context(
                running(ecs, "--redis-url", redis_server.url, clock=clock)
            )
            for _ in range(3)
        ]
        calls = [watch(replica, image_id) for replica in replicas for _ in range(2)]
        for call in calls:
            assert (await next_message(call)).snapshot
        first_reads = replicas[0].upstream_calls(image_id)
        for n in range(1, 4):
            ecs.knobs.modify_share(REGION, image_id, add_accounts=[f"840000000000000{n}"])
            await until(lambda: clock.sleepers >= len(replicas))
            clock.advance(INTERVAL)
            for call in calls:
                change = await next_message(call)
                assert [a.aliyun_id for a in change.accounts] == [f"840000000000000{n}"]
            # Three replicas, six watchers: one upstream read for the interval.
            assert replicas[0].upstream_calls(image_id) == first_reads + n
        for call in calls:
            call.cancel()


# --- the Python client against the real server --------------------------------------------


async def test_the_python_client_resumes_after_a_server_restart_with_what_it_missed(
    ecs: Emulator, clock: SteppedClock
) -> None:
    image_id, ids = new_image(ecs.knobs, 3)
    port = free_port()
    listen = ("--listen", f"127.0.0.1:{port}")
    fast = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 200)]
    async with AsyncImageShareClient(f"127.0.0.1:{port}", options=fast) as client:
        watch = client.watch(
            REGION,
            image_id,
            reconnect=RetryPolicy(max_attempts=200, initial_backoff=0.02, max_backoff=0.2),
        )
        events = aiter(watch)
        async with running(ecs, *listen, clock=clock) as first:
            snapshot = await asyncio.wait_for(anext(events), 5)
            ecs.knobs.modify_share(REGION, image_id, add_accounts=["8500000000000001"])
            await interval_passes(first, clock)
            change = await asyncio.wait_for(anext(events), 5)
        # The server is gone (it drained: the watch ended UNAVAILABLE); the list changes.
        ecs.knobs.modify_share(
            REGION, image_id, remove_accounts=[ids[0]], add_accounts=["8500000000000002"]
        )
        ecs.knobs.modify_share(REGION, image_id, add_groups=["all"])
        async with running(ecs, *listen, clock=SteppedClock()):
            resumed = await asyncio.wait_for(anext(events), 10)
            await events.aclose()  # type: ignore[attr-defined]
    assert snapshot.snapshot
    assert [a.aliyun_id for a in change.added] == ["8500000000000001"]
    assert resumed.resumed
    assert [a.aliyun_id for a in resumed.added] == ["8500000000000002"]
    assert resumed.removed == (ids[0],)
    assert resumed.became_public
    assert watch.reconnects >= 1
    assert sorted(watch.accounts) == sorted([*ids[1:], "8500000000000001", "8500000000000002"])


# --- the hub, without gRPC ------------------------------------------------------------------


class _ListSource:
    """A source whose list the test sets; counts polls."""

    def __init__(self, key: ShareKey, clock: SteppedClock) -> None:
        self.key = key
        self.clock = clock
        self.accounts: tuple[Account, ...] = (Account("1"),)
        self.polled = 0

    def _list(self) -> ShareList:
        return ShareList(self.key, self.accounts, (), (), self.clock.time(), self.clock.monotonic())

    def cached(self, query: object) -> None:
        return None  # nothing cached: every first read streams

    def stream(
        self, query: object, *, deadline: float | None, caller: str = ""
    ) -> AsyncIterator[object]:
        async def chunks() -> AsyncIterator[object]:
            shares = self._list()
            yield ShareChunk(shares.accounts, (), shares.total_count, (), None, shares.read_time)

        return chunks()

    def prebuilt(self, *args: object) -> list[bytes]:
        raise NotImplementedError

    def index(self, entry: object) -> dict[str, Account]:
        raise NotImplementedError

    async def poll(self, key: ShareKey, *, newer_than: float, caller: str = "") -> ShareList:
        self.polled += 1
        return self._list()


async def test_a_watcher_that_falls_behind_gets_the_net_change_in_one_event() -> None:
    clock = SteppedClock()
    key = ShareKey(REGION, "m-hub00001")
    source = _ListSource(key, clock)
    hub = WatchHub(source, interval=INTERVAL, clock=clock)  # type: ignore[arg-type]
    try:
        keeping_up, behind = hub.watch(key), hub.watch(key)
        assert (await keeping_up.next()).snapshot
        assert (await behind.next()).snapshot
        steps = [("2",), ("2", "3"), ("3", "4"), ("1", "3", "4")]
        for ids in steps:
            source.accounts = tuple(Account(i) for i in ids)
            await until(lambda: clock.sleepers >= 1)
            clock.advance(INTERVAL)
            event = await asyncio.wait_for(keeping_up.next(), 5)
            assert event.change is not None
        assert source.polled == 4
        # The watcher that read nothing meanwhile holds no queue: one event, the net change.
        event = await asyncio.wait_for(behind.next(), 5)
        assert event.change is not None
        assert [a.aliyun_id for a in event.change.added] == ["3", "4"]
        assert event.change.removed == ()
        assert event.shares.accounts == source.accounts
        # A change that undid itself while a watcher was behind sends it nothing.
        source.accounts = (Account("1"), Account("3"))
        await until(lambda: clock.sleepers >= 1)
        clock.advance(INTERVAL)
        await asyncio.wait_for(keeping_up.next(), 5)
        source.accounts = (Account("1"), Account("3"), Account("4"))
        await until(lambda: clock.sleepers >= 1)
        clock.advance(INTERVAL)
        await asyncio.wait_for(keeping_up.next(), 5)
        pending = asyncio.ensure_future(behind.next())
        await asyncio.sleep(0)
        assert not pending.done()
        pending.cancel()
        keeping_up.leave()
        behind.leave()
        assert hub.pollers == 0
    finally:
        await hub.aclose()
