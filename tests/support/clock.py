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


class SteppedClock(ManualClock):
    """A clock whose sleeps end only when the test moves it past them (``advance``).

    For what waits a long time on purpose (a watch polls every 60 s): the test
    moves the clock one interval and the poll runs at once, as often as the
    test says, with no real time spent and none raced. Sleeps of zero or less
    only yield. ``sleepers`` counts the sleeps under way, so a test can wait
    until everything that should be asleep is.
    """

    def __init__(self, monotonic: float = 10_000.0, wall: float = 1_767_225_600.0) -> None:
        super().__init__(monotonic, wall)
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    @property
    def sleepers(self) -> int:
        return sum(1 for _, future in self._sleepers if not future.done())

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        entry = (self.monotonic() + seconds, asyncio.get_running_loop().create_future())
        self._sleepers.append(entry)
        try:
            await entry[1]
        finally:
            self._sleepers.remove(entry)

    def advance(self, seconds: float) -> None:
        super().advance(seconds)
        now = self.monotonic()
        for wake_at, future in self._sleepers:
            if wake_at <= now and not future.done():
                future.set_result(None)
