"""A clock tests move by hand: cache ages, windows and budgets without sleeping."""

from __future__ import annotations

import asyncio


class ManualClock:
    """``Clock`` whose time moves only when told (``advance``) or slept through (``sleep``).

    ``sleep`` really sleeps as well, so code waiting on events and timeouts
    sees the same time pass; concurrent sleepers move the clock to the
    latest of their wake-up times, never further.
    """

    def __init__(self, monotonic: float = 10_000.0, wall: float = 1_767_225_600.0) -> None:
        self._monotonic = monotonic
        self._offset = wall - monotonic

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._monotonic + self._offset

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds

    async def sleep(self, seconds: float) -> None:
        target = self._monotonic + seconds
        await asyncio.sleep(seconds)
        self._monotonic = max(self._monotonic, target)


class FastClock(ManualClock):
    """A clock whose sleeps take no real time: back-offs and rate-limit waits pass at once.

    For tests where time must pass but is not the subject (retries at 30% failures); every
    sleeper is let through in turn, and the clock moves by what it slept.
    """

    async def sleep(self, seconds: float) -> None:
        self.advance(max(0.0, seconds))
        await asyncio.sleep(0)
