"""In-process cache of complete share lists: TTL, stale windows, LRU bounds by entries and bytes.

An entry is *fresh* for ``ttl`` seconds; then for ``stale_while_revalidate``
more seconds it is served while one background refresh runs; then for the
rest of ``stale_if_error`` it is only served when the upstream fails with a
transient error (5xx, timeout, throttling). An image that does not exist
(``InvalidImageId.NotFound``) is cached briefly (``negative_ttl``) so a
caller polling a missing image does not spend quota; only the error's data
is kept (code, message, HTTP status, request id), never the exception with
its traceback.

Each entry keeps the serialized response messages a hit needs, for a few
page sizes, so that a hit does no message building (see ``messages``), and,
once a check asked for it, an index of its accounts by id, so that a check
costs one dictionary lookup however long the list is (see ``index``).

Memory is bounded by ``max_bytes`` with sizes measured, not guessed: every
string, tuple and message an entry holds is counted with ``sys.getsizeof``
(a test holds the count within 2x of what ``tracemalloc`` sees). Expired
entries are swept every ``SWEEP_INTERVAL`` seconds even if nobody asks for
them again, so made-up image ids cannot pile up.
"""

from __future__ import annotations

import enum
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import UpstreamErrorData
from imageshare_server.core.types import Account, ShareKey, ShareList
from imageshare_server.observability.metrics import ServiceMetrics

# What an entry costs beyond what it holds: the entry, its key, the list
# object, the LRU's link and the dict slot (measured with tracemalloc).
ENTRY_OVERHEAD = 640
# Message lists kept per entry: callers ask for one or two page sizes; a
# caller cycling through all hundred must not multiply an entry's size.
MAX_MESSAGE_VARIANTS = 4
SWEEP_INTERVAL = 10.0


class Freshness(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"  # within stale-while-revalidate
    ERROR_ONLY = "error_only"  # only as a fallback when the upstream fails
    EXPIRED = "expired"


@dataclass(slots=True, eq=False)
class CacheEntry:
    key: ShareKey
    shares: ShareList | None
    error: UpstreamErrorData | None
    stored: float
    size: int
    messages: OrderedDict[int, list[bytes]] = field(default_factory=OrderedDict)
    accounts_by_id: dict[str, Account] | None = None

    @property
    def negative(self) -> bool:
        return self.shares is None


@dataclass(frozen=True)
class CachePolicy:
    ttl: float = 60.0
    stale_while_revalidate: float = 30.0
    stale_if_error: float = 600.0
    negative_ttl: float = 5.0
    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024

    @property
    def enabled(self) -> bool:
        return self.ttl > 0


def _key_size(key: ShareKey) -> int:
    return (
        sys.getsizeof(key.region_id)
        + sys.getsizeof(key.image_id)
        + sys.getsizeof(key.owner_account)
    )


def list_size(shares: ShareList) -> int:
    """Bytes ``shares`` holds: its tuples, accounts, their ids and times."""
    size = sys.getsizeof(shares.accounts) + sys.getsizeof(shares.share_groups)
    size += sys.getsizeof(shares.request_ids)
    size += sum(sys.getsizeof(g) for g in shares.share_groups)
    size += sum(sys.getsizeof(r) for r in shares.request_ids)
    for account in shares.accounts:
        size += sys.getsizeof(account) + sys.getsizeof(account.aliyun_id)
        if account.shared_time is not None:
            size += sys.getsizeof(account.shared_time)
    return size


def error_size(error: UpstreamErrorData) -> int:
    return (
        sys.getsizeof(error)
        + sys.getsizeof(error.code)
        + sys.getsizeof(error.message)
        + sys.getsizeof(error.request_id)
    )


def messages_size(messages: list[bytes]) -> int:
    return sys.getsizeof(messages) + sum(sys.getsizeof(m) for m in messages)


class ShareCache:
    def __init__(
        self,
        policy: CachePolicy,
        *,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ServiceMetrics.unregistered()
        self.policy = policy
        self._clock = clock
        self._entries: OrderedDict[ShareKey, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._next_sweep = clock.monotonic() + SWEEP_INTERVAL

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    @property
    def clock(self) -> Clock:
        return self._clock

    def freshness(self, entry: CacheEntry, now: float | None = None) -> Freshness:
        age = (self._clock.monotonic() if now is None else now) - entry.stored
        policy = self.policy
        if entry.negative:
            return Freshness.FRESH if age < policy.negative_ttl else Freshness.EXPIRED
        if age < policy.ttl:
            return Freshness.FRESH
        if age < policy.ttl + policy.stale_while_revalidate:
            return Freshness.STALE
        if age < policy.ttl + policy.stale_if_error:
            return Freshness.ERROR_ONLY
        return Freshness.EXPIRED

    def get(self, key: ShareKey) -> CacheEntry | None:
        self._maybe_sweep()
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.freshness(entry) is Freshness.EXPIRED:
            self._remove(key, "expired")
            return None
        self._entries.move_to_end(key)
        return entry

    def fresh(self, key: ShareKey) -> CacheEntry | None:
        """The entry of ``key`` while it is fresh (a use, for the LRU); else None, and then
        nothing changes: ``get`` is what drops an expired entry."""
        self._maybe_sweep()
        entry = self._entries.get(key)
        if entry is None or self.freshness(entry) is not Freshness.FRESH:
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, shares: ShareList) -> CacheEntry | None:
        """Keep ``shares`` unless an entry read later is already there."""
        if not self.policy.enabled:
            return None
        current = self._entries.get(shares.key)
        if (
            current is not None
            and current.shares is not None
            and current.shares.read_monotonic > shares.read_monotonic
        ):
            return current
        size = ENTRY_OVERHEAD + _key_size(shares.key) + list_size(shares)
        if size > self.policy.max_bytes:
            return None
        entry = CacheEntry(shares.key, shares, None, shares.read_monotonic, size)
        self._store(entry)
        return entry

    def put_negative(self, key: ShareKey, error: UpstreamErrorData) -> CacheEntry | None:
        """Remember that ``key``'s image does not exist; never replaces a list still served.

        A fresh or revalidating list stays (a read that said otherwise may
        have been a blip, and the list expires on its own); one kept only for
        stale-if-error gives way, so a deleted image stops costing a read per
        call.
        """
        if not self.policy.enabled or self.policy.negative_ttl <= 0:
            return None
        current = self._entries.get(key)
        if (
            current is not None
            and not current.negative
            and self.freshness(current) in (Freshness.FRESH, Freshness.STALE)
        ):
            return None
        size = ENTRY_OVERHEAD + _key_size(key) + error_size(error)
        entry = CacheEntry(key, None, error, self._clock.monotonic(), size)
        self._store(entry)
        return entry

    def messages(
        self, entry: CacheEntry, page_size: int, build: Callable[[], list[bytes]]
    ) -> list[bytes]:
        """The prebuilt messages of ``entry`` at ``page_size``, built once and accounted for."""
        messages = entry.messages.get(page_size)
        if messages is not None:
            entry.messages.move_to_end(page_size)
            return messages
        messages = build()
        if self._entries.get(entry.key) is not entry:
            return messages  # evicted or replaced meanwhile: serve, do not keep
        added = messages_size(messages)
        entry.messages[page_size] = messages
        while len(entry.messages) > MAX_MESSAGE_VARIANTS:
            _, dropped = entry.messages.popitem(last=False)
            added -= messages_size(dropped)
        entry.size += added
        self._bytes += added
        self._evict()
        self._report()
        return messages

    def index(self, entry: CacheEntry) -> Mapping[str, Account]:
        """The accounts of ``entry`` by id, built once and accounted for.

        The dictionary shares the entry's account objects and id strings, so
        only the table itself adds to the entry's size.
        """
        index = entry.accounts_by_id
        if index is not None:
            return index
        shares = entry.shares
        index = {} if shares is None else {a.aliyun_id: a for a in shares.accounts}
        if self._entries.get(entry.key) is not entry:
            return index  # evicted or replaced meanwhile: answer, do not keep
        entry.accounts_by_id = index
        added = sys.getsizeof(index)
        entry.size += added
        self._bytes += added
        self._evict()
        self._report()
        return index

    def sweep(self) -> int:
        """Drop every expired entry now; returns how many went."""
        now = self._clock.monotonic()
        self._next_sweep = now + SWEEP_INTERVAL
        expired = [
            key
            for key, entry in self._entries.items()
            if self.freshness(entry, now) is Freshness.EXPIRED
        ]
        for key in expired:
            self._remove(key, "expired")
        return len(expired)

    def _maybe_sweep(self) -> None:
        if self._clock.monotonic() >= self._next_sweep:
            self.sweep()

    def _store(self, entry: CacheEntry) -> None:
        self._maybe_sweep()
        if entry.key in self._entries:
            self._remove(entry.key, None)
        self._entries[entry.key] = entry
        self._bytes += entry.size
        self._evict()
        self._report()

    def _evict(self) -> None:
        while len(self._entries) > self.policy.max_entries:
            self._remove(next(iter(self._entries)), "entries")
        while self._bytes > self.policy.max_bytes and self._entries:
            self._remove(next(iter(self._entries)), "size")

    def _remove(self, key: ShareKey, reason: str | None) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size
        if reason is not None:
            self._metrics.cache_evictions.labels(reason).inc()
        self._report()

    def _report(self) -> None:
        self._metrics.cache_entries.set(len(self._entries))
        self._metrics.cache_bytes.set(self._bytes)
