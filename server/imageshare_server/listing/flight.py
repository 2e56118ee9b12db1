"""One upstream read of a share list, shared by every caller who wants it (single-flight).

A ``Flight`` runs as its own task, not inside any caller's RPC: a caller
that cancels stops following, while the read goes on for the others. Once
no caller follows it any more, its owner (``source.SharedShareSource``)
decides whether it goes on as a bounded cache fill or is cancelled.
Followers get the pages in order once published; a late joiner first gets
what was published so far, then the rest.

Time: the read as a whole never runs past ``FlightOptions.timeout`` (its
cap). When a cache will keep its result, the read runs to its cap whatever
its callers' deadlines, and each follower stops following at its own: a
starter with a short deadline cannot fail the callers who joined it with
more time, and a read that outlasts all of them can still fill the cache
for their retries. A follower learns early when the read queues for a
rate-limit slot past its deadline (RESOURCE_EXHAUSTED at once), and why
the read was late when its own time runs out (``stuck_error``). Without a
cache, the read is bounded by the latest deadline of its followers (re-read
at every step, so a caller who joins with more time extends it).

After page 1 reveals TotalCount the remaining pages are read concurrently
(bounded per flight). A list that cannot be read within the cap at the
configured upstream rate is refused before its other pages are asked for
(``ShareListTooLargeError``). Every page is checked against the snapshot
(``listing.SnapshotChecker``); on a mismatch the whole read starts over, so
no follower ever sees an account twice or misses one. If the list will not
settle within ``max_attempts`` reads, followers get ``ListingUnstableError``
(ABORTED).

How the read itself happens is a ``ReadStrategy``: by default straight from
the upstream; with Redis (``replicas``), coordinated with other replicas.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.deadline import ReadDeadline
from imageshare_server.core.errors import (
    DeadlineExceededError,
    ImageShareError,
    ListingTimeoutError,
    ListingUnstableError,
    RateLimitedError,
    ShareListTooLargeError,
    UpstreamApiError,
    UpstreamBusyError,
)
from imageshare_server.core.types import ShareKey, ShareList, SharePage
from imageshare_server.listing.snapshot import SnapshotChecker, page_count
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.observability.tracing import NO_TRACING, SpanIds, Tracer, current_span_ids

log = logging.getLogger(__name__)

# The 2017 documentation's PageSize maximum: what to fall back to when the
# upstream rejects a larger page size.
FALLBACK_PAGE_SIZE = 50


class PageReader(Protocol):
    """The upstream client's interface, as a flight uses it (see ``ecs.client.EcsClient``)."""

    async def describe_image_share_permission(
        self,
        region_id: str,
        image_id: str,
        *,
        page_number: int,
        page_size: int,
        owner_account: str = "",
        deadline: ReadDeadline = ...,
    ) -> SharePage: ...


@dataclass(frozen=True)
class FlightOptions:
    page_size: int = 100
    max_parallel_pages: int = 10
    max_attempts: int = 3  # whole-snapshot re-reads when the list changes under us
    timeout: float = 30.0  # the cap on one whole read: pages, retries and waits
    upstream_qps: float = 0.0  # the configured rate, to refuse lists too large to read
    upstream_burst: int = 1


@dataclass(frozen=True)
class FlightSpec:
    """What one read is for: the key, and what the previous read (if any) left behind."""

    key: ShareKey
    expected_total: int | None = None  # a refresh: the old TotalCount, to ask for all pages
    newer_than: float = 0.0  # wall clock: another replica's list must be newer to be taken


class ReadStrategy(Protocol):
    """How a flight gets its list: ``read_upstream`` is the plain upstream read."""

    async def read(
        self, flight: Flight, read_upstream: Callable[[], Awaitable[ShareList]]
    ) -> ShareList: ...


class UpstreamOnly:
    """The in-process strategy: every flight reads the upstream itself."""

    async def read(
        self, flight: Flight, read_upstream: Callable[[], Awaitable[ShareList]]
    ) -> ShareList:
        return await read_upstream()


UPSTREAM_ONLY = UpstreamOnly()

FLIGHT_SPAN = "imageshare.flight"


class Flight:
    """One read of one key; also the ``ReadDeadline`` its upstream calls run under."""

    def __init__(
        self,
        client: PageReader,
        spec: FlightSpec,
        options: FlightOptions,
        *,
        strategy: ReadStrategy = UPSTREAM_ONLY,
        outlives_callers: bool = False,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
        tracer: Tracer = NO_TRACING,
    ) -> None:
        self._metrics = metrics or ServiceMetrics.unregistered()
        self._tracer = tracer
        self.key = spec.key
        self.spec = spec
        self.started = clock.monotonic()
        self.read_time = clock.time()
        self.cap = self.started + options.timeout
        self.pages: list[SharePage] = []
        self.result: ShareList | None = None
        self.error: BaseException | None = None
        # Every answered upstream attempt's RequestId, failed ones included (for log lines).
        self.request_ids: list[str] = []
        # The flight's span, for callers who join it to link to (tracing on).
        self.span_ids: SpanIds | None = None
        self._client = client
        self._options = options
        self._strategy = strategy
        self._outlives_callers = outlives_callers
        self._clock = clock
        self._page_size = options.page_size
        self._followers: dict[object, tuple[float | None, str]] = {}
        self._blocked_until = 0.0
        self._queued_for_quota = False
        self._slot_waits = 0
        self._on_orphaned: Callable[[Flight], None] | None = None
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- ReadDeadline ------------------------------------------------------------------

    def at(self) -> float | None:
        """The cap, or (without a cache to fill) the latest deadline of the followers."""
        if self._outlives_callers or not self._followers:
            return self.cap
        latest = max((d if d is not None else self.cap) for d, _ in self._followers.values())
        return min(latest, self.cap)

    @property
    def background(self) -> bool:
        """Nobody is waiting: the read only fills the cache."""
        return not self._followers

    @property
    def caller(self) -> str:
        """The caller the read counts against: its longest-waiting follower."""
        for _, caller in self._followers.values():
            return caller
        return ""

    def queued(self, until: float) -> None:
        """The read waits for a rate-limit slot until ``until``: followers who cannot wait
        that long are refused now (``follow``), and the read goes on without them."""
        self._queued_for_quota = True
        if until > self._blocked_until:
            self._blocked_until = until
            self._notify()

    def admitted(self) -> None:
        self._queued_for_quota = False

    def waiting_for_slot(self, waiting: bool) -> None:
        self._slot_waits += 1 if waiting else -1

    def upstream_answer(self, request_id: str) -> None:
        self.request_ids.append(request_id)

    def stuck_error(self) -> ImageShareError:
        """Why a follower whose time ran out got nothing: what the read is waiting for."""
        now = self._clock.monotonic()
        if self._slot_waits:
            return UpstreamBusyError()
        if self._queued_for_quota or self._blocked_until > now:
            # Still waiting for its turn (later than estimated, when callers who had to
            # wait less joined the queue): the quota's refusal, not a timeout.
            return RateLimitedError(max(0.0, self._blocked_until - now))
        return DeadlineExceededError("the read did not finish before the caller's deadline")

    # --- state -------------------------------------------------------------------------

    @property
    def followers(self) -> int:
        return len(self._followers)

    @property
    def page_size(self) -> int:
        """The page size that worked (after a fallback, smaller than asked)."""
        return self._page_size

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def options(self) -> FlightOptions:
        return self._options

    def start(
        self,
        on_done: Callable[[Flight], None],
        on_orphaned: Callable[[Flight], None] | None = None,
    ) -> None:
        self._on_orphaned = on_orphaned

        async def run() -> None:
            with self._tracer.span(FLIGHT_SPAN) as span:
                self.span_ids = current_span_ids()
                if span.recording:
                    span.set("cloud.region", self.key.region_id)
                    span.set("imageshare.image_id", self.key.image_id)
                    span.set("imageshare.refresh", self.spec.expected_total is not None)
                try:
                    remaining = self.cap - self._clock.monotonic()
                    try:
                        async with asyncio.timeout(remaining):
                            self.result = await self._strategy.read(self, self.read_upstream)
                    except TimeoutError:
                        raise ListingTimeoutError(self._options.timeout) from None
                except asyncio.CancelledError:
                    self.error = asyncio.CancelledError()
                    raise
                except Exception as exc:  # handed to every follower, who maps it to a status
                    self.error = exc
                    span.fail(f"{type(exc).__name__}: {exc}")
                finally:
                    span.set("imageshare.upstream.requests", len(self.request_ids))
                    self._done.set()
                    self._notify()
                    on_done(self)

        self._task = asyncio.get_running_loop().create_task(run(), name=f"flight {self.key}")

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def aclose(self) -> None:
        """Cancel the read and wait until it has let go of what it held."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def wait_result(self) -> ShareList:
        await self._done.wait()
        if self.result is None:
            raise self.error or RuntimeError("flight ended without a result")
        return self.result

    async def follow(
        self, deadline: float | None = None, caller: str = ""
    ) -> AsyncGenerator[SharePage, None]:
        """Every published page in order, then the end (or the flight's error).

        ``deadline`` is the follower's own: while it follows, the read's
        waits may last until then. A follower whose deadline comes before the
        rate-limit slot the read queues for gets ``RateLimitedError`` at once.
        ``caller`` names who the follower is, for the upstream quota's turns.
        """
        token = object()
        self._followers[token] = (deadline, caller)
        try:
            index = 0
            while True:
                while index < len(self.pages):
                    yield self.pages[index]
                    index += 1
                if self.done:
                    if self.result is None:
                        raise self.error or RuntimeError("flight ended without a result")
                    return
                if deadline is not None and self._blocked_until > deadline:
                    raise RateLimitedError(self._blocked_until - self._clock.monotonic())
                changed = self._changed
                await changed.wait()
        finally:
            del self._followers[token]
            if not self._followers and not self.done and self._on_orphaned is not None:
                self._on_orphaned(self)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def publish(self, page: SharePage) -> None:
        self.pages.append(page)
        self._notify()

    def publish_list(self, shares: ShareList) -> None:
        """Publish a whole list obtained elsewhere (another replica) as one page."""
        self.publish(
            SharePage(
                request_id="",
                page_number=1,
                page_size=max(1, shares.total_count),
                total_count=shares.total_count,
                accounts=shares.accounts,
                share_groups=shares.share_groups,
            )
        )

    # --- the upstream read -------------------------------------------------------------

    async def _fetch(self, number: int, page_size: int) -> SharePage:
        return await self._client.describe_image_share_permission(
            self.key.region_id,
            self.key.image_id,
            owner_account=self.key.owner_account,
            page_number=number,
            page_size=page_size,
            deadline=self,
        )

    async def _first_page(self) -> SharePage:
        try:
            return await self._fetch(1, self._page_size)
        except UpstreamApiError as exc:
            if (
                exc.code.startswith("InvalidParameter")
                and "pagesize" in exc.message.lower()
                and self._page_size > FALLBACK_PAGE_SIZE
            ):
                log.warning(
                    "upstream rejected PageSize %d; falling back to %d",
                    self._page_size,
                    FALLBACK_PAGE_SIZE,
                )
                self._page_size = FALLBACK_PAGE_SIZE
                return await self._fetch(1, self._page_size)
            raise

    async def read_upstream(self) -> ShareList:
        """Read every page into a checked snapshot, publish it, return the list."""
        for attempt in range(1, self._options.max_attempts + 1):
            try:
                pages = await self._read_snapshot()
            except ListingUnstableError as exc:
                if attempt == self._options.max_attempts:
                    raise
                log.info("share list changed while reading, re-reading: %s", exc)
                continue
            for page in pages:
                self.publish(page)
            self._metrics.upstream_pages.observe(len(pages))
            return ShareList(
                key=self.key,
                accounts=tuple(a for page in pages for a in page.accounts),
                share_groups=pages[0].share_groups,
                request_ids=tuple(p.request_id for p in pages if p.request_id),
                read_time=self.read_time,
                read_monotonic=self.started,
            )
        raise AssertionError("unreachable")

    def _refuse_if_too_large(self, total_count: int) -> None:
        """Refuse a list whose other pages cannot be read before the cap at the configured rate.

        Page 1 is already paid for; the rest would be spent for nothing, and
        the next try would spend it again.
        """
        options = self._options
        if options.upstream_qps <= 0:
            return
        pages = page_count(total_count, self._page_size)
        rest = pages - 1
        needed = max(0, rest - (options.upstream_burst - 1)) / options.upstream_qps
        left = self.cap - self._clock.monotonic()
        # A fifth of what is left goes to the round trips and retries themselves.
        if needed > left * 0.8:
            raise ShareListTooLargeError(total_count, pages, needed, options.timeout)

    def _wave(self, other_pages: int) -> int:
        """How many of a list's other pages to read at once.

        All of them when they fit in the rate limit's burst (page 1 took one token): the
        read then takes two round trips. A list larger than that would only queue in the
        limiter, so it is read ``max_parallel_pages`` at a time, leaving room for others.
        """
        options = self._options
        if options.upstream_qps > 0 and other_pages < options.upstream_burst:
            return max(1, other_pages, options.max_parallel_pages)
        return options.max_parallel_pages

    async def _read_snapshot(self) -> list[SharePage]:
        """Read and check every page; nothing is published until the snapshot is whole.

        Publishing page 1 before the rest is checked would save one round trip
        to the first message, but a change detected later could then only end
        in ABORTED (TotalCount is on every message); checking first lets a
        re-read fix it invisibly.
        """
        early: dict[int, asyncio.Future[SharePage]] = {}
        expected = self.spec.expected_total
        limit: asyncio.Semaphore | None = None
        size = self._page_size

        async def bounded(number: int) -> SharePage:
            assert limit is not None
            async with limit:
                return await self._fetch(number, size)

        if expected is not None:
            # A refresh: the previous TotalCount says how many pages to ask for at once.
            self._refuse_if_too_large(expected)
            limit = asyncio.Semaphore(self._wave(page_count(expected, size) - 1))
            early = {
                n: asyncio.ensure_future(bounded(n))
                for n in range(2, page_count(expected, self._page_size) + 1)
            }
        try:
            first = await self._first_page()
            if size != self._page_size:  # the page size fell back: the early pages are wrong
                for task in early.values():
                    task.cancel()
                early = {}
                size = self._page_size
            checker = SnapshotChecker(first, self._page_size)
            self._refuse_if_too_large(checker.total_count)
            if limit is None:
                limit = asyncio.Semaphore(self._wave(checker.pages - 1))
            for number in list(early):
                if number > checker.pages:
                    early.pop(number).cancel()
            for number in range(2, checker.pages + 1):
                if number not in early:
                    early[number] = asyncio.ensure_future(bounded(number))
            pages = [first]
            for number in range(2, checker.pages + 1):
                page = await early[number]
                checker.add(page, number)
                pages.append(page)
            return pages
        finally:
            for task in early.values():
                task.cancel()
            await asyncio.gather(*early.values(), return_exceptions=True)
