"""Python client for imageshare: who is a custom Alibaba Cloud ECS image shared with?

with ImageShareClient("imageshare:50051") as client:
    listing = client.list_shares("cn-hangzhou", "m-bp1...")
    for account in listing:
        print(account.aliyun_id)
    print(listing.metadata.total_count, listing.metadata.share_groups)
    if client.check("cn-hangzhou", "m-bp1...", "1234567890123456"):
        ...
    for change in client.watch("cn-hangzhou", "m-bp1..."):
        print(change.added, change.removed, change.became_public)
"""

from .aio import AsyncImageShareClient, AsyncShareListing, AsyncShareWatch
from .channel import DEFAULT_SERVICE_CONFIG, NO_RETRY, RetryPolicy, channel_options
from .client import DEFAULT_TIMEOUT, ImageShareClient, ShareListing, ShareWatch
from .errors import FieldViolation, ImageShareError, StreamInterruptedError
from .models import (
    CacheStatus,
    ListingMetadata,
    ShareChange,
    ShareCheck,
    SharedAccount,
    ShareList,
    ShareVia,
)

__all__ = [
    "DEFAULT_SERVICE_CONFIG",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AsyncImageShareClient",
    "AsyncShareListing",
    "AsyncShareWatch",
    "CacheStatus",
    "FieldViolation",
    "ImageShareClient",
    "ImageShareError",
    "ListingMetadata",
    "RetryPolicy",
    "ShareChange",
    "ShareCheck",
    "ShareList",
    "ShareListing",
    "ShareVia",
    "ShareWatch",
    "SharedAccount",
    "StreamInterruptedError",
    "channel_options",
]
