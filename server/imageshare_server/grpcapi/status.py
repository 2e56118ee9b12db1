"""The gRPC status callers get for each failure, with google.rpc rich details.

One table maps every class of ``core.errors`` to the status it becomes;
``to_status`` looks an error up by its class (and its bases), so adding an
error means adding a row here, never touching the service layer. Anything
not in the table is a bug and becomes INTERNAL.

Every status carries ``google.rpc.ErrorInfo``: for upstream failures the
reason is the upstream Code in AIP-193 form (``InvalidImageId.NotFound`` ->
``INVALID_IMAGE_ID_NOT_FOUND``), the domain is the upstream's, and the
metadata holds the upstream RequestId and HTTP status so a caller can quote
them to Alibaba Cloud support. The service's own failures use the
``imageshare.v1`` domain and the reasons the proto lists.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from imageshare_server.core.errors import (
    MAX_RETRY_AFTER,
    DeadlineExceededError,
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
    UpstreamTransportError,
)

SERVICE_DOMAIN = "imageshare.v1"
UPSTREAM_DOMAIN = "ecs.aliyuncs.com"
DEFAULT_THROTTLE_RETRY_DELAY = 1.0
BUSY_RETRY_DELAY = 0.1
# A watch slot frees when another watch ends: not within milliseconds.
WATCHERS_RETRY_DELAY = 5.0


def aip193_reason(code: str) -> str:
    """``InvalidImageId.NotFound`` -> ``INVALID_IMAGE_ID_NOT_FOUND`` (AIP-193: UPPER_SNAKE_CASE)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", code)
    reason = re.sub(r"[^A-Za-z0-9]+", "_", snake).strip("_").upper()
    if not reason or not reason[0].isalpha():
        reason = "UPSTREAM_" + reason
    return reason[:63].rstrip("_")


def _pack(*messages: Message) -> list[any_pb2.Any]:
    packed = []
    for message in messages:
        detail = any_pb2.Any()
        detail.Pack(message)
        packed.append(detail)
    return packed


def _status(code: grpc.StatusCode, message: str, *details: Message) -> grpc.Status:
    proto = status_pb2.Status(code=code.value[0], message=message, details=_pack(*details))
    return rpc_status.to_status(proto)


def _info(reason: str, **metadata: str) -> error_details_pb2.ErrorInfo:
    return error_details_pb2.ErrorInfo(reason=reason, domain=SERVICE_DOMAIN, metadata=metadata)


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    retry_info = error_details_pb2.RetryInfo()
    delay = min(max(seconds, 0.001), MAX_RETRY_AFTER)
    retry_info.retry_delay.FromNanoseconds(int(delay * 1e9))
    return retry_info


def upstream_grpc_code(error: UpstreamApiError) -> grpc.StatusCode:
    code = error.code
    if error.is_image_not_found:
        return grpc.StatusCode.NOT_FOUND
    if error.is_credentials:
        return grpc.StatusCode.INTERNAL
    if error.is_throttling:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if code in ("MissingParameter", "InvalidParameter") or code.startswith(
        ("InvalidRegionId.", "InvalidParameter.")
    ):
        return grpc.StatusCode.INVALID_ARGUMENT
    if error.is_permission_denied:
        return grpc.StatusCode.PERMISSION_DENIED
    if error.is_server_error:
        return grpc.StatusCode.UNAVAILABLE
    if code.startswith(("InvalidTimeStamp", "IllegalTimestamp", "SignatureNonceUsed")):
        # Our clock or our nonce: the caller did nothing wrong.
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.FAILED_PRECONDITION


def _invalid_request(error: InvalidRequestError) -> grpc.Status:
    fields = ", ".join(v.field for v in error.violations)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
    )
    return _status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"invalid {fields}: {error}",
        _info("INVALID_REQUEST", fields=fields),
        bad_request,
    )


def _malformed_request(error: MalformedRequestError) -> grpc.Status:
    return _status(
        grpc.StatusCode.INVALID_ARGUMENT,
        "the request bytes are not a valid protobuf message of the method's request type",
        _info("MALFORMED_REQUEST"),
    )


def _upstream_api_error(error: UpstreamApiError) -> grpc.Status:
    code = upstream_grpc_code(error)
    info = error_details_pb2.ErrorInfo(
        reason=aip193_reason(error.code),
        domain=UPSTREAM_DOMAIN,
        metadata={
            "upstreamCode": error.code,
            "requestId": error.request_id,
            "httpStatus": str(error.http_status),
        },
    )
    details: list[Message] = [info]
    if code is grpc.StatusCode.INTERNAL:
        # The upstream's text may describe our signing; the caller needs none of it.
        message = (
            f"the service's upstream credentials were rejected ({error.code}); "
            "this is a service fault, not the caller's"
        )
    else:
        message = f"upstream {error.code}: {error.message}"
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        details.append(_retry_info(error.retry_after or DEFAULT_THROTTLE_RETRY_DELAY))
        message = f"upstream throttled the service ({error.code}) after retries"
    if error.request_id:
        message += f" (RequestId {error.request_id})"
    return _status(code, message, *details)


def _upstream_transport_error(error: UpstreamTransportError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=aip193_reason("Upstream." + error.kind),
        domain=SERVICE_DOMAIN,
        metadata={"kind": error.kind},
    )
    return _status(grpc.StatusCode.UNAVAILABLE, f"upstream unavailable: {error}", info)


def _deadline_exceeded(error: DeadlineExceededError) -> grpc.Status:
    return _status(grpc.StatusCode.DEADLINE_EXCEEDED, str(error), _info("DEADLINE_TOO_SHORT"))


def _listing_unstable(error: ListingUnstableError) -> grpc.Status:
    return _status(grpc.StatusCode.ABORTED, str(error), _info("SHARE_LIST_CHANGING"))


def _listing_timeout(error: ListingTimeoutError) -> grpc.Status:
    return _status(grpc.StatusCode.UNAVAILABLE, str(error), _info("LISTING_TIMEOUT"))


def _too_large(error: ShareListTooLargeError) -> grpc.Status:
    info = _info(
        "SHARE_LIST_TOO_LARGE",
        totalCount=str(error.total_count),
        pages=str(error.pages),
        neededSeconds=f"{error.needed:.0f}",
        listingTimeoutSeconds=f"{error.limit:g}",
    )
    message = (
        f"{error}; the service's operators can raise --upstream-qps or --listing-timeout "
        "(see the README's section on very large share lists)"
    )
    return _status(grpc.StatusCode.FAILED_PRECONDITION, message, info)


def _rate_limited(error: RateLimitedError) -> grpc.Status:
    return _status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the service's upstream rate limit has no slot before the deadline "
        f"(next in {error.wait:.2f}s)",
        _info("UPSTREAM_RATE_LIMITED"),
        _retry_info(error.wait),
    )


def _busy(error: UpstreamBusyError) -> grpc.Status:
    return _status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        str(error),
        _info("UPSTREAM_BUSY"),
        _retry_info(BUSY_RETRY_DELAY),
    )


def _overloaded(error: OverloadedError) -> grpc.Status:
    return _status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the server is at its limit of {error.limit} concurrent calls; retry with backoff",
        _info("TOO_MANY_CONCURRENT_CALLS", limit=str(error.limit)),
        _retry_info(BUSY_RETRY_DELAY),
    )


def _stalled(error: StreamStalledError) -> grpc.Status:
    return _status(grpc.StatusCode.UNAVAILABLE, str(error), _info("STREAM_STALLED"))


def _too_many_watchers(error: TooManyWatchersError) -> grpc.Status:
    return _status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the server has its limit of {error.limit} watches open; retry with backoff, "
        "or watch from another replica",
        _info("TOO_MANY_WATCHERS", limit=str(error.limit)),
        _retry_info(WATCHERS_RETRY_DELAY),
    )


def _shutting_down(error: ShuttingDownError) -> grpc.Status:
    return _status(grpc.StatusCode.UNAVAILABLE, str(error), _info("SHUTTING_DOWN"))


def internal_error() -> grpc.Status:
    return _status(grpc.StatusCode.INTERNAL, "internal error", _info("INTERNAL"))


_TABLE: dict[type[ImageShareError], Callable[[Any], grpc.Status]] = {
    InvalidRequestError: _invalid_request,
    MalformedRequestError: _malformed_request,
    UpstreamApiError: _upstream_api_error,
    UpstreamTransportError: _upstream_transport_error,
    DeadlineExceededError: _deadline_exceeded,
    ListingUnstableError: _listing_unstable,
    ListingTimeoutError: _listing_timeout,
    ShareListTooLargeError: _too_large,
    RateLimitedError: _rate_limited,
    UpstreamBusyError: _busy,
    OverloadedError: _overloaded,
    StreamStalledError: _stalled,
    TooManyWatchersError: _too_many_watchers,
    ShuttingDownError: _shutting_down,
}


def to_status(error: BaseException) -> grpc.Status:
    """The status for ``error``: its class's row in the table, or INTERNAL."""
    for cls in type(error).__mro__:
        build = _TABLE.get(cls)
        if build is not None:
            return build(error)
    return internal_error()


def mapped(error: BaseException) -> bool:
    """True when ``error`` has a deliberate status (not a bug)."""
    return any(cls in _TABLE for cls in type(error).__mro__)
