"""What can go wrong with an upstream call, classified once for retries and status mapping."""

from __future__ import annotations

import re

THROTTLING_CODES = ("Throttling", "Rejected.Throttling")
CREDENTIAL_CODES = (
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidSecurityToken",
    "IncompleteSignature",
)
SERVER_CODES = ("InternalError", "UnknownError", "ServiceUnavailable")

_STRING_TO_SIGN = re.compile(r"(string to sign is:).*", re.IGNORECASE | re.DOTALL)


def redact_upstream_message(message: str) -> str:
    """Drop the string-to-sign ECS echoes on ``SignatureDoesNotMatch``: it names our AccessKeyId."""
    return _STRING_TO_SIGN.sub(r"\1 [redacted]", message)


class UpstreamError(Exception):
    """Base of every failure of an upstream attempt."""

    retryable: bool = False

    @property
    def outcome(self) -> str:
        """Bounded label value for metrics."""
        raise NotImplementedError


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
        self.code = code
        self.message = redact_upstream_message(message)
        self.http_status = http_status
        self.request_id = request_id
        self.retry_after = retry_after
        super().__init__(f"{code} (HTTP {http_status}): {self.message}")

    @property
    def is_throttling(self) -> bool:
        return self.code.startswith(THROTTLING_CODES)

    @property
    def is_credentials(self) -> bool:
        return self.code.startswith(CREDENTIAL_CODES)

    @property
    def is_server_error(self) -> bool:
        return self.http_status >= 500 or self.code.startswith(SERVER_CODES)

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        # A reused nonce cannot happen with a fresh nonce per attempt, but if
        # it ever does, the next attempt's fresh nonce is the fix.
        return self.is_throttling or self.is_server_error or self.code == "SignatureNonceUsed"

    @property
    def outcome(self) -> str:
        # Codes are a closed upstream vocabulary; clip anything odd to keep labels bounded.
        return self.code if re.fullmatch(r"[A-Za-z0-9.]{1,64}", self.code) else "Other"


class UpstreamTransportError(UpstreamError):
    """No usable answer: timeout, connection failure, or a body that is not the expected JSON."""

    retryable = True

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(f"upstream {kind}: {detail}")

    @property
    def outcome(self) -> str:
        return self.kind
