"""The domain core: the values the service deals in, its errors, and its clock.

Every other package depends on this one and it depends on none of them: no
gRPC, HTTP or Redis is imported here.
"""

from imageshare_server.core.clock import SYSTEM_CLOCK, Clock, SystemClock
from imageshare_server.core.errors import (
    DeadlineExceededError,
    FieldViolation,
    ImageShareError,
    InvalidRequestError,
    ListingTimeoutError,
    ListingUnstableError,
    MalformedRequestError,
    OverloadedError,
    RateLimitedError,
    ShareListTooLargeError,
    ShuttingDownError,
    StreamStalledError,
    TooManyWatchersError,
    UpstreamApiError,
    UpstreamBusyError,
    UpstreamError,
    UpstreamErrorData,
    UpstreamTransportError,
)
from imageshare_server.core.types import (
    Account,
    ShareChange,
    ShareKey,
    ShareList,
    SharePage,
    ShareQuery,
    share_change,
)

__all__ = [
    "SYSTEM_CLOCK",
    "Account",
    "Clock",
    "DeadlineExceededError",
    "FieldViolation",
    "ImageShareError",
    "InvalidRequestError",
    "ListingTimeoutError",
    "ListingUnstableError",
    "MalformedRequestError",
    "OverloadedError",
    "RateLimitedError",
    "ShareChange",
    "ShareKey",
    "ShareList",
    "ShareListTooLargeError",
    "SharePage",
    "ShareQuery",
    "ShuttingDownError",
    "StreamStalledError",
    "SystemClock",
    "TooManyWatchersError",
    "UpstreamApiError",
    "UpstreamBusyError",
    "UpstreamError",
    "UpstreamErrorData",
    "UpstreamTransportError",
    "share_change",
]
