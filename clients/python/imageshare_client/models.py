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
