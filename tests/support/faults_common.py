"""What the end-to-end listing, cache and fault tests share: the demo image and its accounts,
one listing reduced to what a caller sees, the app's own counts of upstream attempts, reads
and retries, and an emulator that answers without Nagle's delay.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from imageshare_emulator import Emulator
from imageshare_emulator.data import demo_accounts
from tests.support.images import REGION
from tests.support.inprocess import InProcessApp, Request
from tests.support.rpc import Details, details
from tests.support.waiting import until

if TYPE_CHECKING:
    from imageshare.v1.image_share_pb2_grpc import ImageShareServiceAsyncStub

BIG = "m-demo0000001"  # the demo image shared with 137 accounts: two upstream pages of 100
DEMO_IDS = [a.aliyun_id for a in demo_accounts()]
ACTION = "DescribeImageSharePermission"
OK = grpc.StatusCode.OK


@dataclass
class Outcome:
    """One listing as its caller saw it: the status, the accounts streamed, the wall time."""

    code: grpc.StatusCode
    ids: list[str] = field(default_factory=list)
    took: float = 0.0
    error: Details | None = None


async def listing(
    app: InProcessApp,
    image_id: str = BIG,
    rpc_timeout: float | None = 20.0,
    stub: ImageShareServiceAsyncStub | None = None,
) -> Outcome:
    """One listing of ``image_id`` (on a channel of its own unless ``stub`` is given)."""
    started = time.monotonic()
    outcome = Outcome(OK)
    request = Request(region_id=REGION, image_id=image_id)
    call = (stub or app.stub()).ListImageShares(request, timeout=rpc_timeout)
    try:
        async for message in call:
            outcome.ids.extend(a.aliyun_id for a in message.accounts)
    except grpc.aio.AioRpcError as exc:
        outcome.code = exc.code()
        outcome.error = details(exc)
    outcome.took = time.monotonic() - started
    return outcome


async def listings(
    app: InProcessApp, n: int, concurrency: int = 6, image_id: str = BIG
) -> list[Outcome]:
    """``n`` listings on one channel, at most ``concurrency`` at a time."""
    gate = asyncio.Semaphore(concurrency)
    stub = app.stub()

    async def one() -> Outcome:
        async with gate:
            return await listing(app, image_id, stub=stub)

    return await asyncio.gather(*(one() for _ in range(n)))


def attempts(app: InProcessApp, outcome: str | None = None) -> int:
    """Upstream attempts the app made (its ``imageshare_upstream_requests_total``), whatever
    their outcome unless one is named; unlike the emulator's counters this includes the
    connections it refused while down."""
    labels = {} if outcome is None else {"outcome": outcome}
    return int(app.total("imageshare_upstream_requests_total", **labels))


def reads(app: InProcessApp) -> int:
    """Upstream reads the app started: listings that did not join a read under way (with the
    cache off, every listing is a miss or joins one)."""
    return int(app.metric("imageshare_cache_requests_total", result="miss"))


def retries(app: InProcessApp) -> int:
    """Retries the app made, whatever the failure before them."""
    return int(app.total("imageshare_upstream_retries_total"))


async def settled(emulator: Emulator) -> dict[str, Any]:
    """The emulator's counters once every call it took has been counted.

    It counts an answered call's outcome before writing the answer, but a reset only once
    the connection is closed, which can be just after the app has seen the reset and
    moved on.
    """
    await until(lambda: emulator.knobs.counters()["in_flight"] == 0)
    counters: dict[str, Any] = emulator.knobs.counters()
    return counters
