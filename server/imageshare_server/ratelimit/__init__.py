"""The in-process limit on upstream calls: a fair token-bucket queue per bucket name."""

from imageshare_server.ratelimit._limiter import (
    JITTER_GUARD,
    BucketNames,
    SendWindow,
    TokenBucket,
    UpstreamRateLimiter,
    one_bucket_per_region,
)

__all__ = [
    "JITTER_GUARD",
    "BucketNames",
    "SendWindow",
    "TokenBucket",
    "UpstreamRateLimiter",
    "one_bucket_per_region",
]
