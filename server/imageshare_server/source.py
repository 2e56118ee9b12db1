"""Where the service gets share lists from.

The gRPC layer consumes a ``ShareSource``: an async stream of ``ShareChunk``
for a validated query. ``UpstreamShareSource`` reads the upstream directly;
the cache layer wraps it with the same interface.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from imageshare.v1 import image_share_pb2
from imageshare_server.ecs.client import EcsClient
from imageshare_server.ecs.model import Account
from imageshare_server.listing import read_pages
from imageshare_server.validation import ShareQuery


@dataclass(frozen=True, slots=True)
class ShareChunk:
    """A run of accounts in upstream order; the first chunk of a stream carries the groups."""

    accounts: Sequence[Account]
    share_groups: Sequence[str]
    total_count: int
    request_ids: Sequence[str]
    cache_status: image_share_pb2.CacheStatus.ValueType
    read_time: float


class ShareSource(Protocol):
    def stream(self, query: ShareQuery, *, deadline: float | None) -> AsyncIterator[ShareChunk]:
        """Yield the share list of ``query.key`` in order; ``deadline`` is ``time.monotonic()``."""
        ...


class UpstreamShareSource:
    """Every call reads the upstream, page by page."""

    def __init__(self, client: EcsClient, *, page_size: int = 100) -> None:
        self._client = client
        self._page_size = page_size

    async def stream(
        self, query: ShareQuery, *, deadline: float | None
    ) -> AsyncIterator[ShareChunk]:
        read_time = time.time()
        status = (
            image_share_pb2.CACHE_STATUS_BYPASS
            if query.bypass_cache
            else image_share_pb2.CACHE_STATUS_MISS
        )
        async for page in read_pages(
            self._client, query.key, page_size=self._page_size, deadline=deadline
        ):
            yield ShareChunk(
                accounts=page.accounts,
                share_groups=page.share_groups,
                total_count=page.total_count,
                request_ids=(page.request_id,) if page.request_id else (),
                cache_status=status,
                read_time=read_time,
            )
