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

That line is written once per call, so it has a short way out
(:func:`log_fields`): when the handler :func:`configure_logging` installed is
the only place the record would go, the line is formatted and written without
a ``LogRecord``; wherever anything else listens (a test's capture, another
handler, a filter), it goes through ``logging`` as any other record. The
line is the same either way.

Redaction costs one pass over the encoded line: every spelling of a secret is
matched there as JSON writes it. Only a line that holds ECS's echoed
string-to-sign (which must be cut from its own value to the value's end, not
the line's) has each value redacted before encoding.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Set
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TextIO, TypeAlias

from imageshare_server.observability.tracing import SpanIds, current_span_ids
from imageshare_server.redaction import has_string_to_sign, redact, redact_encoded

__all__ = [
    "JsonFormatter",
    "RedactingFilter",
    "RpcFields",
    "bind_rpc_fields",
    "configure_logging",
    "log_fields",
    "rpc_end_expected",
    "rpc_log_fields",
    "unbind_rpc_fields",
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


def _plain(value: Any) -> Any:
    """What JSON cannot encode as it is: sets as lists, other mappings as dicts, else ``str``."""
    if isinstance(value, Set):
        return list(value)
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    return str(value)


def _make_encode() -> Callable[[Any], str]:
    """``json.dumps(value, separators=(",", ":"), default=_plain)`` without building an
    encoder per call (nor a circular-reference check: a value that contains itself
    raises ``RecursionError``, and such a line takes the slow path)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator
        return json.JSONEncoder(separators=(",", ":"), default=_plain).encode
    iterencode = make(
        None, _plain, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    return lambda value: "".join(iterencode(value, 0))


_encode = _make_encode()


def _holds_string_to_sign(value: Any) -> bool:
    """Whether any string in ``value`` (keys, nested values, ``str()`` of others) holds it."""
    if isinstance(value, str):
        # The marker has spaces: a string without one cannot hold it (and most have none).
        return " " in value and has_string_to_sign(value)
    if isinstance(value, Mapping):
        return any(_holds_string_to_sign(k) or _holds_string_to_sign(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_string_to_sign(v) for v in value)
    if value is None or isinstance(value, bool | int | float):
        return False
    return _holds_string_to_sign(str(value))


def encode_redacted(entry: Mapping[str, Any]) -> str:
    """``entry`` as one line of JSON, with every secret and echoed string-to-sign scrubbed.

    Secrets are matched on the encoded line, in every spelling they take there. The
    string-to-sign runs to the end of the value that holds it, so a line with one (found
    only where the line has a space: the marker has) is redacted value by value first.
    """
    try:
        line = _encode(entry)
    except (TypeError, ValueError, RecursionError):  # keys JSON cannot take; a cycle
        line = ""
    if not line or (" " in line and _holds_string_to_sign(entry)):
        line = json.dumps(_redact_value(entry), default=str, separators=(",", ":"))
    return redact_encoded(line)


class _Timestamps:
    """ISO 8601 UTC times to the millisecond; the date and time of day are kept per second."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last = (-1, "")  # one tuple, so that threads never pair a second with another's

    def format(self, created: float) -> str:
        second = int(created)
        last_second, prefix = self._last
        if second != last_second:
            stamp = datetime.fromtimestamp(second, UTC).isoformat(timespec="seconds")
            prefix = stamp.removesuffix("+00:00")
            self._last = (second, prefix)
        millis = min(999, int((created - second) * 1000))
        return f"{prefix}.{millis:03d}+00:00"


_TIMESTAMPS = _Timestamps()
_LEVEL_NAMES: dict[int, str] = {}


def _level_name(level: int) -> str:
    name = _LEVEL_NAMES.get(level)
    if name is None:
        name = _LEVEL_NAMES[level] = logging.getLevelName(level).lower()
    return name


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
        entry = _head(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            current_span_ids(),
        )
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
        return encode_redacted(entry)

    def format_fields(
        self,
        created: float,
        level: int,
        name: str,
        msg: str,
        fields: Mapping[str, Any],
        *,
        more: Mapping[str, Any] | None = None,
        span: SpanIds | None = None,
    ) -> str:
        """The line :meth:`format` writes for ``extra={"fields": fields}`` and nothing else
        (with the keys of ``more`` that ``fields`` lacks), inside the span of ``span`` (the
        ids current when the line was logged)."""
        head = _head(created, _level_name(level), name, msg, span)
        entry = {**head, **_with_more(fields, more)}
        entry.update(head)  # the head's keys keep their values, as with setdefault
        return encode_redacted(entry)


def _with_more(fields: Mapping[str, Any], more: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """``fields``, then the keys of ``more`` that ``fields`` lacks."""
    if not more:
        return fields
    merged = {**fields, **more}
    merged.update(fields)
    return merged


def _head(created: float, level: str, name: str, msg: str, span: SpanIds | None) -> dict[str, Any]:
    """The keys every line starts with; inside a traced span, its ids."""
    entry: dict[str, Any] = {
        "ts": _TIMESTAMPS.format(created),
        "level": level,
        "logger": name,
        "msg": msg,
    }
    if span is not None:
        entry["trace_id"] = span.trace_hex
        entry["span_id"] = span.span_hex
    return entry


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


# Lines of log_fields logged on an event loop are gathered, then formatted and written
# together at most this long after the first of them (one write, and one wake-up of
# whatever reads the stream, for all the lines of that moment; and the formatting of many
# lines in a row, which costs less than one at a time between calls), or at once when
# this many are waiting.
GATHER_SECONDS = 0.01
GATHER_LINES = 256

# A line logged but not yet formatted: when, level, logger, msg, fields, more, span ids.
_Pending: TypeAlias = tuple[
    float, int, str, str, Mapping[str, Any], Mapping[str, Any] | None, SpanIds | None
]


class _StderrJsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure_logging` installs; its class marks it for replacement.

    Besides records, it takes lines from :func:`log_fields`, and gathers those logged on
    an event loop for up to ``GATHER_SECONDS``. Every record it emits, and every flush
    (``logging.shutdown`` at exit included), writes the gathered lines first, so the
    stream keeps the order in which lines were logged.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._gathered: list[_Pending] = []
        # The loop (and its thread) whose timer will write them.
        self._flush_thread: int | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    def write_fields(self, pending: _Pending) -> None:
        """Write the line of ``pending``: soon on an event loop, else now."""
        with self.lock:  # type: ignore[union-attr]  # created in Handler.__init__
            flush_loop = self._flush_loop
            if (
                self._flush_thread == threading.get_ident()
                and flush_loop is not None
                and not flush_loop.is_closed()
            ):
                # The timer of this thread's loop is set: the line waits for it.
                self._gathered.append(pending)
                if len(self._gathered) >= GATHER_LINES:
                    self._write_gathered()
                return
            try:
                loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._write_gathered()  # what another thread's loop was to write, if anything
            self._gathered.append(pending)
            if loop is None:
                self._write_gathered()
                return
            self._flush_thread = threading.get_ident()
            self._flush_loop = loop
            loop.call_later(GATHER_SECONDS, self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        # Under the lock (Handler.handle holds it): the gathered lines came first.
        if self._gathered:
            self._write_gathered()
        super().emit(record)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_thread = self._flush_loop = None
            if self._gathered:
                self._write_gathered()
            super().flush()

    def _write_gathered(self) -> None:
        """Format every gathered line and write them in one go (the caller holds the lock)."""
        gathered, self._gathered = self._gathered, []
        if not gathered:
            return
        formatter = self.formatter
        assert isinstance(formatter, JsonFormatter)  # _sole_json_handler checked it
        lines = []
        for created, level, name, msg, fields, more, span in gathered:
            try:
                lines.append(
                    formatter.format_fields(created, level, name, msg, fields, more=more, span=span)
                )
            except Exception:
                self.handleError(logging.LogRecord(name, level, "", 0, msg, (), None))
        if not lines:
            return
        try:
            self.stream.write(self.terminator.join(lines) + self.terminator)
            self.stream.flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "gathered lines", "args": ()}))


def _sole_json_handler(logger: logging.Logger, level: int) -> _StderrJsonHandler | None:
    """The handler of :func:`configure_logging`, when a record of ``level`` on ``logger``
    would reach it and nothing else (no other handler, no filter): None otherwise."""
    if logger.filters:
        return None
    found: _StderrJsonHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            if level < handler.level:
                continue
            if (
                found is not None
                or type(handler) is not _StderrJsonHandler
                or handler.filters
                or not isinstance(handler.formatter, JsonFormatter)
            ):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


def log_fields(
    logger: logging.Logger,
    level: int,
    msg: str,
    fields: Mapping[str, Any],
    more: Mapping[str, Any] | None = None,
) -> None:
    """``logger.log(level, msg, extra={"fields": fields})``, the same line at less cost,
    with the keys of ``more`` that ``fields`` lacks after those of ``fields``.

    Where the record would reach only the stderr handler of
    :func:`configure_logging`, the line is written directly, with no ``LogRecord``
    (on an event loop, formatted a few milliseconds later with others: ``fields`` and
    ``more`` must not change once logged); anywhere else (a test's capture, another
    handler, a filter) the record goes through ``logging`` as usual.
    """
    if not logger.isEnabledFor(level):
        return
    handler = _sole_json_handler(logger, level)
    if handler is None:
        logger.log(level, msg, extra={"fields": _with_more(fields, more)}, stacklevel=2)
        return
    handler.write_fields((time.time(), level, logger.name, msg, fields, more, current_span_ids()))


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


class RpcFields(dict[str, Any]):
    """The fields of one RPC's log line, and whether the handler expects the way it ends.

    ``end_expected`` (set through :func:`rpc_end_expected`; unset until then, read it
    with ``getattr(fields, "end_expected", False)``) keeps a server-fault code that is
    the design, not a failure, from raising the line to WARNING.
    """

    __slots__ = ("end_expected",)

    end_expected: bool


_rpc_fields: contextvars.ContextVar[RpcFields | None] = contextvars.ContextVar(
    "imageshare_rpc_log_fields", default=None
)


def rpc_log_fields() -> RpcFields:
    """Fields to add to the current RPC's log line: ``rpc_log_fields()["cache"] = "hit"``.

    The interceptor binds a fresh dict per call, visible to the handler and to
    tasks it creates (they copy the context, and share the dict). Outside an
    RPC this returns a throwaway dict, so service code runs unchanged in unit
    tests. Values must be JSON-serialisable or are logged as ``str()``;
    they are redacted like everything else.
    """
    fields = _rpc_fields.get()
    return fields if fields is not None else RpcFields()


def rpc_end_expected() -> None:
    """Say that the current RPC ends as designed, whatever its code.

    Its log line is then INFO even for a code that otherwise means a server
    fault (WARNING): a watch the drain ends with UNAVAILABLE is how a drain
    works, not a failure. Metrics count the code as they always do.
    """
    rpc_log_fields().end_expected = True


def bind_rpc_fields(fields: RpcFields) -> contextvars.Token[RpcFields | None]:
    """Make ``fields`` the current RPC's (undo with :func:`unbind_rpc_fields`)."""
    return _rpc_fields.set(fields)


def unbind_rpc_fields(token: contextvars.Token[RpcFields | None]) -> None:
    _rpc_fields.reset(token)
