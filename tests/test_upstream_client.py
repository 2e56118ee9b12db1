"""The upstream client against the in-process emulator: what an attempt may hold, and how long."""

from __future__ import annotations

import asyncio
import importlib.machinery
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from imageshare_emulator import Emulator
from imageshare_server.core.deadline import FixedDeadline, ReadDeadline
from imageshare_server.core.errors import UpstreamBusyError, UpstreamTransportError
from imageshare_server.credentials._base import StaticCredentialsProvider
from imageshare_server.upstream.client import EcsClient, parse_page
from imageshare_server.upstream.endpoints import EndpointResolver
from imageshare_server.upstream.retry import RetryBudget, RetryPolicy
from imageshare_server.upstream.transport import upstream_http_client
from tests.support.attacks import wait_for
from tests.support.clock import ManualClock
from tests.support.inprocess import DEMO_CREDENTIALS

REGION = "cn-hangzhou"
DEMO = "m-demo0000001"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The transport the server uses, as the server builds its client."""
    async with upstream_http_client(httpx.Timeout(10), user_agent="test") as client:
        yield client


def client_for(ecs: Emulator, http: httpx.AsyncClient, **options: object) -> EcsClient:
    return EcsClient(
        http,
        StaticCredentialsProvider(DEMO_CREDENTIALS),
        EndpointResolver(ecs.url),
        **options,  # type: ignore[arg-type]
    )


class GatedLimiter:
    """Holds the first call until released; lets every later one through."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.first_waiting = asyncio.Event()

    async def acquire(self, region_id: str, read: ReadDeadline) -> None:
        if not self.first_waiting.is_set():
            self.first_waiting.set()
            await self.open.wait()


async def test_a_rate_limit_wait_does_not_hold_a_connection_slot(
    ecs: Emulator, http: httpx.AsyncClient
) -> None:
    limiter = GatedLimiter()
    client = client_for(ecs, http, limiter=limiter, max_in_flight=1)
    waiting = asyncio.create_task(
        client.describe_image_share_permission(REGION, DEMO, page_number=1, page_size=10)
    )
    await limiter.first_waiting.wait()
    # The only slot is free while the other call waits for its token.
    page = await asyncio.wait_for(
        client.describe_image_share_permission(REGION, DEMO, page_number=1, page_size=10), 5
    )
    assert page.total_count == 137
    limiter.open.set()
    await waiting


async def test_no_free_slot_before_the_deadline_is_upstream_busy(
    ecs: Emulator, http: httpx.AsyncClient
) -> None:
    ecs.knobs.set(latency_ms=1000)
    client = client_for(ecs, http, max_in_flight=1)
    holder = asyncio.create_task(
        client.describe_image_share_permission(REGION, DEMO, page_number=1, page_size=10)
    )
    await asyncio.to_thread(wait_for, lambda: ecs.knobs.counters()["in_flight"] == 1)
    started = time.monotonic()
    with pytest.raises(UpstreamBusyError):
        await client.describe_image_share_permission(
            REGION, DEMO, page_number=1, page_size=10, deadline=FixedDeadline(started + 0.2)
        )
    assert time.monotonic() - started < 0.5
    await holder


async def test_a_trickling_body_is_cut_by_the_timeout_of_the_whole_attempt(
    ecs: Emulator, http: httpx.AsyncClient
) -> None:
    # Ten chunks 300 ms apart: every read is quick, the whole answer takes 3 s.
    ecs.knobs.fault("slow_body", count=1, interval_ms=300)
    client = client_for(ecs, http, read_timeout=0.5, retry=RetryPolicy(max_attempts=1))
    started = time.monotonic()
    with pytest.raises(UpstreamTransportError) as failed:
        await client.describe_image_share_permission(REGION, DEMO, page_number=1, page_size=100)
    assert failed.value.kind == "timeout"
    assert time.monotonic() - started < 1.0


async def test_an_answer_larger_than_the_cap_is_malformed(
    ecs: Emulator, http: httpx.AsyncClient
) -> None:
    client = client_for(ecs, http, max_response_bytes=1024, retry=RetryPolicy(max_attempts=1))
    with pytest.raises(UpstreamTransportError) as failed:
        await client.describe_image_share_permission(REGION, DEMO, page_number=1, page_size=100)
    assert failed.value.kind == "malformed_response"
    small = await client.describe_image_share_permission(REGION, DEMO, page_number=1, page_size=1)
    assert small.total_count == 137


@pytest.mark.parametrize(
    "body",
    [
        {"TotalCount": 1, "Accounts": {"Account": [{"AliyunId": "12ab"}]}},
        {"TotalCount": 1, "Accounts": {"Account": [{"AliyunId": 1.5e15}]}},
        {"TotalCount": 1, "Accounts": {"Account": [{"AliyunId": "1" * 33}]}},
        {"TotalCount": 10**12, "Accounts": {"Account": []}},
        {"TotalCount": -1, "Accounts": {"Account": []}},
        {"TotalCount": 1, "ShareGroups": {"ShareGroup": [{"Group": "x" * 65}]}},
    ],
)
def test_answers_that_are_not_share_lists_are_malformed(body: dict[str, object]) -> None:
    with pytest.raises(UpstreamTransportError) as failed:
        parse_page(body)
    assert failed.value.kind == "malformed_response"


def test_numeric_account_ids_keep_their_digits() -> None:
    page = parse_page({"TotalCount": 1, "Accounts": {"Account": [{"AliyunId": 1500000000000001}]}})
    assert page.accounts[0].aliyun_id == "1500000000000001"


def test_the_retry_budget_refills_over_time_and_per_region() -> None:
    clock = ManualClock()
    budget = RetryBudget(20, 1.0, refill_per_second=1.0, clock=clock)
    for _ in range(30):  # an outage empties cn-hangzhou's budget
        budget.on_failure(REGION)
    assert not budget.allow_retry(REGION)
    assert budget.allow_retry("eu-central-1")  # other regions keep theirs
    clock.advance(10)  # 10 tokens back: still half
    assert not budget.allow_retry(REGION)
    clock.advance(1)
    assert budget.allow_retry(REGION)
    clock.advance(3600)
    assert budget.tokens(REGION) == 20  # never more than the bucket holds
    still = RetryBudget(20, 1.0, refill_per_second=0.0, clock=clock)
    for _ in range(30):
        still.on_failure(REGION)
    clock.advance(3600)
    assert not still.allow_retry(REGION)


async def test_an_upstream_call_imports_nothing_it_has_to_search_for_again(
    ecs: Emulator, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the upstream's transport nor httpx's own (the credentials chain's: httpcore
    imports sniffio at every connection-pool lock, and without it installed each failed
    import walks ``sys.path`` again) looks for a module on every request."""
    searched: list[str] = []
    real_find_spec = importlib.machinery.PathFinder.find_spec

    def find_spec(name: str, *args: object, **kwargs: object) -> object:
        searched.append(name)
        return real_find_spec(name, *args, **kwargs)  # type: ignore[arg-type]

    client = client_for(ecs, http)
    async with httpx.AsyncClient(trust_env=False) as credentials_http:
        await client.describe_image_share_permission(REGION, DEMO, page_number=1, page_size=10)
        await credentials_http.get(f"{ecs.url}/")
        monkeypatch.setattr(importlib.machinery.PathFinder, "find_spec", find_spec)
        for _ in range(3):
            await client.describe_image_share_permission(REGION, DEMO, page_number=1, page_size=10)
            await credentials_http.get(f"{ecs.url}/")
    assert searched == []
