"""Fault matrix: what callers see when the upstream misbehaves, and that the service holds.

One parametrized matrix injects each fault (throttling, broken answers, an outage, a slow
body) into a fresh app, asserts the caller-visible result and the upstream attempts it
cost, then proves the app still answers a plain call correctly. The tests after it assert
what one call cannot show: deadlines, retry budgets across many calls, random failures,
recovery after an outage.

Upstream attempts are counted twice: by the emulator (calls it answered) and by the app's
own ``imageshare_upstream_requests_total`` (which also counts connections the emulator
refused while down). Back-offs run on ``FastClock`` (they take no real time) unless time
itself is what a test is about.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import httpx
import pytest

from imageshare_emulator import Emulator
from imageshare_emulator.knobs import Knobs
from imageshare_server.core.deadline import FixedDeadline
from imageshare_server.core.errors import DeadlineExceededError
from imageshare_server.credentials._base import StaticCredentialsProvider
from imageshare_server.upstream.client import EcsClient
from imageshare_server.upstream.endpoints import EndpointResolver
from imageshare_server.upstream.transport import upstream_http_client
from tests.support.clock import FastClock
from tests.support.faults_common import (
    ACTION,
    BIG,
    DEMO_IDS,
    OK,
    attempts,
    listing,
    listings,
    reads,
    retries,
    settled,
)
from tests.support.images import REGION
from tests.support.inprocess import DEMO_CREDENTIALS, InProcessApp, running
from tests.support.waiting import until

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
NO_CACHE = ("--cache-ttl", "0")


async def assert_healthy(app: InProcessApp, ecs: Emulator) -> None:
    """With the fault gone, a plain call gets the whole list again."""
    ecs.knobs.reset()
    outcome = await listing(app)
    assert (outcome.code, outcome.ids) == (OK, DEMO_IDS), outcome.error


# --- the matrix ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One fault, and what a caller of the two-page demo listing sees while it lasts."""

    inject: Callable[[Knobs], None]
    code: grpc.StatusCode = OK  # OK: the whole list all the same
    reason: str = ""  # the ErrorInfo reason of a failure
    attempts: int = 2  # upstream attempts in all, as the app counts them
    outcomes: dict[str, int] = field(default_factory=dict)  # as the emulator counts them
    retry_delay: float | None = None  # RetryInfo of a failure, seconds


def _throttle(n: int) -> Callable[[Knobs], None]:
    return lambda knobs: knobs.throttle_next(n)


def _fault(mode: str, count: int, interval_ms: int | None = None) -> Callable[[Knobs], None]:
    return lambda knobs: knobs.fault(mode, count=count, interval_ms=interval_ms)


def _down(knobs: Knobs) -> None:
    knobs.set(down=True)


FAULTS = {
    # Page 1 is throttled twice and read on the third attempt, each with a fresh nonce.
    "throttling_transient": Fault(
        _throttle(2), attempts=4, outcomes={"Throttling.User": 2, "Success": 2}
    ),
    # Four attempts in all (the default), then RESOURCE_EXHAUSTED with a hint to wait.
    "throttling_sustained": Fault(
        _throttle(1000),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "THROTTLING_USER",
        attempts=4,
        outcomes={"Throttling.User": 4},
        retry_delay=1.0,
    ),
    **{
        f"{mode}_once": Fault(
            _fault(mode, 1), attempts=3, outcomes={f"fault:{mode}": 1, "Success": 2}
        )
        for mode in ("reset", "truncated", "malformed")
    },
    **{
        f"{mode}_always": Fault(
            _fault(mode, 100), UNAVAILABLE, reason, attempts=4, outcomes={f"fault:{mode}": 4}
        )
        for mode, reason in (
            ("reset", "UPSTREAM_CONNECTION_ERROR"),
            ("truncated", "UPSTREAM_CONNECTION_ERROR"),
            ("malformed", "UPSTREAM_MALFORMED_RESPONSE"),
        )
    },
    # The emulator hangs up before answering anything: only the app counts the attempts.
    "outage": Fault(_down, UNAVAILABLE, "UPSTREAM_CONNECTION_ERROR", attempts=4),
    # Both pages trickle in (10 chunks, 20 ms apart), well within the caller's deadline.
    "slow_body_within_deadline": Fault(
        _fault("slow_body", 2, interval_ms=20), outcomes={"fault:slow_body": 2}
    ),
}


@pytest.mark.parametrize("name", list(FAULTS))
async def test_fault_matrix(ecs: Emulator, name: str) -> None:
    fault = FAULTS[name]
    async with running(ecs, *NO_CACHE, clock=FastClock()) as app:
        fault.inject(ecs.knobs)
        outcome = await listing(app)
        assert outcome.code is fault.code, outcome.error
        assert outcome.took < 5  # fails fast: no attempt waits for a timeout
        if fault.code is OK:
            assert outcome.ids == DEMO_IDS
            assert outcome.error is None
        else:
            assert outcome.error is not None
            assert outcome.error.error_info is not None
            assert outcome.error.error_info.reason == fault.reason
            if fault.retry_delay is None:
                assert outcome.error.retry_info is None
            else:
                assert outcome.error.retry_info is not None
                assert outcome.error.retry_info.retry_delay.ToNanoseconds() == int(
                    fault.retry_delay * 1e9
                )
        counters = await settled(ecs)  # a slow body's last pause included
        assert attempts(app) == fault.attempts
        # Every attempt after the first of its page was a retry: two pages, or the one failed.
        assert retries(app) == fault.attempts - (2 if fault.code is OK else 1)
        assert counters["outcomes"] == fault.outcomes
        # Every attempt the emulator saw was signed anew: no nonce is ever sent twice.
        assert len(counters["nonces"]) == sum(fault.outcomes.values())
        assert len(set(counters["nonces"])) == len(counters["nonces"])
        await assert_healthy(app, ecs)


async def test_three_concurrent_callers_share_the_retries_of_a_throttling_burst(
    ecs: Emulator,
) -> None:
    """Concurrent callers share upstream reads (as a rule one, here: each attempt takes
    50 ms), so the burst lands on a read's attempts and every caller gets the whole list."""
    ecs.knobs.set(latency_ms=50)
    async with running(ecs, *NO_CACHE, clock=FastClock()) as app:
        ecs.knobs.throttle_next(2)
        results = await listings(app, 3, concurrency=3)
        assert [(r.code, r.ids) for r in results] == [(OK, DEMO_IDS)] * 3
        # However the callers met, each read took its two pages once; the burst cost two
        # retries, each with a nonce of its own.
        counters = await settled(ecs)
        assert 1 <= reads(app) <= 3
        assert counters["outcomes"] == {"Throttling.User": 2, "Success": 2 * reads(app)}
        assert retries(app) == 2
        assert len(set(counters["nonces"])) == len(counters["nonces"]) == 2 + 2 * reads(app)
        await assert_healthy(app, ecs)


# --- latency and deadlines -------------------------------------------------------------------


async def test_added_latency_is_passed_through(ecs: Emulator) -> None:
    ecs.knobs.set(latency_ms=400)
    async with running(ecs, *NO_CACHE) as app:
        results = await listings(app, 4)
        assert [(r.code, r.ids) for r in results] == [(OK, DEMO_IDS)] * 4
        # Two upstream pages, the second read after the first: at least two latencies.
        assert all(r.took >= 0.8 for r in results)
        await assert_healthy(app, ecs)


async def test_latency_spikes_do_not_break_listings(ecs: Emulator) -> None:
    ecs.knobs.set(latency_ms=150, latency_jitter_ms=150, seed=3)
    async with running(ecs, *NO_CACHE) as app:
        results = await listings(app, 12)
        assert [(r.code, r.ids) for r in results] == [(OK, DEMO_IDS)] * 12
        await assert_healthy(app, ecs)


@pytest.mark.parametrize(
    "slow",
    [
        pytest.param(lambda knobs: knobs.set(latency_ms=2000), id="latency"),
        pytest.param(lambda knobs: knobs.fault("slow_body", count=2, interval_ms=2000), id="body"),
    ],
)
async def test_an_upstream_slower_than_the_callers_deadline_is_deadline_exceeded(
    ecs: Emulator, slow: Callable[[Knobs], None]
) -> None:
    async with running(ecs, *NO_CACHE) as app:
        slow(ecs.knobs)
        outcome = await listing(app, rpc_timeout=0.5)
        assert outcome.code is grpc.StatusCode.DEADLINE_EXCEEDED
        # The server's own status, sent before the caller's deadline: not the client timing out.
        assert outcome.error is not None
        assert outcome.error.error_info is not None
        assert outcome.error.error_info.reason == "DEADLINE_TOO_SHORT"
        assert outcome.took < 1.5
        await until(lambda: app.runtime.source.flights == 0)  # the read let go of its attempt
        assert attempts(app) == 1  # a deadline is never retried
        await assert_healthy(app, ecs)


async def test_upstream_timeout_cut_short_by_the_deadline_is_the_deadline(ecs: Emulator) -> None:
    """Not an upstream timeout: no retry, and never UNAVAILABLE racing the caller's deadline."""
    ecs.knobs.set(latency_ms=2000)
    async with upstream_http_client(httpx.Timeout(10), user_agent="test") as http:
        client = EcsClient(
            http, StaticCredentialsProvider(DEMO_CREDENTIALS), EndpointResolver(ecs.url, vpc=False)
        )
        with pytest.raises(DeadlineExceededError, match="during the upstream call"):
            await client.describe_image_share_permission(
                REGION,
                BIG,
                page_number=1,
                page_size=10,
                # Long enough for the request to reach the emulator on a loaded machine,
                # far shorter than the answer.
                deadline=FixedDeadline(time.monotonic() + 1.0),
            )
    assert ecs.knobs.counters()["total"] == 1


# --- many calls: random failures, outages, the retry budget ---------------------------------


async def test_random_server_errors_at_30_percent_leave_95_percent_of_calls_whole(
    ecs: Emulator,
) -> None:
    """The issue's target, with the server's defaults. Callers go one at a time so that every
    call is its own upstream read (concurrent ones would share reads and their fate)."""
    # Seeded: the same 30% of upstream answers fail on every run, so the test replays one
    # sample instead of being a coin toss. (Simulated over 4,000 runs of 100 listings with
    # the default budget, 95% or more succeed in 99% of them.)
    ecs.knobs.set(error_rate=0.3, seed=7)
    async with running(ecs, *NO_CACHE, clock=FastClock()) as app:
        stub = app.stub()
        results = [await listing(app, stub=stub) for _ in range(100)]
        codes = Counter(r.code for r in results)
        succeeded = [r.ids for r in results if r.code is OK]
        assert len(succeeded) >= 95, codes
        assert all(ids == DEMO_IDS for ids in succeeded)
        assert set(codes) <= {OK, UNAVAILABLE}, codes
        # The failures were real and retried away: about 30% of the attempts failed.
        outcomes = (await settled(ecs))["outcomes"]
        failed = sum(n for o, n in outcomes.items() if o != "Success")
        assert failed > 0.2 * attempts(app)
        assert retries(app) == failed - codes[UNAVAILABLE]
        await assert_healthy(app, ecs)


@pytest.mark.parametrize("refill", ["0", "2"])
async def test_retry_budget_bounds_upstream_calls_in_a_full_outage(
    ecs: Emulator, refill: str
) -> None:
    """Without the budget every listing makes 4 attempts: 240 for 60 listings. With it,
    retries stop once half of the 20 tokens are gone: 3 + 3 + 1 retries for the first three
    listings, none after. Refilled (2 tokens a second, the default), retries come back only
    as fast as time passes on the app's clock."""
    clock = FastClock()
    ecs.knobs.fault("error_code", rate=1.0, code="ServiceUnavailable", status=503)
    requests = 60
    async with running(ecs, *NO_CACHE, "--retry-budget-refill", refill, clock=clock) as app:
        stub = app.stub()
        started = clock.monotonic()
        for _ in range(requests):
            outcome = await listing(app, "m-demo0000003", stub=stub)
            assert outcome.code is UNAVAILABLE
            assert outcome.error is not None
            assert outcome.error.error_info is not None
            assert outcome.error.error_info.reason == "SERVICE_UNAVAILABLE"
        elapsed = clock.monotonic() - started
        assert app.upstream_calls() == attempts(app) == requests + retries(app)
        denied = app.metric("imageshare_upstream_retries_denied_total", action=ACTION)
        if refill == "0":
            assert app.upstream_calls() == requests + 7
            assert denied == requests - 2  # listings 3 (after its one retry) to 60
        else:
            # Each retry beyond the first 7 needs a token the refill brought back (see
            # RetryBudget): at most one per half second of the app's clock.
            assert 7 <= retries(app) <= 7 + math.ceil(float(refill) * elapsed)
            assert denied > 0


async def test_retries_never_reuse_a_nonce(ecs: Emulator) -> None:
    ecs.knobs.set(seed=11)
    ecs.knobs.fault("error_code", rate=0.5, code="InternalError", status=500)
    async with running(ecs, *NO_CACHE, clock=FastClock()) as app:
        stub = app.stub()
        for _ in range(10):
            await listing(app, stub=stub)
        counters = await settled(ecs)
        nonces = counters["nonces"]
        # Retries really happened, each a new attempt with a nonce of its own.
        assert counters["outcomes"].get("InternalError", 0) > 0
        assert retries(app) > 0
        assert app.metric(
            "imageshare_upstream_retries_total", action=ACTION, reason="InternalError"
        ) == retries(app)
        assert len(nonces) == app.upstream_calls() == attempts(app)
        assert len(set(nonces)) == len(nonces)


async def test_full_outage_fails_fast_without_amplification_and_recovers_calmly(
    ecs: Emulator,
) -> None:
    clock = FastClock()
    async with running(ecs, *NO_CACHE, clock=clock) as app:
        # A healthy period first, so whatever retry allowance it earns is there to be spent.
        stub = app.stub()
        healthy = [await listing(app, stub=stub) for _ in range(20)]
        assert {r.code for r in healthy} == {OK}
        before = attempts(app), retries(app), reads(app)

        ecs.knobs.set(down=True)
        started = clock.monotonic()
        results = await listings(app, 60)
        elapsed = clock.monotonic() - started
        assert {r.code for r in results} == {UNAVAILABLE}
        assert max(r.took for r in results) < 3
        tried, retried, read = (
            attempts(app) - before[0],
            retries(app) - before[1],
            reads(app) - before[2],
        )
        # Concurrent listings share reads (at most one per listing); each read made one
        # attempt, plus the retries the budget allowed: 9 while its 20 tokens last above
        # half (the reads under way share them), and one more per token the default refill
        # (2 a second) brings back on the app's clock. Unbudgeted, every read retries 3 times.
        assert 0 < read <= 60
        assert tried == read + retried
        assert retried <= 9 + math.ceil(2 * elapsed), (retried, elapsed)
        assert app.metric("imageshare_upstream_retries_denied_total", action=ACTION) > 0

        ecs.knobs.set(down=False)
        ecs.knobs.reset()
        results = await listings(app, 30)
        assert [(r.code, r.ids) for r in results] == [(OK, DEMO_IDS)] * 30
        # At most two pages per listing (concurrent ones share reads): no backlog of retries
        # lands on the upstream once it is back.
        counters = await settled(ecs)
        assert 2 <= counters["total"] <= 2 * 30
        assert set(counters["outcomes"]) == {"Success"}
