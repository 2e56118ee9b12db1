"""One upstream read of a share list, shared by every caller who wants it (single-flight).

A ``Flight`` runs as its own task, not inside any caller's RPC: a caller
that cancels stops following, while the read goes on for the others (and for
the cache). Followers get the pages in order once published; a late joiner
first gets what was published so far, then the rest.

After page 1 reveals TotalCount the remaining pages are read concurrently
(bounded per flight and globally). Every page is checked against the
snapshot (``listing.SnapshotChecker``); on a mismatch the whole read starts
over, so no follower ever sees an account twice or misses one. If the list
will not settle within ``max_attempts`` reads, followers get
``ListingUnstableError`` (ABORTED).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from imageshare_server.ecs.client import EcsClient
from imageshare_server.ecs.errors import UpstreamApiError
from imageshare_server.ecs.model import Account, SharePage
from imageshare_server.errors import ListingUnstableError
from imageshare_server.listing import SnapshotChecker, page_count
from imageshare_server.observability import metrics
from imageshare_server.validation import ShareKey

log = logging.getLogger(__name__)

# The 2017 documentation's PageSize maximum: what to fall back to when the
# upstream rejects a larger page size.
FALLBACK_PAGE_SIZE = 50


@dataclass(frozen=True)
class ShareList:
    """A complete, consistent snapshot of one image's shares."""

    key: ShareKey
    accounts: tuple[Account, ...]
    share_groups: tuple[str, ...]
    request_ids: tuple[str, ...]
    read_time: float  # wall clock, for callers
    read_monotonic: float  # for cache ages

    @property
    def total_count(self) -> int:
        return len(self.accounts)


@dataclass(frozen=True)
class FlightOptions:
    page_size: int = 100
    max_parallel_pages: int = 10
    max_attempts: int = 3  # whole-snapshot re-reads when the list changes under us
    timeout: float = 30.0  # bound on a flight nobody gives a deadline to


class Flight:
    def __init__(
        self,
        client: EcsClient,
        key: ShareKey,
        options: FlightOptions,
        global_pages: asyncio.Semaphore,
        *,
        deadline: float | None,
        expected_total: int | None = None,
    ) -> None:
        self.key = key
        self.started = time.monotonic()
        self.read_time = time.time()
        self.pages: list[SharePage] = []
        self.result: ShareList | None = None
        self.error: BaseException | None = None
        self.followers = 0
        self._client = client
        self._options = options
        self._global_pages = global_pages
        self._page_size = options.page_size
        self._expected_total = expected_total
        self._deadline = self._cap(deadline)
        self._changed = asyncio.Event()
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def _cap(self, deadline: float | None) -> float:
        limit = time.monotonic() + self._options.timeout
        return limit if deadline is None else min(deadline, limit)

    def extend(self, deadline: float | None) -> None:
        """A new follower may give the read more time than the first one did."""
        self._deadline = max(self._deadline, self._cap(deadline))

    @property
    def page_size(self) -> int:
        """The page size that worked (after a fallback, smaller than asked)."""
        return self._page_size

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def start(self, on_done: Callable[[Flight], None]) -> None:
        async def run() -> None:
            try:
                self.result = await self._read()
            except asyncio.CancelledError:
                self.error = asyncio.CancelledError()
                raise
            except Exception as exc:  # handed to every follower, who maps it to a status
                self.error = exc
            finally:
                self._done.set()
                self._notify()
                on_done(self)

        self._task = asyncio.get_running_loop().create_task(run(), name=f"flight {self.key}")

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def wait(self) -> ShareList:
        await self._done.wait()
        if self.result is None:
            raise self.error or RuntimeError("flight ended without a result")
        return self.result

    async def follow(self) -> AsyncIterator[SharePage]:
        """Every published page in order, then the end (or the flight's error)."""
        self.followers += 1
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
                changed = self._changed
                await changed.wait()
        finally:
            self.followers -= 1

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _publish(self, page: SharePage) -> None:
        self.pages.append(page)
        self._notify()

    async def _fetch(self, number: int, page_size: int) -> SharePage:
        async with self._global_pages:
            return await self._client.describe_image_share_permission(
                self.key.region_id,
                self.key.image_id,
                owner_account=self.key.owner_account,
                page_number=number,
                page_size=page_size,
                deadline=self._deadline,
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

    async def _read(self) -> ShareList:
        for attempt in range(1, self._options.max_attempts + 1):
            try:
                pages = await self._read_snapshot()
            except ListingUnstableError as exc:
                if attempt == self._options.max_attempts:
                    raise
                log.info("share list changed while reading, re-reading: %s", exc)
                continue
            for page in pages:
                self._publish(page)
            metrics.UPSTREAM_PAGES.observe(len(pages))
            return ShareList(
                key=self.key,
                accounts=tuple(a for page in pages for a in page.accounts),
                share_groups=pages[0].share_groups,
                request_ids=tuple(p.request_id for p in pages if p.request_id),
                read_time=self.read_time,
                read_monotonic=self.started,
            )
        raise AssertionError("unreachable")

    async def _read_snapshot(self) -> list[SharePage]:
        """Read and check every page; nothing is published until the snapshot is whole.

        Publishing page 1 before the rest is checked would save one round trip
        to the first message, but a change detected later could then only end
        in ABORTED (TotalCount is on every message); checking first lets a
        re-read fix it invisibly.
        """
        early: dict[int, asyncio.Future[SharePage]] = {}
        if self._expected_total is not None:
            # A refresh: the previous TotalCount says how many pages to ask for at once.
            early = {
                n: asyncio.ensure_future(self._fetch(n, self._page_size))
                for n in range(2, page_count(self._expected_total, self._page_size) + 1)
            }
        try:
            first = await self._first_page()
            checker = SnapshotChecker(first, self._page_size)
            size = self._page_size
            limit = asyncio.Semaphore(self._options.max_parallel_pages)

            async def bounded(number: int) -> SharePage:
                async with limit:
                    return await self._fetch(number, size)

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
