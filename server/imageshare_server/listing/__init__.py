"""Reading whole share lists: the cache in front of single-flight reads, checked snapshots.

``SharedShareSource`` is what the gRPC layer streams from; ``Flight`` is one
upstream read shared by every caller who wants it; ``SnapshotChecker`` keeps a
list that changes while it is paged from reaching anyone. A cache shared by
replicas plugs in through ``SharedTier`` and ``ReadStrategy``.
"""

from imageshare_server.listing.flight import (
    Flight,
    FlightOptions,
    FlightSpec,
    PageReader,
    ReadStrategy,
    UpstreamOnly,
)
from imageshare_server.listing.snapshot import SnapshotChecker, page_count
from imageshare_server.listing.source import (
    ShareAnswer,
    ShareChunk,
    SharedShareSource,
    SharedTier,
    ShareSource,
    read_whole,
)

__all__ = [
    "Flight",
    "FlightOptions",
    "FlightSpec",
    "PageReader",
    "ReadStrategy",
    "ShareAnswer",
    "ShareChunk",
    "ShareSource",
    "SharedShareSource",
    "SharedTier",
    "SnapshotChecker",
    "UpstreamOnly",
    "page_count",
    "read_whole",
]
