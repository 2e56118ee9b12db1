"""Typed errors: a caller branches on `code` and `reason`, never on message text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field, from `google.rpc.BadRequest`."""

    field: str
    description: str


class ImageShareError(Exception):
    """A failed call (list, check or watch), with the server's structured details decoded.

    `reason`, `domain` and `metadata` come from `google.rpc.ErrorInfo`; `field_violations`
    from `google.rpc.BadRequest`; `retry_after` (seconds) from `google.rpc.RetryInfo`.
    `attempts` is how many calls were made, counting retries.

    For upstream errors the domain is `ecs.aliyuncs.com`, the reason the upstream Code in
    UPPER_SNAKE_CASE (`InvalidImageId.NotFound` -> `INVALID_IMAGE_ID_NOT_FOUND`) and the
    metadata holds `upstreamCode`, `requestId` and `httpStatus`. The service's own
    reasons (domain `imageshare.v1`): `INVALID_REQUEST` and `MALFORMED_REQUEST`
    (INVALID_ARGUMENT); `UPSTREAM_RATE_LIMITED`, `UPSTREAM_BUSY` and
    `TOO_MANY_CONCURRENT_CALLS` and `TOO_MANY_WATCHERS` (RESOURCE_EXHAUSTED, with
    `retry_after`); `UPSTREAM_TIMEOUT`, `UPSTREAM_CONNECTION_ERROR`,
    `UPSTREAM_MALFORMED_RESPONSE`, `LISTING_TIMEOUT`, `STREAM_STALLED` and `SHUTTING_DOWN`
    (UNAVAILABLE; a watch reconnects by itself); `DEADLINE_TOO_SHORT`
    (DEADLINE_EXCEEDED); `SHARE_LIST_CHANGING` (ABORTED); `SHARE_LIST_TOO_LARGE`
    (FAILED_PRECONDITION); `INTERNAL`.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: tuple[FieldViolation, ...] = (),
        retry_after: float | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.field_violations = field_violations
        self.retry_after = retry_after
        self.attempts = attempts

    @property
    def code_name(self) -> str:
        return str(self.code.name)


class StreamInterruptedError(ImageShareError):
    """The stream failed after delivering messages.

    It is never retried behind the caller's back: the accounts already yielded would be
    yielded again. `accounts_received` says how far it got; call `list_shares` again.
    """

    def __init__(self, cause: ImageShareError, *, accounts_received: int) -> None:
        super().__init__(
            cause.code,
            f"stream interrupted after {accounts_received} accounts: {cause.message}",
            reason=cause.reason,
            domain=cause.domain,
            metadata=cause.metadata,
            field_violations=cause.field_violations,
            retry_after=cause.retry_after,
            attempts=cause.attempts,
        )
        self.accounts_received = accounts_received


def from_rpc_error(error: grpc.RpcError, *, attempts: int = 1) -> ImageShareError:
    """Decode a `grpc.RpcError` (sync) or `grpc.aio.AioRpcError` into an `ImageShareError`.

    Both expose `code()`, `details()` and `trailing_metadata()` synchronously once failed,
    which is all `rpc_status.from_call` needs.
    """
    call: Any = error
    code: grpc.StatusCode = call.code()
    message: str = call.details() or ""
    kwargs: dict[str, Any] = {}
    try:
        status = rpc_status.from_call(call)
    except ValueError:
        status = None  # details inconsistent with the status: keep the plain status only
    if status is not None:
        violations: list[FieldViolation] = []
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            bad = error_details_pb2.BadRequest()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                kwargs.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
            elif detail.Unpack(bad):
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad.field_violations
                )
            elif detail.Unpack(retry):
                kwargs["retry_after"] = retry.retry_delay.ToTimedelta().total_seconds()
        kwargs["field_violations"] = tuple(violations)
    return ImageShareError(code, message, attempts=attempts, **kwargs)
