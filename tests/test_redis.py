"""Issue 8 end to end: replicas sharing a real redis-server, against the real emulator.

Every test starts its own redis-server (tests.support.redis_server) and its
own server processes, uploads its own image, and counts upstream calls with
the emulator's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from imageshare_server.core.deadline import NO_DEADLINE, FixedDeadline
from imageshare_server.core.errors import RateLimitedError, UpstreamErrorData
from imageshare_server.core.types import Account, ShareKey, ShareList
from imageshare_server.ratelimit import UpstreamRateLimiter
from imageshare_server.redis_tier.lease import Lease, LeaseManager
from imageshare_server.redis_tier.link import RedisLink
from imageshare_server.redis_tier.ratelimit import RedisRateLimiter
from imageshare_server.redis_tier.store import decode, encode, encode_negative
from tests.support.processes import ServerProcess
from tests.support.redis_server import RedisServer
from tests.support.rpc import Request, Response, account_ids, list_all, list_error

REGION = "cn-hangzhou"
HIT = image_share_pb2.CACHE_STATUS_HIT
_ids = itertools.count(1)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path, password="redis-test-password-1")
    yield server
    server.stop()


@pytest.fixture
async def link(redis_server: RedisServer) -> AsyncIterator[RedisLink]:
    """A link to this test's own Redis, closed afterwards."""
    redis_link = RedisLink.from_url(redis_server.url)
    yield redis_link
    await redis_link.aclose()


@pytest.fixture
def replicas(
    start_server: Callable[..., ServerProcess], redis_server: RedisServer
) -> Callable[..., list[ServerProcess]]:
    def start(n: int, *args: str) -> list[ServerProcess]:
        return [start_server("--redis-url", redis_server.url, *args) for _ in range(n)]

    return start


def new_image(emulator: EmulatorAdmin, accounts: int) -> tuple[str, list[str]]:
    image_id = f"m-redis{next(_ids):04d}{int(time.time() * 1000) % 1000000}"
    ids = [f"7{i:015d}" for i in range(accounts)]
    emulator.upsert_image(
        {"region_id": REGION, "image_id": image_id, "accounts": [{"aliyun_id": i} for i in ids]}
    )
    return image_id, ids


def page_calls(emulator: EmulatorAdmin, image_id: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for row in emulator.counters()["calls_by_page"]:
        if row["image_id"] == image_id:
            out[int(row["page_number"])] = out.get(int(row["page_number"]), 0) + row["count"]
    return out


def total_calls(emulator: EmulatorAdmin) -> int:
    return int(emulator.counters()["calls_by_action"].get("DescribeImageSharePermission", 0))


def metric(process: ServerProcess, name: str) -> float:
    """Sum of every sample of ``name`` (any labels) on the process's /metrics."""
    total = 0.0
    for line in httpx.get(process.metrics_url).text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition the test cannot be notified of (an emulator counter)."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def fetch(process: ServerProcess, image_id: str, timeout: float = 10.0) -> list[Response]:
    with grpc.insecure_channel(process.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        return list_all(stub, timeout=timeout, region_id=REGION, image_id=image_id)


async def test_150_cold_callers_on_three_replicas_make_one_upstream_call_per_page(
    replicas, emulator
):
    servers = replicas(3)
    image_id, ids = new_image(emulator, 250)
    emulator.set(latency_ms=300)

    async def one(stub: image_share_pb2_grpc.ImageShareServiceStub) -> list[str]:
        call = stub.ListImageShares(Request(region_id=REGION, image_id=image_id), timeout=20)
        return [a.aliyun_id async for m in call for a in m.accounts]

    channels = [grpc.aio.insecure_channel(s.target) for s in servers]
    try:
        stubs = [image_share_pb2_grpc.ImageShareServiceStub(c) for c in channels]
        results = await asyncio.gather(*(one(stubs[i % 3]) for i in range(150)))
    finally:
        for channel in channels:
            await channel.close()
    assert all(r == ids for r in results)
    # 250 accounts at PageSize 100: three pages, each read once by the whole deployment.
    assert page_calls(emulator, image_id) == {1: 1, 2: 1, 3: 1}
    # The two replicas that did not read got the list through Redis.
    waits = sum(metric(s, "imageshare_redis_lease_waits_total") for s in servers)
    hits = sum(metric(s, 'imageshare_redis_cache_requests_total{result="hit"}') for s in servers)
    assert waits + hits >= 2


def test_a_replica_that_never_saw_an_image_serves_it_from_redis(replicas, emulator):
    first, second = replicas(2)
    image_id, ids = new_image(emulator, 130)
    assert account_ids(fetch(first, image_id)) == ids
    assert page_calls(emulator, image_id) == {1: 1, 2: 1}
    messages = fetch(second, image_id)
    assert account_ids(messages) == ids
    assert {m.cache_status for m in messages} == {HIT}
    assert page_calls(emulator, image_id) == {1: 1, 2: 1}
    assert metric(second, 'imageshare_redis_cache_requests_total{result="hit"}') == 1


async def test_lease_holder_killed_mid_read_another_replica_completes(replicas, emulator):
    holder, other = replicas(2, "--redis-lease-ttl", "1")
    image_id, ids = new_image(emulator, 40)
    emulator.set(latency_ms=1500)

    async def race() -> list[str]:
        async with (
            grpc.aio.insecure_channel(holder.target) as a,
            grpc.aio.insecure_channel(other.target) as b,
        ):
            request = Request(region_id=REGION, image_id=image_id)
            doomed = asyncio.ensure_future(
                _collect(image_share_pb2_grpc.ImageShareServiceStub(a), request)
            )
            await asyncio.to_thread(wait_until, lambda: page_calls(emulator, image_id) == {1: 1})
            survivor = asyncio.ensure_future(
                _collect(image_share_pb2_grpc.ImageShareServiceStub(b), request)
            )
            # The other replica is now waiting on the holder's lease (or will find it held).
            holder.signal(signal.SIGKILL)
            with pytest.raises(grpc.aio.AioRpcError):
                await doomed
            return await survivor

    assert await race() == ids
    # The dead holder's read and the take-over: page 1 was read twice, not three times.
    assert page_calls(emulator, image_id) == {1: 2}
    assert holder.proc.wait(5) == -signal.SIGKILL
    assert metric(other, 'imageshare_redis_lease_waits_total{outcome="takeover"}') == 1


async def _collect(stub: image_share_pb2_grpc.ImageShareServiceStub, request: Request) -> list[str]:
    call = stub.ListImageShares(request, timeout=15)
    return [a.aliyun_id async for m in call for a in m.accounts]


def test_every_replica_keeps_serving_without_redis_and_shares_again_when_it_returns(
    replicas, redis_server, emulator
):
    servers = replicas(3, "--redis-timeout", "0.2")
    redis_server.stop()
    for process in servers:
        image_id, ids = new_image(emulator, 20)
        started = time.monotonic()
        assert account_ids(fetch(process, image_id, timeout=5)) == ids
        assert time.monotonic() - started < 2.0
    for process in servers:
        down = process.wait_for("redis_down", timeout=10)
        assert "redis-test-password-1" not in process.log_text
        assert down["redis"] == f"redis://127.0.0.1:{redis_server.port}/0"
        assert metric(process, "imageshare_redis_up") == 0
        assert metric(process, "imageshare_redis_errors_total") >= 1

    redis_server.start()
    for process in servers:
        process.wait_for("redis_up", timeout=10)
        assert metric(process, "imageshare_redis_up") == 1
    image_id, ids = new_image(emulator, 20)
    assert account_ids(fetch(servers[0], image_id)) == ids
    assert account_ids(fetch(servers[1], image_id)) == ids
    assert page_calls(emulator, image_id) == {1: 1}


async def test_shared_limit_keeps_three_replicas_within_ten_percent_of_upstream_qps(
    replicas, emulator
):
    qps = 20
    servers = replicas(3, "--cache-ttl", "0", "--upstream-qps", str(qps), "--upstream-burst", "1")
    window = 3.0

    async def load(stop: float) -> None:
        channels = [grpc.aio.insecure_channel(s.target) for s in servers]
        stubs = [image_share_pb2_grpc.ImageShareServiceStub(c) for c in channels]

        async def loop(stub: image_share_pb2_grpc.ImageShareServiceStub) -> None:
            request = Request(region_id=REGION, image_id="m-demo0000002")
            while time.monotonic() < stop:
                # A refusal by the limiter is fine; the upstream count is what matters.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await _collect(stub, request)

        try:
            await asyncio.gather(*(loop(stubs[i % 3]) for i in range(30)))
        finally:
            for channel in channels:
                await channel.close()

    async def measure() -> int:
        task = asyncio.ensure_future(load(time.monotonic() + window + 2.0))
        await asyncio.sleep(1.0)  # let every replica reach the steady state
        before = await asyncio.to_thread(total_calls, emulator)
        await asyncio.sleep(window)
        after = await asyncio.to_thread(total_calls, emulator)
        await task
        return after - before

    calls = await measure()
    expected = qps * window
    assert abs(calls - expected) <= 0.1 * expected, calls


def test_not_found_is_shared_briefly_too(replicas, emulator):
    first, second = replicas(2)
    for process in (first, second):
        with grpc.insecure_channel(process.target) as channel:
            stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
            assert list_error(stub, region_id=REGION, image_id="m-redisgone01").code == (
                grpc.StatusCode.NOT_FOUND
            )
    assert page_calls(emulator, "m-redisgone01") == {1: 1}


def test_a_hung_redis_costs_a_timeout_not_an_outage(replicas, redis_server, emulator):
    """SIGSTOP keeps the socket open but silent: the slow case, not the refused one."""
    (process,) = replicas(1, "--redis-timeout", "0.2")
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        image_id, ids = new_image(emulator, 20)
        started = time.monotonic()
        assert account_ids(fetch(process, image_id, timeout=5)) == ids
        assert time.monotonic() - started < 1.5
        process.wait_for("redis_down", timeout=10)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    process.wait_for("redis_up", timeout=10)


def test_shared_list_round_trips_through_its_stored_form():
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


async def test_a_cancel_that_meets_a_finishing_redis_call_is_not_lost(link):
    """asyncio.wait_for on 3.11 returns the result and drops the cancel: a lease renewer
    cancelled that way renewed forever, and its read hung until the caller's deadline."""
    loop = asyncio.get_running_loop()
    reply: asyncio.Future[int] = loop.create_future()
    after_call: list[str] = []

    async def renewer() -> None:
        await link.call("lease_renew", lambda r: reply)
        after_call.append("ran on")
        await asyncio.sleep(0)

    task = loop.create_task(renewer())
    await asyncio.sleep(0.01)
    reply.set_result(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert after_call == []


async def test_a_lease_renewer_that_misses_its_cancel_still_stops(link):
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


async def test_a_lease_is_released_only_by_its_holder(link):
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


async def test_redis_gcra_spaces_calls_and_refuses_past_the_deadline(link):
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


def test_replicas_share_through_redis_over_tls_with_a_password(tmp_path, start_server, emulator):
    redis_tls = RedisServer(tmp_path, password="redis-tls-password-1", tls=_self_signed(tmp_path))
    try:
        assert redis_tls.url.startswith("rediss://")
        first, second = (start_server("--redis-url", redis_tls.url) for _ in range(2))
        image_id, ids = new_image(emulator, 30)
        assert account_ids(fetch(first, image_id)) == ids
        messages = fetch(second, image_id)
        assert account_ids(messages) == ids
        assert {m.cache_status for m in messages} == {HIT}
        assert page_calls(emulator, image_id) == {1: 1}
        assert metric(second, "imageshare_redis_up") == 1
        assert "redis-tls-password-1" not in first.log_text + second.log_text
    finally:
        redis_tls.stop()
