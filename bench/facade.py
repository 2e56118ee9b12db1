"""Benchmark the façade against what a user would write instead: the official SDK.

Runs everything on loopback in one process run: the emulator (with 50 ms of
injected latency per call), the server as a real process, the official
Python SDK as the baseline. Prints a Markdown table with wall times, ratios
to the baseline (a) and upstream call counts. Bounded: about a minute.

    .venv/bin/python bench/facade.py [--latency-ms 50] [--accounts 2000] [--cold-reads 7]
        [--fleet 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alibabacloud_ecs20140526 import models as ecs_models
from alibabacloud_ecs20140526.client import Client as EcsSdkClient
from alibabacloud_tea_openapi import models as openapi_models
from floor_server import capture, write_messages

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from imageshare_server.config import Settings
from tests.support.processes import DEMO_ENV, EmulatorProcess, Process, ServerProcess, base_env

HERE = Path(__file__).resolve().parent
REGION = "cn-hangzhou"
BIG = "m-bench0002000"
Row = tuple[str, float, str, int, str]
# How long the server's default rate limit takes to refill its burst (and a fifth more):
# each cold read of (b) then starts with the whole burst, as the first one did.
BURST_REFILL_SECONDS = 1.2 * Settings().upstream_burst / Settings().upstream_qps


def sdk_client(url: str) -> EcsSdkClient:
    config = openapi_models.Config(
        access_key_id=DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_ID"],
        access_key_secret=DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"],
        endpoint=url.removeprefix("http://"),
        protocol="http",
        region_id=REGION,
    )
    return EcsSdkClient(config)


def sdk_list_all(client: EcsSdkClient, image_id: str) -> list[str]:
    """What a careful user writes: page sequentially at PageSize 100 until TotalCount."""
    ids: list[str] = []
    page = 1
    while True:
        response = client.describe_image_share_permission(
            ecs_models.DescribeImageSharePermissionRequest(
                region_id=REGION, image_id=image_id, page_number=page, page_size=100
            )
        )
        body = response.body
        ids.extend(str(a.aliyun_id) for a in body.accounts.account)
        if len(ids) >= body.total_count or not body.accounts.account:
            return ids
        page += 1


def upstream_calls(admin: EmulatorAdmin) -> int:
    return int(admin.counters()["calls_by_action"].get("DescribeImageSharePermission", 0))


def list_ids(
    stub: image_share_pb2_grpc.ImageShareServiceStub, image_id: str, **kw: object
) -> list[str]:
    request = image_share_pb2.ListImageSharesRequest(region_id=REGION, image_id=image_id, **kw)  # type: ignore[arg-type]
    return [a.aliyun_id for m in stub.ListImageShares(request, timeout=60) for a in m.accounts]


def cpu_split(pin: bool) -> tuple[set[int], set[int]] | None:
    """Servers on the first CPU, the caller on the others; None when there are not two."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a running process (new threads inherit from their creator)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:
            continue


def run_caller(
    targets: dict[str, str],
    *,
    image_id: str,
    page_size: int,
    expect: int,
    calls: int,
    cpus: set[int] | None,
    spin_thread: bool,
) -> dict[str, list[float]]:
    argv = [
        sys.executable,
        str(HERE / "warm_caller.py"),
        *("--image", image_id, "--page-size", str(page_size), "--expect", str(expect)),
        *("--calls", str(calls)),
    ]
    for name, target in targets.items():
        argv += ["--target", f"{name}={target}"]
    if cpus:
        argv += ["--cpus", ",".join(str(c) for c in sorted(cpus))]
    if spin_thread:
        argv.append("--spin-thread")
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=900)
    latencies: dict[str, list[float]] = json.loads(done.stdout)
    return latencies


def percentiles(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]


def warm_rows(
    server: ServerProcess,
    channel: grpc.Channel,
    listings: list[tuple[str, int, int]],
    *,
    calls: int,
    pin: bool,
) -> list[Row]:
    """(c): warm latency of each listing, next to a bare grpc.aio server sending the same bytes.

    The 2,000-account listing at the default page size is measured three times:
    first with the caller and the servers sharing every CPU, then (like every
    listing) with the caller on CPUs of its own, when there are two or more,
    and once more there with grpc's default client threading (a channel thread
    hands each message over) instead of what imageshare_client sets.
    """
    split = cpu_split(pin)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        floors: dict[tuple[str, int], Process] = {}
        try:
            for image_id, _, page_size in listings:
                path = Path(tmp) / f"{image_id}-{page_size}.bin"
                request = image_share_pb2.ListImageSharesRequest(
                    region_id=REGION, image_id=image_id, page_size=page_size
                )
                write_messages(path, capture(channel, request))
                floors[image_id, page_size] = Process(
                    [sys.executable, str(HERE / "floor_server.py"), str(path)],
                    base_env(),
                    "serving",
                )
            Plan = tuple[tuple[str, int, int], tuple[set[int], set[int]] | None, bool]
            plan: list[Plan] = [(listings[1], None, False)] if split else []
            plan += [(listing, split, False) for listing in listings]
            plan.insert(-1, (listings[1], split, True))
            for (image_id, expect, page_size), cpus, spin_thread in plan:
                floor = floors[image_id, page_size]
                if cpus:
                    pin_process(server.proc.pid, cpus[0])
                    pin_process(floor.proc.pid, cpus[0])
                latencies = run_caller(
                    {"facade": server.target, "floor": f"127.0.0.1:{floor.ready['grpc_port']}"},
                    image_id=image_id,
                    page_size=page_size,
                    expect=expect,
                    calls=calls,
                    cpus=cpus[1] if cpus else None,
                    spin_thread=spin_thread,
                )
                p50, p99 = percentiles(latencies["facade"])
                f50, f99 = percentiles(latencies["floor"])
                messages = -(-expect // page_size)
                where = (
                    f"caller on CPU {','.join(map(str, sorted(cpus[1])))}, servers on the rest"
                    if cpus
                    else "caller and servers share the CPUs"
                )
                if spin_thread:
                    where += "; caller with grpc's default threading"
                rows.append(
                    (
                        f"(c) façade, warm, {calls} calls, {expect} accounts, page_size "
                        f"{page_size} ({messages} messages); {where}",
                        sum(latencies["facade"]),
                        f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms",
                        0,
                        f"floor (bare grpc.aio, same bytes): p50 {f50 * 1000:.2f} ms, "
                        f"p99 {f99 * 1000:.2f} ms; façade p99 = {p99 / f99:.2f}x floor; "
                        "target p99 <= 5 ms",
                    )
                )
        finally:
            for floor in floors.values():
                floor.stop()
    return rows


def cold_images(count: int) -> list[str]:
    """The 2,000-account images (b) reads cold after ``BIG``, one per read."""
    return [f"{BIG}c{k}" for k in range(count)]


def cold_row(
    stub: image_share_pb2_grpc.ImageShareServiceStub,
    admin: EmulatorAdmin,
    baseline: float,
    expected: list[str],
    args: argparse.Namespace,
) -> Row:
    """(b) the façade, cold: the first read of a process, then the median of cold reads
    of other 2,000-account images on the running server, each with the rate limit's
    burst refilled (a service that has run a while, its pooled connections reused)."""
    admin.reset()
    admin.set(latency_ms=args.latency_ms)
    started = time.perf_counter()
    assert list_ids(stub, BIG) == expected
    first = time.perf_counter() - started
    colds: list[float] = []
    for image_id in cold_images(args.cold_reads):
        time.sleep(BURST_REFILL_SECONDS)
        started = time.perf_counter()
        assert list_ids(stub, image_id) == expected
        colds.append(time.perf_counter() - started)
    cold = statistics.median(colds)
    per_read = upstream_calls(admin) // (args.cold_reads + 1)
    return (
        f"(b) façade, cold, default settings (page 1, then the rest at once): "
        f"median of {args.cold_reads} reads",
        cold,
        f"{baseline / cold:.1f}x faster",
        per_read,
        f"target >= 8x; reads {min(colds) * 1000:.0f} to {max(colds) * 1000:.0f} ms; "
        f"the process's first read {first * 1000:.0f} ms ({baseline / first:.1f}x)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--warm-calls", type=int, default=1000)
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="(c): do not give the servers and the caller separate CPUs",
    )
    parser.add_argument("--cold-reads", type=int, default=7)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--fleet", type=int, default=500)
    parser.add_argument("--fleet-qps", type=int, default=20)
    args = parser.parse_args()

    rows: list[Row] = []
    emulator = EmulatorProcess()
    admin = EmulatorAdmin(emulator.url)
    expected = [f"2{i:015d}" for i in range(args.accounts)]
    accounts = [{"aliyun_id": i} for i in expected]
    for image_id in (BIG, *cold_images(args.cold_reads)):
        admin.upsert_image({"region_id": REGION, "image_id": image_id, "accounts": accounts})
    pages = -(-args.accounts // 100)
    servers: list[ServerProcess] = []
    try:
        admin.set(latency_ms=args.latency_ms)
        # (a) the official SDK, sequential pages.
        client = sdk_client(emulator.url)
        admin.reset()
        admin.set(latency_ms=args.latency_ms)
        started = time.perf_counter()
        assert sdk_list_all(client, BIG) == expected
        baseline = time.perf_counter() - started
        rows.append(
            (
                "(a) official SDK, sequential PageSize 100",
                baseline,
                "1.00x",
                upstream_calls(admin),
                "",
            )
        )

        # Default settings (rate limit included) but a cache long enough for (c).
        server = ServerProcess("--cache-ttl", "300", upstream=emulator.url)
        servers.append(server)
        channel = grpc.insecure_channel(server.target)
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=10)

        rows.append(cold_row(stub, admin, baseline, expected, args))
        # (c) warm: the entry is cached. A typical image (<= 50 accounts, the default
        # sharing quota) and the 2,000-account one at both message sizes, each next to
        # the floor: a bare grpc.aio server streaming the same bytes (floor_server.py).
        typical = "m-bench0000050"
        typical_ids = [f"4{i:015d}" for i in range(50)]
        admin.upsert_image(
            {
                "region_id": REGION,
                "image_id": typical,
                "accounts": [{"aliyun_id": i} for i in typical_ids],
            }
        )
        assert list_ids(stub, typical) == typical_ids
        rows.extend(
            warm_rows(
                server,
                channel,
                [(typical, 50, 50), (BIG, len(expected), 50), (BIG, len(expected), 100)],
                calls=args.warm_calls,
                pin=not args.no_pin,
            )
        )
        channel.close()

        # (d) concurrent identical cold callers on a fresh server.
        fresh = ServerProcess("--cache-ttl", "300", "--upstream-qps", "0", upstream=emulator.url)
        servers.append(fresh)
        admin.reset()
        admin.set(latency_ms=args.latency_ms)

        async def concurrent() -> float:
            async with grpc.aio.insecure_channel(fresh.target) as aio_channel:
                await aio_channel.channel_ready()
                aio_stub = image_share_pb2_grpc.ImageShareServiceStub(aio_channel)
                request = image_share_pb2.ListImageSharesRequest(region_id=REGION, image_id=BIG)

                async def one() -> list[str]:
                    return [
                        a.aliyun_id
                        async for m in aio_stub.ListImageShares(request, timeout=60)
                        for a in m.accounts
                    ]

                t0 = time.perf_counter()
                results = await asyncio.gather(*(one() for _ in range(args.concurrent)))
                elapsed = time.perf_counter() - t0
                assert all(r == expected for r in results)
                return elapsed

        elapsed = asyncio.run(concurrent())
        calls = upstream_calls(admin)
        rows.append(
            (
                f"(d) {args.concurrent} concurrent identical cold callers",
                elapsed,
                f"{calls} calls for {pages} pages",
                calls,
                "target: calls == pages" + (" (met)" if calls == pages else " (MISSED)"),
            )
        )

        # (e) fleet audit under an upstream QPS limit.
        images = [f"m-fleet{i:05d}" for i in range(args.fleet)]
        for i, image_id in enumerate(images):
            admin.upsert_image(
                {
                    "region_id": REGION,
                    "image_id": image_id,
                    "accounts": [{"aliyun_id": f"3{i:07d}{j:04d}"} for j in range(1 + i % 50)],
                }
            )
        floor = args.fleet / args.fleet_qps
        admin.reset()
        admin.set(latency_ms=args.latency_ms, qps_limit=args.fleet_qps)
        errors = 0
        lock = threading.Lock()

        def sdk_one(image_id: str) -> None:
            nonlocal errors
            try:
                sdk_list_all(client, image_id)
            except Exception:
                with lock:
                    errors += 1

        t0 = time.perf_counter()
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(sdk_one, images))
        sdk_time = time.perf_counter() - t0
        counters = admin.counters()
        rows.append(
            (
                f"(e1) fleet audit, official SDK, 20 threads, {args.fleet} images",
                sdk_time,
                f"{sdk_time / floor:.2f}x floor; {errors} failed listings",
                upstream_calls(admin),
                f"Throttling.User answers: {counters['outcomes'].get('Throttling.User', 0)}",
            )
        )

        audit = ServerProcess(
            "--cache-ttl",
            "0",
            "--upstream-qps",
            str(args.fleet_qps),
            "--upstream-burst",
            "1",
            upstream=emulator.url,
        )
        servers.append(audit)
        admin.reset()
        admin.set(latency_ms=args.latency_ms, qps_limit=args.fleet_qps)

        async def fleet() -> tuple[float, int]:
            async with grpc.aio.insecure_channel(audit.target) as aio_channel:
                aio_stub = image_share_pb2_grpc.ImageShareServiceStub(aio_channel)
                failed = 0

                async def one(image_id: str) -> None:
                    nonlocal failed
                    request = image_share_pb2.ListImageSharesRequest(
                        region_id=REGION, image_id=image_id
                    )
                    try:
                        _ = [m async for m in aio_stub.ListImageShares(request, timeout=120)]
                    except grpc.aio.AioRpcError:
                        failed += 1

                t0 = time.perf_counter()
                await asyncio.gather(*(one(i) for i in images))
                return time.perf_counter() - t0, failed

        fleet_time, failed = asyncio.run(fleet())
        counters = admin.counters()
        throttled = counters["outcomes"].get("Throttling.User", 0)
        rows.append(
            (
                f"(e2) fleet audit, façade --upstream-qps {args.fleet_qps}, "
                f"{args.fleet} concurrent callers",
                fleet_time,
                f"{fleet_time / floor:.2f}x the {floor:.0f} s floor; {failed} failed calls",
                upstream_calls(admin),
                f"Throttling.User answers: {throttled}; target within 1.10x and 0",
            )
        )
    finally:
        for process in servers:
            process.stop()
        emulator.stop()

    print(
        f"\nEmulator latency {args.latency_ms:.0f} ms per call; "
        f"image of {args.accounts} accounts ({pages} pages of 100).\n"
    )
    print("| scenario | wall time (s) | result | upstream calls | note |")
    print("|---|---|---|---|---|")
    for name, seconds, result, calls, note in rows:
        print(f"| {name} | {seconds:.3f} | {result} | {calls} | {note} |")


if __name__ == "__main__":
    main()
