"""Plain Python values handed to callers, so that nobody outside this package touches protobufs."""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field

from imageshare.v1 import image_share_pb2 as pb

PUBLIC_GROUP = "all"


class CacheStatus(enum.Enum):
    """How the server answered; mirrors `imageshare.v1.CacheStatus` without its prefix."""

    UNSPECIFIED = pb.CACHE_STATUS_UNSPECIFIED
    MISS = pb.CACHE_STATUS_MISS
    HIT = pb.CACHE_STATUS_HIT
    STALE = pb.CACHE_STATUS_STALE
    BYPASS = pb.CACHE_STATUS_BYPASS
    COALESCED = pb.CACHE_STATUS_COALESCED

    @classmethod
    def from_proto(cls, value: int) -> CacheStatus:
        # A newer server may add values: treat unknown ones as "unspecified" rather than crash.
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


class ShareVia(enum.Enum):
    """How an account may launch an image; mirrors `imageshare.v1.ShareVia`."""

    UNSPECIFIED = pb.SHARE_VIA_UNSPECIFIED  # not shared
    ACCOUNT = pb.SHARE_VIA_ACCOUNT  # the account is in the share list
    PUBLIC = pb.SHARE_VIA_PUBLIC  # the image is public (group "all")

    @classmethod
    def from_proto(cls, value: int) -> ShareVia:
        try:
            return cls(value)
        except ValueError:
            return cls.UNSPECIFIED


def _time(msg: pb.CheckImageShareResponse | pb.WatchImageSharesResponse) -> dt.datetime | None:
    return msg.read_time.ToDatetime(dt.UTC) if msg.HasField("read_time") else None


@dataclass(frozen=True, slots=True)
class SharedAccount:
    """One account the image is shared with; `shared_time` is None when upstream did not say."""

    aliyun_id: str
    shared_time: dt.datetime | None

    @classmethod
    def from_proto(cls, msg: pb.SharedAccount) -> SharedAccount:
        shared = msg.shared_time.ToDatetime(dt.UTC) if msg.HasField("shared_time") else None
        return cls(aliyun_id=msg.aliyun_id, shared_time=shared)


@dataclass(frozen=True, slots=True)
class ListingMetadata:
    """What the first message of a stream says about the whole listing."""

    region_id: str
    image_id: str
    total_count: int
    share_groups: tuple[str, ...]
    cache_status: CacheStatus
    cache_age: dt.timedelta | None
    read_time: dt.datetime | None

    @property
    def is_public(self) -> bool:
        """Group `all` means every account may use the image."""
        return PUBLIC_GROUP in self.share_groups

    @classmethod
    def from_first_message(cls, msg: pb.ListImageSharesResponse) -> ListingMetadata:
        return cls(
            region_id=msg.region_id,
            image_id=msg.image_id,
            total_count=msg.total_count,
            share_groups=tuple(g.group for g in msg.share_groups),
            cache_status=CacheStatus.from_proto(msg.cache_status),
            cache_age=msg.cache_age.ToTimedelta() if msg.HasField("cache_age") else None,
            read_time=msg.read_time.ToDatetime(dt.UTC) if msg.HasField("read_time") else None,
        )


@dataclass(frozen=True, slots=True)
class ShareList:
    """A listing read to its end: what `collect()` returns."""

    metadata: ListingMetadata
    accounts: tuple[SharedAccount, ...]
    upstream_request_ids: tuple[str, ...] = field(default=())

    def __contains__(self, account_id: object) -> bool:
        return any(a.aliyun_id == account_id for a in self.accounts)


@dataclass(frozen=True, slots=True)
class ShareCheck:
    """The answer of `check()`; true in a boolean context when the account may use the image."""

    shared: bool
    via: ShareVia
    shared_time: dt.datetime | None  # when shared with the account (via ACCOUNT)
    total_count: int
    cache_status: CacheStatus
    cache_age: dt.timedelta | None
    read_time: dt.datetime | None
    upstream_request_ids: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.shared

    @classmethod
    def from_proto(cls, msg: pb.CheckImageShareResponse) -> ShareCheck:
        return cls(
            shared=msg.shared,
            via=ShareVia.from_proto(msg.via),
            shared_time=msg.shared_time.ToDatetime(dt.UTC) if msg.HasField("shared_time") else None,
            total_count=msg.total_count,
            cache_status=CacheStatus.from_proto(msg.cache_status),
            cache_age=msg.cache_age.ToTimedelta() if msg.HasField("cache_age") else None,
            read_time=_time(msg),
            upstream_request_ids=tuple(msg.upstream_request_ids),
        )


@dataclass(frozen=True, slots=True)
class ShareChange:
    """One event of a watch: the whole list first (`snapshot`), then each change to it.

    On a snapshot, `added` and `groups_added` hold the whole list. `resumed` marks the
    changes made while the watch was reconnecting (found by comparing the new snapshot
    with what the watch held), so none is missed. `added` also holds accounts shared
    again (a new `shared_time`).
    """

    region_id: str
    image_id: str
    snapshot: bool
    added: tuple[SharedAccount, ...]
    removed: tuple[str, ...]
    groups_added: tuple[str, ...]
    groups_removed: tuple[str, ...]
    total_count: int
    read_time: dt.datetime | None
    resumed: bool = False

    @property
    def became_public(self) -> bool:
        return not self.snapshot and PUBLIC_GROUP in self.groups_added

    @property
    def became_private(self) -> bool:
        return PUBLIC_GROUP in self.groups_removed
