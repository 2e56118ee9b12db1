"""In-process cache of complete share lists: TTL, stale windows, LRU bounds by entries and bytes.

An entry is *fresh* for ``ttl`` seconds; then for ``stale_while_revalidate``
more seconds it is served while one background refresh runs; then for the
rest of ``stale_if_error`` it is only served when the upstream fails with a
transient error (5xx, timeout, throttling). NotFound is cached briefly
(``negative_ttl``) so a caller polling a missing image does not spend quota.

Each entry keeps the serialized response messages a hit needs, per page
size, so that a hit does no message building (see ``messages``).
"""

from __future__ import annotations

import enum
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from imageshare_server.ecs.errors import UpstreamApiError
from imageshare_server.flight import ShareList
from imageshare_server.observability import metrics
from imageshare_server.validation import ShareKey

# Rough per-object overheads: a tuple slot, an Account and its strings.
_ENTRY_OVERHEAD = 512
_ACCOUNT_OVERHEAD = 120


class Freshness(enum.Enum):
    FRESH = "fresh"
    STALE = "stale"  # within stale-while-revalidate
    ERROR_ONLY = "error_only"  # only as a fallback when the upstream fails
    EXPIRED = "expired"


@dataclass
class CacheEntry:
    key: ShareKey
    shares: ShareList | None
    error: UpstreamApiError | None
    stored: float
    size: int
    messages: dict[int, list[bytes]] = field(default_factory=dict)

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


def estimate_size(shares: ShareList) -> int:
    return _ENTRY_OVERHEAD + sum(_ACCOUNT_OVERHEAD + len(a.aliyun_id) for a in shares.accounts)


class ShareCache:
    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy
        self._entries: OrderedDict[ShareKey, CacheEntry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def freshness(self, entry: CacheEntry, now: float | None = None) -> Freshness:
        age = (time.monotonic() if now is None else now) - entry.stored
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
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.freshness(entry) is Freshness.EXPIRED:
            self._remove(key, "expired")
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, shares: ShareList) -> CacheEntry | None:
        if not self.policy.enabled:
            return None
        size = estimate_size(shares)
        if size > self.policy.max_bytes:
            return None
        entry = CacheEntry(shares.key, shares, None, shares.read_monotonic, size)
        self._store(entry)
        return entry

    def put_negative(self, key: ShareKey, error: UpstreamApiError) -> None:
        if self.policy.enabled and self.policy.negative_ttl > 0:
            self._store(CacheEntry(key, None, error, time.monotonic(), _ENTRY_OVERHEAD))

    def _store(self, entry: CacheEntry) -> None:
        if entry.key in self._entries:
            self._remove(entry.key, None)
        self._entries[entry.key] = entry
        self._bytes += entry.size
        while len(self._entries) > self.policy.max_entries:
            self._remove(next(iter(self._entries)), "entries")
        while self._bytes > self.policy.max_bytes:
            self._remove(next(iter(self._entries)), "size")
        self._report()

    def _remove(self, key: ShareKey, reason: str | None) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.size
        if reason is not None:
            metrics.CACHE_EVICTIONS.labels(reason).inc()
        self._report()

    def _report(self) -> None:
        metrics.CACHE_ENTRIES.set(len(self._entries))
        metrics.CACHE_BYTES.set(self._bytes)
