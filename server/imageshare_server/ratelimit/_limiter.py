"""Client-side limit on upstream calls, so the service never spends the account's quota faster
than the operator allows.

ECS throttles per account, API and region, for every client of the account
together; a token bucket per bucket name (a region, see ``BucketNames``) at
``--upstream-qps`` keeps this service's share predictable.

The bucket is a fair queue: callers (connections) take turns, a token is
taken only by the read that sends, and a read that goes away (cancelled, its
deadline gone) leaves the queue without spending anything, so neither a
flood of reads from one caller nor a storm of abandoned calls can push
everyone else's turn into the future. Reads that no caller waits for any
more (cache fills, background refreshes) queue behind every caller's read.
A read whose turn would come after its deadline is refused at once, with
the wait, instead of queueing in vain.

Tokens alone are not enough: a caller leaves when its wake-up runs, and
wake-ups run late by varying amounts, so a late call followed by an on-time
one can put ``qps + 1`` calls into one of the upstream's one-second windows,
and the upstream throttles exactly that. ``SendWindow`` therefore also
checks the calls as actually sent: never more than the rate allows in any
sliding window, a window kept ``JITTER_GUARD`` longer than a second for the
variation in transit time between here and the upstream. The head of the
queue waits for both a token and room in the window before it goes, so no
call ever waits outside the fair queue.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable

from imageshare_server.core.clock import SYSTEM_CLOCK, Clock
from imageshare_server.core.deadline import ReadDeadline
from imageshare_server.core.errors import DeadlineExceededError, RateLimitedError
from imageshare_server.observability.metrics import ServiceMetrics

JITTER_GUARD = 0.025
# Refills are sums of float products: a token "almost" there is there.
_EPSILON = 1e-9

BucketNames = Callable[[str], str]
"""Maps a (validated) region id to the name of the bucket its calls count against."""


def one_bucket_per_region(region_id: str) -> str:
    return region_id


class SendWindow:
    """At most ``floor(rate)`` sends (at least one) in any sliding window of that many slots."""

    def __init__(self, rate: float, guard: float = JITTER_GUARD) -> None:
        self._limit = max(1, math.floor(rate))
        self.window = self._limit / rate + guard
        self.spacing = self.window / self._limit  # the sustained rate it allows, as a gap
        self._sent: deque[float] = deque(maxlen=self._limit)

    def wait(self, now: float) -> float:
        """How long a send at ``now`` must wait to keep the window."""
        if len(self._sent) < self._limit:
            return 0.0
        return max(0.0, self._sent[0] + self.window - now)

    def record(self, now: float) -> None:
        self._sent.append(now)


class _Waiter:
    __slots__ = ("read", "seq", "tag", "turn")

    def __init__(self, read: ReadDeadline, tag: float, seq: int) -> None:
        self.read = read
        self.tag = tag
        self.seq = seq
        self.turn = asyncio.Event()

    def order(self) -> tuple[bool, float, int]:
        return (self.read.background, self.tag, self.seq)


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second, shared fairly between callers.

    Waiting reads are served in start-time fair queueing order: each read
    gets a tag one past the later of its caller's previous tag and the tag
    last served, so callers take turns, one token each, however many reads
    one of them queues; a caller with a single read waits for about one
    token per other active caller, not behind a flood. Reads no caller waits
    for any more (``background``, asked anew at every turn: callers leave
    and join while a read waits) come after every caller's read.
    """

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.updated = now
        self.window = SendWindow(rate)
        self._waiters: list[_Waiter] = []
        self._virtual = 0.0  # the tag last served
        self._last_tag: dict[str, float] = {}  # callers with a tag beyond it
        self._seq = 0

    def refill(self, now: float) -> None:
        """Add the tokens earned since the last refill, up to the burst.

        While reads are queued, earned tokens stop at one: they are spent as
        they come, and none pile up behind a full send window to go out
        together once it opens (which would serve the queue in one-second
        pulses instead of evenly).
        """
        if now > self.updated:
            cap = self.capacity if not self._waiters else max(self.tokens, 1.0)
            self.tokens = min(cap, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _next_tag(self, caller: str) -> float:
        return max(self._virtual, self._last_tag.get(caller, 0.0)) + 1

    def _served(self, tag: float) -> None:
        if tag > self._virtual:
            self._virtual = tag
            # Callers whose turns are all served need no memory: the map stays as
            # small as the set of callers with reads still queued.
            stale = [c for c, t in self._last_tag.items() if t <= self._virtual]
            for caller in stale:
                del self._last_tag[caller]

    def wait_estimate(self, now: float, read: ReadDeadline) -> float:
        """How long ``read``, arriving now, would wait for its turn to send."""
        self.refill(now)
        mine = (read.background, self._next_tag(read.caller), self._seq)
        ahead = sum(1 for waiter in self._waiters if waiter.order() < mine)
        tokens = (ahead + 1 - self.tokens) / self.rate
        window = self.window.wait(now) + ahead * self.window.spacing
        return max(0.0, tokens, window)

    def _ready_in(self, now: float) -> float:
        """How long until the next call may go: a token, and room in the send window."""
        self.refill(now)
        token = 0.0 if self.tokens >= 1 - _EPSILON else (1 - self.tokens) / self.rate
        return max(token, self.window.wait(now))

    def _send(self, now: float) -> None:
        self.tokens -= 1
        self.window.record(now)

    def try_take(self, now: float, read: ReadDeadline) -> bool:
        """Go at once if nobody is queued and a token and the window allow it."""
        if self._waiters or self._ready_in(now) > 0:
            return False
        self._send(now)
        tag = self._next_tag(read.caller)
        self._last_tag[read.caller] = tag
        self._served(tag)
        return True

    def _head(self) -> _Waiter | None:
        return min(self._waiters, key=_Waiter.order) if self._waiters else None

    def _wake_head(self) -> None:
        head = self._head()
        if head is not None:
            head.turn.set()

    async def take(self, clock: Clock, read: ReadDeadline) -> None:
        """Queue for a token and take it; leaving the queue (cancel, deadline) costs nothing."""
        tag = self._next_tag(read.caller)
        self._last_tag[read.caller] = tag
        waiter = _Waiter(read, tag, self._seq)
        self._seq += 1
        self._waiters.append(waiter)
        self._wake_head()
        try:
            while True:
                await waiter.turn.wait()
                if self._head() is not waiter:
                    # Another caller's turn (or a caller's read ahead of this cache fill).
                    waiter.turn.clear()
                    self._wake_head()
                    continue
                now = clock.monotonic()
                wait = self._ready_in(now)
                if wait <= 0:
                    self._send(now)
                    self._served(waiter.tag)
                    return
                deadline = read.at()
                if deadline is not None and now + wait > deadline:
                    raise RateLimitedError(wait)
                await clock.sleep(wait)
        finally:
            self._waiters.remove(waiter)
            self._wake_head()


class UpstreamRateLimiter:
    """One fair token bucket per bucket name; ``rate`` 0 disables the limit.

    ``buckets`` bounds the state callers can create: region ids map onto a
    fixed set of names (see ``ecs.endpoints.RegionBuckets``).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        buckets: BucketNames = one_bucket_per_region,
        clock: Clock = SYSTEM_CLOCK,
        metrics: ServiceMetrics | None = None,
    ) -> None:
        self._metrics = metrics or ServiceMetrics.unregistered()
        self._rate = rate
        self._burst = burst
        self._bucket_name = buckets
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return self._burst

    def bucket(self, region_id: str) -> TokenBucket:
        name = self._bucket_name(region_id)
        bucket = self._buckets.get(name)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, self._clock.monotonic())
            self._buckets[name] = bucket
        return bucket

    @property
    def bucket_count(self) -> int:
        return len(self._buckets)

    async def acquire(self, region_id: str, read: ReadDeadline) -> None:
        """Wait for the right to send one call to ``region_id``'s upstream.

        Raises ``DeadlineExceededError`` when ``read.at()`` (``clock.monotonic()``)
        has already passed, and ``RateLimitedError`` with the wait when the
        turn would come after it; tells ``read`` how long it queues. Reads
        nobody waits for (``read.background``) queue behind callers' reads.
        """
        if self._rate <= 0:
            return
        clock = self._clock
        started = clock.monotonic()
        deadline = read.at()
        if deadline is not None and deadline <= started:
            raise DeadlineExceededError("the caller's deadline passed before the upstream call")
        bucket = self.bucket(region_id)
        if not bucket.try_take(started, read):
            wait = bucket.wait_estimate(started, read)
            if deadline is not None and started + wait > deadline:
                raise RateLimitedError(wait)
            read.queued(started + wait)
            await bucket.take(clock, read)
        self._metrics.upstream_rate_limit_wait.observe(clock.monotonic() - started)
