"""Watches: one poller per watched share list, shared by every watcher of it.

A ``Poller`` is started by the first watcher of a key and stopped when the
last one leaves (reference counted). Its first read goes through the source
like a listing (a fresh cached list costs nothing); then, every ``interval``
seconds, it polls: a read of the list made since the start of the current
interval, through the same cache, single-flight, rate limit, retries and
snapshot checks as listings (``SharedShareSource.poll``). A read under way
for the key (a listing's) is joined, a list read since by anyone is taken, and
with Redis the replicas share the read: polls of a key fall at the same
moment of each interval on every replica (the phase is a hash of the key, and
spreads keys over the interval), one replica takes the read lease and the
others take its list from Redis.

Each successful poll that finds the list changed makes a new *version*; the
step from one version to the next is one ``WatchEvent``, built once and sent
to every watcher that was up to date. A watcher holds only the version (and
the list) it last sent: a watcher that falls behind (slow to read) gets the
net change from its version to the newest in one message, so a stalled caller
holds no queue, only references to lists the poller already holds.

A poll that fails sends nothing and the watch goes on, except when the image
is gone (``InvalidImageId.NotFound``) or the service may no longer read it
(``Forbidden*``): then every watcher of it ends with that error. ``close``
ends every watch with ``ShuttingDownError`` (SIGTERM: callers reconnect
elsewhere and get a new snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import math
import zlib
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import (
    ImageShareError,
    ShuttingDownError,
    TooManyWatchersError,
    UpstreamApiError,
)
from imageshare_server.core.rules import MAX_PAGE_SIZE
from imageshare_server.core.types import ShareChange, ShareKey, ShareList, ShareQuery, share_change
from imageshare_server.listing.source import ShareSource, read_whole
from imageshare_server.observability.metrics import ServiceMetrics

log = logging.getLogger(__name__)

# Every poll takes its turns for the upstream quota as this one caller, so watched
# images together cannot crowd out the callers of listings and checks.
WATCH_CALLER = "watch"
# A list read this long before the poll's moment still counts as this interval's read:
# replicas' clocks differ by milliseconds, and a listing that just read it is as good.
MAX_SKEW = 1.0
# Account ids named in one change's log line (the counts are always complete).
LOGGED_IDS = 20


class WatchSource(ShareSource, Protocol):
    async def poll(self, key: ShareKey, *, newer_than: float, caller: str = "") -> ShareList:
        """A list of ``key`` read after ``newer_than`` (wall clock)."""
        ...


@dataclass(eq=False, slots=True)
class WatchEvent:
    """What a watcher is sent: the whole list (``change`` None), or the change that led to it.

    ``encoded`` is the serialized message, built by the first watcher that
    sends the event and reused by the others.
    """

    shares: ShareList
    change: ShareChange | None = None
    encoded: bytes | None = None

    @property
    def snapshot(self) -> bool:
        return self.change is None


def phase(key: ShareKey, interval: float) -> float:
    """Where in each interval the key's polls fall: the same on every replica, spread over keys."""
    digest = zlib.crc32(f"{key.region_id}/{key.image_id}/{key.owner_account}".encode())
    return digest / 2**32 * interval


def next_poll(now: float, interval: float, offset: float) -> float:
    """The first poll moment after ``now`` (wall clock) for a key of phase ``offset``."""
    return (math.floor((now - offset) / interval) + 1) * interval + offset


def ends_watch(error: ImageShareError) -> bool:
    """Failures that say the image is gone or out of reach for good; others are retried."""
    return isinstance(error, UpstreamApiError) and (
        error.is_image_not_found or error.code.startswith("Forbidden")
    )


class Poller:
    """The reads of one watched key, and the versions of its list."""

    def __init__(self, hub: WatchHub, key: ShareKey) -> None:
        self.key = key
        self.watchers = 0
        self.version = 0
        self.current: ShareList | None = None  # the newest list read (same shares all version)
        self.error: ImageShareError | None = None
        self._hub = hub
        self._step: WatchEvent | None = None  # version - 1 -> version
        self._snapshot: WatchEvent | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"watch {self.key}")

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.notify()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def snapshot(self) -> WatchEvent:
        """The whole current list as one event (built once per list read)."""
        current = self.current
        assert current is not None
        if self._snapshot is None or self._snapshot.shares is not current:
            self._snapshot = WatchEvent(current)
        return self._snapshot

    def step(self) -> WatchEvent:
        assert self._step is not None
        return self._step

    # --- the reads ----------------------------------------------------------------------

    async def _run(self) -> None:
        hub = self._hub
        try:
            first = await read_whole(
                hub.source,
                ShareQuery(self.key, page_size=MAX_PAGE_SIZE, bypass_cache=False),
                deadline=None,
                caller=WATCH_CALLER,
            )
        except ImageShareError as exc:
            self._end(exc)
            return
        self.current = first.shares(hub.clock)
        self.notify()
        offset = phase(self.key, hub.interval)
        skew = min(MAX_SKEW, hub.interval / 4)
        while True:
            at = next_poll(hub.clock.time(), hub.interval, offset)
            await hub.clock.sleep(at - hub.clock.time())
            # From when the poll actually runs (a moment after ``at``), never before it.
            newer_than = max(at, hub.clock.time()) - skew
            try:
                shares = await hub.source.poll(self.key, newer_than=newer_than, caller=WATCH_CALLER)
            except ImageShareError as exc:
                if ends_watch(exc):
                    hub.metrics.watch_polls.labels("ended").inc()
                    self._end(exc)
                    return
                hub.metrics.watch_polls.labels("failed").inc()
                log.warning(
                    "poll of a watched share list failed; the watch goes on",
                    extra={"event": "watch_poll_failed", **self._where(), "error": str(exc)},
                )
                continue
            except Exception:
                hub.metrics.watch_polls.labels("failed").inc()
                log.exception("unexpected error polling a watched share list", extra=self._where())
                continue
            self._advance(shares)

    def _advance(self, shares: ShareList) -> None:
        current = self.current
        assert current is not None
        if shares.read_time < current.read_time:
            return  # an older list than the one watchers have (a slow read landing late)
        change = share_change(current, shares)
        self.current = shares
        if not change:
            self._hub.metrics.watch_polls.labels("unchanged").inc()
            return
        self._hub.metrics.watch_polls.labels("changed").inc()
        self.version += 1
        self._step = WatchEvent(shares, change)
        self._report(change, shares)
        self.notify()

    def _end(self, error: ImageShareError) -> None:
        """Every watcher of this key ends with ``error``; a new watcher starts a new poller."""
        self.error = error
        self._hub.forget(self)
        log.info(
            "watched share list can no longer be read; its watches end",
            extra={"event": "watch_ended", **self._where(), "error": str(error)},
        )
        self.notify()

    def _where(self) -> dict[str, str]:
        return {"region": self.key.region_id, "image": self.key.image_id}

    def _report(self, change: ShareChange, shares: ShareList) -> None:
        """Count the change by kind and log one line naming the image."""
        counts = self._hub.metrics.share_changes
        if change.added:
            counts.labels("account_added").inc(len(change.added))
        if change.removed:
            counts.labels("account_removed").inc(len(change.removed))
        if change.groups_added:
            counts.labels("group_added").inc(len(change.groups_added))
        if change.groups_removed:
            counts.labels("group_removed").inc(len(change.groups_removed))
        if change.became_public:
            counts.labels("became_public").inc()
        if change.became_private:
            counts.labels("became_private").inc()
        level = logging.WARNING if change.became_public else logging.INFO
        log.log(
            level,
            "image became public" if change.became_public else "share list changed",
            extra={
                "event": "share_change",
                **self._where(),
                "owner_account": self.key.owner_account,
                "accounts_added": len(change.added),
                "accounts_removed": len(change.removed),
                "added_ids": [a.aliyun_id for a in change.added[:LOGGED_IDS]],
                "removed_ids": list(change.removed[:LOGGED_IDS]),
                "groups_added": list(change.groups_added),
                "groups_removed": list(change.groups_removed),
                "became_public": change.became_public,
                "became_private": change.became_private,
                "total_count": shares.total_count,
                "watchers": self.watchers,
            },
        )


class Watcher:
    """One caller's watch: the events to send it, from its own version to the newest.

    Use it as a context manager: leaving it releases the watch (and, for the
    last watcher of a key, stops its poller).
    """

    def __init__(self, hub: WatchHub, poller: Poller) -> None:
        self._hub = hub
        self._poller = poller
        self._version: int | None = None  # none sent yet: the first event is a snapshot
        self._sent: ShareList | None = None
        self._left = False

    @property
    def key(self) -> ShareKey:
        return self._poller.key

    async def next(self) -> WatchEvent:
        """The next event: a snapshot first, then each change, however late the caller reads.

        Raises the poller's error when the image can no longer be watched, and
        ``ShuttingDownError`` once the hub is closed.
        """
        poller = self._poller
        while True:
            if self._hub.closed:
                raise ShuttingDownError()
            if poller.error is not None:
                raise poller.error
            current = poller.current
            if current is not None and self._version != poller.version:
                event = self._event(poller, current)
                self._version, self._sent = poller.version, current
                if event is not None:
                    return event
                continue
            await poller.changed()

    def _event(self, poller: Poller, current: ShareList) -> WatchEvent | None:
        if self._version is None or self._sent is None:
            return poller.snapshot()
        if self._version == poller.version - 1:
            return poller.step()
        # Behind by several versions: the net change in one message (none if it undid itself).
        change = share_change(self._sent, current)
        return WatchEvent(current, change) if change else None

    def leave(self) -> None:
        if not self._left:
            self._left = True
            self._hub.leave(self._poller)

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.leave()


class WatchHub:
    """Every watch of the process: pollers by key, the watcher limit, and shutdown."""

    def __init__(
        self,
        source: WatchSource,
        *,
        interval: float = 60.0,
        max_watchers: int = 10_000,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self.source = source
        self.interval = interval
        self.max_watchers = max_watchers
        self.clock = clock
        self.metrics = metrics or ServiceMetrics.unregistered()
        self.closed = False
        self._pollers: dict[ShareKey, Poller] = {}
        self._watchers = 0

    @property
    def watchers(self) -> int:
        return self._watchers

    @property
    def pollers(self) -> int:
        return len(self._pollers)

    def watch(self, key: ShareKey) -> Watcher:
        """A new watch of ``key``, joining its poller or starting one."""
        if self.closed:
            raise ShuttingDownError()
        if self._watchers >= self.max_watchers:
            raise TooManyWatchersError(self.max_watchers)
        poller = self._pollers.get(key)
        if poller is None:
            poller = Poller(self, key)
            self._pollers[key] = poller
            poller.start()
            self.metrics.watched_images.set(len(self._pollers))
        poller.watchers += 1
        self._watchers += 1
        self.metrics.watchers.set(self._watchers)
        return Watcher(self, poller)

    def leave(self, poller: Poller) -> None:
        poller.watchers -= 1
        self._watchers -= 1
        self.metrics.watchers.set(self._watchers)
        if poller.watchers == 0:
            self.forget(poller)
            poller.cancel()

    def forget(self, poller: Poller) -> None:
        """Take ``poller`` out of service: the next watcher of its key starts a new one."""
        if self._pollers.get(poller.key) is poller:
            del self._pollers[poller.key]
            self.metrics.watched_images.set(len(self._pollers))

    def close(self) -> None:
        """End every watch with ``ShuttingDownError`` now and refuse new ones."""
        self.closed = True
        for poller in list(self._pollers.values()):
            poller.cancel()

    async def aclose(self) -> None:
        """``close``, then wait for the pollers to stop."""
        self.close()
        tasks = [p.task for p in self._pollers.values() if p.task is not None]
        self._pollers.clear()
        self.metrics.watched_images.set(0)
        await asyncio.gather(*tasks, return_exceptions=True)
