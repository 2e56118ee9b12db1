"""``SIGUSR1``: dump every thread's stack and every asyncio task's await chain to stderr.

For a process that hangs in a pod (``kubectl exec ... kill -USR1 1``, then
``kubectl logs``). The handler is a plain ``signal.signal`` handler, not the
event loop's: it runs between two bytecodes of the main thread even while
the loop is blocked, which is when a dump is wanted most.

The dump is one JSON line (``"event": "stack_dump"``) like every other line
on stderr, written directly (whatever ``--log-level``), with ``threads`` and
``tasks``; each has a ``stack`` in the usual traceback format, innermost
call last. ``jq -r '.threads[].stack, .tasks[].stack'`` prints them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from types import FrameType
from typing import Any, TextIO

from imageshare_server.observability.logging import JsonFormatter

__all__ = ["dump_stacks", "install_stack_dump", "stack_dump_fields"]

_LOGGER = "imageshare.stacks"


def _format(frames: Iterator[FrameType]) -> str:
    summary = traceback.StackSummary.extract(((f, f.f_lineno) for f in frames), lookup_lines=True)
    return "".join(summary.format())


def _thread_stacks() -> list[dict[str, Any]]:
    names = {thread.ident: thread for thread in threading.enumerate()}
    stacks = []
    for ident, frame in sys._current_frames().items():
        thread = names.get(ident)
        chain = []
        current: FrameType | None = frame
        while current is not None:
            chain.append(current)
            current = current.f_back
        stacks.append(
            {
                "name": thread.name if thread is not None else f"thread-{ident}",
                "id": ident,
                "daemon": thread.daemon if thread is not None else None,
                "stack": _format(reversed(chain)),
            }
        )
    return stacks


def _await_chain(coro: Any) -> tuple[list[FrameType], str]:
    """The frames of a task's coroutine and of everything it awaits, outermost first,
    and what the innermost one waits on (a future, a sleep) when it is not a coroutine."""
    frames: list[FrameType] = []
    while coro is not None:
        frame = (
            getattr(coro, "cr_frame", None)
            or getattr(coro, "gi_frame", None)
            or getattr(coro, "ag_frame", None)
        )
        if frame is None:
            return frames, repr(coro)[:300]
        frames.append(frame)
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )
    return frames, ""


def _task_stacks(loop: asyncio.AbstractEventLoop) -> list[dict[str, Any]]:
    stacks = []
    for task in asyncio.all_tasks(loop):
        frames, awaiting = _await_chain(task.get_coro())
        stacks.append(
            {
                "name": task.get_name(),
                "coro": getattr(task.get_coro(), "__qualname__", repr(task.get_coro())),
                "awaiting": awaiting,
                "stack": _format(iter(frames)),
            }
        )
    stacks.sort(key=lambda entry: str(entry["name"]))
    return stacks


def stack_dump_fields(loop: asyncio.AbstractEventLoop | None) -> dict[str, Any]:
    """The dump as log fields: every thread and, with ``loop``, every task of it."""
    return {
        "event": "stack_dump",
        "threads": _thread_stacks(),
        "tasks": _task_stacks(loop) if loop is not None else [],
    }


def dump_stacks(loop: asyncio.AbstractEventLoop | None, stream: TextIO | None = None) -> None:
    """Write the dump as one JSON line to ``stream`` (stderr), whatever the log level."""
    fields = stack_dump_fields(loop)
    record = logging.getLogger(_LOGGER).makeRecord(
        _LOGGER,
        logging.WARNING,
        __file__,
        0,
        "stack dump: %d threads, %d tasks",
        (len(fields["threads"]), len(fields["tasks"])),
        None,
        extra={"fields": fields},
    )
    out = stream if stream is not None else sys.stderr
    out.write(JsonFormatter().format(record) + "\n")
    out.flush()


def install_stack_dump(loop: asyncio.AbstractEventLoop) -> None:
    """Dump every thread and every task of ``loop`` on ``SIGUSR1`` (main thread only)."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        dump_stacks(loop)

    signal.signal(signal.SIGUSR1, on_signal)
