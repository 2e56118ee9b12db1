"""End to end: replicas sharing a real redis-server, against the emulator.

Every test starts its own redis-server (tests.support.redis_server) on a free
port and uploads its own image; upstream calls are counted by the emulator.
The replicas run in this process (tests.support.inprocess: each has its own
registry, cache, single-flight and rate limiter, so only Redis can make them
share anything) against the in-process emulator. Redis outages are real:
the redis-server process is stopped, restarted or frozen with SIGSTOP. One
replica stays a process of its own: the lease holder killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import Emulator
from imageshare_server.core.deadline import NO_DEADLINE, FixedDeadline
from imageshare_server.core.errors import RateLimitedError, UpstreamErrorData
from imageshare_server.core.types import Account, ShareKey, ShareList
from imageshare_server.observability.logging import JsonFormatter
from imageshare_server.ratelimit import UpstreamRateLimiter
from imageshare_server.redis_tier.lease import Lease, LeaseManager
from imageshare_server.redis_tier.link import RedisLink
from imageshare_server.redis_tier.ratelimit import RedisRateLimiter
from imageshare_server.redis_tier.store import decode, encode, encode_negative
from tests.support.images import new_image
from tests.support.inprocess import InProcessApp, Request, running
from tests.support.processes import ServerProcess
from tests.support.redis_server import RedisServer
from tests.support.rpc import account_ids
from tests.support.waiting import until

if TYPE_CHECKING:
    # Only in the stubs: what ImageShareServiceStub(an aio channel) is.
    from imageshare.v1.image_share_pb2_grpc import ImageShareServiceAsyncStub as Stub

REGION = "cn-hangzhou"
HIT = image_share_pb2.CACHE_STATUS_HIT
PASSWORD = "redis-test-password-1"
# The replicas and their callers share this process's event loop, so a busy loop's delays
# count against every Redis operation's timeout (0.25 s by default). Where sharing is the
# subject, not a slow Redis, a generous timeout keeps a loaded machine from turning a slow
# reply into a fallback; the outage tests set their own short one.
SHARING = ("--redis-timeout", "2")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password=PASSWORD)
    yield server
    server.stop()


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    """A link to this test's own Redis, closed afterwards."""
    redis_link = RedisLink.from_url(redis_server.url)
    yield redis_link
    await redis_link.aclose()


@contextlib.asynccontextmanager
async def replicas(
    ecs: Emulator, url: str, n: int, *flags: str
) -> AsyncIterator[list[InProcessApp]]:
    """``n`` replicas in this process sharing the Redis at ``url``; stopped afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running(ecs, "--redis-url", url, *flags))
            for _ in range(n)
        ]


def page_calls(ecs: Emulator, image_id: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for row in ecs.knobs.counters()["calls_by_page"]:
        if row["image_id"] == image_id:
            out[int(row["page_number"])] = out.get(int(row["page_number"]), 0) + row["count"]
    return out


def events(app: InProcessApp, event: str) -> list[logging.LogRecord]:
    """Records logged with ``event``, by any app running in this process while ``app`` ran."""
    return [r for r in app.logs.records if getattr(r, "event", None) == event]


def log_text(app: InProcessApp) -> str:
    """The records as the process would write them: JSON lines, redacted."""
    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in app.logs.records)


def raw_fields(app: InProcessApp) -> str:
    """Each record's message and ``extra`` fields before redaction."""
    return "\n".join(f"{r.getMessage()} {r.__dict__}" for r in app.logs.records)


async def fetch(app: InProcessApp, image_id: str, rpc_timeout: float = 10.0) -> list[str]:
    messages = await app.list(rpc_timeout=rpc_timeout, region_id=REGION, image_id=image_id)
    return account_ids(messages)


def stub_on(channel: grpc.aio.Channel) -> Stub:
    return image_share_pb2_grpc.ImageShareServiceStub(channel)


async def _collect(stub: Stub, request: Request, rpc_timeout: float = 15) -> list[str]:
    call = stub.ListImageShares(request, timeout=rpc_timeout)
    return [a.aliyun_id async for m in call for a in m.accounts]


@pytest.mark.redis
async def test_150_cold_callers_on_three_replicas_make_one_upstream_call_per_page(
    ecs: Emulator, redis_server: RedisServer
) -> None:
    image_id, ids = new_image(ecs.knobs, 250)
    ecs.knobs.set(latency_ms=300)
    async with replicas(ecs, redis_server.url, 3, *SHARING) as apps:
        stubs = [stub_on(app.channel()) for app in apps]
        request = Request(region_id=REGION, image_id=image_id)
        results = await asyncio.gather(*(_collect(stubs[i % 3], request, 20) for i in range(150)))
        assert all(r == ids for r in results)
        # 250 accounts at PageSize 100: three pages, each read once by the whole deployment.
        assert page_calls(ecs, image_id) == {1: 1, 2: 1, 3: 1}
        # The two replicas that did not read got the list through Redis.
        waits = sum(app.total("imageshare_redis_lease_waits_total") for app in apps)
        hits = sum(
            app.metric("imageshare_redis_cache_requests_total", result="hit") for app in apps
        )
        assert waits + hits >= 2


@pytest.mark.redis
async def test_a_replica_that_never_saw_an_image_serves_it_from_redis(
    ecs: Emulator, redis_server: RedisServer
) -> None:
    async with replicas(ecs, redis_server.url, 2, *SHARING) as (first, second):
        image_id, ids = new_image(ecs.knobs, 130)
        assert await fetch(first, image_id) == ids
        assert page_calls(ecs, image_id) == {1: 1, 2: 1}
        messages = await second.list(region_id=REGION, image_id=image_id)
        assert account_ids(messages) == ids
        assert {m.cache_status for m in messages} == {HIT}
        assert page_calls(ecs, image_id) == {1: 1, 2: 1}
        assert second.metric("imageshare_redis_cache_requests_total", result="hit") == 1


@pytest.mark.subprocess
@pytest.mark.redis
async def test_lease_holder_killed_mid_read_another_replica_completes(
    ecs: Emulator, redis_server: RedisServer
) -> None:
    """The lease holder is a server process of its own: SIGKILL ends it mid-read with no
    ``finally``, no lease release and no goodbye to Redis, which a replica in this process
    cannot imitate. The replica that takes over runs in this process."""
    flags = ("--redis-url", redis_server.url, "--redis-lease-ttl", "1", *SHARING)
    holder = await asyncio.to_thread(ServerProcess, *flags, upstream=ecs.url)
    try:
        async with running(ecs, *flags) as other:
            image_id, ids = new_image(ecs.knobs, 40)
            ecs.knobs.set(latency_ms=1500)
            request = Request(region_id=REGION, image_id=image_id)
            async with grpc.aio.insecure_channel(holder.target) as channel:
                doomed = asyncio.ensure_future(_collect(stub_on(channel), request))
                await until(lambda: page_calls(ecs, image_id) == {1: 1})
                survivor = asyncio.ensure_future(_collect(stub_on(other.channel()), request))
                # The other replica is now waiting on the holder's lease (or will find it held).
                holder.signal(signal.SIGKILL)
                with pytest.raises(grpc.aio.AioRpcError):
                    await doomed
                assert await survivor == ids
            # The dead holder's read and the take-over: page 1 was read twice, not three times.
            assert page_calls(ecs, image_id) == {1: 2}
            assert await asyncio.to_thread(holder.proc.wait, 5) == -signal.SIGKILL
            assert other.metric("imageshare_redis_lease_waits_total", outcome="takeover") == 1
    finally:
        await asyncio.to_thread(holder.stop)


@pytest.mark.redis
async def test_every_replica_keeps_serving_without_redis_and_shares_again_when_it_returns(
    ecs: Emulator, redis_server: RedisServer
) -> None:
    """Redis really goes away and comes back: its process is stopped and started again on
    the same port (connections refused, then a fresh, empty server)."""
    async with replicas(ecs, redis_server.url, 3, "--redis-timeout", "0.2") as apps:
        await asyncio.to_thread(redis_server.stop)
        for app in apps:
            image_id, ids = new_image(ecs.knobs, 20)
            started = time.monotonic()
            assert await fetch(app, image_id, rpc_timeout=5) == ids
            assert time.monotonic() - started < 2.0
        await until(lambda: all(app.metric("imageshare_redis_up") == 0 for app in apps))
        # Each replica said so once, naming Redis without its password.
        down = events(apps[0], "redis_down")
        assert len(down) == 3
        assert {getattr(r, "redis", None) for r in down} == {
            f"redis://127.0.0.1:{redis_server.port}/0"
        }
        for app in apps:
            assert app.total("imageshare_redis_errors_total") >= 1
        assert PASSWORD not in raw_fields(apps[0])
        assert PASSWORD not in log_text(apps[0])

        await asyncio.to_thread(redis_server.start)
        await until(lambda: all(app.metric("imageshare_redis_up") == 1 for app in apps))
        assert len(events(apps[0], "redis_up")) == 3
        image_id, ids = new_image(ecs.knobs, 20)
        assert await fetch(apps[0], image_id) == ids
        assert await fetch(apps[1], image_id) == ids
        assert page_calls(ecs, image_id) == {1: 1}


@pytest.mark.redis
async def test_shared_limit_keeps_three_replicas_within_ten_percent_of_upstream_qps(
    ecs: Emulator, redis_server: RedisServer
) -> None:
    """The measurement window is wall-clock time on purpose: it measures a rate.

    Each caller asks for an image of its own, so reads are not coalesced (in a replica or
    through a lease) and 30 are always waiting for the limiter: the rate is the limit's.
    """
    qps, window = 20, 3.0
    flags = ("--cache-ttl", "0", "--upstream-qps", str(qps), "--upstream-burst", "1", *SHARING)
    images = [new_image(ecs.knobs, 2)[0] for _ in range(30)]
    async with replicas(ecs, redis_server.url, 3, *flags) as apps:
        stubs = [stub_on(app.channel()) for app in apps]

        async def loop(stub: Stub, image_id: str) -> None:
            request = Request(region_id=REGION, image_id=image_id)
            while True:
                # A refusal by the limiter is fine; the upstream count is what matters.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await _collect(stub, request)

        load = asyncio.gather(*(loop(stubs[i % 3], image) for i, image in enumerate(images)))
        try:
            # Steady state: every replica is reading upstream under the shared limit.
            await until(
                lambda: all(app.total("imageshare_upstream_requests_total") >= 2 for app in apps)
            )
            before = ecs.knobs.counters()["calls_by_action"]["DescribeImageSharePermission"]
            await asyncio.sleep(window)
            after = ecs.knobs.counters()["calls_by_action"]["DescribeImageSharePermission"]
        finally:
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
    calls = after - before
    expected = qps * window
    assert abs(calls - expected) <= 0.1 * expected, calls


@pytest.mark.redis
async def test_not_found_is_shared_briefly_too(ecs: Emulator, redis_server: RedisServer) -> None:
    async with replicas(ecs, redis_server.url, 2, *SHARING) as apps:
        for app in apps:
            error = await app.error(region_id=REGION, image_id="m-redisgone01")
            assert error.code is grpc.StatusCode.NOT_FOUND
    assert page_calls(ecs, "m-redisgone01") == {1: 1}


@pytest.mark.redis
async def test_a_hung_redis_costs_a_timeout_not_an_outage(
    ecs: Emulator, redis_server: RedisServer
) -> None:
    """SIGSTOP keeps the socket open but silent: the slow case, not the refused one."""
    async with replicas(ecs, redis_server.url, 1, "--redis-timeout", "0.2") as (app,):
        redis_server.pause()
        try:
            image_id, ids = new_image(ecs.knobs, 20)
            started = time.monotonic()
            assert await fetch(app, image_id, rpc_timeout=5) == ids
            assert time.monotonic() - started < 1.5
            await until(lambda: app.metric("imageshare_redis_up") == 0)
            assert len(events(app, "redis_down")) == 1
        finally:
            redis_server.resume()
        await until(lambda: app.metric("imageshare_redis_up") == 1)
        assert len(events(app, "redis_up")) == 1


def test_shared_list_round_trips_through_its_stored_form() -> None:
    shared = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    shares = ShareList(
        key=ShareKey(REGION, "m-x1", "owner@example.com"),
        accounts=(Account("0012", shared), Account("1557809237701234567")),
        share_groups=("all",),
        request_ids=("R-1", "R-2"),
        read_time=time.time() - 30,
        read_monotonic=0.0,
    )
    back = decode(shares.key, encode(shares))
    assert isinstance(back, ShareList)
    assert back.accounts == shares.accounts
    assert (back.share_groups, back.request_ids, back.read_time) == (
        shares.share_groups,
        shares.request_ids,
        shares.read_time,
    )
    # The age carries over to this process's monotonic clock.
    assert 29 < time.monotonic() - back.read_monotonic < 31
    error = decode(
        shares.key,
        encode_negative(
            UpstreamErrorData("InvalidImageId.NotFound", "gone", 404, "R-3"), time.time()
        ),
    )
    assert error == UpstreamErrorData("InvalidImageId.NotFound", "gone", 404, "R-3")


@pytest.mark.redis
async def test_a_cancel_that_meets_a_finishing_redis_call_is_not_lost(link: RedisLink) -> None:
    """asyncio.wait_for on 3.11 returns the result and drops the cancel: a lease renewer
    cancelled that way renewed forever, and its read hung until the caller's deadline."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[int] = loop.create_future()
    waiting = asyncio.Event()
    after_call: list[str] = []

    def operation(client: object) -> asyncio.Future[int]:
        waiting.set()  # the renewer awaits the reply as soon as this returns
        return reply

    async def renewer() -> None:
        await link.call("lease_renew", operation)
        after_call.append("ran on")
        await asyncio.sleep(0)

    task = loop.create_task(renewer())
    await waiting.wait()
    reply.set_result(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after_call == []


@pytest.mark.redis
async def test_a_lease_renewer_that_misses_its_cancel_still_stops(link: RedisLink) -> None:
    """A renew that swallows the cancel (as wait_for inside redis-py can on 3.11) must not
    keep the lease, and the read holding it, alive until the caller's deadline."""

    class SwallowingLeases(LeaseManager):
        async def renew(self, lease: Lease) -> bool:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
            return True

    leases = SwallowingLeases(link, prefix="t:", ttl=30)
    key = ShareKey(REGION, "m-lease02")
    lease = await leases.try_acquire(key)
    assert lease is not None
    async with asyncio.timeout(5):
        async with leases.held(lease):
            await asyncio.sleep(0)
    assert await leases.try_acquire(key) is not None  # released, not renewed on


@pytest.mark.redis
async def test_a_lease_is_released_only_by_its_holder(link: RedisLink) -> None:
    leases = LeaseManager(link, prefix="t:", ttl=30)
    key = ShareKey(REGION, "m-lease01")
    mine = await leases.try_acquire(key)
    assert mine is not None
    assert await leases.try_acquire(key) is None
    # Expired (as Redis would expire it) and taken by someone else: the late holder
    # must neither delete nor renew the new lease.
    await link.client.delete(mine.name)
    theirs = await leases.try_acquire(key)
    assert theirs is not None
    await leases.release(mine)
    assert await leases.renew(mine) is False
    assert mine.lost
    assert await leases.try_acquire(key) is None
    await leases.release(theirs)
    assert await leases.try_acquire(key) is not None


@pytest.mark.redis
async def test_redis_gcra_spaces_calls_and_refuses_past_the_deadline(link: RedisLink) -> None:
    limiter = RedisRateLimiter(
        link, 10, 2, account=_account, prefix="t:", fallback=UpstreamRateLimiter(10, 2)
    )
    started = time.monotonic()
    for _ in range(4):  # two at once (the burst), then one every 100 ms
        await limiter.acquire(REGION, NO_DEADLINE)
    assert 0.17 < time.monotonic() - started < 0.5
    with pytest.raises(RateLimitedError) as refused:
        await limiter.acquire(REGION, FixedDeadline(time.monotonic() + 0.01))
    assert 0.05 < refused.value.wait <= 0.2


@pytest.mark.redis
async def test_a_replica_that_stops_with_reads_queued_gives_their_slots_back(
    ecs: Emulator, redis_server: RedisServer
) -> None:
    """Reads still waiting for the shared limit at shutdown return their slots to Redis."""
    flags = ("--upstream-qps", "1", "--upstream-burst", "1", "--max-orphan-reads", "8", *SHARING)
    async with replicas(ecs, redis_server.url, 1, *flags) as (app,):
        stub = stub_on(app.channel())
        await fetch(app, new_image(ecs.knobs, 1)[0])  # takes the only slot for a second
        calls = [
            stub.ListImageShares(Request(region_id=REGION, image_id=new_image(ecs.knobs, 1)[0]))
            for _ in range(5)
        ]
        # Each read holds a slot it sleeps towards (one to five seconds away).
        await until(lambda: app.metric("imageshare_upstream_rate_limit_wait_seconds_count") == 6)
    for call in calls:
        call.cancel()
    assert app.metric("imageshare_redis_errors_total", op="rate_limit_refund") == 0
    assert events(app, "redis_down") == []
    # Without the refunds the next slot would be five seconds away: refused at once.
    async with replicas(ecs, redis_server.url, 1, *flags) as (other,):
        assert await fetch(other, new_image(ecs.knobs, 1)[0], rpc_timeout=2) != []


async def _account() -> str:
    return "test-account"


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "redis.test")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "redis.crt", directory / "redis.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.redis
async def test_replicas_share_through_redis_over_tls_with_a_password(
    tmp_path: Path, ecs: Emulator
) -> None:
    redis_tls = RedisServer(tmp_path, password="redis-tls-password-1", tls=_self_signed(tmp_path))
    try:
        assert redis_tls.url.startswith("rediss://")
        async with replicas(ecs, redis_tls.url, 2, *SHARING) as (first, second):
            image_id, ids = new_image(ecs.knobs, 30)
            assert await fetch(first, image_id) == ids
            messages = await second.list(region_id=REGION, image_id=image_id)
            assert account_ids(messages) == ids
            assert {m.cache_status for m in messages} == {HIT}
            assert page_calls(ecs, image_id) == {1: 1}
            assert second.metric("imageshare_redis_up") == 1
            assert "redis-tls-password-1" not in raw_fields(first)
            assert "redis-tls-password-1" not in log_text(first)
    finally:
        redis_tls.stop()
