"""Every failure the service raises on purpose, in one hierarchy.

The gRPC layer maps each class to a status in one table
(``imageshare_server.grpcapi.status``); nothing here knows about gRPC,
HTTP or Redis. ``transient`` marks failures another read might not have:
when one of them ends a read, a list kept for stale-if-error is served
instead.

Upstream text is untrusted: codes, messages and request ids are bounded and
redacted when the error is built, so every later use (status messages,
logs, metric labels, the negative cache) gets safe, short values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from imageshare_server.redaction import redact

# Upstream text that may reach callers is cut here: default gRPC clients
# refuse trailing metadata beyond 8 KiB, and nobody reads a longer message.
MAX_UPSTREAM_TEXT = 1024
# Retry hints from the upstream are clamped: a broken or hostile header must
# not tell callers to come back in eleven days.
MAX_RETRY_AFTER = 60.0

THROTTLING_CODES = ("Throttling", "Rejected.Throttling")
CREDENTIAL_CODES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidSecurityToken",
    "IncompleteSignature",
)
SERVER_CODES = ("InternalError", "UnknownError", "ServiceUnavailable")
# The service's own identity lacks permission (RAM policy, disabled AccessKey, risk control).
PERMISSION_CODES = ("Forbidden",)

# Upstream codes that may appear as metric label values; anything else is "other".
KNOWN_UPSTREAM_CODES = frozenset(
    {
        "MissingParameter", "InvalidParameter", "IncompleteSignature", "SignatureDoesNotMatch",
        "SignatureNonceUsed", "InvalidTimeStamp.Expired", "IllegalTimestamp",
        "InvalidAccessKeyId.NotFound", "InvalidAccessKeyId.Inactive",
        "InvalidSecurityToken.Expired", "InvalidSecurityToken.Malformed",
        "InvalidSecurityToken.MismatchWithAccessKey", "Throttling", "Throttling.User",
        "Throttling.Api", "Rejected.Throttling", "Forbidden", "Forbidden.RAM",
        "Forbidden.AccessKeyDisabled", "Forbidden.SubUser", "Forbidden.RiskControl",
        "InvalidAction", "InvalidAction.NotFound", "InvalidVersion", "InvalidImageId.NotFound",
        "InvalidRegionId.NotFound", "IncorrectImageStatus", "InternalError", "UnknownError",
        "ServiceUnavailable", "ServiceUnavailable.RegionMaintaining",
        "HTTP500", "HTTP502", "HTTP503", "HTTP504",
    }
)  # fmt: skip

_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9-]{1,64}")


def bounded_text(text: str, limit: int = MAX_UPSTREAM_TEXT) -> str:
    """``text`` redacted, cut to ``limit`` characters (marked with an ellipsis)."""
    text = redact(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bounded_code(code: str) -> str:
    """An upstream Code as sent when it looks like one, else ``Malformed``."""
    return code if _CODE.fullmatch(code) else "Malformed"


def bounded_request_id(request_id: str) -> str:
    return request_id if _REQUEST_ID.fullmatch(request_id) else ""


def code_label(code: str) -> str:
    """A metric label for an upstream code: known codes as they are, the rest ``other``."""
    return code if code in KNOWN_UPSTREAM_CODES else "other"


class ImageShareError(Exception):
    """Base of every failure the service raises on purpose."""

    transient: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str
    description: str


class InvalidRequestError(ImageShareError):
    """The caller's request breaks the contract; names every bad field."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class UpstreamError(ImageShareError):
    """Base of every failure of an upstream attempt."""

    retryable: bool = False

    @property
    def outcome(self) -> str:
        """Bounded label value for metrics."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class UpstreamErrorData:
    """What an upstream error body said, and nothing else: what the negative cache keeps."""

    code: str
    message: str
    http_status: int
    request_id: str = ""


class UpstreamApiError(UpstreamError):
    """The upstream answered with an error body (``Code``, ``Message``, ``RequestId``)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        http_status: int,
        request_id: str = "",
        retry_after: float | None = None,
    ) -> None:
        self.code = bounded_code(code)
        self.message = bounded_text(message)
        self.http_status = http_status
        self.request_id = bounded_request_id(request_id)
        self.retry_after = (
            None if retry_after is None else min(max(retry_after, 0.0), MAX_RETRY_AFTER)
        )
        super().__init__(f"{self.code} (HTTP {http_status}): {self.message}")

    @classmethod
    def from_data(cls, data: UpstreamErrorData) -> UpstreamApiError:
        return cls(
            data.code, data.message, http_status=data.http_status, request_id=data.request_id
        )

    def data(self) -> UpstreamErrorData:
        return UpstreamErrorData(self.code, self.message, self.http_status, self.request_id)

    @property
    def is_throttling(self) -> bool:
        return self.code.startswith(THROTTLING_CODES)

    @property
    def is_credentials(self) -> bool:
        return self.code.startswith(CREDENTIAL_CODES)

    @property
    def is_permission_denied(self) -> bool:
        """The service's own identity is not allowed the call (``Forbidden*``)."""
        return self.code.startswith(PERMISSION_CODES)

    @property
    def is_server_error(self) -> bool:
        return self.http_status >= 500 or self.code.startswith(SERVER_CODES)

    @property
    def is_image_not_found(self) -> bool:
        """The image does not exist in this region: the only answer worth caching as negative."""
        return self.code == "InvalidImageId.NotFound"

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        # A reused nonce cannot happen with a fresh nonce per attempt, but if
        # it ever does, the next attempt's fresh nonce is the fix.
        return self.is_throttling or self.is_server_error or self.code == "SignatureNonceUsed"

    @property
    def transient(self) -> bool:  # type: ignore[override]
        return self.retryable

    @property
    def outcome(self) -> str:
        return code_label(self.code)


class UpstreamTransportError(UpstreamError):
    """No usable answer: timeout, connection failure, or a body that is not the expected one."""

    retryable = True
    transient = True

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(f"upstream {kind}: {bounded_text(detail)}")

    @property
    def outcome(self) -> str:
        return self.kind


class DeadlineExceededError(ImageShareError):
    """The caller's deadline is too short for what is left to do."""

    transient = True


class RateLimitedError(ImageShareError):
    """The wait for an upstream rate-limit slot would outlast the caller's deadline."""

    transient = True

    def __init__(self, wait: float) -> None:
        self.wait = wait
        super().__init__(f"upstream rate limit: the next slot is {wait:.2f}s away")


class UpstreamBusyError(ImageShareError):
    """Every upstream connection slot stayed taken until the caller's deadline."""

    transient = True

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        slots = "upstream call slots" if limit is None else f"{limit} upstream call slots"
        super().__init__(f"all the service's {slots} stayed busy until the deadline")


class ListingUnstableError(ImageShareError):
    """The share list kept changing while it was read; no consistent snapshot could be taken."""


class ListingTimeoutError(ImageShareError):
    """One complete read of a share list ran past ``--listing-timeout``."""

    transient = True

    def __init__(self, limit: float) -> None:
        self.limit = limit
        super().__init__(f"the upstream read of this share list did not finish within {limit:g}s")


class ShareListTooLargeError(ImageShareError):
    """A list whose read cannot finish within the listing timeout at the configured rate."""

    def __init__(self, total_count: int, pages: int, needed: float, limit: float) -> None:
        self.total_count = total_count
        self.pages = pages
        self.needed = needed
        self.limit = limit
        super().__init__(
            f"the share list has {total_count} accounts ({pages} upstream pages); reading it "
            f"at the configured upstream rate takes about {needed:.0f}s, more than the listing "
            f"timeout of {limit:g}s"
        )


class OverloadedError(ImageShareError):
    """More calls at once than ``--max-concurrent-rpcs``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the server is at its limit of {limit} concurrent calls")


class StreamStalledError(ImageShareError):
    """The caller stopped reading its stream: no message left for ``seconds``."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"the caller read nothing for {seconds:g}s; the stream was ended")


class TooManyWatchersError(ImageShareError):
    """More watches open at once than ``--max-watchers``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the server has its limit of {limit} watches open")


class ShuttingDownError(ImageShareError):
    """The server is draining: a watch ends so that its caller reconnects to another replica."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down; reconnect to watch from another replica")


class CredentialsUnavailable(ImageShareError):
    """No provider in the credentials chain could supply credentials."""


class MalformedRequestError(ImageShareError):
    """The request bytes are not a valid protobuf message."""
