"""gRPC server metrics with go-grpc-middleware's names, labels and label values.

Fleet dashboards and alerts written for Go services query
``grpc_server_started_total``, ``grpc_server_handled_total{grpc_code}``,
``grpc_server_msg_{received,sent}_total`` and ``grpc_server_handling_seconds``
with ``grpc_type``/``grpc_service``/``grpc_method`` labels and Go's spelling of
status codes. py-grpc-prometheus spells them differently and only has a sync
interceptor, hence this one for ``grpc.aio``.

The same interceptor writes the one JSON log line per RPC: both need the
final status code, and working it out once keeps them in agreement.

Semantics follow go-grpc-middleware v1: ``started`` when the handler is
entered, ``handled`` and the histogram when it finishes; a unary request is
one received message, a unary response one sent message only when the call
ends ``OK`` (a non-OK status discards it). Calls to unknown methods never reach
a handler and are not counted, which also keeps caller-chosen method names out
of the label values.

With tracing on, each async call (but health checks and reflection) runs in a
server span that continues the caller's W3C ``traceparent``; the log line is
written and the latency observed while it is current, so the line carries
``trace_id``/``span_id`` and the histogram an exemplar. Nothing of it is done
per streamed message.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Protocol, TypeAlias

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from imageshare_server.observability.logging import (
    RpcFields,
    bind_rpc_fields,
    log_fields,
    unbind_rpc_fields,
)
from imageshare_server.observability.metrics import LATENCY_BUCKETS
from imageshare_server.observability.tracing import NO_SPAN, NO_TRACING, Span, Tracer, exemplar

__all__ = ["GO_CODE_NAMES", "SERVER_FAULT_CODES", "GrpcMetricsInterceptor"]

GO_CODE_NAMES: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

_CODE_NUMBERS = {name: code.value[0] for code, name in GO_CODE_NAMES.items()}

# Codes that mean the server (or what it depends on) failed the caller; the
# error-ratio alert and the WARNING level of the RPC log line use the same set.
SERVER_FAULT_CODES = frozenset(
    {"Unknown", "Internal", "Unavailable", "DataLoss", "DeadlineExceeded"}
)

# Health probes and reflection are frequent and boring: their log lines go out
# at DEBUG. They are counted in the metrics like any other call.
DEFAULT_QUIET_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
     "grpc.reflection.v1.ServerReflection"}
)  # fmt: skip

# A call cancelled this close to (or past) its deadline was cancelled by the
# deadline. ``time_remaining()`` is clamped at 0 once it has passed and is None
# without a deadline.
_DEADLINE_SLACK_SECONDS = 0.01

_LABELS = ("grpc_type", "grpc_service", "grpc_method")

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class _StatusSource(Protocol):
    """What the final code is read from: an asyncio context, or a sync one's proxy."""

    def code(self) -> grpc.StatusCode | None: ...

    def time_remaining(self) -> float | None: ...

    def peer(self) -> str: ...


_RPC_LOGGER = logging.getLogger("imageshare.rpc")


def _split_method(full_method: str) -> tuple[str, str]:
    service, _, method = full_method.lstrip("/").rpartition("/")
    return service or "unknown", method or "unknown"


def _grpc_type(handler: Handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


# Updates queued before they are applied together (or before any collection).
UPDATE_BATCH = 256


class _Updates(Collector):
    """The interceptor's metrics, and the updates of calls queued for them.

    A call queues its updates (a counter child to increment, or a histogram child, a
    value and an exemplar to observe) and goes on; every ``UPDATE_BATCH`` of them are
    applied together. The metrics are registered through this collector, not on their
    own, so every collection of them (a scrape, one filtered with ``name[]``, a test
    reading the registry) applies the queue first and sees every update queued until
    then. The queue is a deque: appends and pops from any thread (sync handlers run in
    an executor) are atomic.
    """

    def __init__(self, metrics: Iterable[MetricWrapperBase]) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._metrics = tuple(metrics)

    def add(self, update: Any) -> None:
        self._queue.append(update)
        if len(self._queue) >= UPDATE_BATCH:
            self.apply()

    def apply(self) -> None:
        pop = self._queue.popleft
        while True:
            try:
                update = pop()
            except IndexError:
                return
            if type(update) is tuple:
                histogram, value, exemplar_labels = update
                histogram.observe(value, exemplar_labels)
            else:
                update.inc()

    def collect(self) -> Iterable[Metric]:
        self.apply()
        for metric in self._metrics:
            yield from metric.collect()

    def describe(self) -> Iterable[Metric]:
        for metric in self._metrics:
            yield from metric.describe()


class _Method:
    """What every call of one method shares: its labels and metric children, resolved once."""

    __slots__ = (
        "_handled",
        "full_name",
        "grpc_type",
        "handled",
        "labels",
        "name",
        "quiet",
        "received",
        "seconds",
        "sent",
        "service",
        "started",
    )

    def __init__(self, interceptor: GrpcMetricsInterceptor, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self.grpc_type, self.service, self.name = labels
        self.full_name = f"/{self.service}/{self.name}"
        self.quiet = self.service in interceptor.quiet_services
        self.started = interceptor.started.labels(*labels)
        self.received = interceptor.msg_received.labels(*labels)
        self.sent = interceptor.msg_sent.labels(*labels)
        self.seconds = interceptor.handling_seconds.labels(*labels)
        self._handled = interceptor.handled
        self.handled: dict[str, Any] = {}

    def handled_child(self, code: str) -> Any:
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = self._handled.labels(*self.labels, code)
        return child


class _Call:
    """Accounting for one RPC; ``finish`` runs exactly once, whatever ends the call."""

    __slots__ = (
        "_finished",
        "_interceptor",
        "_start",
        "_updates",
        "fields",
        "method",
        "received",
        "sent",
        "span",
    )

    def __init__(self, interceptor: GrpcMetricsInterceptor, method: _Method) -> None:
        self._interceptor = interceptor
        self.method = method
        self.received = 0
        self.sent = 0
        self.fields = RpcFields()
        self.span: Span = NO_SPAN
        self._finished = False
        self._start = time.perf_counter()
        self._updates = interceptor.updates
        self._updates.add(method.started)

    def message_received(self) -> None:
        self.received += 1
        self._updates.add(self.method.received)

    def message_sent(self) -> None:
        self.sent += 1
        self._updates.add(self.method.sent)

    def finish(self, context: _StatusSource, exc: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        duration = time.perf_counter() - self._start
        code = _final_code(context, exc)
        method = self.method
        self._updates.add(method.handled_child(code))
        self._updates.add((method.seconds, duration, exemplar()))
        interceptor = self._interceptor
        if interceptor.log_rpcs:
            interceptor.log_call(self, context, code, duration)
        if self.span.recording:
            self._describe(code)

    def _describe(self, code: str) -> None:
        """The call's outcome on its span: status code, and what the handler logged."""
        span = self.span
        span.set("rpc.grpc.status_code", _CODE_NUMBERS.get(code, 2))
        for field in ("region", "image", "cache"):
            value = self.fields.get(field)
            if isinstance(value, str):
                span.set(f"imageshare.{field}", value)
        if code in SERVER_FAULT_CODES:
            span.fail(code)


def _final_code(context: _StatusSource, exc: BaseException | None) -> str:
    """The status the client gets, as grpc.aio decides it after the handler returns."""
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= _DEADLINE_SLACK_SECONDS:
            return "DeadlineExceeded"
        return "Canceled"
    # abort()/abort_with_status()/set_code() all land in context.code(); an
    # exception after set_code(non-OK) still sends that code, otherwise UNKNOWN.
    code = context.code()
    if exc is None:
        return GO_CODE_NAMES.get(code, "Unknown") if code is not None else "OK"
    if code is None or code is grpc.StatusCode.OK:
        return "Unknown"
    return GO_CODE_NAMES.get(code, "Unknown")


class _ContextProxy:
    """The servicer context as the handler sees it: counts ``read``/``write`` messages.

    What handlers call on every call is forwarded by a method of its own, the rest
    through ``__getattr__``.
    """

    __slots__ = ("_call", "_context")

    def __init__(self, context: Context, call: _Call) -> None:
        self._context = context
        self._call = call

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._call.message_sent()

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._call.message_received()
        return message

    def peer(self) -> str:
        return self._context.peer()

    def time_remaining(self) -> float | None:
        return self._context.time_remaining()

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self._context.set_trailing_metadata(trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _CountingIterator:
    """The request stream as the handler sees it: counts each message it yields."""

    __slots__ = ("_call", "_iterator", "_requests")

    def __init__(self, requests: Any, call: _Call) -> None:
        self._requests = requests
        self._iterator: Any = None
        self._call = call

    def __aiter__(self) -> _CountingIterator:
        return self

    async def __anext__(self) -> Any:
        # Started lazily: a handler that uses context.read() never iterates,
        # and grpc.aio's receiver would warn about a never-awaited coroutine.
        if self._iterator is None:
            self._iterator = self._requests.__aiter__()
        message = await self._iterator.__anext__()
        self._call.message_received()
        return message


# How an async handler answers: one response, responses it writes itself
# (context.write), or responses it yields (an async generator).
_UNARY, _WRITTEN, _GENERATED = "unary", "written", "generated"


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Count, time and log every RPC the server hands to a handler.

    Create one per registry (the metrics are registered in the constructor).
    Tests pass a fresh :class:`~prometheus_client.CollectorRegistry`.

    ``log_rpcs`` writes one JSON line per RPC on the ``imageshare.rpc`` logger
    (INFO; WARNING for server-fault codes unless the handler said the end was
    expected, see :func:`~imageshare_server.observability.logging.rpc_end_expected`;
    DEBUG for ``quiet_services``).

    Handlers may be ``async def`` (returning, or using ``context.write``),
    async generators, or sync functions and generators (which grpc.aio runs
    in an executor). Install it first in the interceptor list so that it
    sees the outcome of every other interceptor too.

    Each method's handler is wrapped once (and its metric children resolved once),
    then reused for every call that gets the same handler.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = REGISTRY,
        *,
        log_rpcs: bool = True,
        quiet_services: Collection[str] = DEFAULT_QUIET_SERVICES,
        logger: logging.Logger = _RPC_LOGGER,
        tracer: Tracer = NO_TRACING,
    ) -> None:
        self.log_rpcs = log_rpcs
        self.tracer = tracer
        self.quiet_services = frozenset(quiet_services)
        self._logger = logger
        # Full method name -> (the handler grpc found, its wrapped form).
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}
        self.started = Counter(
            "grpc_server_started_total",
            "Total number of RPCs started on the server.",
            _LABELS,
            registry=None,
        )
        self.handled = Counter(
            "grpc_server_handled_total",
            "Total number of RPCs completed on the server, regardless of success or failure.",
            (*_LABELS, "grpc_code"),
            registry=None,
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total",
            "Total number of RPC stream messages received on the server.",
            _LABELS,
            registry=None,
        )
        self.msg_sent = Counter(
            "grpc_server_msg_sent_total",
            "Total number of gRPC stream messages sent by the server.",
            _LABELS,
            registry=None,
        )
        self.handling_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level "
            "handled by the server.",
            _LABELS,
            buckets=LATENCY_BUCKETS,
            registry=None,
        )
        # Registered together, through the queue of their updates (see _Updates).
        self.updates = _Updates(
            (self.started, self.handled, self.msg_received, self.msg_sent, self.handling_seconds)
        )
        if registry is not None:
            registry.register(self.updates)

    def initialize(self, full_method: str, grpc_type: str) -> None:
        """Export zero-valued series for a method before its first call.

        Like go-grpc-middleware's ``InitializeMetrics``: ``rate()`` and
        absent-series alerts then work from the first scrape.
        """
        labels = (grpc_type, *_split_method(full_method))
        self.started.labels(*labels)
        self.msg_received.labels(*labels)
        self.msg_sent.labels(*labels)
        self.handling_seconds.labels(*labels)
        for code in GO_CODE_NAMES.values():
            self.handled.labels(*labels, code)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full_method = handler_call_details.method
        wrapped = self._wrapped.get(full_method)
        if wrapped is not None and wrapped[0] is handler:
            return wrapped[1]
        method = _Method(self, (_grpc_type(handler), *_split_method(full_method)))
        result = self._wrap(handler, method)
        # Only methods a handler exists for get here: the table cannot grow without bound.
        self._wrapped[full_method] = (handler, result)
        return result

    def log_call(self, call: _Call, context: _StatusSource, code: str, duration: float) -> None:
        method = call.method
        fields = call.fields
        if method.quiet:
            level = logging.DEBUG
        elif code in SERVER_FAULT_CODES and not getattr(fields, "end_expected", False):
            level = logging.WARNING
        else:
            level = logging.INFO
        if not self._logger.isEnabledFor(level):
            return
        try:
            peer = context.peer()
        except Exception:  # the peer is gone after some cancellations
            peer = ""
        line: dict[str, Any] = {
            "event": "rpc",
            "method": method.full_name,
            "grpc_type": method.grpc_type,
            "code": code,
            "duration_ms": round(duration * 1000, 3),
            "peer": peer,
            "msg_received": call.received,
            "msg_sent": call.sent,
        }
        # The handler's fields come after these and never replace them; a copy, since the
        # line may be formatted a little later (a task the handler started may still hold them).
        log_fields(self._logger, level, "rpc", line, dict(fields) if fields else None)

    def _wrap(self, handler: Handler, method: _Method) -> Handler:
        if handler.request_streaming and handler.response_streaming:
            assert handler.stream_stream is not None
            return grpc.stream_stream_rpc_method_handler(
                self._streaming_response(handler.stream_stream, method, streaming_request=True),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.request_streaming:
            assert handler.stream_unary is not None
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(handler.stream_unary, method, streaming_request=True),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.response_streaming:
            assert handler.unary_stream is not None
            return grpc.unary_stream_rpc_method_handler(
                self._streaming_response(handler.unary_stream, method, streaming_request=False),
                handler.request_deserializer,
                handler.response_serializer,
            )
        assert handler.unary_unary is not None
        return grpc.unary_unary_rpc_method_handler(
            self._unary_response(handler.unary_unary, method, streaming_request=False),
            handler.request_deserializer,
            handler.response_serializer,
        )

    def _unary_response(
        self, behavior: Callable[..., Any], method: _Method, *, streaming_request: bool
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        if not inspect.iscoroutinefunction(behavior):
            return self._sync(behavior, method, streaming_request=streaming_request)
        return self._async(behavior, method, _UNARY, streaming_request=streaming_request)

    def _streaming_response(
        self, behavior: Callable[..., Any], method: _Method, *, streaming_request: bool
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        if inspect.isasyncgenfunction(behavior):
            return self._async(behavior, method, _GENERATED, streaming_request=streaming_request)
        if inspect.iscoroutinefunction(behavior):
            return self._async(behavior, method, _WRITTEN, streaming_request=streaming_request)
        return self._sync(behavior, method, streaming_request=streaming_request)

    def _async(
        self,
        behavior: Callable[..., Any],
        method: _Method,
        answers: str,
        *,
        streaming_request: bool,
    ) -> Callable[[Any, Context], Awaitable[Any]]:
        """Count one async call from its request to its end, whatever ends it.

        The handler gets a counting iterator when requests stream, and its
        exception, a cancellation included, is what ``finish`` turns into the
        code. Probes and reflection are not traced: a kubelet probe would start
        a trace every few seconds per pod.

        Async generators are driven here with context.write() rather than
        handed back to grpc.aio: a cancellation then surfaces in this
        coroutine (not later, in the generator's finaliser), and the
        handler's own cleanup runs before the call is accounted for.
        """
        tracer = NO_TRACING if method.quiet else self.tracer

        async def account(call: _Call, request: Any, context: Context) -> Any:
            exc: BaseException | None = None
            try:
                if streaming_request:
                    request = _CountingIterator(request, call)
                else:
                    call.message_received()
                proxy = _ContextProxy(context, call)
                if answers is _WRITTEN:
                    return await behavior(request, proxy)
                if answers is _UNARY:
                    response = await behavior(request, proxy)
                    code = context.code()
                    if code is None or code is grpc.StatusCode.OK:
                        call.message_sent()
                    return response
                responses = behavior(request, proxy)
                try:
                    async for response in responses:
                        await context.write(response)
                        call.message_sent()
                finally:
                    await responses.aclose()
                return None
            except BaseException as error:
                exc = error
                raise
            finally:
                call.finish(context, exc)

        async def handle(request: Any, context: Context) -> Any:
            call = _Call(self, method)
            token = bind_rpc_fields(call.fields)
            try:
                if not tracer.enabled:
                    return await account(call, request, context)
                with tracer.server_span(
                    method.service, method.name, context.invocation_metadata
                ) as span:
                    call.span = span
                    return await account(call, request, context)
            finally:
                unbind_rpc_fields(token)

        return handle

    def _sync(
        self,
        behavior: Callable[..., Any],
        method: _Method,
        *,
        streaming_request: bool,
    ) -> Callable[[Any, Any], Any]:
        """Account for a sync handler, which grpc.aio runs in an executor thread.

        The generated servicer base class is sync (its methods answer
        UNIMPLEMENTED), so such calls happen even in an all-async server.
        Sync handlers get no :func:`rpc_log_fields` binding: a generator's
        steps may run in different threads, each with its own context.
        """
        response_streaming = method.grpc_type in ("server_stream", "bidi_stream")

        def handle(request: Any, sync_context: Any) -> Any:
            context = _SyncContextProxy(sync_context)
            call = _Call(self, method)
            if streaming_request:
                request = _SyncCountingIterator(request, call)
            else:
                call.message_received()
            try:
                result = behavior(request, context)
            except BaseException as error:
                call.finish(context, error)
                raise
            if response_streaming:
                return _sync_responses(result, call, context)
            code = context.code()
            if code is None or code is grpc.StatusCode.OK:
                call.message_sent()
            call.finish(context, None)
            return result

        return handle


class _SyncContextProxy:
    """A sync servicer context that remembers the code set on it (it has no ``code()``)."""

    __slots__ = ("_code", "_context")

    def __init__(self, context: Any) -> None:
        self._context = context
        self._code: grpc.StatusCode | None = None

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code
        self._context.set_code(code)

    def abort(self, code: grpc.StatusCode, *args: Any, **kwargs: Any) -> None:
        self._code = code
        self._context.abort(code, *args, **kwargs)

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _SyncCountingIterator:
    __slots__ = ("_call", "_iterator")

    def __init__(self, requests: Any, call: _Call) -> None:
        self._iterator = iter(requests)
        self._call = call

    def __iter__(self) -> _SyncCountingIterator:
        return self

    def __next__(self) -> Any:
        message = next(self._iterator)
        self._call.message_received()
        return message


def _sync_responses(responses: Any, call: _Call, context: Any) -> Any:
    exc: BaseException | None = None
    try:
        for response in responses:
            yield response
            call.message_sent()
    except GeneratorExit:
        # grpc.aio closes the generator when the call is cancelled.
        exc = asyncio.CancelledError()
        raise
    except BaseException as error:
        exc = error
        raise
    finally:
        call.finish(context, exc)
