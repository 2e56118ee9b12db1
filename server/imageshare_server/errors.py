"""The gRPC status callers get for each failure, with google.rpc rich details.

Every error carries ``google.rpc.ErrorInfo``: for upstream failures the
reason is the upstream Code in AIP-193 form (``InvalidImageId.NotFound`` ->
``INVALID_IMAGE_ID_NOT_FOUND``), the domain is the upstream's, and the
metadata holds the upstream RequestId and HTTP status so a caller can quote
them to Alibaba Cloud support.
"""

from __future__ import annotations

import re

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from imageshare_server.ecs.client import DeadlineExceededError
from imageshare_server.ecs.errors import UpstreamApiError, UpstreamError, UpstreamTransportError
from imageshare_server.observability.logging import redact
from imageshare_server.validation import InvalidRequestError

SERVICE_DOMAIN = "imageshare.v1"
UPSTREAM_DOMAIN = "ecs.aliyuncs.com"
DEFAULT_THROTTLE_RETRY_DELAY = 1.0


def aip193_reason(code: str) -> str:
    """``InvalidImageId.NotFound`` -> ``INVALID_IMAGE_ID_NOT_FOUND`` (AIP-193: UPPER_SNAKE_CASE)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", code)
    reason = re.sub(r"[^A-Za-z0-9]+", "_", snake).strip("_").upper()
    if not reason or not reason[0].isalpha():
        reason = "UPSTREAM_" + reason
    return reason[:63].rstrip("_")


class ListingUnstableError(Exception):
    """The share list kept changing while it was read; no consistent snapshot could be taken."""


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


def upstream_grpc_code(error: UpstreamApiError) -> grpc.StatusCode:
    code = error.code
    if code == "InvalidImageId.NotFound":
        return grpc.StatusCode.NOT_FOUND
    if error.is_credentials:
        return grpc.StatusCode.INTERNAL
    if error.is_throttling:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if code in ("MissingParameter", "InvalidParameter") or code.startswith(
        ("InvalidRegionId.", "InvalidParameter.")
    ):
        return grpc.StatusCode.INVALID_ARGUMENT
    if code.startswith("Forbidden"):
        return grpc.StatusCode.PERMISSION_DENIED
    if error.is_server_error:
        return grpc.StatusCode.UNAVAILABLE
    if code.startswith(("InvalidTimeStamp", "IllegalTimestamp", "SignatureNonceUsed")):
        # Our clock or our nonce: the caller did nothing wrong.
        return grpc.StatusCode.INTERNAL
    return grpc.StatusCode.FAILED_PRECONDITION


def invalid_request(error: InvalidRequestError) -> grpc.Status:
    fields = ", ".join(v.field for v in error.violations)
    bad_request = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]
    )
    info = error_details_pb2.ErrorInfo(
        reason="INVALID_REQUEST", domain=SERVICE_DOMAIN, metadata={"fields": fields}
    )
    return _status(
        grpc.StatusCode.INVALID_ARGUMENT, f"invalid {fields}: {error}", info, bad_request
    )


def upstream_error(error: UpstreamError) -> grpc.Status:
    if isinstance(error, UpstreamApiError):
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
            message = f"upstream {error.code}: {redact(error.message)}"
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            delay = error.retry_after or DEFAULT_THROTTLE_RETRY_DELAY
            retry_info = error_details_pb2.RetryInfo()
            retry_info.retry_delay.FromNanoseconds(int(delay * 1e9))
            details.append(retry_info)
            message = f"upstream throttled the service ({error.code}) after retries"
        if error.request_id:
            message += f" (RequestId {error.request_id})"
        return _status(code, message, *details)
    if isinstance(error, UpstreamTransportError):
        info = error_details_pb2.ErrorInfo(
            reason=aip193_reason("Upstream." + error.kind),
            domain=SERVICE_DOMAIN,
            metadata={"kind": error.kind},
        )
        return _status(
            grpc.StatusCode.UNAVAILABLE, f"upstream unavailable: {redact(str(error))}", info
        )
    return internal_error()


def deadline_exceeded(error: DeadlineExceededError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason="DEADLINE_TOO_SHORT", domain=SERVICE_DOMAIN)
    return _status(grpc.StatusCode.DEADLINE_EXCEEDED, str(error), info)


def listing_unstable(error: ListingUnstableError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason="SHARE_LIST_CHANGING", domain=SERVICE_DOMAIN)
    return _status(grpc.StatusCode.ABORTED, str(error), info)


def rate_limited(wait: float) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason="UPSTREAM_RATE_LIMITED", domain=SERVICE_DOMAIN)
    retry_info = error_details_pb2.RetryInfo()
    retry_info.retry_delay.FromNanoseconds(int(wait * 1e9))
    return _status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the service's upstream rate limit has no slot before the deadline (next in {wait:.2f}s)",
        info,
        retry_info,
    )


def overloaded(limit: int) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason="TOO_MANY_CONCURRENT_CALLS", domain=SERVICE_DOMAIN, metadata={"limit": str(limit)}
    )
    retry_info = error_details_pb2.RetryInfo()
    retry_info.retry_delay.FromMilliseconds(100)
    return _status(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the server is at its limit of {limit} concurrent calls; retry with backoff",
        info,
        retry_info,
    )


def internal_error() -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=SERVICE_DOMAIN)
    return _status(grpc.StatusCode.INTERNAL, "internal error", info)
