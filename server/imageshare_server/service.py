"""The gRPC service layer: validate, stream, map every failure to a status.

Nothing reaches the upstream before the request is validated, and every
failure leaves as a deliberate status with rich details (see ``errors``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_server import errors
from imageshare_server.ecs.client import DeadlineExceededError
from imageshare_server.ecs.errors import UpstreamError
from imageshare_server.messages import MessageBuilder
from imageshare_server.source import ShareSource
from imageshare_server.validation import InvalidRequestError, validate

log = logging.getLogger(__name__)

Response = image_share_pb2.ListImageSharesResponse


class ImageShareService(image_share_pb2_grpc.ImageShareServiceServicer):
    def __init__(self, source: ShareSource) -> None:
        self._source = source

    async def ListImageShares(
        self,
        request: image_share_pb2.ListImageSharesRequest,
        context: grpc.aio.ServicerContext[image_share_pb2.ListImageSharesRequest, Response],
    ) -> AsyncIterator[Response]:
        try:
            query = validate(request)
        except InvalidRequestError as exc:
            await _abort(context, errors.invalid_request(exc))
            return
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        builder = MessageBuilder(query)
        try:
            async for chunk in self._source.stream(query, deadline=deadline):
                for message in builder.feed(chunk):
                    yield message
            for message in builder.finish():
                yield message
        except asyncio.CancelledError:
            raise
        except UpstreamError as exc:
            await _abort(context, errors.upstream_error(exc))
        except DeadlineExceededError as exc:
            await _abort(context, errors.deadline_exceeded(exc))
        except errors.ListingUnstableError as exc:
            await _abort(context, errors.listing_unstable(exc))


async def _abort(context: grpc.aio.ServicerContext[object, object], error: errors.RpcError) -> None:
    await context.abort_with_status(error.status)
