"""The floor for (c): a bare grpc.aio server streaming prebuilt messages, nothing else.

No interceptor, no logging, no cache lookup, no validation: it answers every
``ListImageShares`` call with the serialized messages in ``MESSAGES_FILE``
(each a 4-byte big-endian length, then the bytes), which ``facade.py``
captured from the real server for the same listing. The warm latency of the
façade is reported as a ratio to this server's, measured by the same caller
in the same run, so what the table shows as ours is what remains beyond
grpcio's own cost of streaming that many messages.

    python bench/floor_server.py MESSAGES_FILE
"""

from __future__ import annotations

import asyncio
import json
import struct
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from imageshare.v1 import image_share_pb2
from imageshare_server.grpcapi.service import SERVICE_NAME

METHOD = "ListImageShares"


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


def capture(channel: grpc.Channel, request: image_share_pb2.ListImageSharesRequest) -> list[bytes]:
    """The serialized messages a server sends for ``request``, exactly as sent."""
    raw: grpc.UnaryStreamMultiCallable[image_share_pb2.ListImageSharesRequest, bytes] = (
        channel.unary_stream(
            f"/{SERVICE_NAME}/{METHOD}",
            request_serializer=image_share_pb2.ListImageSharesRequest.SerializeToString,
        )
    )
    return list(raw(request, timeout=30))


async def serve(messages: list[bytes]) -> None:
    async def list_image_shares(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME, {METHOD: grpc.unary_stream_rpc_method_handler(list_image_shares)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"event": "serving", "grpc_port": port}), file=sys.stderr, flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(read_messages(Path(sys.argv[1]))))
