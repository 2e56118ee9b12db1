"""Time as the service reads it, injectable so tests can move it instead of sleeping.

Everything that ages (cache entries, reads, rate-limit buckets, retry
budgets) asks a ``Clock`` rather than the ``time`` module. Production uses
``SYSTEM_CLOCK``; tests pass a clock they advance by hand.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: ages, deadlines, rates."""
        ...

    def time(self) -> float:
        """Wall-clock seconds since the epoch: what callers are told (read times)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` on this clock."""
        ...


class SystemClock:
    """The real clocks, and ``asyncio.sleep``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()
