"""The service's domain values: what is asked for, and what the upstream answered.

Plain frozen dataclasses with no transport in them, shared by every layer
(validation, upstream client, cache, single-flight, Redis tier, gRPC layer).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime


class CacheStatus(enum.Enum):
    """Where an answer comes from; the gRPC layer maps it to the proto's enum."""

    MISS = "miss"  # read from the upstream for this call
    HIT = "hit"  # a fresh cache entry
    STALE = "stale"  # an old entry: revalidating, or because a read failed
    BYPASS = "bypass"  # read from the upstream because the caller asked
    COALESCED = "coalesced"  # joined a read another caller started


@dataclass(frozen=True, slots=True)
class ShareKey:
    """What identifies a share list upstream, and so a cache entry."""

    region_id: str
    image_id: str
    owner_account: str = ""


@dataclass(frozen=True, slots=True)
class ShareQuery:
    """A validated request: the list wanted, how to chunk it, whether to skip the cache."""

    key: ShareKey
    page_size: int
    bypass_cache: bool


@dataclass(frozen=True, slots=True)
class Account:
    """One account an image is shared with; ``aliyun_id`` is verbatim, even if sent as a number."""

    aliyun_id: str
    shared_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class SharePage:
    """One DescribeImageSharePermission page."""

    request_id: str
    page_number: int
    page_size: int
    total_count: int
    accounts: tuple[Account, ...]
    share_groups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
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


PUBLIC_GROUP = "all"


@dataclass(frozen=True, slots=True)
class ShareChange:
    """What changed from one list of an image to a later one.

    ``added`` holds the accounts new to the list and those shared again (same
    id, another shared time), in the later list's order; applying the
    removals, then the additions, to the earlier list gives the later one's
    accounts and groups.
    """

    added: tuple[Account, ...] = ()
    removed: tuple[str, ...] = ()
    groups_added: tuple[str, ...] = ()
    groups_removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.groups_added or self.groups_removed)

    @property
    def became_public(self) -> bool:
        return PUBLIC_GROUP in self.groups_added

    @property
    def became_private(self) -> bool:
        return PUBLIC_GROUP in self.groups_removed


def share_change(before: ShareList, after: ShareList) -> ShareChange:
    """The change from ``before`` to ``after``; falsy when they hold the same shares."""
    if before.accounts == after.accounts and before.share_groups == after.share_groups:
        return ShareChange()
    old = {a.aliyun_id: a for a in before.accounts}
    new_ids = {a.aliyun_id for a in after.accounts}
    added = tuple(a for a in after.accounts if old.get(a.aliyun_id) != a)
    removed = tuple(a.aliyun_id for a in before.accounts if a.aliyun_id not in new_ids)
    old_groups, new_groups = set(before.share_groups), set(after.share_groups)
    return ShareChange(
        added=added,
        removed=removed,
        groups_added=tuple(g for g in after.share_groups if g not in old_groups),
        groups_removed=tuple(g for g in before.share_groups if g not in new_groups),
    )
