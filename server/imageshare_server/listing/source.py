"""Where the service gets share lists from: the cache, a read in flight, or a new read.

The gRPC layer consumes a ``ShareSource``: an async stream of ``ShareChunk``
for a validated query. ``SharedShareSource`` puts the cache in front of
single-flight upstream reads:

* fresh entry: served (HIT); an image that does not exist is cached briefly too.
* stale entry within stale-while-revalidate: served (STALE) while one
  background refresh runs.
* older entry within stale-if-error: a read is made; if it fails with a
  transient error before anything was sent, or the caller's deadline comes
  before it ends, the old list is served (STALE).
* otherwise, or with ``bypass_cache``: follow the read in flight for the key
  (COALESCED) or start one (MISS / BYPASS). The result refreshes the entry.

``read_whole`` collects a stream into one ``ShareAnswer`` (what a check
needs), and ``index`` gives a cached list's accounts by id. ``poll`` is how
a watch reads: a list read after a given time, from the cache, a read in
flight or a new read, never a fresh entry older than that.

A read whose callers have all gone goes on only as a cache fill, and only
``max_orphan_reads`` of those at a time (background refreshes included):
the rest are cancelled, so callers who give up cannot keep spending quota.

With a ``SharedTier`` (Redis, see ``replicas``) the in-process cache is a
small L1: when it has no fresh entry, a newer list stored by any replica is
looked up first, and reads are coordinated across replicas through the
tier's ``ReadStrategy``. Without one the behaviour is exactly the
in-process one.

Traced (when tracing is on): the cache decision is a span of its own
(``imageshare.cache.result``: hit, miss, stale, bypass, coalesced,
negative_hit); a read it starts is that span's child, and a caller who joins
a read under way links to it. The caller's log line lists the RequestId of
every upstream attempt of the read it followed, failed ones included.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeAlias

from imageshare_server.cache import CacheEntry, Freshness, ShareCache
from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import (
    DeadlineExceededError,
    ImageShareError,
    UpstreamApiError,
    UpstreamErrorData,
)
from imageshare_server.core.types import Account, CacheStatus, ShareKey, ShareList, ShareQuery
from imageshare_server.listing.flight import (
    UPSTREAM_ONLY,
    Flight,
    FlightOptions,
    FlightSpec,
    PageReader,
    ReadStrategy,
)
from imageshare_server.observability.logging import rpc_log_fields
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.observability.tracing import NO_SPAN, NO_TRACING, Span, Tracer

log = logging.getLogger(__name__)

# A read needs at least this long: a caller with less left (or none) is told
# DEADLINE_EXCEEDED at once instead of starting a read that cannot finish.
MIN_READ_SECONDS = 0.01
# A caller stops waiting for a read this much before its deadline (at most a
# fifth of its time), so what it gets instead (a list to fall back on, or a
# status with details) still reaches it before the deadline does.
MARGIN_SECONDS = 0.05

CACHE_SPAN = "imageshare.cache"


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
    cache_status: CacheStatus | None  # None: not yet known (a list being built)
    read_time: float
    entry: CacheEntry | None = None


# A cached list as a hit serves it: the entry, and what the caller is told it is.
Served: TypeAlias = tuple[CacheEntry, CacheStatus]


class ShareSource(Protocol):
    def cached(self, query: ShareQuery) -> Served | None:
        """A fresh cache entry for ``query``, counted as a hit as ``stream`` counts it; None
        when the call needs ``stream`` (a read, a stale entry, the shared tier, a negative
        entry, ``bypass_cache``).

        Synchronous: a hit costs no async generator.
        """
        ...

    def stream(
        self, query: ShareQuery, *, deadline: float | None, caller: str = ""
    ) -> AsyncGenerator[ShareChunk, None]:
        """Yield the share list of ``query.key`` in order.

        ``deadline`` is ``Clock.monotonic()``; ``caller`` says who asks (callers
        take turns for the upstream quota).
        """
        ...

    def prebuilt(
        self, entry: CacheEntry, page_size: int, build: Callable[[], list[bytes]]
    ) -> list[bytes]:
        """The serialized messages of a cached list at ``page_size`` (built once, then kept)."""
        ...

    def index(self, entry: CacheEntry) -> Mapping[str, Account]:
        """The accounts of a cached list by id (built once per entry, then kept)."""
        ...


@dataclass(frozen=True, slots=True)
class ShareAnswer:
    """A whole share list as one call got it: from the cache (``entry``) or a read."""

    key: ShareKey
    accounts: tuple[Account, ...]
    share_groups: tuple[str, ...]
    request_ids: tuple[str, ...]
    cache_status: CacheStatus | None
    read_time: float
    entry: CacheEntry | None = None

    @property
    def total_count(self) -> int:
        return len(self.accounts)

    def shares(self, clock: Clock) -> ShareList:
        """The answer as a ``ShareList`` (its monotonic read time derived from its age)."""
        if self.entry is not None and self.entry.shares is not None:
            return self.entry.shares
        age = max(0.0, clock.time() - self.read_time)
        return ShareList(
            key=self.key,
            accounts=self.accounts,
            share_groups=self.share_groups,
            request_ids=self.request_ids,
            read_time=self.read_time,
            read_monotonic=clock.monotonic() - age,
        )


async def read_whole(
    source: ShareSource, query: ShareQuery, *, deadline: float | None, caller: str = ""
) -> ShareAnswer:
    """The whole list of ``query.key``, as ``source.stream`` serves it (cache, single-flight,
    stale fallbacks and errors alike)."""
    accounts: list[Account] = []
    groups: Sequence[str] | None = None
    request_ids: list[str] = []
    status: CacheStatus | None = None
    read_time = 0.0
    hit = source.cached(query)
    if hit is not None:
        return _cached_answer(query, *hit)
    chunks = source.stream(query, deadline=deadline, caller=caller)
    async with contextlib.aclosing(chunks):
        async for chunk in chunks:
            if chunk.entry is not None and chunk.entry.shares is not None:
                # A cached list comes whole, in one chunk, and nothing before it.
                return _cached_answer(query, chunk.entry, chunk.cache_status)
            if groups is None:
                groups, status, read_time = chunk.share_groups, chunk.cache_status, chunk.read_time
            accounts.extend(chunk.accounts)
            request_ids.extend(chunk.request_ids)
    return ShareAnswer(
        query.key,
        tuple(accounts),
        tuple(groups or ()),
        tuple(request_ids),
        status,
        read_time,
    )


def _cached_answer(
    query: ShareQuery, entry: CacheEntry, cache_status: CacheStatus | None
) -> ShareAnswer:
    shares = entry.shares
    assert shares is not None
    return ShareAnswer(
        query.key, shares.accounts, shares.share_groups, (), cache_status, shares.read_time, entry
    )


class SharedTier(Protocol):
    """A cache and read coordination shared by every replica (the Redis tier)."""

    @property
    def strategy(self) -> ReadStrategy:
        """How flights read: taking another replica's result, or leading the read."""
        ...

    async def lookup(self, key: ShareKey) -> ShareList | UpstreamErrorData | None:
        """What any replica stored for ``key``; None when nothing (or the tier is away)."""
        ...


def _transient(error: BaseException) -> bool:
    return isinstance(error, ImageShareError) and error.transient


@dataclass(slots=True)
class _Plan:
    """What the cache decided for one call: a chunk to serve now, or a read to follow."""

    served: ShareChunk | None = None
    flight: Flight | None = None
    status: CacheStatus = CacheStatus.MISS
    fallback: CacheEntry | None = None
    follow_until: float | None = None


class SharedShareSource:
    def __init__(
        self,
        client: PageReader,
        cache: ShareCache,
        options: FlightOptions,
        *,
        shared: SharedTier | None = None,
        max_orphan_reads: int = 8,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
        tracer: Tracer = NO_TRACING,
    ) -> None:
        self._metrics = metrics or ServiceMetrics.unregistered()
        self._tracer = tracer
        self._client = client
        # Shared lists need the cache's windows; with the cache off, Redis only limits the rate.
        self._shared = shared if cache.policy.enabled else None
        self._strategy = self._shared.strategy if self._shared is not None else UPSTREAM_ONLY
        self._cache = cache
        self._options = options
        self._max_orphans = max_orphan_reads
        self._clock = clock
        self._flights: dict[ShareKey, Flight] = {}
        self._orphans: set[Flight] = set()

    def prebuilt(
        self, entry: CacheEntry, page_size: int, build: Callable[[], list[bytes]]
    ) -> list[bytes]:
        return self._cache.messages(entry, page_size, build)

    def index(self, entry: CacheEntry) -> Mapping[str, Account]:
        return self._cache.index(entry)

    @property
    def flights(self) -> int:
        return len(self._flights)

    @property
    def orphans(self) -> int:
        return len(self._orphans)

    def _flight(self, spec: FlightSpec) -> tuple[Flight, bool]:
        """The read in flight for ``spec.key`` (joined: True) or a new one."""
        flight = self._flights.get(spec.key)
        if flight is not None:
            self._orphans.discard(flight)
            return flight, True
        flight = Flight(
            self._client,
            spec,
            self._options,
            strategy=self._strategy,
            outlives_callers=self._cache.policy.enabled,
            clock=self._clock,
            metrics=self._metrics,
            tracer=self._tracer,
        )
        self._flights[spec.key] = flight
        flight.start(self._landed, self._orphaned)
        return flight, False

    async def aclose(self) -> None:
        """Stop the reads still going (cache fills nobody waits for) and wait for them.

        Before the upstream client and Redis close under them: a read cancelled here still
        gives back its rate-limit slot and its lease.
        """
        flights = {*self._flights.values(), *self._orphans}
        await asyncio.gather(*(flight.aclose() for flight in flights))

    def _orphaned(self, flight: Flight) -> None:
        """The last follower left: go on as a cache fill if there is room, else stop."""
        if self._cache.policy.enabled and len(self._orphans) < self._max_orphans:
            self._orphans.add(flight)
            return
        self._metrics.orphan_reads_cancelled.inc()
        flight.cancel()

    def _landed(self, flight: Flight) -> None:
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        self._orphans.discard(flight)
        if flight.page_size != self._options.page_size:
            # Remember the page size the upstream accepted for later flights.
            self._options = dataclasses.replace(self._options, page_size=flight.page_size)
        if flight.result is not None:
            self._cache.put(flight.result)
        elif isinstance(flight.error, UpstreamApiError) and flight.error.is_image_not_found:
            self._cache.put_negative(flight.key, flight.error.data())

    def refresh_in_background(self, entry: CacheEntry) -> None:
        """Refresh a stale entry with a read nobody waits for, if an orphan slot is free."""
        if entry.key in self._flights or len(self._orphans) >= self._max_orphans:
            return
        shares = entry.shares
        spec = FlightSpec(
            entry.key,
            expected_total=shares.total_count if shares is not None else None,
            newer_than=shares.read_time if shares is not None else 0.0,
        )
        flight, _ = self._flight(spec)
        self._orphans.add(flight)

    async def _lookup(self, key: ShareKey) -> CacheEntry | None:
        """L1, then the shared tier when L1 has nothing fresh; a newer shared list goes into L1."""
        entry = self._cache.get(key)
        if self._shared is None or (
            entry is not None and self._cache.freshness(entry) is Freshness.FRESH
        ):
            return entry
        stored = await self._shared.lookup(key)
        if stored is None:
            return entry
        if isinstance(stored, UpstreamErrorData):
            return self._cache.put_negative(key, stored) if entry is None else entry
        if (
            entry is not None
            and entry.shares is not None
            and stored.read_time <= entry.shares.read_time
        ):
            return entry
        return self._cache.put(stored) or entry

    def cached(self, query: ShareQuery) -> Served | None:
        if query.bypass_cache:
            return None
        entry = self._cache.fresh(query.key)
        if entry is None or entry.error is not None:
            return None
        if self._tracer.enabled:
            with self._tracer.span(CACHE_SPAN) as span:
                self._counted(span, "hit")
        else:  # no span to open: the same count, without a context manager per hit
            self._counted(NO_SPAN, "hit")
        return entry, CacheStatus.HIT

    async def stream(
        self, query: ShareQuery, *, deadline: float | None, caller: str = ""
    ) -> AsyncGenerator[ShareChunk, None]:
        # The span covers the decision only: it must not stay current across a yield.
        with self._tracer.span(CACHE_SPAN) as span:
            plan = await self._plan(query, deadline, span)
        if plan.served is not None:
            yield plan.served
            return
        assert plan.flight is not None
        async for chunk in self._follow(
            plan.flight, plan.status, plan.follow_until, caller, plan.fallback
        ):
            yield chunk

    async def _plan(self, query: ShareQuery, deadline: float | None, span: Span) -> _Plan:
        fallback: CacheEntry | None = None
        if not query.bypass_cache:
            entry = await self._lookup(query.key)
            if entry is not None:
                served = self._from_cache(entry, span)
                if served is not None:
                    return _Plan(served=served)
                fallback = entry  # only good if a read fails
        now = self._clock.monotonic()
        if deadline is not None and deadline - now < MIN_READ_SECONDS:
            if fallback is None:
                raise DeadlineExceededError("the caller's deadline leaves no time to read the list")
            span.set("imageshare.cache.result", "stale")
            return _Plan(served=self._stale(fallback, "deadline"))
        flight, status = self._read_for(query, fallback, span)
        follow_until = None
        if deadline is not None:
            follow_until = deadline - min(MARGIN_SECONDS, (deadline - now) / 5)
        return _Plan(flight=flight, status=status, fallback=fallback, follow_until=follow_until)

    async def poll(self, key: ShareKey, *, newer_than: float, caller: str = "") -> ShareList:
        """A list of ``key`` read after ``newer_than`` (wall clock), at the least cost.

        The in-process entry when it was read since; else the read in flight
        for the key (a listing's, or another poll's); else a new read, which
        with a shared tier first takes a list another replica read since
        ``newer_than``, or leads the read for every replica. The read refreshes
        the cache like any other; an image known not to exist (a negative entry)
        is not read again before its entry expires.
        """
        entry = self._cache.get(key)
        if entry is not None:
            if entry.error is not None:
                raise UpstreamApiError.from_data(entry.error)
            if entry.shares is not None and entry.shares.read_time > newer_than:
                return entry.shares
        shares = entry.shares if entry is not None else None
        spec = FlightSpec(
            key,
            expected_total=shares.total_count if shares is not None else None,
            newer_than=newer_than,
        )
        flight, _ = self._flight(spec)
        pages = flight.follow(None, caller)
        try:
            async for _ in pages:
                pass
        finally:
            await pages.aclose()
        assert flight.result is not None  # follow ends normally only with a result
        return flight.result

    def _counted(self, span: Span, result: str) -> None:
        self._metrics.cache_results[result].inc()
        span.set("imageshare.cache.result", result)

    def _from_cache(self, entry: CacheEntry, span: Span) -> ShareChunk | None:
        """A fresh or revalidating entry's chunk; None when it is only a fallback."""
        if entry.error is not None:
            self._counted(span, "negative_hit")
            raise UpstreamApiError.from_data(entry.error)
        freshness = self._cache.freshness(entry)
        if freshness is Freshness.FRESH:
            self._counted(span, "hit")
            return _cached_chunk(entry, CacheStatus.HIT)
        if freshness is Freshness.STALE:
            self._counted(span, "stale")
            self._metrics.cache_stale_serves.labels("revalidating").inc()
            self.refresh_in_background(entry)
            return _cached_chunk(entry, CacheStatus.STALE)
        return None

    def _read_for(
        self, query: ShareQuery, fallback: CacheEntry | None, span: Span
    ) -> tuple[Flight, CacheStatus]:
        """The read to follow (joined or new), and what the caller is told it is."""
        shares = fallback.shares if fallback is not None else None
        if query.bypass_cache:
            newer_than = self._clock.time()
        else:
            newer_than = shares.read_time if shares is not None else 0.0
        spec = FlightSpec(
            query.key,
            expected_total=shares.total_count if shares is not None else None,
            newer_than=newer_than,
        )
        flight, joined = self._flight(spec)
        if query.bypass_cache:
            status = CacheStatus.BYPASS
        elif joined:
            status = CacheStatus.COALESCED
            self._metrics.coalesced_waits.inc()
        else:
            status = CacheStatus.MISS
        if joined:
            span.link(flight.span_ids)
        self._counted(span, status.value)
        return flight, status

    async def _follow(
        self,
        flight: Flight,
        status: CacheStatus,
        follow_until: float | None,
        caller: str,
        fallback: CacheEntry | None,
    ) -> AsyncIterator[ShareChunk]:
        """The read's pages until ``follow_until``; the fallback list if the read fails first."""
        pages = flight.follow(follow_until, caller)
        sent = False
        try:
            while True:
                try:
                    if follow_until is None or sent:
                        page = await anext(pages)
                    else:
                        async with asyncio.timeout(follow_until - self._clock.monotonic()):
                            page = await anext(pages)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if fallback is None:
                        raise flight.stuck_error() from None
                    yield self._stale(fallback, "deadline")
                    return
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
                "upstream read failed or ran out of time; serving the last good list",
                extra={"event": "stale_if_error", "error": str(exc)},
            )
            yield self._stale(fallback, "upstream_error")
        finally:
            await pages.aclose()
            # The RPC's log line: every attempt of the read it followed, failed ones too.
            rpc_log_fields()["upstream_request_ids"] = list(flight.request_ids)

    def _stale(self, entry: CacheEntry, reason: str) -> ShareChunk:
        self._metrics.cache_stale_serves.labels(reason).inc()
        return _cached_chunk(entry, CacheStatus.STALE)


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
