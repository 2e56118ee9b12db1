"""The gRPC service layer: validate, stream, map every failure to a status.

Nothing reaches the upstream before the request is validated, and every
failure leaves as a deliberate status with rich details (see ``status``).
Cache hits are streamed as prebuilt bytes; the method handlers are
registered by hand (``add_to_server``) so their serializers pass those bytes
through, and their deserializers turn undecodable request bytes into
INVALID_ARGUMENT instead of an UNKNOWN with a traceback.

``CheckImageShare`` reads the same list as ``ListImageShares`` (cache,
single-flight, rate limit, errors) and looks the account up in the cached
entry's index. ``WatchImageShares`` streams a ``watch.Watcher``'s events;
watches do not count against ``max_concurrent`` (the hub has its own limit)
and end with UNAVAILABLE (``SHUTTING_DOWN``) once the hub is closed.

A cache hit (``ShareSource.cached``) is answered without an async generator:
the prebuilt messages, each with the call's own cache status and age.

A caller that stops reading cannot hold its slot: every message must be
taken by the transport within ``stall_timeout`` seconds, or the stream ends
with UNAVAILABLE (``STREAM_STALLED``). One timer watches every write in
progress (``StallWatch``), not one per message. The status is set rather
than raised: an abort would wait for the unread messages to drain first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import grpc

from imageshare.v1 import image_share_pb2
from imageshare_server.cache import CacheEntry
from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import (
    ImageShareError,
    MalformedRequestError,
    OverloadedError,
    ShuttingDownError,
    StreamStalledError,
)
from imageshare_server.core.types import Account, CacheStatus, ShareQuery
from imageshare_server.grpcapi import status
from imageshare_server.grpcapi.messages import (
    MessageBuilder,
    build_cached_messages,
    check_response,
    hit_suffix,
    watch_message,
)
from imageshare_server.grpcapi.validation import (
    CheckQuery,
    validate,
    validate_check,
    validate_watch,
)
from imageshare_server.listing.source import ShareAnswer, ShareSource, read_whole
from imageshare_server.observability.logging import rpc_end_expected, rpc_log_fields
from imageshare_server.watch.hub import WatchHub

log = logging.getLogger(__name__)

SERVICE_NAME = image_share_pb2.DESCRIPTOR.services_by_name["ImageShareService"].full_name
LIST_METHOD = f"/{SERVICE_NAME}/ListImageShares"
CHECK_METHOD = f"/{SERVICE_NAME}/CheckImageShare"
WATCH_METHOD = f"/{SERVICE_NAME}/WatchImageShares"
METHODS = {LIST_METHOD: "server_stream", CHECK_METHOD: "unary", WATCH_METHOD: "server_stream"}
Request = image_share_pb2.ListImageSharesRequest
Response = image_share_pb2.ListImageSharesResponse
CheckRequest = image_share_pb2.CheckImageShareRequest
CheckResponse = image_share_pb2.CheckImageShareResponse
WatchRequest = image_share_pb2.WatchImageSharesRequest
Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]
M = TypeVar("M", Request, CheckRequest, WatchRequest)


class MalformedRequest:
    """What the deserializer hands the handler for bytes that are not a request."""

    __slots__ = ()


MALFORMED = MalformedRequest()


def deserializer(kind: type[M]) -> Callable[[bytes], M | MalformedRequest]:
    """A request deserializer that hands the handler ``MALFORMED`` instead of raising."""

    def deserialize(data: bytes) -> M | MalformedRequest:
        try:
            return kind.FromString(data)
        except Exception:  # DecodeError, and whatever else the runtime raises on garbage
            return MALFORMED

    return deserialize


deserialize_request = deserializer(Request)


class ImageShareService:
    def __init__(
        self,
        source: ShareSource,
        *,
        watches: WatchHub | None = None,
        max_concurrent: int = 1000,
        stall_timeout: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._source = source
        self._watches = watches
        self._max_concurrent = max_concurrent
        self._stalls = StallWatch(stall_timeout)
        self._clock = clock
        self._active = 0

    @property
    def active(self) -> int:
        return self._active

    async def ListImageShares(self, request: Request | MalformedRequest, context: Context) -> None:
        call = _Call(context, self._stalls, self._clock)
        if isinstance(request, MalformedRequest):
            call.fields["error"] = "malformed request"
            call.fail(status.to_status(MalformedRequestError()))
            return
        if self._active >= self._max_concurrent:
            call.fail(status.to_status(OverloadedError(self._max_concurrent)))
            return
        self._active += 1
        try:
            await self._list(request, call)
        finally:
            self._active -= 1

    async def _list(self, request: Request, call: _Call) -> None:
        fields = call.fields
        request_ids: list[str] = []
        try:
            query = validate(request)
            fields.update(region=query.key.region_id, image=query.key.image_id)
            hit = self._source.cached(query)
            if hit is not None:
                await self._send_cached(call, query, *hit)
            else:
                await self._read(query, call, request_ids)
        except asyncio.CancelledError:
            raise
        except ImageShareError as exc:
            fields.setdefault("error", str(exc))
            call.fail(status.to_status(exc))
        except Exception:
            log.exception("unexpected error in ListImageShares")
            call.fail(status.internal_error())
        finally:
            # A read's own list (every attempt, failed ones too) is set by the source.
            fields.setdefault("upstream_request_ids", request_ids)

    async def _read(self, query: ShareQuery, call: _Call, request_ids: list[str]) -> None:
        """Stream what the source yields: a read's pages as they come, or a cached list."""
        remaining = call.context.time_remaining()
        deadline = None if remaining is None else self._clock.monotonic() + remaining
        builder = MessageBuilder(query)
        chunks = self._source.stream(query, deadline=deadline, caller=_peer(call.context))
        async with contextlib.aclosing(chunks):
            async for chunk in chunks:
                if chunk.entry is not None:  # a cached list comes whole, and nothing before it
                    assert chunk.cache_status is not None  # a cached chunk knows its status
                    await self._send_cached(call, query, chunk.entry, chunk.cache_status)
                    return
                if not request_ids and not builder.messages_sent:
                    call.announce(chunk.cache_status, chunk.read_time, cached=False)
                request_ids.extend(chunk.request_ids)
                for message in builder.feed(chunk):
                    await call.write(message)
        for message in builder.finish():
            await call.write(message)
        call.fields["messages"] = builder.messages_sent

    async def _send_cached(
        self, call: _Call, query: ShareQuery, entry: CacheEntry, cache_status: CacheStatus
    ) -> None:
        """A cached list: its prebuilt messages, each with this call's cache status and age."""
        shares = entry.shares
        assert shares is not None  # a list, not a negative entry
        call.announce(cache_status, shares.read_time, cached=True)
        suffix = hit_suffix(cache_status, entry.stored, self._clock)
        prebuilt = self._source.prebuilt(
            entry, query.page_size, build_cached_messages(entry, query)
        )
        for data in prebuilt:
            await call.write(data + suffix)
        call.fields["messages"] = len(prebuilt)

    async def CheckImageShare(
        self, request: CheckRequest | MalformedRequest, context: Context
    ) -> CheckResponse | None:
        call = _Call(context, self._stalls, self._clock)
        if isinstance(request, MalformedRequest):
            call.fields["error"] = "malformed request"
            call.fail(status.to_status(MalformedRequestError()))
            return None
        if self._active >= self._max_concurrent:
            call.fail(status.to_status(OverloadedError(self._max_concurrent)))
            return None
        self._active += 1
        try:
            return await self._check(request, call)
        finally:
            self._active -= 1

    async def _check(self, request: CheckRequest, call: _Call) -> CheckResponse | None:
        fields = call.fields
        try:
            check = validate_check(request)
            key = check.query.key
            fields.update(region=key.region_id, image=key.image_id)
            remaining = call.context.time_remaining()
            deadline = None if remaining is None else self._clock.monotonic() + remaining
            answer = await read_whole(
                self._source, check.query, deadline=deadline, caller=_peer(call.context)
            )
            call.announce(answer.cache_status, answer.read_time, cached=answer.entry is not None)
            fields["upstream_request_ids"] = list(answer.request_ids)
            response = check_response(answer, self._find(answer, check), self._clock)
            fields["shared"] = response.shared
            return response
        except asyncio.CancelledError:
            raise
        except ImageShareError as exc:
            fields.setdefault("error", str(exc))
            call.fail(status.to_status(exc))
        except Exception:
            log.exception("unexpected error in CheckImageShare")
            call.fail(status.internal_error())
        return None

    def _find(self, answer: ShareAnswer, check: CheckQuery) -> Account | None:
        """The account in the list: one lookup in a cached entry's index, else one scan of
        the list just read (which cost the read anyway)."""
        if answer.entry is not None:
            return self._source.index(answer.entry).get(check.aliyun_id)
        return next((a for a in answer.accounts if a.aliyun_id == check.aliyun_id), None)

    async def WatchImageShares(
        self, request: WatchRequest | MalformedRequest, context: Context
    ) -> None:
        call = _Call(context, self._stalls, self._clock)
        if isinstance(request, MalformedRequest):
            call.fields["error"] = "malformed request"
            call.fail(status.to_status(MalformedRequestError()))
            return
        fields = call.fields
        fields["messages"] = 0
        try:
            key = validate_watch(request)
            fields.update(region=key.region_id, image=key.image_id)
            if self._watches is None:
                raise ShuttingDownError()
            with self._watches.watch(key) as watcher:
                while True:
                    event = await watcher.next()
                    await call.write(watch_message(event, key))
                    fields["messages"] += 1
        except asyncio.CancelledError:
            raise
        except ImageShareError as exc:
            fields.setdefault("error", str(exc))
            if isinstance(exc, ShuttingDownError):
                rpc_end_expected()  # how a drain hands watchers to other replicas
            call.fail(status.to_status(exc))
        except Exception:
            log.exception("unexpected error in WatchImageShares")
            call.fail(status.internal_error())


class StallWatch:
    """Ends the writes that wait longer than ``timeout`` for their caller to read.

    One loop timer for every stream, not one per message: it looks at the writes in
    progress every tenth of the timeout (at most a second apart), so a stalled
    stream ends between ``timeout`` and ``timeout`` plus that interval after the
    write it is stuck in began.
    """

    __slots__ = ("_interval", "_timer", "_writing", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._interval = min(1.0, timeout / 10)
        self._writing: dict[_Call, float] = {}  # each write in progress: when it began
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, call: _Call, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        self._writing[call] = now
        if self._timer is None:
            self._timer = loop.call_at(now + self._interval, self._sweep, loop)

    def end(self, call: _Call) -> None:
        self._writing.pop(call, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        stalled = [call for call, began in self._writing.items() if now - began >= self.timeout]
        for call in stalled:
            del self._writing[call]
            call.stall()
        if self._writing:
            self._timer = loop.call_at(now + self._interval, self._sweep, loop)


class _Call:
    """One call's context, its log fields, and the trailing metadata it builds up."""

    __slots__ = (
        "_cancelling",
        "_stalled",
        "clock",
        "context",
        "fields",
        "loop",
        "stalls",
        "task",
        "trailing",
    )

    def __init__(self, context: Context, stalls: StallWatch, clock: Clock) -> None:
        self.context = context
        self.stalls = stalls
        self.clock = clock
        self.fields = rpc_log_fields()
        self.trailing: tuple[tuple[str, str | bytes], ...] = ()
        self.task = asyncio.current_task()
        self.loop = self.task.get_loop() if self.task is not None else None
        self._stalled = False
        self._cancelling = 0

    async def write(self, message: Response | bytes) -> None:
        """Hand ``message`` to the transport, or ``StreamStalledError`` after the stall timeout."""
        stalls = self.stalls
        stalls.begin(self, self.loop or asyncio.get_running_loop())
        try:
            await self.context.write(message)
        except asyncio.CancelledError:
            # Ours (as asyncio.timeout tells its own): a stall, and no other cancellation.
            if self._stalled and self.task is not None and self.task.uncancel() <= self._cancelling:
                raise StreamStalledError(stalls.timeout) from None
            raise
        finally:
            stalls.end(self)

    def stall(self) -> None:
        """The write under way waited too long: cancel it (``write`` turns that into the error)."""
        if self.task is None or self._stalled:
            return
        self._stalled = True
        self._cancelling = self.task.cancelling()
        self.task.cancel()

    def announce(self, cache_status: CacheStatus | None, read_time: float, *, cached: bool) -> None:
        """Say where the answer comes from, in trailing metadata and in the RPC's log line."""
        name = cache_status.value if cache_status is not None else "unspecified"
        age_ms = max(0, int((self.clock.time() - read_time) * 1000)) if cached else 0
        self.fields["cache"] = name
        self.fields["cache_age_ms"] = age_ms
        self.trailing = (("x-imageshare-cache", name), ("x-imageshare-cache-age-ms", str(age_ms)))
        self.context.set_trailing_metadata(self.trailing)

    def fail(self, failure: grpc.Status) -> None:
        """End the call with ``failure`` once the handler returns (never blocks on the stream)."""
        self.context.set_code(failure.code)
        self.context.set_details(failure.details)
        self.context.set_trailing_metadata((*self.trailing, *failure.trailing_metadata))


def _peer(context: Context) -> str:
    """The caller's connection (``ipv4:10.0.0.7:53122``): callers take turns by it."""
    try:
        return str(context.peer())
    except Exception:  # the peer is gone after some cancellations
        return ""


def _serialize(message: Response | CheckResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(service: ImageShareService, server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "ListImageShares": grpc.unary_stream_rpc_method_handler(
                service.ListImageShares,
                request_deserializer=deserialize_request,
                response_serializer=_serialize,
            ),
            "CheckImageShare": grpc.unary_unary_rpc_method_handler(
                service.CheckImageShare,
                request_deserializer=deserializer(CheckRequest),
                response_serializer=_serialize,
            ),
            "WatchImageShares": grpc.unary_stream_rpc_method_handler(
                service.WatchImageShares,
                request_deserializer=deserializer(WatchRequest),
                response_serializer=_serialize,
            ),
        },
    )
    server.add_generic_rpc_handlers((handler,))
