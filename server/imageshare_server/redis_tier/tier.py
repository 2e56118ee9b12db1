"""Single-flight across replicas: the ``SharedTier`` the share source plugs Redis in through.

Within a replica, callers already share one ``Flight`` per key. With Redis,
that flight's ``ReadStrategy`` first takes the key's lease. The holder reads
upstream (renewing the lease), writes the list to the shared store, then
releases. A replica that finds the lease taken polls the store with backoff
until a list newer than the one it already had appears, trying for the lease
on every round so that it takes over when the holder dies or gives up. If
Redis fails at any point the flight reads upstream on its own: coordination
is lost, never the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from imageshare_server.cache import CachePolicy
from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import DeadlineExceededError, UpstreamApiError, UpstreamErrorData
from imageshare_server.core.types import ShareKey, ShareList
from imageshare_server.listing.flight import Flight
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.redis_tier.lease import LeaseManager
from imageshare_server.redis_tier.link import RedisLink, RedisUnavailable
from imageshare_server.redis_tier.store import RedisShareStore

log = logging.getLogger(__name__)

FIRST_POLL = 0.02
MAX_POLL = 0.25


class RedisReadStrategy:
    """Lead the read under the key's lease, or take the leader's stored result."""

    def __init__(
        self,
        store: RedisShareStore,
        leases: LeaseManager,
        clock: Clock,
        metrics: ServiceMetrics,
    ) -> None:
        self._metrics = metrics
        self._store = store
        self._leases = leases
        self._clock = clock

    async def read(
        self, flight: Flight, read_upstream: Callable[[], Awaitable[ShareList]]
    ) -> ShareList:
        poll = FIRST_POLL
        waited = False
        while True:
            try:
                found = await self._stored(flight)
                if found is not None:
                    if waited:
                        self._metrics.redis_lease_waits.labels("result").inc()
                    return found
                lease = await self._leases.try_acquire(flight.key)
            except RedisUnavailable:
                if waited:
                    self._metrics.redis_lease_waits.labels("fallback").inc()
                return await self._read_and_store(flight, read_upstream)
            if lease is not None:
                if waited:
                    self._metrics.redis_lease_waits.labels("takeover").inc()
                async with self._leases.held(lease):
                    # The holder before us may have stored its list just before releasing.
                    try:
                        found = await self._stored(flight)
                    except RedisUnavailable:
                        found = None
                    if found is not None:
                        return found
                    return await self._read_and_store(flight, read_upstream)
            waited = True
            limit = flight.at()
            remaining = None if limit is None else limit - self._clock.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceededError("another replica's read of this list did not finish")
            await asyncio.sleep(poll if remaining is None else min(poll, remaining))
            poll = min(poll * 1.5, MAX_POLL)

    async def _stored(self, flight: Flight) -> ShareList | None:
        """A stored list newer than the one this read replaces (a NotFound is raised)."""
        value = await self._store.get(flight.key)
        if value is None:
            return None
        newer_than = flight.spec.newer_than
        if isinstance(value, UpstreamErrorData):
            if newer_than == 0.0:
                raise UpstreamApiError.from_data(value)
            return None
        if value.read_time <= newer_than:
            return None
        flight.publish_list(value)
        return value

    async def _read_and_store(
        self, flight: Flight, read_upstream: Callable[[], Awaitable[ShareList]]
    ) -> ShareList:
        try:
            result = await read_upstream()
        except UpstreamApiError as exc:
            if exc.is_image_not_found:
                await self._store.put_negative(flight.key, exc.data())
            raise
        await self._store.put(result)
        return result


class RedisTier:
    """The L2 store and cross-replica reads, as ``source.SharedTier``."""

    def __init__(
        self,
        link: RedisLink,
        policy: CachePolicy,
        *,
        prefix: str,
        lease_ttl: float,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        metrics = metrics or ServiceMetrics.unregistered()
        self.link = link
        self.store = RedisShareStore(link, policy, prefix=prefix, clock=clock, metrics=metrics)
        self.leases = LeaseManager(link, prefix=prefix, ttl=lease_ttl)
        self._strategy = RedisReadStrategy(self.store, self.leases, clock, metrics)

    @property
    def strategy(self) -> RedisReadStrategy:
        return self._strategy

    async def lookup(self, key: ShareKey) -> ShareList | UpstreamErrorData | None:
        if not self.link.available():
            return None
        try:
            return await self.store.get(key)
        except RedisUnavailable:
            return None
