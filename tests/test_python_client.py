"""The Python client: retry/deadline/cancellation logic against a scripted gRPC server over real
sockets, then end to end against the app and the emulator, both in this process (one test
kills a server process).

Checks and watches against the scripted server too: what the client decides
(retries, reconnections, the state a watch holds) is its own, whatever a server does.
Their end-to-end tests, the resume across a server restart included, are in
test_check_and_watch.py."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from imageshare.v1 import image_share_pb2 as pb
from imageshare.v1 import image_share_pb2_grpc as pb_grpc
from imageshare_client import (
    DEFAULT_SERVICE_CONFIG,
    NO_RETRY,
    AsyncImageShareClient,
    CacheStatus,
    ImageShareClient,
    ImageShareError,
    RetryPolicy,
    ShareChange,
    ShareList,
    ShareVia,
    StreamInterruptedError,
)
from imageshare_client._watching import WatchState, reconnect_delay
from imageshare_emulator import Emulator
from tests.support.images import new_image
from tests.support.inprocess import InProcessApp, running
from tests.support.processes import ServerProcess

FAST_RETRY = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


# --- a scripted server: real gRPC over a real socket, behaviour chosen per test -------------


@dataclass
class Script:
    """What the scripted server does on each call."""

    fail_first: int = 0  # abort the first N calls with UNAVAILABLE before any message
    messages: list[pb.ListImageSharesResponse] = field(default_factory=list)
    then: Callable[[grpc.ServicerContext], None] | None = None  # after the messages
    calls: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # CheckImageShare: fail the first N with UNAVAILABLE, then answer this.
    check_fail_first: int = 0
    check_answer: pb.CheckImageShareResponse = field(default_factory=pb.CheckImageShareResponse)
    checks: list[pb.CheckImageShareRequest] = field(default_factory=list)
    check_then: Callable[[grpc.ServicerContext], None] | None = None  # before answering
    # WatchImageShares: one list of messages per stream; each stream but the last then ends
    # UNAVAILABLE (a drain), the last one hangs until cancelled (or ends with ``watch_end``).
    watch_streams: list[list[pb.WatchImageSharesResponse]] = field(default_factory=list)
    watch_end: Callable[[grpc.ServicerContext], None] | None = None
    watches: int = 0
    # Sent on the last stream once ``release`` is set.
    after_release: list[pb.WatchImageSharesResponse] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)


def message(ids: list[str], total: int, groups: tuple[str, ...] = ()) -> pb.ListImageSharesResponse:
    return pb.ListImageSharesResponse(
        accounts=[pb.SharedAccount(aliyun_id=i) for i in ids],
        share_groups=[pb.ShareGroup(group=g) for g in groups],
        total_count=total,
        region_id="cn-hangzhou",
        image_id="m-test",
        upstream_request_ids=[f"req-{ids[0]}"] if ids else [],
        cache_status=pb.CACHE_STATUS_MISS,
    )


class ScriptedService(pb_grpc.ImageShareServiceServicer):
    def __init__(self) -> None:
        self.script = Script()

    def ListImageShares(
        self, request: pb.ListImageSharesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.ListImageSharesResponse]:
        script = self.script
        context.add_callback(lambda: None if context.is_active() else script.cancelled.set())
        with script.lock:
            script.calls += 1
            call = script.calls
        if call <= script.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted failure {call}")
        yield from script.messages
        if script.then is not None:
            script.then(context)

    def CheckImageShare(
        self, request: pb.CheckImageShareRequest, context: grpc.ServicerContext
    ) -> pb.CheckImageShareResponse:
        script = self.script
        with script.lock:
            script.checks.append(request)
            call = len(script.checks)
        if call <= script.check_fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"scripted failure {call}")
        if script.check_then is not None:
            script.check_then(context)
        return script.check_answer

    def WatchImageShares(
        self, request: pb.WatchImageSharesRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchImageSharesResponse]:
        script = self.script
        with script.lock:
            stream = script.watches
            script.watches += 1
        last = stream >= len(script.watch_streams) - 1
        if last:  # ``cancelled``: the client let go of the stream it was left with
            context.add_callback(lambda: None if context.is_active() else script.cancelled.set())
        yield from script.watch_streams[stream] if stream < len(script.watch_streams) else []
        if not last:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted drain")
        if script.after_release and script.release.wait(10):
            yield from script.after_release
        if script.watch_end is not None:
            script.watch_end(context)
        hang_until_cancelled(context)


def watch_message(
    ids: list[str],
    *,
    snapshot: bool = False,
    removed: tuple[str, ...] = (),
    groups: tuple[str, ...] = (),
    groups_removed: tuple[str, ...] = (),
    total: int = 0,
) -> pb.WatchImageSharesResponse:
    return pb.WatchImageSharesResponse(
        snapshot=snapshot,
        accounts=[pb.SharedAccount(aliyun_id=i) for i in ids],
        removed_aliyun_ids=removed,
        share_groups=[pb.ShareGroup(group=g) for g in groups],
        removed_share_groups=groups_removed,
        total_count=total,
        region_id="cn-hangzhou",
        image_id="m-test",
    )


def hang_until_cancelled(context: grpc.ServicerContext) -> None:
    """Send nothing more until the call ends (the client cancels or its deadline passes)."""
    ended = threading.Event()
    if context.add_callback(ended.set):  # False: the call has ended already
        ended.wait(10)


def abort_unavailable(context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.UNAVAILABLE, "connection to upstream lost")


def abort_not_found(context: grpc.ServicerContext) -> None:
    context.abort(grpc.StatusCode.NOT_FOUND, "the image was deleted")


def abort_rich_invalid_argument(context: grpc.ServicerContext) -> None:
    info, bad = any_pb2.Any(), any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason="INVALID_REGION", domain="imageshare.v1", metadata={"requestId": "R1"}
        )
    )
    bad.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field="region_id", description="bad")
            ]
        )
    )
    status = status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT, message="region_id is malformed", details=[info, bad]
    )
    context.abort_with_status(rpc_status.to_status(status))


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[ScriptedService, str]]:
    service = ScriptedService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ImageShareServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield service, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def script(scripted: tuple[ScriptedService, str]) -> Script:
    scripted[0].script = Script()
    return scripted[0].script


@pytest.fixture
def target(scripted: tuple[ScriptedService, str]) -> str:
    return scripted[1]


def no_channel_retry(target: str, retry: RetryPolicy = FAST_RETRY) -> ImageShareClient:
    """The client's own retry loop alone, so that attempts can be counted exactly."""
    return ImageShareClient(target, retry=retry, service_config=None)


# --- pure logic ------------------------------------------------------------------------------


def test_backoff_is_jittered_within_the_exponential_cap() -> None:
    policy = RetryPolicy(max_attempts=5, initial_backoff=0.1, max_backoff=0.3, multiplier=2)
    for attempt, cap in [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.3)]:
        delays = [policy.backoff(attempt) for _ in range(200)]
        assert all(0 <= d <= cap for d in delays)
        assert max(delays) > cap / 2  # jitter spreads over the range
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_unknown_cache_status_from_a_newer_server_is_unspecified() -> None:
    assert CacheStatus.from_proto(99) is CacheStatus.UNSPECIFIED
    assert CacheStatus.from_proto(pb.CACHE_STATUS_HIT) is CacheStatus.HIT


# --- retry, deadline, interruption, cancellation against the scripted server ---------------


def test_unavailable_before_first_message_is_retried(script: Script, target: str) -> None:
    script.fail_first = 2
    script.messages = [message(["1", "2"], 3, ("all",)), message(["3"], 3)]
    retries: list[tuple[int, str]] = []
    with ImageShareClient(
        target,
        retry=FAST_RETRY,
        service_config=None,
        on_retry=lambda n, e, _: retries.append((n, e.code_name)),
    ) as client:
        result = client.list_shares("cn-hangzhou", "m-test").collect()
    assert [a.aliyun_id for a in result.accounts] == ["1", "2", "3"]
    assert result.metadata.total_count == 3
    assert result.metadata.is_public
    assert result.metadata.cache_status is CacheStatus.MISS
    assert result.upstream_request_ids == ("req-1", "req-3")
    assert retries == [(1, "UNAVAILABLE"), (2, "UNAVAILABLE")]
    assert script.calls == 3


def test_retries_are_bounded(script: Script, target: str) -> None:
    script.fail_first = 100
    with no_channel_retry(target) as client, pytest.raises(ImageShareError) as caught:
        client.list_shares("cn-hangzhou", "m-test").start()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts == FAST_RETRY.max_attempts
    assert script.calls == FAST_RETRY.max_attempts


def test_channel_service_config_retries_transparently(script: Script, target: str) -> None:
    """The default service config's retryPolicy absorbs UNAVAILABLE below the client loop."""
    script.fail_first = 2
    script.messages = [message(["1"], 1)]
    with ImageShareClient(target, retry=NO_RETRY) as client:
        listing = client.list_shares("cn-hangzhou", "m-test")
        assert [a.aliyun_id for a in listing] == ["1"]
    assert listing.attempts == 1
    assert script.calls == 3


def test_other_errors_are_not_retried_and_carry_details(script: Script, target: str) -> None:
    script.then = abort_rich_invalid_argument
    with no_channel_retry(target) as client, pytest.raises(ImageShareError) as caught:
        client.list_shares("cn-hangzhou", "m-test").start()
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.message == "region_id is malformed"
    assert error.reason == "INVALID_REGION"
    assert error.domain == "imageshare.v1"
    assert error.metadata == {"requestId": "R1"}
    assert [(v.field, v.description) for v in error.field_violations] == [("region_id", "bad")]
    assert script.calls == 1


def test_started_stream_is_never_retried(script: Script, target: str) -> None:
    script.messages = [message(["1", "2"], 5)]
    script.then = abort_unavailable
    received: list[str] = []
    with no_channel_retry(target) as client:
        accounts = iter(client.list_shares("cn-hangzhou", "m-test"))
        received.append(next(accounts).aliyun_id)
        received.append(next(accounts).aliyun_id)
        with pytest.raises(StreamInterruptedError) as caught:
            next(accounts)
    assert received == ["1", "2"]
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.accounts_received == 2
    assert "interrupted after 2 accounts" in str(caught.value)
    assert script.calls == 1


def test_deadline_covers_the_wait_for_the_first_message(script: Script, target: str) -> None:
    script.then = hang_until_cancelled  # no message at all
    started = time.monotonic()
    with no_channel_retry(target) as client, pytest.raises(ImageShareError) as caught:
        client.list_shares("cn-hangzhou", "m-test", timeout=0.3).start()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3
    assert script.calls == 1


def test_nothing_listening_fails_unavailable_after_bounded_attempts() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again when the block ends: nothing listens
    seen: list[int] = []
    with (
        ImageShareClient(
            f"127.0.0.1:{port}", retry=FAST_RETRY, on_retry=lambda n, _e, _d: seen.append(n)
        ) as client,
        pytest.raises(ImageShareError) as caught,
    ):
        client.list_shares("cn-hangzhou", "m-test").start()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts == 3
    assert seen == [1, 2]


def test_server_that_comes_up_after_the_first_attempt_is_reached() -> None:
    """A caller started before its server (a rollout, a restart) gets through on a retry."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    service = ScriptedService()
    service.script.messages = [message(["7"], 1)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ImageShareServiceServicer_to_server(service, server)

    def start_listening(attempt: int, error: ImageShareError, _delay: float) -> None:
        if attempt == 1:
            assert error.code == grpc.StatusCode.UNAVAILABLE
            # Binding is listening already (the kernel would queue connections): only now.
            assert server.add_insecure_port(f"127.0.0.1:{port}") == port
            server.start()

    try:
        with ImageShareClient(
            f"127.0.0.1:{port}",
            retry=RetryPolicy(max_attempts=8, initial_backoff=0.05, max_backoff=0.5),
            # Reconnect quickly after the refused connection; the default waits about 1 s.
            options=[("grpc.initial_reconnect_backoff_ms", 50)],
            on_retry=start_listening,
        ) as client:
            listing = client.list_shares("cn-hangzhou", "m-test")
            assert [a.aliyun_id for a in listing] == ["7"]
        assert listing.attempts >= 2
        assert service.script.calls == 1
    finally:
        server.stop(grace=None)


def test_leaving_the_listing_block_cancels_the_call(script: Script, target: str) -> None:
    """Leaving ``with listing:`` early cancels the call, and nothing else does: the iterator
    is still referenced (its ``finally`` would cancel too) and the channel stays open (closing
    it would cancel every call on it)."""
    script.messages = [message(["1"], 2)]
    script.then = hang_until_cancelled
    with no_channel_retry(target) as client:
        listing = client.list_shares("cn-hangzhou", "m-test")
        with listing:
            accounts = iter(listing)
            assert next(accounts).aliyun_id == "1"
            assert not script.cancelled.is_set()  # the call is open while the block runs
        assert script.cancelled.wait(5)
        assert listing.accounts_received == 1
        assert list(accounts) == []  # a cancelled listing ends quietly
    assert script.calls == 1


def test_breaking_out_of_the_loop_cancels(script: Script, target: str) -> None:
    """The loop's iterator is closed by ``break``; the listing (and so its grpc call, which
    grpc would cancel once unreferenced) is still held, as is the channel: only the
    listing's own cancel can end the call."""
    script.messages = [message(["1"], 2)]
    script.then = hang_until_cancelled
    with no_channel_retry(target) as client:
        listing = client.list_shares("cn-hangzhou", "m-test")
        for account in listing:
            assert account.aliyun_id == "1"
            break
        assert script.cancelled.wait(5)
        assert listing.accounts_received == 1


# --- checks: one small call, retried like a listing before its first message ---------------


def test_check_retries_unavailable_and_decodes_the_answer(script: Script, target: str) -> None:
    script.check_fail_first = 1
    script.check_answer = pb.CheckImageShareResponse(
        shared=True,
        via=pb.SHARE_VIA_ACCOUNT,
        total_count=7,
        cache_status=pb.CACHE_STATUS_HIT,
        upstream_request_ids=["R-1"],
    )
    script.check_answer.shared_time.FromJsonString("2025-01-02T03:04:05Z")
    with no_channel_retry(target) as client:
        answer = client.check("cn-hangzhou", "m-test", "1234", owner_account="ram@x")
    assert answer
    assert answer.via is ShareVia.ACCOUNT
    assert answer.shared_time is not None
    assert answer.shared_time.isoformat() == "2025-01-02T03:04:05+00:00"
    assert (answer.total_count, answer.cache_status) == (7, CacheStatus.HIT)
    assert answer.upstream_request_ids == ("R-1",)
    assert [(c.aliyun_id, c.owner_account) for c in script.checks] == [("1234", "ram@x")] * 2


def test_is_shared_with_is_one_check_call(script: Script, target: str) -> None:
    """It no longer streams the list to look for the account: the server answers."""
    script.check_answer = pb.CheckImageShareResponse(shared=True, via=pb.SHARE_VIA_PUBLIC)
    script.messages = [message(["1"], 1)]
    with no_channel_retry(target) as client:
        assert client.is_shared_with("cn-hangzhou", "m-test", "42")
        script.check_answer = pb.CheckImageShareResponse(shared=False)
        assert not client.is_shared_with("cn-hangzhou", "m-test", "43")
    assert [c.aliyun_id for c in script.checks] == ["42", "43"]
    assert script.calls == 0  # the list was never streamed


def test_check_retries_of_unavailable_are_bounded(script: Script, target: str) -> None:
    script.check_fail_first = 100
    with no_channel_retry(target) as client, pytest.raises(ImageShareError) as caught:
        client.check("cn-hangzhou", "m-test", "1")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.attempts == FAST_RETRY.max_attempts
    assert len(script.checks) == FAST_RETRY.max_attempts


async def test_async_check(script: Script, target: str) -> None:
    script.check_fail_first = 1
    script.check_answer = pb.CheckImageShareResponse(shared=True, via=pb.SHARE_VIA_PUBLIC)
    async with AsyncImageShareClient(target, retry=FAST_RETRY, service_config=None) as client:
        answer = await client.check("cn-hangzhou", "m-test", "5")
        assert answer.via is ShareVia.PUBLIC
        assert await client.is_shared_with("cn-hangzhou", "m-test", "5")
    assert len(script.checks) == 3  # a retry, then the answer; then is_shared_with's one call


# --- watches: state, reconnection ------------------------------------------------------------


def test_watch_state_applies_changes_and_reports_what_a_reconnect_missed() -> None:
    state = WatchState("cn-hangzhou", "m-test")
    first = state.apply(watch_message(["1", "2"], snapshot=True, total=2))
    assert first is not None
    assert first.snapshot
    assert [a.aliyun_id for a in first.added] == ["1", "2"]
    change = state.apply(watch_message(["3"], removed=("1",), groups=("all",), total=2))
    assert change is not None
    assert not change.snapshot
    assert (change.removed, change.groups_added, change.became_public) == (("1",), ("all",), True)
    assert sorted(state.accounts) == ["2", "3"]
    assert state.is_public
    # The stream ended; the new snapshot differs from what the watch held.
    resumed = state.apply(watch_message(["2", "4"], snapshot=True, total=2))
    assert resumed is not None
    assert resumed.resumed
    assert not resumed.snapshot
    assert [a.aliyun_id for a in resumed.added] == ["4"]
    assert resumed.removed == ("3",)
    assert resumed.groups_removed == ("all",)
    assert resumed.became_private
    # A snapshot after a reconnect that changes nothing reports nothing.
    assert state.apply(watch_message(["2", "4"], snapshot=True, total=2)) is None


def test_watch_reconnects_on_unavailable_and_resource_exhausted_only() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.1, max_backoff=0.4)
    unavailable = ImageShareError(grpc.StatusCode.UNAVAILABLE, "drain")
    busy = ImageShareError(grpc.StatusCode.RESOURCE_EXHAUSTED, "limit", retry_after=5.0)
    busy_without_hint = ImageShareError(grpc.StatusCode.RESOURCE_EXHAUSTED, "limit")
    gone = ImageShareError(grpc.StatusCode.NOT_FOUND, "deleted")
    delay = reconnect_delay(unavailable, 1, policy)
    assert delay is not None
    assert 0 <= delay <= 0.1
    assert reconnect_delay(busy, 1, policy) == 5.0
    assert reconnect_delay(busy_without_hint, 1, policy) is None
    assert reconnect_delay(gone, 1, policy) is None
    assert reconnect_delay(unavailable, 3, policy) is None  # bounded by max_attempts


def test_watch_resumes_after_the_stream_ends_and_reports_the_missed_change(
    script: Script, target: str
) -> None:
    script.watch_streams = [
        [watch_message(["1", "2"], snapshot=True, total=2), watch_message(["3"], total=3)],
        [watch_message(["1", "3", "4"], snapshot=True, total=3)],
    ]
    retried: list[str] = []
    with (
        ImageShareClient(
            target, service_config=None, on_retry=lambda _n, e, _d: retried.append(e.code_name)
        ) as client,
        client.watch(
            "cn-hangzhou", "m-test", reconnect=RetryPolicy(max_attempts=5, initial_backoff=0.01)
        ) as watch,
    ):
        events = iter(watch)
        snapshot, change, resumed = next(events), next(events), next(events)
        assert not script.cancelled.is_set()  # the second stream is open while the block runs
    assert snapshot.snapshot
    assert [a.aliyun_id for a in change.added] == ["3"]
    assert resumed.resumed
    assert [a.aliyun_id for a in resumed.added] == ["4"]
    assert resumed.removed == ("2",)
    assert sorted(watch.accounts) == ["1", "3", "4"]
    assert watch.reconnects == 1
    assert retried == ["UNAVAILABLE"]
    assert script.watches == 2
    assert script.cancelled.wait(5)  # leaving the block let go of the stream


def test_a_watch_has_no_default_deadline_unlike_the_other_calls(
    script: Script, target: str
) -> None:
    """The service config's deadline (10 s) is for lists and checks: a watch outlives it.

    The client's own default deadline is off, and the config's is cut to 0.2 s: a listing
    and a check that get no answer fail when it passes, the watch opened before goes on."""
    config = json.loads(json.dumps(DEFAULT_SERVICE_CONFIG))
    assert config["methodConfig"][0]["timeout"] == "10s"
    config["methodConfig"][0]["timeout"] = "0.2s"
    script.watch_streams = [[watch_message(["1"], snapshot=True, total=1)]]
    script.after_release = [watch_message(["2"], total=2)]
    script.then = hang_until_cancelled
    script.check_then = hang_until_cancelled
    with ImageShareClient(target, service_config=config, timeout=None) as client:
        with client.watch("cn-hangzhou", "m-test") as watch:
            events = iter(watch)
            assert next(events).snapshot
            with pytest.raises(ImageShareError) as listing:
                client.list_shares("cn-hangzhou", "m-test").start()
            assert listing.value.code == grpc.StatusCode.DEADLINE_EXCEEDED  # 0.2 s have passed
            with pytest.raises(ImageShareError) as check:
                client.check("cn-hangzhou", "m-test", "1")
            assert check.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            script.release.set()
            later = next(events)  # the watch is still open
        assert [a.aliyun_id for a in later.added] == ["2"]
        assert watch.reconnects == 0


def test_watch_ends_with_not_found(script: Script, target: str) -> None:
    """NOT_FOUND (the image was deleted) is an answer: the watch does not reconnect."""
    script.watch_streams = [[watch_message(["1"], snapshot=True, total=1)]]
    script.watch_end = abort_not_found
    with ImageShareClient(target, service_config=None) as client:
        watch = client.watch("cn-hangzhou", "m-test")
        seen: list[ShareChange] = []
        with pytest.raises(ImageShareError) as caught:
            seen.extend(watch)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert [c.snapshot for c in seen] == [True]
    assert script.watches == 1


async def test_async_watch_resumes_too(script: Script, target: str) -> None:
    script.watch_streams = [
        [watch_message(["1"], snapshot=True, total=1)],
        [watch_message(["1"], snapshot=True, groups=("all",), total=1)],
    ]
    async with (
        AsyncImageShareClient(target, service_config=None) as client,
        client.watch(
            "cn-hangzhou", "m-test", reconnect=RetryPolicy(max_attempts=5, initial_backoff=0.01)
        ) as watch,
    ):
        events = aiter(watch)
        first = await anext(events)
        second = await anext(events)
        await events.aclose()  # type: ignore[attr-defined]
    assert first.snapshot
    assert second.resumed
    assert second.became_public
    assert watch.reconnects == 1
    assert await asyncio.to_thread(script.cancelled.wait, 5)


async def test_async_retry_then_stream(script: Script, target: str) -> None:
    script.fail_first = 1
    script.messages = [message(["1"], 2, ("all",)), message(["2"], 2)]
    async with AsyncImageShareClient(target, retry=FAST_RETRY, service_config=None) as client:
        listing = client.list_shares("cn-hangzhou", "m-test")
        with pytest.raises(RuntimeError, match="not started"):
            _ = listing.metadata
        meta = await listing.start()
        assert meta.share_groups == ("all",)
        assert [a.aliyun_id async for a in listing] == ["1", "2"]
        assert listing.attempts == 2
        assert listing.upstream_request_ids == ("req-1", "req-2")


async def test_async_started_stream_fails_clearly(script: Script, target: str) -> None:
    script.messages = [message(["1"], 5)]
    script.then = abort_unavailable
    async with AsyncImageShareClient(target, retry=FAST_RETRY, service_config=None) as client:
        with pytest.raises(StreamInterruptedError) as caught:
            await client.list_shares("cn-hangzhou", "m-test").collect()
    assert caught.value.accounts_received == 1
    assert script.calls == 1


async def test_async_task_cancellation_cancels_the_rpc(script: Script, target: str) -> None:
    script.messages = [message(["1"], 2)]
    script.then = hang_until_cancelled
    first = asyncio.Event()

    async def consume(client: AsyncImageShareClient) -> None:
        async for _ in client.list_shares("cn-hangzhou", "m-test"):
            first.set()

    async with AsyncImageShareClient(target, retry=NO_RETRY) as client:
        task = asyncio.create_task(consume(client))
        await asyncio.wait_for(first.wait(), 5)
        assert not script.cancelled.is_set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The server hears of it while the channel is still open.
        assert await asyncio.to_thread(script.cancelled.wait, 5)


async def test_async_deadline(script: Script, target: str) -> None:
    script.then = hang_until_cancelled
    async with AsyncImageShareClient(target, retry=FAST_RETRY, service_config=None) as client:
        with pytest.raises(ImageShareError) as caught:
            await client.list_shares("cn-hangzhou", "m-test", timeout=0.3).collect()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


# --- end to end: client -> the app -> httpx -> ECS emulator ---------------------------------
# The app runs in this process on the test's event loop (tests/support/inprocess.py) against
# the in-process emulator (`ecs`, knobs reset around each test). The blocking client runs in
# a worker thread (`asyncio.to_thread`) so that the loop keeps serving it.

REGION = "cn-hangzhou"
DEMO = "m-demo0000001"  # 137 accounts: two upstream pages


@pytest.fixture
async def live(ecs: Emulator) -> AsyncIterator[InProcessApp]:
    """An app of this test's own, cache off (every listing reads the upstream)."""
    async with running(ecs, "--cache-ttl", "0") as app:
        yield app


async def test_live_large_listing_in_chunks(live: InProcessApp) -> None:
    def collect() -> ShareList:
        with ImageShareClient(live.target) as client:
            listing = client.list_shares(REGION, DEMO, page_size=7, bypass_cache=True)
            return listing.collect()

    result = await asyncio.to_thread(collect)
    ids = [a.aliyun_id for a in result.accounts]
    assert len(ids) >= 120
    assert len(set(ids)) == len(ids) == result.metadata.total_count
    assert result.metadata.region_id == REGION
    assert result.metadata.image_id == DEMO
    assert result.metadata.cache_status is CacheStatus.BYPASS
    assert result.upstream_request_ids  # quoted to support when something looks wrong
    assert not result.metadata.is_public
    assert all(a.shared_time is not None for a in result.accounts)
    assert len(live.logs.rpc_lines()) == 1  # one call: no retry, no second stream


async def test_live_sync_stream_is_read_on_the_calling_thread(ecs: Emulator) -> None:
    """No hand-over of each message from a grpc thread: no thread appears while streaming.

    The listing is a cache hit (read once before), so that nothing else in this process (the
    emulator's request threads) starts a thread meanwhile.
    """
    async with running(ecs, "--cache-ttl", "60") as app:
        await app.list(region_id=REGION, image_id=DEMO)

        def stream() -> tuple[set[threading.Thread], int, int, CacheStatus]:
            with ImageShareClient(app.target) as client:
                listing = client.list_shares(REGION, DEMO, page_size=7)
                before = set(threading.enumerate())
                accounts = iter(listing)
                next(accounts)
                during = set(threading.enumerate())
                rest = list(accounts)
            meta = listing.metadata
            return during - before, len(rest) + 1, meta.total_count, meta.cache_status

        appeared, received, total, cache_status = await asyncio.to_thread(stream)
    assert cache_status is CacheStatus.HIT
    assert appeared == set()
    assert received == total == 137


async def test_live_public_and_unshared_images(live: InProcessApp) -> None:
    def ask() -> None:
        with ImageShareClient(live.target) as client:
            assert client.list_shares(REGION, "m-demo0000002").metadata.share_groups == ("all",)
            assert client.is_shared_with(REGION, "m-demo0000002", "424242")
            empty = client.list_shares(REGION, "m-demo0000003").collect()
            assert empty.accounts == ()
            assert empty.metadata.total_count == 0
            assert not client.is_shared_with(REGION, "m-demo0000003", "424242")
            last = client.list_shares(REGION, DEMO).collect().accounts[-1]
            assert client.is_shared_with(REGION, DEMO, last.aliyun_id)
            listed = client.check(REGION, DEMO, last.aliyun_id)
            assert (listed.via, listed.shared_time) == (ShareVia.ACCOUNT, last.shared_time)
            assert client.check(REGION, "m-demo0000002", "424242").via is ShareVia.PUBLIC
            # Not an account id: a failed call, even for a public image, not "not shared".
            with pytest.raises(ImageShareError) as caught:
                client.is_shared_with(REGION, "m-demo0000002", "anyone")
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert [v.field for v in caught.value.field_violations] == ["aliyun_id"]

    await asyncio.to_thread(ask)
    # One CheckImageShare call each, and no listing behind any of them.
    methods = [line["method"].rsplit("/", 1)[-1] for line in live.logs.rpc_lines()]
    assert methods.count("CheckImageShare") == 6
    assert methods.count("ListImageShares") == 3  # the test's own


async def test_live_errors_are_typed(live: InProcessApp) -> None:
    def fail(region: str, image: str) -> ImageShareError:
        with ImageShareClient(live.target) as client, pytest.raises(ImageShareError) as caught:
            client.list_shares(region, image).collect()
        return caught.value

    missing = await asyncio.to_thread(fail, REGION, "m-doesnotexist0")
    invalid = await asyncio.to_thread(fail, "Not a region", DEMO)
    assert missing.code == grpc.StatusCode.NOT_FOUND
    assert missing.reason  # the upstream Code, from google.rpc.ErrorInfo
    assert missing.attempts == 1  # NOT_FOUND is never retried
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "region_id" in [v.field for v in invalid.field_violations]


async def test_live_unavailable_before_first_message_is_retried(ecs: Emulator) -> None:
    async with running(ecs, "--upstream-max-attempts=1", "--cache-ttl=0") as app:
        image, _ = new_image(ecs.knobs, 3)
        ecs.knobs.fault("error_code", count=1, status=503, code="ServiceUnavailable")
        errors: list[str] = []

        def collect() -> tuple[int, int]:
            with ImageShareClient(
                app.target,
                retry=FAST_RETRY,
                service_config=None,
                on_retry=lambda _n, e, _d: errors.append(e.code_name),
            ) as client:
                listing = client.list_shares(REGION, image)
                return len(listing.collect().accounts), listing.attempts

        accounts, attempts = await asyncio.to_thread(collect)
        assert accounts == 3
        assert errors == ["UNAVAILABLE"]
        assert attempts == 2
        assert [line["code"] for line in app.logs.rpc_lines()] == ["Unavailable", "OK"]


async def test_live_deadline(live: InProcessApp, ecs: Emulator) -> None:
    ecs.knobs.set(latency_ms=3000)

    def late() -> tuple[ImageShareError, float]:
        started = time.monotonic()
        with ImageShareClient(live.target) as client, pytest.raises(ImageShareError) as caught:
            client.list_shares(REGION, DEMO, bypass_cache=True, timeout=0.5).collect()
        return caught.value, time.monotonic() - started

    error, took = await asyncio.to_thread(late)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert took < 2.5


@pytest.mark.subprocess
def test_live_server_killed_mid_stream_fails_clearly(
    ecs: Emulator, start_server: Callable[..., ServerProcess]
) -> None:
    """A stream that delivered accounts is not silently restarted when its server dies.

    A subprocess on purpose: the server is SIGKILLed, so its connection drops with no
    status at all, as when a pod is killed; an app in this process can only be stopped
    politely. The upstream is the in-process emulator.

    The server streams only once the whole list is read, and then all at once; so the
    list is far larger than HTTP/2 flow control lets the server send ahead of a caller
    that has read one message: the server is still streaming when it is killed.
    """
    server = start_server("--upstream-qps", "0", upstream=ecs.url)
    total = 20_000
    image, _ = new_image(ecs.knobs, total)
    with ImageShareClient(server.target) as client:
        listing = client.list_shares(REGION, image, page_size=5, bypass_cache=True)
        accounts = iter(listing)
        next(accounts)
        server.proc.kill()
        with pytest.raises(StreamInterruptedError) as caught:
            for _ in accounts:
                pass
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert 1 <= caught.value.accounts_received < total
    assert listing.attempts == 1


async def test_live_async_client_matches_sync(live: InProcessApp) -> None:
    async with AsyncImageShareClient(live.target) as client:
        listing = client.list_shares(REGION, DEMO, page_size=100)
        meta = await listing.start()
        ids = [a.aliyun_id async for a in listing]
        assert await client.is_shared_with(REGION, "m-demo0000002", "1")

    def sync_ids() -> list[str]:
        with ImageShareClient(live.target) as sync_client:
            return [a.aliyun_id for a in sync_client.list_shares(REGION, DEMO)]

    assert ids == await asyncio.to_thread(sync_ids)
    assert meta.total_count == len(ids)
