"""Benchmark the façade against what a user would write instead (issue 3).

Runs everything on loopback in one process run: the emulator (with 50 ms of
injected latency per call), the server as a real process, the official
Python SDK as the baseline. Prints a Markdown table with wall times, ratios
to the baseline (a) and upstream call counts. Bounded: about a minute.

    .venv/bin/python bench/facade.py [--latency-ms 50] [--accounts 2000] [--fleet 500]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alibabacloud_ecs20140526 import models as ecs_models
from alibabacloud_ecs20140526.client import Client as EcsSdkClient
from alibabacloud_tea_openapi import models as openapi_models

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_server.emulator import EmulatorAdmin
from tests.support.processes import DEMO_ENV, EmulatorProcess, ServerProcess

REGION = "cn-hangzhou"
BIG = "m-bench0002000"


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--warm-calls", type=int, default=1000)
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--fleet", type=int, default=500)
    parser.add_argument("--fleet-qps", type=int, default=20)
    args = parser.parse_args()

    rows: list[tuple[str, float, str, int, str]] = []
    emulator = EmulatorProcess()
    admin = EmulatorAdmin(emulator.url)
    expected = [f"2{i:015d}" for i in range(args.accounts)]
    admin.upsert_image(
        {"region_id": REGION, "image_id": BIG, "accounts": [{"aliyun_id": i} for i in expected]}
    )
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

        server = ServerProcess("--cache-ttl", "300", "--upstream-qps", "0", upstream=emulator.url)
        servers.append(server)
        channel = grpc.insecure_channel(server.target)
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        grpc.channel_ready_future(channel).result(timeout=10)

        # (b) the façade, cold.
        admin.reset()
        admin.set(latency_ms=args.latency_ms)
        started = time.perf_counter()
        assert list_ids(stub, BIG) == expected
        cold = time.perf_counter() - started
        rows.append(
            (
                "(b) façade, cold (parallel pages)",
                cold,
                f"{baseline / cold:.1f}x faster",
                upstream_calls(admin),
                "target >= 5x",
            )
        )

        # (c) warm: the entry is cached. A typical image (<= 50 accounts, the default
        # sharing quota) and the 2,000-account one at both message sizes.
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
        for image_id, want, page_size in (
            (typical, typical_ids, 50),
            (BIG, expected, 50),
            (BIG, expected, 100),
        ):
            latencies = []
            for _ in range(args.warm_calls):
                t0 = time.perf_counter()
                ids = list_ids(stub, image_id, page_size=page_size)
                latencies.append(time.perf_counter() - t0)
            assert ids == want
            latencies.sort()
            p50 = statistics.median(latencies)
            p99 = latencies[int(len(latencies) * 0.99) - 1]
            rows.append(
                (
                    f"(c) façade, warm, {args.warm_calls} calls, {len(want)} accounts, "
                    f"page_size {page_size}",
                    sum(latencies),
                    f"p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms",
                    0,
                    "target p99 <= 5 ms",
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
