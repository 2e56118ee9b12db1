"""When to retry an upstream call, and when not to.

Backoff is exponential with full jitter (so synchronized callers spread
out). The retry budget throttles retries by the recent failure rate (Google
SRE's "retry budget", the AWS SDK's retry quota, gRPC's retryThrottling): in
a full outage the service stops retrying after a few failures instead of
multiplying its load on a struggling upstream by the attempt count.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from imageshare_server.ecs.errors import UpstreamApiError, UpstreamError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    base_delay: float = 0.1
    throttle_base_delay: float = 0.5
    max_delay: float = 5.0

    def delay(self, retry_number: int, error: UpstreamError) -> float:
        """Sleep before retry ``retry_number`` (1-based); honours ``x-acs-retry-after``."""
        base = self.base_delay
        if isinstance(error, UpstreamApiError):
            if error.retry_after is not None:
                return min(error.retry_after, self.max_delay)
            if error.is_throttling:
                base = self.throttle_base_delay
        return random.uniform(0, min(self.max_delay, base * 2 ** (retry_number - 1)))


class RetryBudget:
    """Retry throttling as gRPC specifies it (gRFC A6 ``retryThrottling``).

    A bucket of ``max_tokens``: every transient failure takes one token,
    every success puts ``token_ratio`` back, and a retry is made only while
    more than half the tokens are left. With a success worth one token,
    retries flow while fewer than half the attempts fail (30% random 5xx are
    absorbed), and stop after a handful of failures once the upstream is
    down: in a full outage retries add about ``max_tokens / 2`` calls in all,
    not a multiple of the load.
    """

    def __init__(self, max_tokens: float = 10.0, token_ratio: float = 1.0) -> None:
        if max_tokens < 1 or token_ratio <= 0:
            raise ValueError("max_tokens must be >= 1 and token_ratio > 0")
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self._tokens = max_tokens

    @property
    def tokens(self) -> float:
        return self._tokens

    def on_success(self) -> None:
        self._tokens = min(self.max_tokens, self._tokens + self.token_ratio)

    def on_failure(self) -> None:
        self._tokens = max(0.0, self._tokens - 1.0)

    def allow_retry(self) -> bool:
        return self._tokens > self.max_tokens / 2


class UnlimitedRetries:
    """No budget: every retry the policy allows is made (tests, single callers)."""

    def on_success(self) -> None:
        """Nothing to record."""

    def on_failure(self) -> None:
        """Nothing to record."""

    def allow_retry(self) -> bool:
        return True
