"""The OpenTelemetry tracer: imported only when ``OTEL_*`` variables ask for traces.

Everything is configured by the standard variables, read by the SDK itself:
``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (the service name
defaults to ``imageshare-server``), ``OTEL_TRACES_SAMPLER`` and
``OTEL_TRACES_SAMPLER_ARG`` (default ``parentbased_always_on``: a caller's
sampling decision is kept), ``OTEL_PROPAGATORS`` (default W3C
``tracecontext,baggage``), ``OTEL_EXPORTER_OTLP_*`` (endpoint, headers,
certificates, timeout, compression) and ``OTEL_BSP_*`` (batching).
``OTEL_TRACES_EXPORTER`` may name ``otlp`` (OTLP over gRPC, the exporter the
extra installs) and ``console``.

The provider is this app's own, not OpenTelemetry's global one: two apps in
one process (tests) each have theirs, and :meth:`OtelTracer.shutdown` flushes
it when the app stops.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from opentelemetry import propagate
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from imageshare_server import __version__
from imageshare_server.observability.tracing import (
    NO_SPAN,
    AttributeValue,
    Metadata,
    Span,
    SpanIds,
    TracingConfigError,
    current_span_ids,
    reset_current_span_ids,
    set_current_span_ids,
)
from imageshare_server.observability.tracing import (
    SpanKind as Kind,
)
from imageshare_server.redaction import redact

if TYPE_CHECKING:
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer as OtelTracerApi

__all__ = ["OtelTracer"]

DEFAULT_SERVICE_NAME = "imageshare-server"
# Status descriptions are for people; long upstream messages stay in the logs.
_MAX_DESCRIPTION = 256

_KINDS: dict[Kind, SpanKind] = {
    "internal": SpanKind.INTERNAL,
    "server": SpanKind.SERVER,
    "client": SpanKind.CLIENT,
}


class _Span:
    __slots__ = ("_span",)

    def __init__(self, span: OtelSpan) -> None:
        self._span = span

    @property
    def recording(self) -> bool:
        return self._span.is_recording()

    def set(self, key: str, value: AttributeValue) -> None:
        if isinstance(value, str):
            value = redact(value)
        elif isinstance(value, list | tuple):
            value = [redact(v) for v in value]
        self._span.set_attribute(key, value)

    def fail(self, description: str) -> None:
        text = redact(description)
        if len(text) > _MAX_DESCRIPTION:
            text = text[: _MAX_DESCRIPTION - 1] + "…"
        self._span.set_status(Status(StatusCode.ERROR, text))

    def link(self, ids: SpanIds | None) -> None:
        if ids is None:
            return
        flags = TraceFlags(TraceFlags.SAMPLED if ids.sampled else TraceFlags.DEFAULT)
        self._span.add_link(SpanContext(ids.trace_id, ids.span_id, False, flags))


class OtelTracer:
    """Spans through an OpenTelemetry SDK ``TracerProvider`` of this app's own."""

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer: OtelTracerApi = provider.get_tracer("imageshare_server", __version__)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> OtelTracer:
        exporters = _exporters(environ)
        resource = Resource.create({SERVICE_VERSION: __version__})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider)

    @contextmanager
    def span(
        self, name: str, *, kind: Kind = "internal", only_in_trace: bool = False
    ) -> Iterator[Span]:
        if only_in_trace and current_span_ids() is None:
            yield NO_SPAN
            return
        with self._tracer.start_as_current_span(
            name, kind=_KINDS[kind], record_exception=False, set_status_on_exception=False
        ) as span:
            yield from _current(span)

    @contextmanager
    def server_span(
        self, service: str, method: str, metadata: Callable[[], Metadata | None]
    ) -> Iterator[_Span]:
        carrier = {key: value for key, value in metadata() or () if isinstance(value, str)}
        with self._tracer.start_as_current_span(
            f"{service}/{method}",
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield from _current(span)

    def shutdown(self) -> None:
        self.provider.force_flush(timeout_millis=5000)
        self.provider.shutdown()


def _current(span: OtelSpan) -> Iterator[_Span]:
    """Publish ``span``'s ids for logs and exemplars while it is current; mark failures."""
    context = span.get_span_context()
    token = set_current_span_ids(
        SpanIds(context.trace_id, context.span_id, context.trace_flags.sampled)
    )
    wrapped = _Span(span)
    try:
        yield wrapped
    except Exception as exc:
        if wrapped.recording:
            wrapped.fail(f"{type(exc).__name__}: {exc}")
        raise
    except BaseException:  # cancelled (or closed): not a failure of its own
        if wrapped.recording:
            wrapped.set("imageshare.cancelled", True)
        raise
    finally:
        reset_current_span_ids(token)


def _exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    names = [
        name.strip().lower()
        for name in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")
        if name.strip()
    ] or ["otlp"]
    exporters: list[SpanExporter] = []
    for name in names:
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp(environ))
        else:
            raise TracingConfigError(
                f"OTEL_TRACES_EXPORTER={name!r} is not supported; use otlp or console"
            )
    return exporters


def _otlp(environ: Mapping[str, str]) -> SpanExporter:
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol != "grpc":
        raise TracingConfigError(
            f"OTLP protocol {protocol!r} is not installed; the otel extra exports OTLP over "
            "gRPC (OTEL_EXPORTER_OTLP_PROTOCOL=grpc, a collector's port 4317)"
        )
    # The exporter reads the OTEL_EXPORTER_OTLP_* variables itself.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    return OTLPSpanExporter()
