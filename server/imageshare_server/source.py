"""Where the service gets share lists from: the cache, a read in flight, or a new read.

The gRPC layer consumes a ``ShareSource``: an async stream of ``ShareChunk``
for a validated query. ``SharedShareSource`` puts the cache in front of
single-flight upstream reads:

* fresh entry: served (HIT); NotFound is cached briefly too.
* stale entry within stale-while-revalidate: served (STALE) while one
  background refresh runs.
* older entry within stale-if-error: a read is made; if it fails with a
  transient error before anything was sent, the old list is served (STALE).
* otherwise, or with ``bypass_cache``: follow the read in flight for the key
  (COALESCED) or start one (MISS / BYPASS). The result refreshes the entry.

With Redis (``replicas.flight.RedisTier``) the in-process cache is a small L1:
when it has no fresh entry, a newer list stored by any replica is taken
from Redis first, and reads are coordinated across replicas by a lease.
Without Redis the behaviour is exactly the in-process one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

from imageshare.v1 import image_share_pb2
from imageshare_server.cache import CacheEntry, Freshness, ShareCache
from imageshare_server.ecs.client import EcsClient
from imageshare_server.ecs.errors import UpstreamApiError, UpstreamError
from imageshare_server.ecs.model import Account
from imageshare_server.flight import Flight, FlightOptions
from imageshare_server.observability import metrics
from imageshare_server.validation import ShareKey, ShareQuery

if TYPE_CHECKING:
    from imageshare_server.replicas.flight import RedisTier

log = logging.getLogger(__name__)

CacheStatus: TypeAlias = image_share_pb2.CacheStatus.ValueType


@dataclass(frozen=True, slots=True)
class ShareChunk:
    """A run of accounts in upstream order; the first chunk of a stream carries the groups.

    A chunk served from the cache also carries its ``entry``, whose
    prebuilt messages spare the hit any message building.
    """

    accounts: Sequence[Account]
    share_groups: Sequence[str]
    total_count: int
    request_ids: Sequence[str]
    cache_status: CacheStatus
    read_time: float
    entry: CacheEntry | None = None


class ShareSource(Protocol):
    def stream(self, query: ShareQuery, *, deadline: float | None) -> AsyncIterator[ShareChunk]:
        """Yield the share list of ``query.key`` in order; ``deadline`` is ``time.monotonic()``."""
        ...


def _transient(error: BaseException) -> bool:
    return isinstance(error, UpstreamError) and error.retryable


class SharedShareSource:
    def __init__(
        self,
        client: EcsClient,
        cache: ShareCache,
        options: FlightOptions,
        *,
        max_parallel_pages_total: int = 64,
        shared: RedisTier | None = None,
    ) -> None:
        self._client = client
        # Shared lists need the cache's windows; with the cache off, Redis only limits the rate.
        self._shared = shared if cache.policy.enabled else None
        self._cache = cache
        self._options = options
        self._global_pages = asyncio.Semaphore(max_parallel_pages_total)
        self._flights: dict[ShareKey, Flight] = {}

    def _flight(
        self,
        key: ShareKey,
        deadline: float | None,
        expected_total: int | None = None,
        newer_than: float = 0.0,
    ) -> tuple[Flight, bool]:
        """The read in flight for ``key`` (joined: True) or a new one.

        ``newer_than`` (wall clock) is the read time of the list the caller
        already rejected: another replica's result must be newer to be taken.
        """
        flight = self._flights.get(key)
        if flight is not None:
            flight.extend(deadline)
            return flight, True
        if self._shared is not None:
            flight = self._shared.flight(
                self._client,
                key,
                self._options,
                self._global_pages,
                deadline=deadline,
                expected_total=expected_total,
                newer_than=newer_than,
            )
        else:
            flight = Flight(
                self._client,
                key,
                self._options,
                self._global_pages,
                deadline=deadline,
                expected_total=expected_total,
            )
        self._flights[key] = flight
        flight.start(self._landed)
        return flight, False

    def _landed(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        if flight.page_size != self._options.page_size:
            # Remember the page size the upstream accepted for later flights.
            self._options = dataclasses.replace(self._options, page_size=flight.page_size)
        if flight.result is not None:
            self._cache.put(flight.result)
        elif isinstance(flight.error, UpstreamApiError) and flight.error.code.endswith(".NotFound"):
            self._cache.put_negative(flight.key, flight.error)

    def refresh_in_background(self, entry: CacheEntry) -> None:
        if entry.key not in self._flights:
            total = entry.shares.total_count if entry.shares is not None else None
            seen = entry.shares.read_time if entry.shares is not None else 0.0
            self._flight(entry.key, None, expected_total=total, newer_than=seen)

    async def stream(
        self, query: ShareQuery, *, deadline: float | None
    ) -> AsyncIterator[ShareChunk]:
        key = query.key
        fallback: CacheEntry | None = None
        if not query.bypass_cache:
            entry = self._cache.get(key)
            if self._shared is not None and (
                entry is None or self._cache.freshness(entry) is not Freshness.FRESH
            ):
                entry = await self._shared.refresh_l1(self._cache, key, entry)
            if entry is not None:
                freshness = self._cache.freshness(entry)
                if entry.negative and entry.error is not None:
                    metrics.CACHE_REQUESTS.labels("negative_hit").inc()
                    cached = entry.error
                    raise UpstreamApiError(
                        cached.code,
                        cached.message,
                        http_status=cached.http_status,
                        request_id=cached.request_id,
                    )
                if freshness is Freshness.FRESH:
                    metrics.CACHE_REQUESTS.labels("hit").inc()
                    yield _cached_chunk(entry, image_share_pb2.CACHE_STATUS_HIT)
                    return
                if freshness is Freshness.STALE:
                    metrics.CACHE_REQUESTS.labels("stale").inc()
                    metrics.CACHE_STALE_SERVES.labels("revalidating").inc()
                    self.refresh_in_background(entry)
                    yield _cached_chunk(entry, image_share_pb2.CACHE_STATUS_STALE)
                    return
                fallback = entry
        expected = fallback.shares.total_count if fallback and fallback.shares else None
        if query.bypass_cache:
            newer_than = time.time()
        else:
            newer_than = fallback.shares.read_time if fallback and fallback.shares else 0.0
        flight, joined = self._flight(key, deadline, expected, newer_than)
        if query.bypass_cache:
            status: CacheStatus = image_share_pb2.CACHE_STATUS_BYPASS
            metrics.CACHE_REQUESTS.labels("bypass").inc()
        elif joined:
            status = image_share_pb2.CACHE_STATUS_COALESCED
            metrics.CACHE_REQUESTS.labels("coalesced").inc()
            metrics.COALESCED_WAITS.inc()
        else:
            status = image_share_pb2.CACHE_STATUS_MISS
            metrics.CACHE_REQUESTS.labels("miss").inc()
        sent = False
        try:
            async for page in flight.follow():
                sent = True
                yield ShareChunk(
                    accounts=page.accounts,
                    share_groups=page.share_groups,
                    total_count=page.total_count,
                    request_ids=(page.request_id,) if page.request_id else (),
                    cache_status=status,
                    read_time=flight.read_time,
                )
        except Exception as exc:
            if sent or fallback is None or not _transient(exc):
                raise
            log.warning(
                "upstream failed; serving the last good list",
                extra={"event": "stale_if_error", "error": str(exc)},
            )
            metrics.CACHE_STALE_SERVES.labels("upstream_error").inc()
            yield _cached_chunk(fallback, image_share_pb2.CACHE_STATUS_STALE)
        finally:
            if flight.followers == 0 and not flight.done and not self._cache.policy.enabled:
                # Nobody wants the result any more and no cache would keep it.
                flight.cancel()


def _cached_chunk(entry: CacheEntry, status: CacheStatus) -> ShareChunk:
    shares = entry.shares
    assert shares is not None
    return ShareChunk(
        accounts=shares.accounts,
        share_groups=shares.share_groups,
        total_count=shares.total_count,
        request_ids=(),
        cache_status=status,
        read_time=shares.read_time,
        entry=entry,
    )
