"""Rules a complete share list must satisfy, page by page.

The upstream has no continuation token: if the list changes between page
reads, pages overlap or skip entries. The reader checks every page against
the first one (same TotalCount, no account seen twice, no short page before
the last) and refuses to pass on an inconsistent snapshot.
"""

from __future__ import annotations

from imageshare_server.core.errors import ListingUnstableError
from imageshare_server.core.types import SharePage


def page_count(total_count: int, page_size: int) -> int:
    return max(1, -(-total_count // page_size))


class SnapshotChecker:
    """Rejects a page that cannot belong to the same snapshot as the pages before it."""

    def __init__(self, first: SharePage, page_size: int) -> None:
        self.total_count = first.total_count
        self.page_size = page_size
        self._seen: set[str] = set()
        self.add(first, 1)

    @property
    def pages(self) -> int:
        return page_count(self.total_count, self.page_size)

    def add(self, page: SharePage, page_number: int) -> None:
        if page.total_count != self.total_count:
            raise ListingUnstableError(
                f"TotalCount changed from {self.total_count} to {page.total_count} while paging"
            )
        expected = min(self.page_size, self.total_count - (page_number - 1) * self.page_size)
        if len(page.accounts) != max(expected, 0):
            raise ListingUnstableError(
                f"page {page_number} has {len(page.accounts)} accounts, expected {expected}"
            )
        ids = {a.aliyun_id for a in page.accounts}
        if len(ids) != len(page.accounts) or not self._seen.isdisjoint(ids):
            raise ListingUnstableError(f"page {page_number} repeats accounts of earlier pages")
        self._seen |= ids
