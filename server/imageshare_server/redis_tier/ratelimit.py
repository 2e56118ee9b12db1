"""The upstream rate limit shared by every replica: GCRA in one Lua script per call.

ECS throttles per account, API and region for all clients of the account
together, so the bucket is keyed by account and region, not by replica.
The script runs on Redis's clock (``TIME``), so replica clocks do not
matter; it reserves the next slot atomically and returns how long to wait,
or refuses when that wait would outlast the caller's deadline. When Redis
is unavailable the in-process limiter takes over (each replica then
enforces the full limit on its own: more upstream load, never an outage).

A caller cancelled while it sleeps towards its slot gives the slot back
(``REFUND``), so abandoned calls do not push everyone's next slot away.
Unlike the in-process limiter this one has no notion of cache fills queueing
behind callers: Redis serves slots in arrival order.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.deadline import ReadDeadline
from imageshare_server.core.errors import DeadlineExceededError, RateLimitedError
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.ratelimit import BucketNames, UpstreamRateLimiter, one_bucket_per_region
from imageshare_server.redis_tier.link import RedisLink, RedisUnavailable

# KEYS[1] bucket; ARGV: interval us, tolerance us, longest acceptable wait us (-1: any).
# Returns {1, wait_us} for a reserved slot, {0, wait_us} for a refusal.
GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait < 0 then wait = 0 end
if max_wait >= 0 and wait > max_wait then return {0, wait} end
local next_tat = tat + interval
local ttl_ms = math.floor((next_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', ttl_ms)
return {1, wait}
"""

# KEYS[1] bucket; ARGV[1] interval us: give one slot back, never into the past.
REFUND = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
local interval = tonumber(ARGV[1])
if tat - interval > now then
  redis.call('SET', KEYS[1], string.format('%d', tat - interval), 'KEEPTTL')
  return 1
end
return 0
"""

AccountName = Callable[[], Awaitable[str]]


def account_label(account: str) -> str:
    """A stable, non-identifying key part for an account name or AccessKey ID."""
    return hashlib.sha256(account.encode()).hexdigest()[:16]


class RedisRateLimiter:
    """``Limiter`` for ``EcsClient``; ``rate`` 0 disables the limit like the in-process one."""

    def __init__(
        self,
        link: RedisLink,
        rate: float,
        burst: int,
        *,
        account: AccountName,
        prefix: str,
        fallback: UpstreamRateLimiter,
        buckets: BucketNames = one_bucket_per_region,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ServiceMetrics.unregistered()
        self._link = link
        self._rate = rate
        self._account = account
        self._prefix = prefix
        self._fallback = fallback
        self._bucket_name = buckets
        self._clock = clock
        if rate > 0:
            self._interval_us = int(1_000_000 / rate)
            self._tolerance_us = (burst - 1) * self._interval_us
        self._script = link.client.register_script(GCRA)
        self._refund = link.client.register_script(REFUND)

    async def acquire(self, region_id: str, read: ReadDeadline) -> None:
        if self._rate <= 0:
            return
        if not self._link.available():
            await self._fallback.acquire(region_id, read)
            return
        deadline = read.at()
        remaining = None if deadline is None else deadline - self._clock.monotonic()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceededError("the caller's deadline passed before the upstream call")
        bucket = self._bucket_name(region_id)
        key = f"{self._prefix}rate:{account_label(await self._account())}:{bucket}"
        max_wait = -1 if remaining is None else int(remaining * 1e6)
        args = [self._interval_us, self._tolerance_us, max_wait]
        try:
            reply = await self._link.call(
                "rate_limit", lambda r: self._script(keys=[key], args=args)
            )
        except RedisUnavailable:
            await self._fallback.acquire(region_id, read)
            return
        granted, wait_us = int(reply[0]), int(reply[1])
        wait = wait_us / 1_000_000
        if not granted:
            raise RateLimitedError(wait)
        self._metrics.upstream_rate_limit_wait.observe(wait)
        if wait > 0:
            read.queued(self._clock.monotonic() + wait)
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                await self._give_back(key)
                raise

    async def _give_back(self, key: str) -> None:
        """Return a slot not used: a cancelled caller must not cost the others a slot."""
        args = [self._interval_us]
        await self._link.call_detached(
            "rate_limit_refund", lambda r: self._refund(keys=[key], args=args)
        )
