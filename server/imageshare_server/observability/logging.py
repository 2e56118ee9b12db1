"""JSON-lines logs on stderr, with secrets scrubbed before anything is written.

Every record leaves as one JSON object per line, so log pipelines need no
parser of their own. Redaction happens at the last moment, in the handler,
so that no code path (library loggers, ``logger.exception`` tracebacks,
``sys.excepthook``) can write a registered secret or the string-to-sign ECS
echoes on ``SignatureDoesNotMatch`` (it names our AccessKeyId and, with V1
signatures, embeds the STS token).

The per-RPC log line is written by the gRPC interceptor
(``observability.grpc_metrics``); handlers add their own fields to it through
:func:`rpc_log_fields`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO
from urllib.parse import quote, quote_plus

__all__ = [
    "REDACTED",
    "JsonFormatter",
    "RedactingFilter",
    "bind_rpc_log_fields",
    "configure_logging",
    "redact",
    "register_secret",
    "rpc_log_fields",
]

REDACTED = "[redacted]"

# Shorter values would shred ordinary text; real AccessKey secrets are 30
# characters and STS tokens hundreds.
_MIN_SECRET_LENGTH = 8
# STS tokens rotate; keep the recent ones (an old token can still be in a
# retry's error message) without letting the pattern grow for ever.
_MAX_SECRETS = 64

# ECS echoes its string-to-sign after this marker. V1's fits on one line; V3's
# is the algorithm name, a newline and a hex digest.
_STRING_TO_SIGN = re.compile(
    r"(string to sign is:)[^\r\n]*(?:\r?\n[0-9a-fA-F]{64}\b)?",
    re.IGNORECASE,
)


def _variants(value: str) -> set[str]:
    """Spellings a secret takes on its way into URLs, JSON and the V1 string-to-sign."""
    once = quote(value, safe="")
    return {
        value,
        once,
        quote(once, safe=""),  # the V1 string-to-sign percent-encodes the query again
        quote_plus(value),
        json.dumps(value)[1:-1],
    }


class _SecretSet:
    """Registered secrets and one compiled pattern matching any spelling of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, None] = {}  # insertion-ordered set
        self.pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        with self._lock:
            if value in self._values:
                return
            self._values[value] = None
            while len(self._values) > _MAX_SECRETS:
                del self._values[next(iter(self._values))]
            spellings = {v for s in self._values for v in _variants(s)}
            alternatives = sorted(spellings, key=len, reverse=True)
            self.pattern = re.compile("|".join(re.escape(v) for v in alternatives))


_SECRETS = _SecretSet()


def register_secret(value: str | None) -> None:
    """Never write ``value`` (or its URL/JSON-encoded forms) to a log line again.

    Values shorter than 8 characters are ignored: they cannot be credentials,
    and scrubbing them would mangle unrelated text.
    """
    if value and len(value) >= _MIN_SECRET_LENGTH:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """Scrub registered secrets and echoed strings-to-sign from ``text``.

    Safe to apply twice. Use it for anything leaving the process that may
    quote upstream or exception messages (logs, gRPC status details).
    """
    pattern = _SECRETS.pattern
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return _STRING_TO_SIGN.sub(rf"\1 {REDACTED}", text)


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
        # Second pass over the encoded line catches secrets that only appear
        # once escaped; the string-to-sign rule is line-based and ran above.
        pattern = _SECRETS.pattern
        return pattern.sub(REDACTED, line) if pattern is not None else line


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
