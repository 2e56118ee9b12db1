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

from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.errors import UpstreamApiError, UpstreamError


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


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now


class RetryBudget:
    """Retry throttling as gRPC specifies it (gRFC A6 ``retryThrottling``), refilled over time.

    A bucket of ``max_tokens`` per rate-limit bucket (region): every
    transient failure takes one token, every success puts ``token_ratio``
    back, and a retry is made only while more than half the tokens are
    left. With a success worth one token, retries flow while fewer than half
    the attempts fail (30% random 5xx are absorbed), and stop after a
    handful of failures once the upstream is down: in a full outage retries
    add about ``max_tokens / 2`` calls, not a multiple of the load.

    Unlike gRPC's, the bucket also refills by ``refill_per_second``: after an
    outage the budget would otherwise stay spent until enough calls
    succeeded, and with failures still frequent that takes long, so the
    first minutes after recovery would see far more failed listings than a
    fresh budget allows. The cost is ``refill_per_second`` extra retries per
    second per region while the upstream stays down. Each region has its own
    budget, so an outage of one region (or a caller asking for made-up
    regions) does not stop retries in the others.
    """

    def __init__(
        self,
        max_tokens: float = 10.0,
        token_ratio: float = 1.0,
        *,
        refill_per_second: float = 0.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_tokens < 1 or token_ratio <= 0 or refill_per_second < 0:
            raise ValueError("max_tokens must be >= 1, token_ratio > 0, refill_per_second >= 0")
        self.max_tokens = max_tokens
        self.token_ratio = token_ratio
        self.refill_per_second = refill_per_second
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def _bucket(self, name: str) -> _Bucket:
        now = self._clock.monotonic()
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = self._buckets[name] = _Bucket(self.max_tokens, now)
        elif self.refill_per_second:
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(self.max_tokens, bucket.tokens + elapsed * self.refill_per_second)
        bucket.updated = now
        return bucket

    def tokens(self, bucket: str) -> float:
        return self._bucket(bucket).tokens

    def on_success(self, bucket: str) -> None:
        state = self._bucket(bucket)
        state.tokens = min(self.max_tokens, state.tokens + self.token_ratio)

    def on_failure(self, bucket: str) -> None:
        state = self._bucket(bucket)
        state.tokens = max(0.0, state.tokens - 1.0)

    def allow_retry(self, bucket: str) -> bool:
        return self._bucket(bucket).tokens > self.max_tokens / 2


class UnlimitedRetries:
    """No budget: every retry the policy allows is made (tests, single callers)."""

    def on_success(self, bucket: str) -> None:
        """Nothing to record."""

    def on_failure(self, bucket: str) -> None:
        """Nothing to record."""

    def allow_retry(self, bucket: str) -> bool:
        return True
