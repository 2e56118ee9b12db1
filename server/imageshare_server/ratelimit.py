"""Client-side limit on upstream calls, so the service never spends the account's quota faster
than the operator allows.

ECS throttles per account, API and region, for every client of the account
together; a limiter per region at ``--upstream-qps`` keeps this service's
share predictable. The algorithm is GCRA (a token bucket without a timer):
each call reserves the next free slot, so waiting callers are served in
order and none is starved.

Slots are reserved when a call arrives, but a call leaves when its sleep
ends, and sleeps end late by varying amounts: a late call followed by an
on-time one can put ``qps + 1`` calls into one of the upstream's one-second
windows, and the upstream throttles exactly that. ``SendWindow`` therefore
checks the calls as actually sent: never more than the rate allows in any
sliding window, a window kept ``JITTER_GUARD`` longer than a second for the
variation in transit time between here and the upstream.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from imageshare_server.observability import metrics


class RateLimitedError(Exception):
    """The wait for an upstream slot would outlast the caller's deadline."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        super().__init__(f"upstream rate limit: the next slot is {wait:.2f}s away")


class TokenBucket:
    def __init__(self, rate: float, burst: int = 1) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.interval = 1.0 / rate
        self.tolerance = (burst - 1) * self.interval
        self._tat = 0.0  # theoretical arrival time of the next call

    def reserve(self, now: float, deadline: float | None = None) -> float:
        """Reserve a slot and return how long to wait for it; raise if past ``deadline``."""
        tat = max(self._tat, now)
        wait = max(0.0, tat - self.tolerance - now)
        if deadline is not None and now + wait > deadline:
            raise RateLimitedError(wait)
        self._tat = tat + self.interval
        return wait


JITTER_GUARD = 0.025


class SendWindow:
    """At most ``floor(rate)`` sends (at least one) in any sliding window of that many slots."""

    def __init__(self, rate: float, guard: float = JITTER_GUARD) -> None:
        self._limit = max(1, math.floor(rate))
        self.window = self._limit / rate + guard
        self._sent: deque[float] = deque(maxlen=self._limit)

    def wait(self, now: float) -> float:
        """How long a send at ``now`` must wait to keep the window."""
        if len(self._sent) < self._limit:
            return 0.0
        return max(0.0, self._sent[0] + self.window - now)

    def record(self, now: float) -> None:
        self._sent.append(now)


class UpstreamRateLimiter:
    """One bucket per region; ``rate`` 0 disables the limit."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._regions: dict[str, tuple[TokenBucket, SendWindow]] = {}

    async def acquire(self, region_id: str, deadline: float | None) -> None:
        if self._rate <= 0:
            return
        region = self._regions.get(region_id)
        if region is None:
            region = TokenBucket(self._rate, self._burst), SendWindow(self._rate)
            self._regions[region_id] = region
        bucket, window = region
        started = time.monotonic()
        wait = bucket.reserve(started, deadline)
        if wait > 0:
            await asyncio.sleep(wait)
        # Claim the send time before sleeping, so the next caller waits behind this one.
        now = time.monotonic()
        late = window.wait(now)
        if deadline is not None and now + late > deadline:
            raise RateLimitedError(late)
        window.record(now + late)
        if late > 0:
            await asyncio.sleep(late)
        metrics.UPSTREAM_RATE_LIMIT_WAIT.observe(now + late - started)
