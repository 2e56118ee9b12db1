"""Waiting for a condition a test cannot be notified of (an emulator counter, a log line).

Polling, not sleeping a fixed time: the wait ends the moment the condition
holds, and fails with a clear message when it never does. The default bound is
generous (the suite runs on both CPUs at once): it costs nothing when the
condition holds, and only a failing test waits it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], within: float = 30.0) -> float:
    """Block until ``predicate()`` is true; returns how long it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"condition not reached within {within} s")
        time.sleep(0.005)
    return time.monotonic() - started


async def until(predicate: Callable[[], object], within: float = 30.0) -> float:
    """``wait_until`` for coroutines: the event loop keeps running while it waits."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            raise AssertionError(f"condition not reached within {within} s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started
