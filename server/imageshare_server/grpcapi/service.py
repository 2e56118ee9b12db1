"""The gRPC service layer: validate, stream, map every failure to a status.

Nothing reaches the upstream before the request is validated, and every
failure leaves as a deliberate status with rich details (see ``status``).
Cache hits are streamed as prebuilt bytes; the method handler is registered
by hand (``add_to_server``) so its serializer passes those bytes through,
and its deserializer turns undecodable request bytes into INVALID_ARGUMENT
instead of an UNKNOWN with a traceback.

A caller that stops reading cannot hold its slot: every message must be
taken by the transport within ``stall_timeout`` seconds, or the stream ends
with UNAVAILABLE (``STREAM_STALLED``). The status is set rather than raised:
an abort would wait for the unread messages to drain first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TypeAlias

import grpc

from imageshare.v1 import image_share_pb2
from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import (
    ImageShareError,
    MalformedRequestError,
    OverloadedError,
    StreamStalledError,
)
from imageshare_server.core.types import CacheStatus
from imageshare_server.grpcapi import status
from imageshare_server.grpcapi.messages import MessageBuilder, build_cached_messages, hit_suffix
from imageshare_server.grpcapi.validation import validate
from imageshare_server.listing.source import ShareSource
from imageshare_server.observability.logging import rpc_log_fields

log = logging.getLogger(__name__)

SERVICE_NAME = image_share_pb2.DESCRIPTOR.services_by_name["ImageShareService"].full_name
LIST_METHOD = f"/{SERVICE_NAME}/ListImageShares"
Request = image_share_pb2.ListImageSharesRequest
Response = image_share_pb2.ListImageSharesResponse
Context: TypeAlias = grpc.aio.ServicerContext["Request | MalformedRequest", "Response | bytes"]
Metadata: TypeAlias = Sequence[tuple[str, str | bytes]]


class MalformedRequest:
    """What the deserializer hands the handler for bytes that are not a request."""

    __slots__ = ()


MALFORMED = MalformedRequest()


def deserialize_request(data: bytes) -> Request | MalformedRequest:
    try:
        return Request.FromString(data)
    except Exception:  # DecodeError, and whatever else the runtime raises on garbage
        return MALFORMED


class ImageShareService:
    def __init__(
        self,
        source: ShareSource,
        *,
        max_concurrent: int = 1000,
        stall_timeout: float = 30.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._source = source
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


def _serialize(message: Response | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(service: ImageShareService, server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "ListImageShares": grpc.unary_stream_rpc_method_handler(
                service.ListImageShares,
                request_deserializer=deserialize_request,
                response_serializer=_serialize,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
