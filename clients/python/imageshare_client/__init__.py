"""Python client for imageshare: who is a custom Alibaba Cloud ECS image shared with?

with ImageShareClient("imageshare:50051") as client:
    listing = client.list_shares("cn-hangzhou", "m-bp1...")
    for account in listing:
        print(account.aliyun_id)
    print(listing.metadata.total_count, listing.metadata.share_groups)
"""

from .aio import AsyncImageShareClient, AsyncShareListing
from .channel import DEFAULT_SERVICE_CONFIG, NO_RETRY, RetryPolicy, channel_options
from .client import DEFAULT_TIMEOUT, ImageShareClient, ShareListing
from .errors import FieldViolation, ImageShareError, StreamInterruptedError
from .models import CacheStatus, ListingMetadata, SharedAccount, ShareList

__all__ = [
    "DEFAULT_SERVICE_CONFIG",
    "DEFAULT_TIMEOUT",
    "NO_RETRY",
    "AsyncImageShareClient",
    "AsyncShareListing",
    "CacheStatus",
    "FieldViolation",
    "ImageShareClient",
    "ImageShareError",
    "ListingMetadata",
    "RetryPolicy",
    "ShareList",
    "ShareListing",
    "SharedAccount",
    "StreamInterruptedError",
    "channel_options",
]
