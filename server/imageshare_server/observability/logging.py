"""JSON-lines logs on stderr, with secrets scrubbed before anything is written.

Every record leaves as one JSON object per line, so log pipelines need no
parser of their own. Redaction happens at the last moment, in the handler,
so that no code path (library loggers, ``logger.exception`` tracebacks,
``sys.excepthook``) can write a registered secret or the string-to-sign ECS
echoes on ``SignatureDoesNotMatch`` (it names our AccessKeyId and, with V1
signatures, embeds the STS token).

The per-RPC log line is written by the gRPC interceptor
(``observability.grpc_metrics``); handlers add their own fields to it through
:func:`rpc_log_fields`. A line written while a traced span is current (an RPC
with tracing on, and everything it runs) carries ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO

from imageshare_server.observability.tracing import current_span_ids
from imageshare_server.redaction import redact, redact_encoded

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "bind_rpc_log_fields",
    "configure_logging",
    "rpc_log_fields",
]


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {str(k): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


# Attributes every LogRecord has; anything else came in through ``extra=``.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, extras, ``exc``.

    Inside a traced span, ``trace_id`` and ``span_id`` (W3C hex) follow ``msg``.

    Keys passed with ``extra=`` become top-level keys; a mapping passed as
    ``extra={"fields": {...}}`` is merged at the top level too, which allows
    keys that ``logging`` reserves (``msg``, ``args``...) to be avoided
    without renaming. Every string, tracebacks included, goes through
    :func:`redact`.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = current_span_ids()
        if span is not None:
            entry["trace_id"] = span.trace_hex
            entry["span_id"] = span.span_hex
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRIBUTES:
                continue
            if key == "fields" and isinstance(value, Mapping):
                for field, field_value in value.items():
                    entry.setdefault(str(field), field_value)
            else:
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        line = json.dumps(_redact_value(entry), default=str, separators=(",", ":"))
        # Second pass over the encoded line catches secrets that only appear once escaped.
        return redact_encoded(line)


class RedactingFilter(logging.Filter):
    """Scrub a record in place, for handlers whose formatter is not :class:`JsonFormatter`.

    Renders message and traceback now so that the secret-bearing originals
    (``args``, ``exc_info``) are dropped from the record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class _StderrJsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs; its class marks it for replacement."""


# Libraries whose INFO lines quote full request URLs (V1 puts the STS token
# and signature in the query string).
_CHATTY_LOGGERS = ("httpx", "httpcore", "hpack")


def _parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    value = logging.getLevelNamesMapping().get(level.strip().upper())
    if value is None:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    return value


def configure_logging(level: str | int = "info", *, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) as redacted JSON lines.

    Idempotent: calling it again replaces the handler it installed before.
    Also routes uncaught exceptions (main thread and other threads) through
    the same formatter, so their tracebacks are redacted too.
    """
    root = logging.getLogger()
    for previous in [h for h in root.handlers if isinstance(h, _StderrJsonHandler)]:
        root.removeHandler(previous)
    handler = _StderrJsonHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(_parse_level(level))
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("imageshare").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    logging.getLogger("imageshare").critical(
        "uncaught exception in thread %s",
        args.thread.name if args.thread is not None else "?",
        exc_info=(args.exc_type, args.exc_value or args.exc_type(), args.exc_traceback),
    )


_rpc_fields: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "imageshare_rpc_log_fields", default=None
)


def rpc_log_fields() -> dict[str, Any]:
    """Fields to add to the current RPC's log line: ``rpc_log_fields()["cache"] = "hit"``.

    The interceptor binds a fresh dict per call, visible to the handler and to
    tasks it creates (they copy the context, and share the dict). Outside an
    RPC this returns a throwaway dict, so service code runs unchanged in unit
    tests. Values must be JSON-serialisable or are logged as ``str()``;
    they are redacted like everything else.
    """
    fields = _rpc_fields.get()
    return fields if fields is not None else {}


@contextmanager
def bind_rpc_log_fields() -> Iterator[dict[str, Any]]:
    """Bind a fresh field dict to the current context for the duration of one RPC."""
    fields: dict[str, Any] = {}
    token = _rpc_fields.set(fields)
    try:
        yield fields
    finally:
        _rpc_fields.reset(token)
