"""Single-flight across replicas: the in-process ``Flight`` coordinated through Redis.

Within a replica, callers already share one ``Flight`` per key. With Redis,
that flight first takes the key's lease. The holder reads upstream (renewing
the lease), writes the list to the shared store, then releases. A replica
that finds the lease taken polls the store with backoff until a list newer
than the one it already had appears, trying for the lease on every round so
that it takes over when the holder dies or gives up. If Redis fails at any
point the flight reads upstream on its own: coordination is lost, never the
answer.
"""

from __future__ import annotations

import asyncio
import logging
import time

from imageshare_server.cache import CacheEntry, CachePolicy, ShareCache
from imageshare_server.ecs.client import DeadlineExceededError, EcsClient
from imageshare_server.ecs.errors import UpstreamApiError
from imageshare_server.ecs.model import SharePage
from imageshare_server.flight import Flight, FlightOptions, ShareList
from imageshare_server.observability import metrics
from imageshare_server.replicas.lease import LeaseManager
from imageshare_server.replicas.link import RedisLink, RedisUnavailable
from imageshare_server.replicas.store import RedisShareStore
from imageshare_server.validation import ShareKey

log = logging.getLogger(__name__)

FIRST_POLL = 0.02
MAX_POLL = 0.25


class SharedFlight(Flight):
    def __init__(
        self,
        tier: RedisTier,
        client: EcsClient,
        key: ShareKey,
        options: FlightOptions,
        global_pages: asyncio.Semaphore,
        *,
        deadline: float | None,
        expected_total: int | None = None,
        newer_than: float = 0.0,
    ) -> None:
        super().__init__(
            client,
            key,
            options,
            global_pages,
            deadline=deadline,
            expected_total=expected_total,
        )
        self._tier = tier
        self._newer_than = newer_than

    async def _read(self) -> ShareList:
        tier = self._tier
        poll = FIRST_POLL
        waited = False
        while True:
            try:
                found = await self._stored()
                if found is not None:
                    if waited:
                        metrics.REDIS_LEASE_WAITS.labels("result").inc()
                    return found
                lease = await tier.leases.try_acquire(self.key)
            except RedisUnavailable:
                if waited:
                    metrics.REDIS_LEASE_WAITS.labels("fallback").inc()
                return await self._read_and_store()
            if lease is not None:
                if waited:
                    metrics.REDIS_LEASE_WAITS.labels("takeover").inc()
                async with tier.leases.held(lease):
                    # The holder before us may have stored its list just before releasing.
                    try:
                        found = await self._stored()
                    except RedisUnavailable:
                        found = None
                    if found is not None:
                        return found
                    return await self._read_and_store()
            waited = True
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError("another replica's read of this list did not finish")
            await asyncio.sleep(min(poll, remaining))
            poll = min(poll * 1.5, MAX_POLL)

    async def _stored(self) -> ShareList | None:
        """A stored list newer than the one this read replaces (a NotFound is raised)."""
        stored = await self._tier.store.get(self.key)
        if stored is None:
            return None
        value = stored.value
        if isinstance(value, UpstreamApiError):
            if self._newer_than == 0.0:
                raise value
            return None
        if value.read_time <= self._newer_than:
            return None
        self._publish(
            SharePage(
                request_id="",
                page_number=1,
                page_size=max(1, value.total_count),
                total_count=value.total_count,
                accounts=value.accounts,
                share_groups=value.share_groups,
            )
        )
        return value

    async def _read_and_store(self) -> ShareList:
        try:
            result = await super()._read()
        except UpstreamApiError as exc:
            if exc.code.endswith(".NotFound"):
                await self._tier.store.put_negative(self.key, exc)
            raise
        await self._tier.store.put(result)
        return result


class RedisTier:
    """What ``SharedShareSource`` needs from Redis: the L2 store and shared flights."""

    def __init__(
        self, link: RedisLink, policy: CachePolicy, *, prefix: str, lease_ttl: float
    ) -> None:
        self.link = link
        self.store = RedisShareStore(link, policy, prefix=prefix)
        self.leases = LeaseManager(link, prefix=prefix, ttl=lease_ttl)

    def flight(
        self,
        client: EcsClient,
        key: ShareKey,
        options: FlightOptions,
        global_pages: asyncio.Semaphore,
        *,
        deadline: float | None,
        expected_total: int | None,
        newer_than: float,
    ) -> Flight:
        return SharedFlight(
            self,
            client,
            key,
            options,
            global_pages,
            deadline=deadline,
            expected_total=expected_total,
            newer_than=newer_than,
        )

    async def refresh_l1(
        self, cache: ShareCache, key: ShareKey, entry: CacheEntry | None
    ) -> CacheEntry | None:
        """After an in-process miss (or a stale hit), take a newer list from Redis into L1."""
        if not self.link.available():
            return entry
        try:
            stored = await self.store.get(key)
        except RedisUnavailable:
            return entry
        if stored is None:
            return entry
        value = stored.value
        if isinstance(value, UpstreamApiError):
            if entry is None:
                cache.put_negative(key, value)
                return cache.get(key)
            return entry
        if (
            entry is not None
            and entry.shares is not None
            and value.read_time <= entry.shares.read_time
        ):
            return entry
        return cache.put(value) or entry
