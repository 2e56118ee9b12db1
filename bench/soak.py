"""Soak: mixed listings from concurrent callers while the upstream misbehaves, bounded in time.

Starts an emulator and a server as real processes (the test harness in
``tests/support``), adds a few images of different sizes, then runs async
gRPC callers for ``--duration`` seconds while a fault schedule cycles through
latency spikes, 5xx bursts, throttling, resets and broken bodies. It samples
the server's RSS and open file descriptors (``/proc``) and its asyncio task
count (``imageshare_asyncio_tasks`` on /metrics) at the start, after warm-up
and at the end, and prints a Markdown table plus the error budget used.

    .venv/bin/python bench/soak.py --duration 150 --callers 16
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc  # noqa: E402
from imageshare_emulator import EmulatorAdmin  # noqa: E402
from tests.support.processes import EmulatorProcess, ServerProcess  # noqa: E402

REGION = "cn-hangzhou"
# (image id, accounts): one page, several pages, many pages, the demo images, a missing one.
IMAGES = [("m-soaksmall01", 3), ("m-soakmid0001", 250), ("m-soaklarge01", 1200)]
DEMO = ["m-demo0000001", "m-demo0000002", "m-demo0000003"]
MISSING = "m-soakmissing"
# Each phase lasts PHASE seconds; healthy phases in between let the server recover.
FAULTS: list[tuple[str, dict[str, object]]] = [
    ("healthy", {}),
    ("latency 200±150 ms", {"set": {"latency_ms": 200, "latency_jitter_ms": 150}}),
    ("healthy", {}),
    ("5xx at 30%", {"set": {"error_rate": 0.3}}),
    ("healthy", {}),
    ("throttle bursts", {"throttle": 20}),
    ("resets 20%", {"fault": {"mode": "reset", "rate": 0.2}}),
    ("healthy", {}),
    ("truncated+malformed 10%", {"fault": {"mode": "truncated", "rate": 0.1}}),
    ("slow body 5%", {"fault": {"mode": "slow_body", "rate": 0.05, "interval_ms": 50}}),
]
PHASE = 10.0
# What the soak promises: errors only where the upstream itself failed.
ERROR_BUDGET = 0.05


@dataclass
class Sample:
    label: str
    rss_mib: float
    fds: int
    tasks: int


def sample(server: ServerProcess, label: str) -> Sample:
    pid = server.proc.pid
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    text = httpx.get(server.metrics_url, timeout=5).text
    tasks = next(
        int(s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "imageshare_asyncio_tasks"
    )
    return Sample(label, rss_kib / 1024, fds, tasks)


def upstream_attempts(server: ServerProcess) -> int:
    text = httpx.get(server.metrics_url, timeout=5).text
    return int(
        sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "imageshare_upstream_requests_total"
        )
    )


async def caller(
    target: str, stop: float, seed: int, outcomes: Counter[str], latencies: list[float]
) -> None:
    rng = random.Random(seed)
    choices = [i for i, _ in IMAGES] * 3 + DEMO + [MISSING]
    async with grpc.aio.insecure_channel(target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        while time.monotonic() < stop:
            request = image_share_pb2.ListImageSharesRequest(
                region_id=REGION,
                image_id=rng.choice(choices),
                page_size=rng.choice([0, 1, 17, 100]),
                bypass_cache=rng.random() < 0.1,
            )
            started = time.monotonic()
            try:
                async for _ in stub.ListImageShares(request, timeout=10):
                    pass
                outcome = "OK"
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            latencies.append(time.monotonic() - started)
            # NOT_FOUND for the missing image is a correct answer, not an error.
            if request.image_id == MISSING and outcome == "NOT_FOUND":
                outcome = "OK"
            outcomes[outcome] += 1


async def fault_schedule(admin: EmulatorAdmin, stop: float) -> list[str]:
    applied = []
    for name, fault in itertools.cycle(FAULTS):
        if time.monotonic() >= stop:
            break
        await asyncio.to_thread(admin.reset)
        if "set" in fault:
            await asyncio.to_thread(admin.set, **fault["set"])  # type: ignore[arg-type]
        if "throttle" in fault:
            await asyncio.to_thread(admin.throttle_next, int(fault["throttle"]))  # type: ignore[call-overload]
        if "fault" in fault:
            await asyncio.to_thread(admin.fault, **fault["fault"])  # type: ignore[arg-type]
        applied.append(name)
        await asyncio.sleep(min(PHASE, max(0.0, stop - time.monotonic())))
    await asyncio.to_thread(admin.reset)
    return applied


async def soak(args: argparse.Namespace) -> int:
    emulator = EmulatorProcess()
    admin = EmulatorAdmin(emulator.url)
    for image_id, n in IMAGES:
        admin.upsert_image(
            {
                "region_id": REGION,
                "image_id": image_id,
                "accounts": [{"aliyun_id": str(10**15 + i)} for i in range(n)],
            }
        )
    server = ServerProcess(*args.server_args, upstream=emulator.url)
    try:
        samples = [sample(server, "start")]
        outcomes: Counter[str] = Counter()
        latencies: list[float] = []
        # Warm-up: connections, caches and lazily created objects settle before the baseline.
        warm = time.monotonic() + min(10.0, args.duration / 10)
        await asyncio.gather(*(caller(server.target, warm, i, Counter(), []) for i in range(4)))
        samples.append(sample(server, "after warm-up"))
        started = time.monotonic()
        stop = started + args.duration
        callers = (
            caller(server.target, stop, 100 + i, outcomes, latencies) for i in range(args.callers)
        )
        phases, *_ = await asyncio.gather(fault_schedule(admin, stop), *callers)
        assert isinstance(phases, list)
        elapsed = time.monotonic() - started
        # Let in-flight work and idle connections wind down before the last sample.
        await asyncio.sleep(2)
        samples.append(sample(server, "end"))
        upstream = upstream_attempts(server)
    finally:
        code = server.stop()
        emulator.stop()

    total = sum(outcomes.values())
    errors = total - outcomes["OK"]
    used = errors / total / ERROR_BUDGET if total else 0.0
    latencies.sort()
    print(f"soak: {args.duration:.0f}s, {args.callers} callers, phases: {', '.join(phases)}")
    print()
    print("| sample | RSS MiB | open fds | asyncio tasks |")
    print("|---|---|---|---|")
    for s in samples:
        print(f"| {s.label} | {s.rss_mib:.1f} | {s.fds} | {s.tasks} |")
    print()
    print(f"calls: {total} in {elapsed:.0f}s ({total / elapsed:.0f}/s); outcomes: {dict(outcomes)}")
    if latencies:
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"latency p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms")
    print(
        f"error rate {errors / max(total, 1):.2%} of a {ERROR_BUDGET:.0%} budget "
        f"({used:.0%} of the budget used)"
    )
    print(f"upstream attempts by the server: {upstream} ({upstream / max(total, 1):.2f} per call)")
    print(f"server exit code {code}")
    end, warm_sample = samples[-1], samples[1]
    flat = end.fds <= warm_sample.fds + 5 and end.tasks <= warm_sample.tasks + 5
    print("resources flat" if flat else "RESOURCES GREW")
    return 0 if flat and used <= 1.0 and code == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=150.0, help="seconds under load")
    parser.add_argument("--callers", type=int, default=16, help="concurrent gRPC callers")
    parser.add_argument(
        "--server-arg",
        dest="server_args",
        action="append",
        default=["--cache-ttl", "2"],
        help="extra imageshare-server argument (repeat); default --cache-ttl 2",
    )
    return asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
