"""Which tracer the standard ``OTEL_*`` variables ask for, decided at start-up.

Apart from :mod:`.tracing` so that the dependency runs one way: ``otel`` builds on
``tracing``, and this module, which the app calls, is the only one that imports
``otel`` (and only when tracing is asked for).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from imageshare_server.observability.tracing import NO_TRACING, Tracer

__all__ = ["configure_tracing", "tracing_requested"]

log = logging.getLogger(__name__)


def _flag(environ: Mapping[str, str], name: str) -> str:
    return environ.get(name, "").strip().lower()


def tracing_requested(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces to be exported.

    Off unless asked: ``OTEL_TRACES_EXPORTER`` names an exporter other than
    ``none``, or an OTLP endpoint is given (``OTEL_EXPORTER_OTLP_ENDPOINT``,
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``). ``OTEL_SDK_DISABLED=true`` wins.
    """
    if _flag(environ, "OTEL_SDK_DISABLED") == "true":
        return False
    exporters = {e.strip() for e in _flag(environ, "OTEL_TRACES_EXPORTER").split(",")} - {""}
    if exporters:
        return exporters != {"none"}
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def configure_tracing(environ: Mapping[str, str] | None = None) -> Tracer:
    """The tracer the ``OTEL_*`` variables ask for: OpenTelemetry's, or ``NO_TRACING``.

    Without the ``otel`` extra, a request for tracing is logged once and the
    server runs without it. Raises :class:`TracingConfigError` for settings it
    cannot honour (an exporter or protocol that is not installed).
    """
    environ = os.environ if environ is None else environ
    if not tracing_requested(environ):
        return NO_TRACING
    try:
        from imageshare_server.observability import otel  # noqa: PLC0415  (optional extra)
    except ImportError as exc:
        log.warning(
            "OTEL_* variables ask for traces, but the otel extra is not installed; "
            "tracing is off (pip install 'imageshare-server[otel]')",
            extra={"event": "tracing_unavailable", "error": str(exc)},
        )
        return NO_TRACING
    return otel.OtelTracer.from_environment(environ)
