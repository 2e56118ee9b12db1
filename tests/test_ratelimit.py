"""The upstream rate limiter: a fair queue that abandoned calls leave without spending."""

from __future__ import annotations

import asyncio

import pytest

from imageshare_server.core.deadline import FixedDeadline
from imageshare_server.core.errors import DeadlineExceededError, RateLimitedError
from imageshare_server.ratelimit import JITTER_GUARD, SendWindow, UpstreamRateLimiter
from imageshare_server.upstream.endpoints import EndpointResolver
from tests.support.clock import ManualClock

REGION = "cn-hangzhou"


class Read:
    """A ``ReadDeadline`` whose callers can leave (``background``) while it queues."""

    def __init__(
        self, at: float | None = None, *, background: bool = False, caller: str = ""
    ) -> None:
        self._at = at
        self.background = background
        self.caller = caller
        self.queued_until: float | None = None

    def at(self) -> float | None:
        return self._at

    def queued(self, until: float) -> None:
        self.queued_until = until

    def admitted(self) -> None:
        """Not needed here."""

    def waiting_for_slot(self, waiting: bool) -> None:
        """Not used by the limiter."""

    def upstream_answer(self, request_id: str) -> None:
        """Not used by the limiter."""


async def test_calls_beyond_the_burst_are_spaced_at_the_rate() -> None:
    clock = ManualClock()
    limiter = UpstreamRateLimiter(10, 2, clock=clock)
    start = clock.monotonic()
    sent = []
    for _ in range(5):
        await limiter.acquire(REGION, FixedDeadline())
        sent.append(round(clock.monotonic() - start, 3))
    assert sent == [0.0, 0.0, 0.1, 0.2, 0.3]


async def test_a_turn_after_the_deadline_is_refused_at_once_with_the_wait() -> None:
    clock = ManualClock()
    limiter = UpstreamRateLimiter(10, 1, clock=clock)
    await limiter.acquire(REGION, FixedDeadline())
    with pytest.raises(RateLimitedError) as refused:
        await limiter.acquire(REGION, FixedDeadline(clock.monotonic() + 0.05))
    assert refused.value.wait == pytest.approx(0.1)
    # Refused calls take nothing: the next turn is still 0.1 s away.
    read = Read(clock.monotonic() + 1)
    await limiter.acquire(REGION, read)
    assert read.queued_until == pytest.approx(clock.monotonic())


async def test_a_deadline_already_gone_is_deadline_exceeded_even_when_idle() -> None:
    clock = ManualClock()
    limiter = UpstreamRateLimiter(10, 10, clock=clock)
    with pytest.raises(DeadlineExceededError):
        await limiter.acquire(REGION, FixedDeadline(clock.monotonic()))


async def test_cancelled_waiters_leave_the_queue_without_spending_a_token() -> None:
    clock = ManualClock()
    limiter = UpstreamRateLimiter(20, 1, clock=clock)
    await limiter.acquire(REGION, FixedDeadline())  # the burst is spent
    abandoned = [asyncio.create_task(limiter.acquire(REGION, FixedDeadline())) for _ in range(100)]
    await asyncio.sleep(0)
    assert limiter.bucket(REGION).waiting == 100
    for task in abandoned:
        task.cancel()
    await asyncio.gather(*abandoned, return_exceptions=True)
    assert limiter.bucket(REGION).waiting == 0
    # The next caller waits one interval, not a hundred.
    started = clock.monotonic()
    await limiter.acquire(REGION, FixedDeadline(started + 1))
    assert clock.monotonic() - started <= 0.05 + 1e-9


async def test_callers_reads_go_ahead_of_reads_nobody_waits_for() -> None:
    clock = ManualClock()
    limiter = UpstreamRateLimiter(100, 1, clock=clock)
    await limiter.acquire(REGION, FixedDeadline())
    order: list[str] = []

    async def take(name: str, read: Read) -> None:
        await limiter.acquire(REGION, read)
        order.append(name)

    orphan = Read(background=True)
    tasks = [asyncio.create_task(take("fill", orphan))]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(take(f"caller{i}", Read())) for i in range(3)]
    await asyncio.gather(*tasks)
    assert order == ["caller0", "caller1", "caller2", "fill"]
    # A caller's read whose callers then leave falls behind the ones still wanted.
    order.clear()
    await limiter.acquire(REGION, FixedDeadline())
    left = Read()
    tasks = [asyncio.create_task(take("left", left))]
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(take("wanted", Read())))
    await asyncio.sleep(0)
    left.background = True
    await asyncio.gather(*tasks)
    assert order == ["wanted", "left"]


async def test_callers_take_turns_however_many_reads_one_of_them_queues() -> None:
    clock = ManualClock()
    limiter = UpstreamRateLimiter(100, 1, clock=clock)
    await limiter.acquire(REGION, FixedDeadline())
    order: list[str] = []

    async def take(name: str, caller: str) -> None:
        await limiter.acquire(REGION, Read(caller=caller))
        order.append(name)

    flood = [asyncio.create_task(take(f"flood{i}", "ipv4:10.0.0.9:4242")) for i in range(50)]
    await asyncio.sleep(0)
    victim = Read(clock.monotonic() + 0.05, caller="ipv4:10.0.0.7:5353")
    estimate = limiter.bucket(REGION).wait_estimate(clock.monotonic(), victim)
    assert estimate <= 0.02 + 1e-9  # about one token, not fifty
    tasks = [*flood, asyncio.create_task(take("victim", "ipv4:10.0.0.7:5353"))]
    await asyncio.gather(*tasks)
    assert order.index("victim") <= 2
    assert limiter.bucket(REGION).waiting == 0


async def test_the_read_learns_how_long_it_queues() -> None:
    clock = ManualClock()
    limiter = UpstreamRateLimiter(4, 1, clock=clock)
    await limiter.acquire(REGION, FixedDeadline())
    read = Read(clock.monotonic() + 10)
    await limiter.acquire(REGION, read)
    assert read.queued_until is not None
    assert read.queued_until == pytest.approx(clock.monotonic())


async def test_buckets_stay_bounded_whatever_regions_callers_invent() -> None:
    official = EndpointResolver(extra_regions=frozenset({"xx-new-1"}))
    limiter = UpstreamRateLimiter(1e6, 20_000, buckets=official.bucket, clock=ManualClock())
    for i in range(10_000):
        await limiter.acquire(f"zz-made-up{i}", FixedDeadline())
    await limiter.acquire("cn-hangzhou", FixedDeadline())
    await limiter.acquire("xx-new-1", FixedDeadline())
    assert limiter.bucket_count == 3  # "other", cn-hangzhou, the extra region
    single = EndpointResolver("http://127.0.0.1:1")
    assert {single.bucket(r) for r in ("cn-hangzhou", "zz-x", "eu-west-1")} == {"endpoint"}


def test_send_window_holds_back_what_a_late_sleeper_would_push_over_the_rate() -> None:
    window = SendWindow(rate=20)
    # Slot 0 (t=0.00) left 40 ms late; slots 1..19 left on time, 50 ms apart.
    sent = [0.04, *(0.05 * i for i in range(1, 20))]
    for t in sent:
        assert window.wait(t) == 0.0
        window.record(t)
    # Slot 20 is due at 1.00 s: on time it would be the 21st call within one second.
    assert window.wait(1.0) == pytest.approx(0.04 + 1.0 + JITTER_GUARD - 1.0)
    assert window.wait(1.0 + 0.04 + JITTER_GUARD) == 0.0


async def test_send_window_wait_past_the_deadline_is_refused_not_slept() -> None:
    clock = ManualClock()
    limiter = UpstreamRateLimiter(rate=2, burst=2, clock=clock)
    start = clock.monotonic()
    await limiter.acquire(REGION, FixedDeadline())
    await limiter.acquire(REGION, FixedDeadline())
    # The bucket's token comes at +0.5 s, but the window holds the send until +1.025 s.
    with pytest.raises(RateLimitedError):
        await limiter.acquire(REGION, FixedDeadline(start + 1.01))
    assert clock.monotonic() - start < 1.01


def test_send_window_below_one_call_per_second() -> None:
    window = SendWindow(rate=0.5)
    window.record(10.0)
    assert window.wait(11.0) == pytest.approx(1.0 + JITTER_GUARD)
    assert window.wait(12.0 + JITTER_GUARD) == 0.0
