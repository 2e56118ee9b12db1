"""``grpc.health.v1`` calls over grpc.aio channels, typed.

The grpc-health stubs give ``HealthStub`` no methods, so the calls are made from the
channel with the messages' own (de)serializers.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2

CheckRequest = health_pb2.HealthCheckRequest
CheckResponse = health_pb2.HealthCheckResponse
SERVING = health_pb2.HealthCheckResponse.SERVING


def check(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryUnaryMultiCallable[CheckRequest, CheckResponse]:
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=CheckRequest.SerializeToString,
        response_deserializer=CheckResponse.FromString,
    )


def watch(
    channel: grpc.aio.Channel,
) -> grpc.aio.UnaryStreamMultiCallable[CheckRequest, CheckResponse]:
    return channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=CheckRequest.SerializeToString,
        response_deserializer=CheckResponse.FromString,
    )


async def health_status(channel: grpc.aio.Channel, service: str = "") -> int:
    """The status ``Check`` reports for ``service`` ("" is the whole server), within 5 s."""
    response = await check(channel)(CheckRequest(service=service), timeout=5)
    return int(response.status)


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """The status of a health check that must fail (the channel is closed afterwards)."""
    try:
        await health_status(channel)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await channel.close()
    raise AssertionError("the health check succeeded")
