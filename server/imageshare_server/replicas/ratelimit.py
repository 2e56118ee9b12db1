"""The upstream rate limit shared by every replica: GCRA in one Lua script per call.

ECS throttles per account, API and region for all clients of the account
together, so the bucket is keyed by account and region, not by replica.
The script runs on Redis's clock (``TIME``), so replica clocks do not
matter; it reserves the next slot atomically and returns how long to wait,
or refuses when that wait would outlast the caller's deadline. When Redis
is unavailable the in-process limiter takes over (each replica then
enforces the full limit on its own: more upstream load, never an outage).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable

from imageshare_server.observability import metrics
from imageshare_server.ratelimit import RateLimitedError, UpstreamRateLimiter
from imageshare_server.replicas.link import RedisLink, RedisUnavailable

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
    ) -> None:
        self._link = link
        self._rate = rate
        self._account = account
        self._prefix = prefix
        self._fallback = fallback
        if rate > 0:
            self._interval_us = int(1_000_000 / rate)
            self._tolerance_us = (burst - 1) * self._interval_us
        self._script = link.client.register_script(GCRA)

    async def acquire(self, region_id: str, deadline: float | None) -> None:
        if self._rate <= 0:
            return
        if not self._link.available():
            await self._fallback.acquire(region_id, deadline)
            return
        key = f"{self._prefix}rate:{account_label(await self._account())}:{region_id}"
        max_wait = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1e6))
        args = [self._interval_us, self._tolerance_us, max_wait]
        try:
            reply = await self._link.call(
                "rate_limit", lambda r: self._script(keys=[key], args=args)
            )
        except RedisUnavailable:
            await self._fallback.acquire(region_id, deadline)
            return
        granted, wait_us = int(reply[0]), int(reply[1])
        wait = wait_us / 1_000_000
        if not granted:
            raise RateLimitedError(wait)
        metrics.UPSTREAM_RATE_LIMIT_WAIT.observe(wait)
        if wait > 0:
            await asyncio.sleep(wait)
