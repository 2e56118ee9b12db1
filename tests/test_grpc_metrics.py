"""The gRPC interceptor against a real grpc.aio server on loopback.

A proto-less test service (bytes in, bytes out) covers every handler shape and
ending; the real health and reflection servicers cover what the production
server also serves. Each test gets a fresh registry and server, so counts are
exact. The per-RPC log line is the synchronisation point: it is written after
the metrics, when the server has finished accounting for the call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2
from prometheus_client import CollectorRegistry

from imageshare_server.observability.grpc_metrics import GrpcMetricsInterceptor
from imageshare_server.observability.logging import (
    JsonFormatter,
    rpc_end_expected,
    rpc_log_fields,
)
from tests.support.client_health import check, watch

SERVICE = "test.v1.Echo"
Context = grpc.aio.ServicerContext[bytes, bytes]
NEVER = asyncio.Event()  # handlers that must outlive the client wait on this


async def unary(request: bytes, context: Context) -> bytes:
    rpc_log_fields()["cache"] = "hit"

    async def child() -> None:
        rpc_log_fields()["from_child_task"] = True

    await asyncio.create_task(child())
    match request:
        case b"notfound":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such image")
        case b"invalid":
            await context.abort_with_status(_status(grpc.StatusCode.INVALID_ARGUMENT))
        case b"raise":
            raise RuntimeError("boom")
        case b"setcode":
            context.set_code(grpc.StatusCode.NOT_FOUND)
            return b"discarded"
        case b"setcode-ok-raise":
            context.set_code(grpc.StatusCode.OK)
            raise RuntimeError("boom")
        case b"hang":
            await NEVER.wait()
        case b"unavailable":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "gone")
        case b"unavailable-by-design":
            rpc_end_expected()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
    return b"pong"


def _status(code: grpc.StatusCode) -> grpc.Status:
    @dataclass(frozen=True)
    class Status(grpc.Status):
        code: grpc.StatusCode
        details: str
        trailing_metadata: tuple[tuple[str, str], ...]

    return Status(code, "bad", ())


async def generate(request: bytes, context: Context) -> AsyncIterator[bytes]:
    rpc_log_fields()["pages"] = 3
    if request == b"hang":
        yield b"first"
        await NEVER.wait()
    for i in range(int(request)):
        yield str(i).encode()
    if request == b"0":
        await context.abort(grpc.StatusCode.NOT_FOUND, "empty")


async def write(request: bytes, context: Context) -> None:
    for i in range(int(request)):
        await context.write(str(i).encode())


async def collect(requests: AsyncIterator[bytes], context: Context) -> bytes:
    return b",".join([r async for r in requests])


async def collect_by_read(
    requests: object, context: grpc.aio.ServicerContext[object, bytes]
) -> bytes:
    received: list[bytes] = []
    while (message := await context.read()) is not grpc.aio.EOF:  # the stub omits EOF
        assert isinstance(message, bytes)
        received.append(message)
    return b",".join(received)


class LogCapture(logging.Handler):
    """Keeps formatted lines and wakes waiters on each one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))
        self._changed.set()

    async def wait_for_lines(self, count: int) -> list[dict[str, Any]]:
        async with asyncio.timeout(10):
            while len(self.lines) < count:
                self._changed.clear()
                await self._changed.wait()
        return self.lines


@dataclass
class Harness:
    channel: grpc.aio.Channel
    registry: CollectorRegistry
    logs: LogCapture
    health: HealthServicer

    def call(self, kind: str, method: str) -> Callable[..., Any]:
        factory = getattr(self.channel, kind)
        return factory(f"/{SERVICE}/{method}")  # type: ignore[no-any-return]

    def series(self, name: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every non-zero sample of ``name``, keyed by its sorted labels."""
        found = {}
        for metric in self.registry.collect():
            for sample in metric.samples:
                if sample.name == name and sample.value:
                    found[tuple(sorted(sample.labels.items()))] = sample.value
        return found


def labels(grpc_type: str, method: str, service: str = SERVICE, **extra: str) -> tuple[Any, ...]:
    values = {"grpc_type": grpc_type, "grpc_service": service, "grpc_method": method, **extra}
    return tuple(sorted(values.items()))


@asynccontextmanager
async def serve(
    extra: dict[str, grpc.RpcMethodHandler[Any, Any]] | None = None,
) -> AsyncIterator[Harness]:
    """A real server on loopback with the interceptor, a fresh registry and a log capture."""
    registry = CollectorRegistry()
    logger = logging.getLogger(f"test.rpc.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    capture = LogCapture()
    logger.addHandler(capture)
    interceptor = GrpcMetricsInterceptor(registry, logger=logger)
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Generate": grpc.unary_stream_rpc_method_handler(generate),
                    "Write": grpc.unary_stream_rpc_method_handler(write),
                    "Collect": grpc.stream_unary_rpc_method_handler(collect),
                    "CollectByRead": grpc.stream_unary_rpc_method_handler(collect_by_read),
                    **(extra or {}),
                },
            )
        ]
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE, reflection.SERVICE_NAME, "grpc.health.v1.Health"), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Harness(channel, registry, capture, health)
    finally:
        await server.stop(None)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    async with serve() as running:
        yield running


async def test_unary_ok_counts_once_and_logs_handler_fields(harness: Harness) -> None:
    assert await harness.call("unary_unary", "Unary")(b"ping") == b"pong"
    (line,) = await harness.logs.wait_for_lines(1)

    unary_labels = labels("unary", "Unary")
    assert harness.series("grpc_server_started_total") == {unary_labels: 1}
    assert harness.series("grpc_server_handled_total") == {
        labels("unary", "Unary", grpc_code="OK"): 1
    }
    assert harness.series("grpc_server_msg_received_total") == {unary_labels: 1}
    assert harness.series("grpc_server_msg_sent_total") == {unary_labels: 1}
    assert harness.series("grpc_server_handling_seconds_count") == {unary_labels: 1}
    # One bucket from 1 ms .. 30 s plus +Inf, per go-grpc-middleware's layout.
    buckets = [
        s.labels["le"]
        for m in harness.registry.collect()
        for s in m.samples
        if s.name == "grpc_server_handling_seconds_bucket"
    ]
    assert buckets[0] == "0.001"
    assert buckets[-2:] == ["30.0", "+Inf"]

    assert line["event"] == "rpc"
    assert line["level"] == "info"
    assert line["method"] == f"/{SERVICE}/Unary"
    assert line["code"] == "OK"
    assert line["grpc_type"] == "unary"
    assert line["peer"].startswith("ipv4:127.0.0.1:")
    assert isinstance(line["duration_ms"], float)
    assert line["duration_ms"] >= 0
    assert line["cache"] == "hit"
    assert line["from_child_task"] is True
    assert (line["msg_received"], line["msg_sent"]) == (1, 1)


@pytest.mark.parametrize(
    ("request_bytes", "client_code", "go_code"),
    [
        (b"notfound", grpc.StatusCode.NOT_FOUND, "NotFound"),
        (b"invalid", grpc.StatusCode.INVALID_ARGUMENT, "InvalidArgument"),
        (b"raise", grpc.StatusCode.UNKNOWN, "Unknown"),
        (b"setcode", grpc.StatusCode.NOT_FOUND, "NotFound"),
        (b"setcode-ok-raise", grpc.StatusCode.UNKNOWN, "Unknown"),
    ],
)
async def test_unary_failures_use_the_code_the_client_sees(
    harness: Harness, request_bytes: bytes, client_code: grpc.StatusCode, go_code: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.call("unary_unary", "Unary")(request_bytes)
    assert raised.value.code() is client_code
    (line,) = await harness.logs.wait_for_lines(1)

    assert harness.series("grpc_server_handled_total") == {
        labels("unary", "Unary", grpc_code=go_code): 1
    }
    assert harness.series("grpc_server_started_total") == {labels("unary", "Unary"): 1}
    # A non-OK status discards the unary response.
    assert harness.series("grpc_server_msg_sent_total") == {}
    assert line["code"] == go_code
    assert line["level"] == ("warning" if go_code == "Unknown" else "info")


async def test_deadline_exceeded_is_told_apart_from_cancellation(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.call("unary_unary", "Unary")(b"hang", timeout=0.5)
    assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    (line,) = await harness.logs.wait_for_lines(1)

    assert harness.series("grpc_server_handled_total") == {
        labels("unary", "Unary", grpc_code="DeadlineExceeded"): 1
    }
    assert harness.series("grpc_server_handling_seconds_count") == {labels("unary", "Unary"): 1}
    assert line["code"] == "DeadlineExceeded"
    assert line["level"] == "warning"


async def test_an_end_the_handler_expects_is_logged_at_info_and_counted_as_ever(
    harness: Harness,
) -> None:
    """UNAVAILABLE is a server fault (WARNING) unless the handler says it is the design."""
    for request in (b"unavailable", b"unavailable-by-design"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await harness.call("unary_unary", "Unary")(request)
        assert raised.value.code() is grpc.StatusCode.UNAVAILABLE
    lines = await harness.logs.wait_for_lines(2)
    assert [(line["code"], line["level"]) for line in lines] == [
        ("Unavailable", "warning"),
        ("Unavailable", "info"),
    ]
    assert harness.series("grpc_server_handled_total") == {
        labels("unary", "Unary", grpc_code="Unavailable"): 2
    }


async def test_client_cancel_mid_stream_counts_canceled_and_sent_messages(
    harness: Harness,
) -> None:
    call = harness.call("unary_stream", "Generate")(b"hang", timeout=30)
    assert await call.read() == b"first"
    call.cancel()
    (line,) = await harness.logs.wait_for_lines(1)

    stream = labels("server_stream", "Generate")
    assert harness.series("grpc_server_handled_total") == {
        labels("server_stream", "Generate", grpc_code="Canceled"): 1
    }
    assert harness.series("grpc_server_msg_sent_total") == {stream: 1}
    assert harness.series("grpc_server_msg_received_total") == {stream: 1}
    assert line["code"] == "Canceled"
    assert line["pages"] == 3


async def test_async_generator_stream(harness: Harness) -> None:
    responses = [r async for r in harness.call("unary_stream", "Generate")(b"5")]
    assert responses == [b"0", b"1", b"2", b"3", b"4"]
    (line,) = await harness.logs.wait_for_lines(1)

    stream = labels("server_stream", "Generate")
    assert harness.series("grpc_server_started_total") == {stream: 1}
    assert harness.series("grpc_server_handled_total") == {
        labels("server_stream", "Generate", grpc_code="OK"): 1
    }
    assert harness.series("grpc_server_msg_sent_total") == {stream: 5}
    assert harness.series("grpc_server_msg_received_total") == {stream: 1}
    assert line["msg_sent"] == 5


async def test_async_generator_abort(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        _ = [r async for r in harness.call("unary_stream", "Generate")(b"0")]
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    await harness.logs.wait_for_lines(1)
    assert harness.series("grpc_server_handled_total") == {
        labels("server_stream", "Generate", grpc_code="NotFound"): 1
    }
    assert harness.series("grpc_server_msg_sent_total") == {}


async def test_context_write_stream(harness: Harness) -> None:
    responses = [r async for r in harness.call("unary_stream", "Write")(b"3")]
    assert responses == [b"0", b"1", b"2"]
    await harness.logs.wait_for_lines(1)

    stream = labels("server_stream", "Write")
    assert harness.series("grpc_server_handled_total") == {
        labels("server_stream", "Write", grpc_code="OK"): 1
    }
    assert harness.series("grpc_server_msg_sent_total") == {stream: 3}


@pytest.mark.parametrize("method", ["Collect", "CollectByRead"])
async def test_client_stream_counts_each_request(harness: Harness, method: str) -> None:
    assert await harness.call("stream_unary", method)(iter([b"a", b"b", b"c"])) == b"a,b,c"
    await harness.logs.wait_for_lines(1)

    stream = labels("client_stream", method)
    assert harness.series("grpc_server_msg_received_total") == {stream: 3}
    assert harness.series("grpc_server_msg_sent_total") == {stream: 1}
    assert harness.series("grpc_server_handled_total") == {
        labels("client_stream", method, grpc_code="OK"): 1
    }


async def test_health_check_and_watch(harness: Harness) -> None:
    reply = await check(harness.channel)(health_pb2.HealthCheckRequest(service=""))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await check(harness.channel)(health_pb2.HealthCheckRequest(service="nope"))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    call = watch(harness.channel)(health_pb2.HealthCheckRequest(service=""))
    first = await call.read()
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    call.cancel()
    lines = await harness.logs.wait_for_lines(3)

    health = "grpc.health.v1.Health"
    assert harness.series("grpc_server_handled_total") == {
        labels("unary", "Check", health, grpc_code="OK"): 1,
        labels("unary", "Check", health, grpc_code="NotFound"): 1,
        labels("server_stream", "Watch", health, grpc_code="Canceled"): 1,
    }
    assert harness.series("grpc_server_msg_sent_total") == {
        labels("unary", "Check", health): 1,
        labels("server_stream", "Watch", health): 1,
    }
    # Probes are frequent: their lines are DEBUG so production INFO logs stay readable.
    assert {line["level"] for line in lines} == {"debug"}


async def test_reflection_bidi_stream(harness: Harness) -> None:
    info = harness.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    requests = [reflection_pb2.ServerReflectionRequest(list_services="")] * 2
    replies = [r async for r in info(iter(requests))]
    assert len(replies) == 2
    assert SERVICE in {s.name for s in replies[0].list_services_response.service}
    await harness.logs.wait_for_lines(1)

    service = "grpc.reflection.v1alpha.ServerReflection"
    bidi = labels("bidi_stream", "ServerReflectionInfo", service)
    assert harness.series("grpc_server_started_total") == {bidi: 1}
    assert harness.series("grpc_server_msg_received_total") == {bidi: 2}
    assert harness.series("grpc_server_msg_sent_total") == {bidi: 2}
    assert harness.series("grpc_server_handled_total") == {
        labels("bidi_stream", "ServerReflectionInfo", service, grpc_code="OK"): 1
    }


async def test_unknown_method_is_not_counted(harness: Harness) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await harness.call("unary_unary", "NoSuchMethod")(b"x")
    assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    # A known call afterwards proves the server is accounting, and that it is alone.
    await harness.call("unary_unary", "Unary")(b"ping")
    (line,) = await harness.logs.wait_for_lines(1)
    assert line["method"] == f"/{SERVICE}/Unary"
    assert harness.series("grpc_server_started_total") == {labels("unary", "Unary"): 1}


async def test_initialize_exports_zero_series() -> None:
    registry = CollectorRegistry()
    interceptor = GrpcMetricsInterceptor(registry, log_rpcs=False)
    interceptor.initialize("/imageshare.v1.ImageShareService/ListImageShares", "server_stream")
    value = registry.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": "server_stream",
            "grpc_service": "imageshare.v1.ImageShareService",
            "grpc_method": "ListImageShares",
            "grpc_code": "Unavailable",
        },
    )
    assert value == 0.0


def test_rpc_log_fields_outside_a_call_is_a_throwaway() -> None:
    rpc_log_fields()["cache"] = "hit"
    assert rpc_log_fields() == {}


async def test_sync_handlers_are_counted_too() -> None:
    def unimplemented(request: bytes, context: grpc.ServicerContext) -> bytes:
        # What a generated servicer base class does for a method nobody overrode.
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        raise NotImplementedError("Method not implemented!")

    def sync_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield from (b"a", b"b")

    async with serve(
        {
            "SyncUnary": grpc.unary_unary_rpc_method_handler(unimplemented),
            "SyncStream": grpc.unary_stream_rpc_method_handler(sync_stream),
        }
    ) as harness:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await harness.call("unary_unary", "SyncUnary")(b"x")
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert [r async for r in harness.call("unary_stream", "SyncStream")(b"x")] == [b"a", b"b"]
        await harness.logs.wait_for_lines(2)

        assert harness.series("grpc_server_handled_total") == {
            labels("unary", "SyncUnary", grpc_code="Unimplemented"): 1,
            labels("server_stream", "SyncStream", grpc_code="OK"): 1,
        }
        assert harness.series("grpc_server_msg_sent_total") == {
            labels("server_stream", "SyncStream"): 2
        }


async def test_concurrent_mixed_calls_each_count_once(harness: Harness) -> None:
    unary_call = harness.call("unary_unary", "Unary")

    async def one(kind: int) -> None:
        if kind == 0:
            await unary_call(b"ping")
        elif kind == 1:
            with pytest.raises(grpc.aio.AioRpcError):
                await unary_call(b"notfound")
        else:
            call = harness.call("unary_stream", "Generate")(b"hang")
            await call.read()
            call.cancel()

    await asyncio.gather(*(one(i % 3) for i in range(30)))
    await harness.logs.wait_for_lines(30)

    assert harness.series("grpc_server_handled_total") == {
        labels("unary", "Unary", grpc_code="OK"): 10,
        labels("unary", "Unary", grpc_code="NotFound"): 10,
        labels("server_stream", "Generate", grpc_code="Canceled"): 10,
    }
    assert sum(harness.series("grpc_server_started_total").values()) == 30
    assert len(harness.logs.lines) == 30


def test_a_scrape_filtered_by_name_sees_every_queued_update() -> None:
    """Updates are queued per call; a ``name[]``-filtered scrape applies them too."""
    registry = CollectorRegistry()
    interceptor = GrpcMetricsInterceptor(registry)
    labels = ("server_stream", "imageshare.v1.ImageShareService", "ListImageShares")
    for _ in range(3):
        interceptor.updates.add(interceptor.started.labels(*labels))
    only = registry.restricted_registry(["grpc_server_started_total"])
    filtered = [
        (sample.name, sample.value) for family in only.collect() for sample in family.samples
    ]
    assert filtered == [("grpc_server_started_total", 3.0)]
