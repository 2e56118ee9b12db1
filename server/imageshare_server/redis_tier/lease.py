"""A cross-replica lease on one share-list key: who reads it upstream right now.

The holder sets ``lease:<key>`` to a random token with ``SET NX PX``, renews
it while it reads, and releases it with a compare-and-delete script so it can
never delete a lease that expired and was taken by another replica. A holder
that dies simply stops renewing; the lease expires after ``ttl`` and a waiter
takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from imageshare_server.core.types import ShareKey
from imageshare_server.redis_tier.link import RedisLink, RedisUnavailable

log = logging.getLogger(__name__)

# KEYS[1] lease, ARGV[1] token: delete only our own lease.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS[1] lease, ARGV[1] token, ARGV[2] ttl ms: extend only our own lease.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def lease_key(prefix: str, key: ShareKey) -> str:
    return f"{prefix}lease:{key.region_id}:{key.image_id}:{key.owner_account}"


class Lease:
    """A held lease; ``lost`` once a renewal found another holder (or none)."""

    def __init__(self, leases: LeaseManager, name: str, token: str) -> None:
        self._leases = leases
        self.name = name
        self.token = token
        self.lost = False


class LeaseManager:
    def __init__(self, link: RedisLink, *, prefix: str, ttl: float = 5.0) -> None:
        self._link = link
        self._prefix = prefix
        self.ttl = ttl
        self._release = link.client.register_script(RELEASE)
        self._renew = link.client.register_script(RENEW)

    async def try_acquire(self, key: ShareKey) -> Lease | None:
        """The lease if it was free, None if another replica holds it.

        Raises ``RedisUnavailable``: then nobody can coordinate and the caller reads alone.
        """
        name = lease_key(self._prefix, key)
        token = secrets.token_hex(16)
        ttl_ms = int(self.ttl * 1000)
        acquired = await self._link.call(
            "lease_acquire", lambda r: r.set(name, token, nx=True, px=ttl_ms)
        )
        return Lease(self, name, token) if acquired else None

    async def release(self, lease: Lease) -> None:
        """Give the lease up, even from a read being cancelled; if Redis is away it expires."""
        await self._link.call_detached(
            "lease_release", lambda r: self._release(keys=[lease.name], args=[lease.token])
        )

    async def renew(self, lease: Lease) -> bool:
        ttl_ms = int(self.ttl * 1000)
        try:
            renewed = await self._link.call(
                "lease_renew",
                lambda r: self._renew(keys=[lease.name], args=[lease.token, ttl_ms]),
            )
        except RedisUnavailable:
            return True  # cannot tell; keep reading, the result is still good
        if not renewed:
            lease.lost = True
        return bool(renewed)

    @contextlib.asynccontextmanager
    async def held(self, lease: Lease) -> AsyncIterator[Lease]:
        """Renew ``lease`` every third of its TTL while the body runs, then release it.

        The renewer also stops on a flag, not only on being cancelled: on Python 3.11
        ``asyncio.wait_for`` (which redis-py uses to send commands) drops a cancel that
        lands as the command completes, and a renewer that missed its cancel renewed
        forever while this block waited for it.
        """
        body_done = False

        async def keep() -> None:
            while await self.renew(lease):
                if body_done:
                    return
                await asyncio.sleep(self.ttl / 3)
            log.warning("lost the read lease on %s; finishing the read anyway", lease.name)

        renewer = asyncio.get_running_loop().create_task(keep(), name=f"renew {lease.name}")
        try:
            yield lease
        finally:
            body_done = True
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
            await self.release(lease)
