"""When to retry an upstream call, and when not to.

Backoff is exponential with full jitter (so synchronized callers spread
out). The retry budget caps retries at a fraction of first attempts, as in
Google SRE's "retry budget" and the AWS SDK's retry quota: in a full outage
the service adds ``ratio`` more calls at most, instead of multiplying its
load on a struggling upstream by the attempt count.
"""

from __future__ import annotations

import random
import time
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
    """Token bucket of retries: each first attempt deposits ``ratio``, each retry spends one.

    ``reserve`` tokens allow a few retries when traffic is low (a single
    caller's one transient error should still be retried); the bucket never
    holds more than ``reserve`` plus what recent traffic deposited, capped.
    """

    def __init__(self, ratio: float = 0.1, reserve: float = 10.0, cap: float = 100.0) -> None:
        if ratio < 0 or reserve < 0 or cap < reserve:
            raise ValueError("ratio and reserve must be >= 0 and cap >= reserve")
        self.ratio = ratio
        self.cap = cap
        self._tokens = reserve

    @property
    def tokens(self) -> float:
        return self._tokens

    def attempt(self) -> None:
        self._tokens = min(self.cap, self._tokens + self.ratio)

    def allow_retry(self) -> bool:
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class UnlimitedRetries:
    """No budget: every retry the policy allows is made (tests, single callers)."""

    def attempt(self) -> None:
        """Nothing to record."""

    def allow_retry(self) -> bool:
        return True


def monotonic() -> float:
    return time.monotonic()
