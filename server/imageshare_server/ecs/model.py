"""Plain data the upstream returns, parsed once and independent of the wire format."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
