"""Floors for the warm benchmarks: grpc.aio streaming prebuilt messages, and two rungs above.

Every variant answers ``ListImageShares`` with the serialized messages in
``MESSAGES_FILE`` (each a 4-byte big-endian length, then the bytes), which the
bench captured from the real server for the same listing, so the same caller
can measure the server against what grpcio itself costs.

- Bare (the floor): no interceptor, no logging, no cache lookup, no validation;
  an async generator yields the bytes.
- ``--grpc-like-service``: what the service asks of grpc.aio and nothing of its own
  work: the request parsed, the messages written with ``context.write``, two
  trailing-metadata keys, one (pass-through) interceptor, the server's channel options.
- ``--minimal-handler``: the above, with the least Python work each call of the
  service must do, written flat in one coroutine (no layers): validate the request,
  find the list in a ``ShareCache`` and count the hit, add this call's cache status
  and age to each message, set the cache trailers, and account for the call as the
  interceptor does (its metric updates and JSON RPC line), without its wrapper. No error
  handling, no stall watch, no concurrency limit: a floor for the service's
  design, not a server.

    python bench/floor_server.py MESSAGES_FILE [--grpc-like-service | --minimal-handler]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import CollectorRegistry

from imageshare.v1 import image_share_pb2
from imageshare_server.app import server_options
from imageshare_server.cache import CachePolicy, ShareCache
from imageshare_server.config import Settings
from imageshare_server.core.clock import SYSTEM_CLOCK
from imageshare_server.core.types import CacheStatus, ShareList
from imageshare_server.grpcapi.messages import hit_suffix
from imageshare_server.grpcapi.service import SERVICE_NAME
from imageshare_server.grpcapi.validation import validate
from imageshare_server.observability.grpc_metrics import GrpcMetricsInterceptor, _Call, _Method
from imageshare_server.observability.logging import configure_logging
from imageshare_server.observability.metrics import ServiceMetrics

METHOD = "ListImageShares"
Request = image_share_pb2.ListImageSharesRequest
Handler = Callable[[Any, Any], Any]


def read_messages(path: Path) -> list[bytes]:
    data = path.read_bytes()
    messages, offset = [], 0
    while offset < len(data):
        (size,) = struct.unpack_from(">I", data, offset)
        offset += 4
        messages.append(data[offset : offset + size])
        offset += size
    return messages


def write_messages(path: Path, messages: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack(">I", len(m)) + m for m in messages))


def capture(channel: grpc.Channel, request: Request) -> list[bytes]:
    """The serialized messages a server sends for ``request``, exactly as sent."""
    raw: grpc.UnaryStreamMultiCallable[Request, bytes] = channel.unary_stream(
        f"/{SERVICE_NAME}/{METHOD}", request_serializer=Request.SerializeToString
    )
    return list(raw(request, timeout=30))


class PassThrough(grpc.aio.ServerInterceptor):
    """An interceptor that does nothing: the cost of grpc.aio's interceptor path alone."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        return await continuation(handler_call_details)


TRAILERS = (("x-imageshare-cache", "hit"), ("x-imageshare-cache-age-ms", "0"))


def bare(messages: list[bytes]) -> Handler:
    async def list_image_shares(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    return list_image_shares


def grpc_like_service(messages: list[bytes]) -> Handler:
    async def list_image_shares(request: Request, context: Any) -> None:
        context.set_trailing_metadata(TRAILERS)
        for message in messages:
            await context.write(message)

    return list_image_shares


def minimal_handler(messages: list[bytes]) -> Handler:
    """One flat coroutine doing what every call of the service must (see the module doc).

    The accounting is the interceptor's own (its per-call ``_Call``: the metric updates
    and the RPC line, exactly as the server writes them) without its wrapper around the
    handler. The messages stand for the cache entry's prebuilt ones; the suffix this
    call adds to each overrides the status and age they were captured with.
    """
    configure_logging("info")
    cache = ShareCache(CachePolicy(ttl=3600.0))
    hits = ServiceMetrics(None).cache_results["hit"]
    metrics = GrpcMetricsInterceptor(CollectorRegistry())
    method = _Method(metrics, ("server_stream", SERVICE_NAME, METHOD))

    def built() -> list[bytes]:
        return messages

    async def list_image_shares(request: Request, context: Any) -> None:
        call = _Call(metrics, method)
        call.message_received()
        fields = call.fields
        query = validate(request)
        fields.update(region=query.key.region_id, image=query.key.image_id)
        entry = cache.fresh(query.key)
        if entry is None:  # the first call: a list read just now
            now = SYSTEM_CLOCK.time(), SYSTEM_CLOCK.monotonic()
            entry = cache.put(ShareList(query.key, (), (), (), *now))
            assert entry is not None
        hits.inc()
        assert entry.shares is not None
        age_ms = max(0, int((SYSTEM_CLOCK.time() - entry.shares.read_time) * 1000))
        fields["cache"] = "hit"
        fields["cache_age_ms"] = age_ms
        context.set_trailing_metadata(
            (("x-imageshare-cache", "hit"), ("x-imageshare-cache-age-ms", str(age_ms)))
        )
        suffix = hit_suffix(CacheStatus.HIT, entry.stored, SYSTEM_CLOCK)
        prebuilt = cache.messages(entry, query.page_size, built)
        for data in prebuilt:
            await context.write(data + suffix)
            call.message_sent()
        fields["messages"] = len(prebuilt)
        fields["upstream_request_ids"] = []
        call.finish(context, None)

    return list_image_shares


async def serve(messages: list[bytes], variant: str) -> None:
    handler: grpc.RpcMethodHandler[Any, Any]
    if variant == "bare":
        handler = grpc.unary_stream_rpc_method_handler(bare(messages))
        server = grpc.aio.server()
    else:
        make = grpc_like_service if variant == "grpc-like-service" else minimal_handler
        handler = grpc.unary_stream_rpc_method_handler(
            make(messages), request_deserializer=Request.FromString
        )
        server = grpc.aio.server(interceptors=[PassThrough()], options=server_options(Settings()))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD: handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "serving", "grpc_port": port}), file=sys.stderr, flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("messages_file", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--grpc-like-service", dest="variant", action="store_const", const="grpc-like-service"
    )
    group.add_argument(
        "--minimal-handler", dest="variant", action="store_const", const="minimal-handler"
    )
    args = parser.parse_args()
    asyncio.run(serve(read_messages(args.messages_file), args.variant or "bare"))


if __name__ == "__main__":
    main()
