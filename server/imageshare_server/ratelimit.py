"""Client-side limit on upstream calls, so the service never spends the account's quota faster
than the operator allows.

ECS throttles per account, API and region, for every client of the account
together; a limiter per region at ``--upstream-qps`` keeps this service's
share predictable. The algorithm is GCRA (a token bucket without a timer):
each call reserves the next free slot, so waiting callers are served in
order and none is starved.
"""

from __future__ import annotations

import asyncio
import time

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


class UpstreamRateLimiter:
    """One bucket per region; ``rate`` 0 disables the limit."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    async def acquire(self, region_id: str, deadline: float | None) -> None:
        if self._rate <= 0:
            return
        bucket = self._buckets.get(region_id)
        if bucket is None:
            bucket = self._buckets[region_id] = TokenBucket(self._rate, self._burst)
        wait = bucket.reserve(time.monotonic(), deadline)
        metrics.UPSTREAM_RATE_LIMIT_WAIT.observe(wait)
        if wait > 0:
            await asyncio.sleep(wait)
