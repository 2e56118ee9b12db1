"""Tracing as the service's components see it: a ``Tracer``, a no-op one, the current span's ids.

OpenTelemetry is optional (the ``otel`` extra) and off unless the standard
``OTEL_*`` variables ask for an exporter. Nothing in this module imports it:
``tracing_setup.configure_tracing`` imports ``observability.otel`` (which builds
on this module) only when tracing is asked for, so a server without the extra,
or without the variables, never loads opentelemetry and runs exactly as before.

Components receive a :class:`Tracer` (``NO_TRACING`` by default), like their
``ServiceMetrics``, and open spans with ``with tracer.span(name) as span:``.
The no-op tracer hands out one shared no-op span: no allocation, no context
switch. Spans never cross a ``yield`` of an async generator (the context
variable would leak into the consumer).

The ids of the span that is current live in a context variable of this
module, set only while one of our spans is current, so that log lines
(``JsonFormatter``) and histogram exemplars read them with one lookup and
without opentelemetry.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Protocol, TypeAlias

__all__ = [
    "NO_SPAN",
    "NO_TRACING",
    "Span",
    "SpanIds",
    "Tracer",
    "TracingConfigError",
    "current_span_ids",
    "exemplar",
]

log = logging.getLogger(__name__)

SpanKind: TypeAlias = Literal["internal", "server", "client"]
AttributeValue: TypeAlias = str | bool | int | float | Sequence[str]
Metadata: TypeAlias = Iterable[tuple[str, str | bytes]]


class TracingConfigError(Exception):
    """``OTEL_*`` variables that ask for something this server cannot do."""


@dataclass(frozen=True, slots=True)
class SpanIds:
    """The W3C ids of a span, and whether its trace is sampled (exported)."""

    trace_id: int
    span_id: int
    sampled: bool

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_hex(self) -> str:
        return f"{self.span_id:016x}"


_current: contextvars.ContextVar[SpanIds | None] = contextvars.ContextVar(
    "imageshare_span_ids", default=None
)


def current_span_ids() -> SpanIds | None:
    """The ids of the span of ours that is current in this context; None outside any."""
    return _current.get()


def set_current_span_ids(ids: SpanIds | None) -> contextvars.Token[SpanIds | None]:
    """For tracer implementations: make ``ids`` current (reset with the returned token)."""
    return _current.set(ids)


def reset_current_span_ids(token: contextvars.Token[SpanIds | None]) -> None:
    _current.reset(token)


def exemplar() -> dict[str, str] | None:
    """Exemplar labels for a histogram observation: the current sampled span's ids, or None.

    An unsampled trace is not stored anywhere, so it would only be a dead link.
    """
    ids = _current.get()
    if ids is None or not ids.sampled:
        return None
    return {"trace_id": ids.trace_hex, "span_id": ids.span_hex}


class Span(Protocol):
    """What a component may do with its span."""

    @property
    def recording(self) -> bool:
        """False for the no-op span (and unsampled ones): skip computing attributes."""
        ...

    def set(self, key: str, value: AttributeValue) -> None:
        """Set an attribute; strings are redacted like log lines."""
        ...

    def fail(self, description: str) -> None:
        """Mark the span as failed (status ERROR) with a short, redacted description."""
        ...

    def link(self, ids: SpanIds | None) -> None:
        """Link to another span (a read this call joined instead of starting)."""
        ...


class Tracer(Protocol):
    @property
    def enabled(self) -> bool: ...

    def span(
        self, name: str, *, kind: SpanKind = "internal", only_in_trace: bool = False
    ) -> AbstractContextManager[Span]:
        """A span, current while the block runs, child of the current one.

        ``only_in_trace``: none at all unless a span is already current (background
        chores such as the Redis probe must not start a trace every second).
        """
        ...

    def server_span(
        self, service: str, method: str, metadata: Callable[[], Metadata | None]
    ) -> AbstractContextManager[Span]:
        """The span of one RPC, continuing the caller's W3C ``traceparent`` from ``metadata``.

        ``metadata`` is called only when tracing is on.
        """
        ...

    def shutdown(self) -> None:
        """Export what is buffered and stop."""
        ...


class _NoSpan:
    """The span and the context manager of the no-op tracer, in one shared object."""

    __slots__ = ()

    recording = False

    def set(self, key: str, value: AttributeValue) -> None:
        """Nothing to record."""

    def fail(self, description: str) -> None:
        """Nothing to record."""

    def link(self, ids: SpanIds | None) -> None:
        """Nothing to record."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NO_SPAN = _NoSpan()


class NoTracing:
    """Tracing off: every span is the shared no-op span."""

    __slots__ = ()

    enabled = False

    def span(
        self, name: str, *, kind: SpanKind = "internal", only_in_trace: bool = False
    ) -> _NoSpan:
        return NO_SPAN

    def server_span(
        self, service: str, method: str, metadata: Callable[[], Metadata | None]
    ) -> _NoSpan:
        return NO_SPAN

    def shutdown(self) -> None:
        """Nothing buffered."""


NO_TRACING = NoTracing()
