"""The gRPC service layer: validate, stream, map every failure to a status.

Nothing reaches the upstream before the request is validated, and every
failure leaves as a deliberate status with rich details (see ``errors``).
Cache hits are streamed as prebuilt bytes; the method handler is registered
by hand (``add_to_server``) so its serializer passes those bytes through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc

from imageshare.v1 import image_share_pb2
from imageshare_server import errors
from imageshare_server.ecs.client import DeadlineExceededError
from imageshare_server.ecs.errors import UpstreamError
from imageshare_server.messages import MessageBuilder, cached_messages, hit_suffix
from imageshare_server.observability.logging import rpc_log_fields
from imageshare_server.ratelimit import RateLimitedError
from imageshare_server.source import ShareSource
from imageshare_server.validation import InvalidRequestError, validate

log = logging.getLogger(__name__)

SERVICE_NAME = "imageshare.v1.ImageShareService"
Request = image_share_pb2.ListImageSharesRequest
Response = image_share_pb2.ListImageSharesResponse
Context: TypeAlias = grpc.aio.ServicerContext[Request, Response]

_CACHE_STATUS_NAMES = {
    value: name.removeprefix("CACHE_STATUS_").lower()
    for name, value in image_share_pb2.CacheStatus.items()
}


class ImageShareService:
    def __init__(self, source: ShareSource, *, max_concurrent: int = 1000) -> None:
        self._source = source
        self._max_concurrent = max_concurrent
        self._active = 0

    async def ListImageShares(
        self, request: Request, context: Context
    ) -> AsyncIterator[Response | bytes]:
        if self._active >= self._max_concurrent:
            await context.abort_with_status(errors.overloaded(self._max_concurrent))
        self._active += 1
        try:
            async for message in self._list(request, context):
                yield message
        finally:
            self._active -= 1

    async def _list(self, request: Request, context: Context) -> AsyncIterator[Response | bytes]:
        fields = rpc_log_fields()
        try:
            query = validate(request)
        except InvalidRequestError as exc:
            await context.abort_with_status(errors.invalid_request(exc))
        fields.update(region=query.key.region_id, image=query.key.image_id)
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        builder = MessageBuilder(query)
        request_ids: list[str] = []
        failure: grpc.Status | None = None
        try:
            async for chunk in self._source.stream(query, deadline=deadline):
                if not request_ids and not builder.messages_sent:
                    _announce(context, fields, chunk.cache_status, chunk.read_time, chunk.entry)
                request_ids.extend(chunk.request_ids)
                if chunk.entry is not None:
                    suffix = hit_suffix(chunk.cache_status, chunk.entry.stored)
                    prebuilt = cached_messages(chunk.entry, query)
                    for data in prebuilt:
                        yield data + suffix
                    fields["messages"] = len(prebuilt)
                    return
                for message in builder.feed(chunk):
                    yield message
            for message in builder.finish():
                yield message
            fields["messages"] = builder.messages_sent
        except asyncio.CancelledError:
            raise
        except UpstreamError as exc:
            failure = errors.upstream_error(exc)
        except DeadlineExceededError as exc:
            failure = errors.deadline_exceeded(exc)
        except RateLimitedError as exc:
            failure = errors.rate_limited(exc.wait)
        except errors.ListingUnstableError as exc:
            failure = errors.listing_unstable(exc)
        except Exception:
            log.exception("unexpected error in ListImageShares")
            failure = errors.internal_error()
        finally:
            fields["upstream_request_ids"] = request_ids
        if failure is not None:
            await context.abort_with_status(failure)


def _announce(
    context: Context,
    fields: dict[str, object],
    status: image_share_pb2.CacheStatus.ValueType,
    read_time: float,
    entry: object,
) -> None:
    """Say where the answer comes from, in trailing metadata and in the RPC's log line."""
    name = _CACHE_STATUS_NAMES.get(status, "unspecified")
    age_ms = max(0, int((time.time() - read_time) * 1000)) if entry is not None else 0
    fields["cache"] = name
    fields["cache_age_ms"] = age_ms
    context.set_trailing_metadata(
        (("x-imageshare-cache", name), ("x-imageshare-cache-age-ms", str(age_ms)))
    )


def _serialize(message: Response | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def add_to_server(service: ImageShareService, server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "ListImageShares": grpc.unary_stream_rpc_method_handler(
                service.ListImageShares,
                request_deserializer=Request.FromString,
                response_serializer=_serialize,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
