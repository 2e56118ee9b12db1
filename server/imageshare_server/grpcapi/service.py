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

A caller that stops reading cannot hold its slot: every message must be
taken by the transport within ``stall_timeout`` seconds, or the stream ends
with UNAVAILABLE (``STREAM_STALLED``). The status is set rather than raised:
an abort would wait for the unread messages to drain first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias, TypeVar

import grpc

from imageshare.v1 import image_share_pb2
from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import (
    ImageShareError,
    MalformedRequestError,
    OverloadedError,
    ShuttingDownError,
    StreamStalledError,
)
from imageshare_server.core.types import Account, CacheStatus
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
from imageshare_server.observability.logging import rpc_log_fields
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
        self._stall_timeout = stall_timeout
        self._clock = clock
        self._active = 0

    @property
    def active(self) -> int:
        return self._active

    async def ListImageShares(self, request: Request | MalformedRequest, context: Context) -> None:
        call = _Call(context, self._stall_timeout, self._clock)
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
            remaining = call.context.time_remaining()
            deadline = None if remaining is None else self._clock.monotonic() + remaining
            builder = MessageBuilder(query)
            caller = _peer(call.context)
            async for chunk in self._source.stream(query, deadline=deadline, caller=caller):
                if not request_ids and not builder.messages_sent:
                    call.announce(chunk.cache_status, chunk.read_time, chunk.entry is not None)
                request_ids.extend(chunk.request_ids)
                if chunk.entry is not None:
                    assert chunk.cache_status is not None  # a cached chunk knows its status
                    suffix = hit_suffix(chunk.cache_status, chunk.entry.stored, self._clock)
                    prebuilt = self._source.prebuilt(
                        chunk.entry, query.page_size, build_cached_messages(chunk.entry, query)
                    )
                    for data in prebuilt:
                        await call.write(data + suffix)
                    fields["messages"] = len(prebuilt)
                    return
                for message in builder.feed(chunk):
                    await call.write(message)
            for message in builder.finish():
                await call.write(message)
            fields["messages"] = builder.messages_sent
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

    async def CheckImageShare(
        self, request: CheckRequest | MalformedRequest, context: Context
    ) -> CheckResponse | None:
        call = _Call(context, self._stall_timeout, self._clock)
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
            call.announce(answer.cache_status, answer.read_time, answer.entry is not None)
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
        call = _Call(context, self._stall_timeout, self._clock)
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
            call.fail(status.to_status(exc))
        except Exception:
            log.exception("unexpected error in WatchImageShares")
            call.fail(status.internal_error())


class _Call:
    """One call's context, its log fields, and the trailing metadata it builds up."""

    __slots__ = ("clock", "context", "fields", "stall_timeout", "trailing")

    def __init__(self, context: Context, stall_timeout: float, clock: Clock) -> None:
        self.context = context
        self.stall_timeout = stall_timeout
        self.clock = clock
        self.fields = rpc_log_fields()
        self.trailing: list[tuple[str, str | bytes]] = []

    async def write(self, message: Response | bytes) -> None:
        """Hand ``message`` to the transport, or ``StreamStalledError`` after the stall timeout."""
        try:
            async with asyncio.timeout(self.stall_timeout):
                await self.context.write(message)
        except TimeoutError:
            raise StreamStalledError(self.stall_timeout) from None

    def announce(self, cache_status: CacheStatus | None, read_time: float, cached: bool) -> None:
        """Say where the answer comes from, in trailing metadata and in the RPC's log line."""
        name = cache_status.value if cache_status is not None else "unspecified"
        age_ms = max(0, int((self.clock.time() - read_time) * 1000)) if cached else 0
        self.fields["cache"] = name
        self.fields["cache_age_ms"] = age_ms
        self.trailing = [("x-imageshare-cache", name), ("x-imageshare-cache-age-ms", str(age_ms))]
        self.context.set_trailing_metadata(tuple(self.trailing))

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
