"""Attack the service as a buggy or hostile caller would, and measure what its neighbours feel.

Everything on loopback: the emulator and the server as real processes, the
well-behaved callers (the "victims") as a process of their own, the attacks
from this one. For each attack, the table gives the victims' latency (cache
hits and cold reads) while it runs against an idle baseline of the same run,
their errors, the upstream calls the attack caused, and the server's RSS and
asyncio task count before, during and after. Bounded: about two minutes.

    .venv/bin/python bench/abuse.py [--seconds 6]

The server runs with its defaults, except ``--stream-stall-timeout 10`` (the
default 30 s would make each stalled-stream attack last half a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import grpc
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from imageshare_emulator.data import demo_data
from tests.support.attacks import LIST_PATH, ZeroWindowAttacker
from tests.support.processes import EmulatorProcess, ServerProcess

REGION = "cn-hangzhou"
HIT = "m-demo0000001"
BIG = "m-abuse020000"
HUGE = "m-abuse060000"
COLD_POOL = 3000
Request = image_share_pb2.ListImageSharesRequest
STALL_TIMEOUT = 10.0
MEMORY_CACHE_BYTES = 8 * 2**20


def data_file(directory: Path) -> Path:
    """The demo data plus a 20,000- and a 60,000-account image and a pool of cold images."""
    images = [
        {
            "region_id": image.region_id,
            "image_id": image.image_id,
            "accounts": [{"aliyun_id": a.aliyun_id} for a in image.accounts],
            "share_groups": list(image.share_groups),
        }
        for image in demo_data().images.values()
    ]
    for image_id, count in ((BIG, 20_000), (HUGE, 60_000)):
        accounts = [{"aliyun_id": str(1_600_000_000_000_000 + i)} for i in range(count)]
        images.append({"region_id": REGION, "image_id": image_id, "accounts": accounts})
    for n in range(COLD_POOL):
        accounts = [{"aliyun_id": str(1_700_000_000_000_000 + n * 10 + i)} for i in range(2)]
        images.append({"region_id": REGION, "image_id": f"m-cold{n:05d}", "accounts": accounts})
    path = directory / "images.json"
    path.write_text(json.dumps({"images": images}))
    return path


# --- the victims: a process of their own -------------------------------------------------


def victim_main(target: str, seconds: float, cold_from: int) -> None:
    """Three callers reading a cached list, one reading cold lists; prints latencies as JSON."""
    hits: list[float] = []
    cold: list[float] = []
    errors: Counter[str] = Counter()
    stop = time.monotonic() + seconds
    cold_next = [cold_from]

    def caller(kind: str) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
            while time.monotonic() < stop:
                if kind == "hit":
                    image = HIT
                else:
                    image = f"m-cold{cold_next[0] % COLD_POOL:05d}"
                    cold_next[0] += 1
                started = time.perf_counter()
                try:
                    for _ in stub.ListImageShares(
                        Request(region_id=REGION, image_id=image), timeout=10
                    ):
                        pass
                except grpc.RpcError as exc:
                    errors[f"{kind}:{exc.code().name}"] += 1
                    time.sleep(0.05)
                    continue
                (hits if kind == "hit" else cold).append(time.perf_counter() - started)
                if kind == "cold":
                    time.sleep(0.1)  # ten cold reads a second at most: half the default QPS

    threads = [threading.Thread(target=caller, args=(k,)) for k in ("hit", "hit", "hit", "cold")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"hits": hits, "cold": cold, "errors": dict(errors)}))


@dataclass
class VictimResult:
    hits: list[float]
    cold: list[float]
    errors: dict[str, int]
    cold_used: int = 0

    @staticmethod
    def summary(samples: list[float]) -> str:
        if len(samples) < 2:
            return "n/a"
        ordered = sorted(samples)
        p99 = ordered[max(0, int(len(ordered) * 0.99) - 1)]
        return f"{statistics.median(ordered) * 1000:.1f} / {p99 * 1000:.1f}"


def run_victims(target: str, seconds: float, cold_from: int) -> VictimResult:
    argv = [sys.executable, __file__, "--victim", target, "--seconds", str(seconds)]
    argv += ["--cold-from", str(cold_from)]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=seconds + 60)
    raw = json.loads(done.stdout)
    return VictimResult(raw["hits"], raw["cold"], raw["errors"], len(raw["cold"]))


# --- measurements of the server process ---------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def tasks(server: ServerProcess) -> int:
    text = httpx.get(server.metrics_url, timeout=5).text
    for line in text.splitlines():
        if line.startswith("imageshare_asyncio_tasks "):
            return int(float(line.split()[1]))
    return -1


@dataclass
class Sample:
    rss: float
    tasks: int


def sample(server: ServerProcess) -> Sample:
    return Sample(rss_mb(server.proc.pid), tasks(server))


class Sampler:
    """The peak RSS and task count while an attack runs, sampled every 250 ms."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.peak = sample(server)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            now = sample(self.server)
            self.peak = Sample(max(self.peak.rss, now.rss), max(self.peak.tasks, now.tasks))

    def stop(self) -> Sample:
        self._stop.set()
        self._thread.join()
        return self.peak


def upstream_calls(admin: EmulatorAdmin) -> int:
    return int(admin.counters()["calls_by_action"].get("DescribeImageSharePermission", 0))


# --- the attacks ---------------------------------------------------------------------------


Stop = Callable[[], str]


def zero_window(server: ServerProcess) -> Stop:
    started = time.time()
    attacker = ZeroWindowAttacker("127.0.0.1", server.grpc_port, 1000, image_id=HIT)

    def stop() -> str:
        deadline = time.monotonic() + STALL_TIMEOUT + 5
        while time.monotonic() < deadline and _stalled(server, started) < 100:
            time.sleep(0.1)
        released = _stalled_released(server, started)
        attacker.close()
        return f"{attacker.refused} of 1000 streams refused at once; {released}"

    return stop


def _stalled_ends(server: ServerProcess, started: float) -> list[float]:
    """When (seconds after ``started``) the server ended each stream for stalling."""
    return [
        datetime.fromisoformat(r["ts"]).timestamp() - started
        for r in server.records()
        if r.get("event") == "rpc"
        and r.get("code") == "Unavailable"
        and "read nothing" in str(r.get("error"))
        and datetime.fromisoformat(r["ts"]).timestamp() >= started
    ]


def _ended(server: ServerProcess, image_id: str, started: float) -> int:
    return sum(
        1
        for r in server.records()
        if r.get("event") == "rpc"
        and r.get("image") == image_id
        and datetime.fromisoformat(r["ts"]).timestamp() >= started
    )


def _stalled(server: ServerProcess, started: float) -> int:
    return len(_stalled_ends(server, started))


def _stalled_released(server: ServerProcess, started: float) -> str:
    """How many stalled streams the server ended since ``started``, and when the last one went."""
    ends = _stalled_ends(server, started)
    if not ends:
        return "no stalled stream ended yet"
    return f"{len(ends)} stalled streams ended, the last {max(ends):.1f} s after the attack began"


def stalled_readers(server: ServerProcess) -> Stop:
    started = time.time()
    channels: list[grpc.Channel] = []
    calls = []
    for _ in range(50):  # ordinary grpcio callers, default options and page size
        channel = grpc.insecure_channel(server.target)
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        call = stub.ListImageShares(Request(region_id=REGION, image_id=BIG))
        next(call)
        channels.append(channel)
        calls.append(call)
    # Measure once the callers have stopped reading: every stream either done (the whole
    # list fit in the caller's window) or stalled.
    deadline = time.monotonic() + STALL_TIMEOUT + 5
    while time.monotonic() < deadline and _ended(server, BIG, started) < 50:
        time.sleep(0.1)

    def stop() -> str:
        codes = Counter(
            str(r.get("code"))
            for r in server.records()
            if r.get("event") == "rpc"
            and r.get("image") == BIG
            and datetime.fromisoformat(r["ts"]).timestamp() >= started
        )
        for call in calls:
            call.cancel()
        for channel in channels:
            channel.close()
        return (
            "each read one message of 20,000, then nothing; the server's streams ended: "
            f"{dict(codes) or 'none yet'} (default grpcio windows took the whole list)"
        )

    return stop


def _in_thread(work: Callable[[threading.Event], str]) -> Stop:
    stop_event = threading.Event()
    result: list[str] = []
    thread = threading.Thread(target=lambda: result.append(work(stop_event)), daemon=True)
    thread.start()

    def stop() -> str:
        stop_event.set()
        thread.join(120)
        return result[0] if result else "did not finish"

    return stop


def cancel_storm(server: ServerProcess) -> Stop:
    def work(stop: threading.Event) -> str:
        with grpc.insecure_channel(server.target) as channel:
            stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
            for wave in range(8):
                calls = [
                    stub.ListImageShares(
                        Request(region_id=REGION, image_id=f"m-storm{wave:02d}{i:04d}"), timeout=10
                    )
                    for i in range(100)
                ]
                time.sleep(0.03)
                for call in calls:
                    call.cancel()
                time.sleep(0.01)
        return "800 cold calls, each cancelled 30 ms after it started"

    return _in_thread(work)


def _flood(server: ServerProcess, requests: list[Request], stop: threading.Event) -> Counter[str]:
    codes: Counter[str] = Counter()

    async def run() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
            gate = asyncio.Semaphore(50)

            async def one(request: Request) -> None:
                async with gate:
                    if stop.is_set():
                        return
                    try:
                        async for _ in stub.ListImageShares(request, timeout=10):
                            pass
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as exc:
                        codes[exc.code().name] += 1

            await asyncio.gather(*(one(r) for r in requests))

    asyncio.run(run())
    return codes


def negative_flood(server: ServerProcess) -> Stop:
    requests = [Request(region_id=REGION, image_id=f"m-madeup{i:06d}") for i in range(10_000)]
    return _in_thread(
        lambda stop: f"10,000 made-up image ids: {dict(_flood(server, requests, stop))}"
    )


def region_flood(server: ServerProcess) -> Stop:
    requests = [Request(region_id=f"zz-made-up{i}", image_id="m-x") for i in range(10_000)]
    return _in_thread(
        lambda stop: f"10,000 made-up regions: {dict(_flood(server, requests, stop))}"
    )


def large_list(server: ServerProcess) -> Stop:
    requests = [Request(region_id=REGION, image_id=HUGE) for _ in range(200)]
    return _in_thread(
        lambda stop: f"200 calls for a 60,000-account list: {dict(_flood(server, requests, stop))}"
    )


def malformed(server: ServerProcess) -> Stop:
    def work(stop: threading.Event) -> str:
        codes: Counter[str] = Counter()
        with grpc.insecure_channel(server.target) as channel:
            raw = channel.unary_stream(
                LIST_PATH, request_serializer=lambda b: b, response_deserializer=lambda b: b
            )
            for _ in range(1000):
                try:
                    list(raw(b"\xff\xff\xff\xff\x0f", timeout=5))
                    codes["OK"] += 1
                except grpc.RpcError as exc:
                    codes[exc.code().name] += 1
        return f"1,000 undecodable requests: {dict(codes)}"

    return _in_thread(work)


ATTACKS: dict[str, Callable[[ServerProcess], Stop]] = {
    "zero-window streams, 1 connection x 1,000": zero_window,
    "stalled grpcio readers x 50 (20,000 accounts)": stalled_readers,
    "cancel storm: 800 calls cancelled after 30 ms": cancel_storm,
    "negative flood: 10,000 made-up image ids": negative_flood,
    "region flood: 10,000 made-up regions": region_flood,
    "list too large to read (60,000 accounts) x 200": large_list,
    "malformed request bytes x 1,000": malformed,
}


# --- the run -------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    victims: VictimResult
    upstream: int
    before: Sample
    during: Sample
    after: Sample
    note: str
    extra: dict[str, str] = field(default_factory=dict)


def memory_rows(emulator: EmulatorProcess) -> list[str]:
    """RSS for 10,000 made-up image ids and 10,000 made-up regions, run to the end."""
    rows = []
    for name, requests in (
        (
            "10,000 made-up image ids",
            [Request(region_id=REGION, image_id=f"m-madeup{i:06d}") for i in range(10_000)],
        ),
        (
            "10,000 made-up regions",
            [Request(region_id=f"zz-made-up{i}", image_id="m-x") for i in range(10_000)],
        ),
    ):
        server = ServerProcess(
            "--upstream-qps", "0", "--cache-max-bytes", str(MEMORY_CACHE_BYTES),
            upstream=emulator.url,
        )  # fmt: skip
        try:
            before = rss_mb(server.proc.pid)
            started = time.monotonic()
            codes = _flood(server, requests, threading.Event())
            took = time.monotonic() - started
            after = rss_mb(server.proc.pid)
            cache = _gauge(server, "imageshare_cache_bytes")
            rows.append(
                f"| {name} | {dict(codes)} in {took:.0f} s | {before:.0f} | {after:.0f} | "
                f"{after - before:+.1f} | {cache / 2**20:.1f} |"
            )
        finally:
            server.stop()
    return rows


def _gauge(server: ServerProcess, name: str) -> float:
    for line in httpx.get(server.metrics_url, timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--victim", help=argparse.SUPPRESS)
    parser.add_argument("--cold-from", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.victim:
        victim_main(args.victim, args.seconds, args.cold_from)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        emulator = EmulatorProcess("--data", str(data_file(Path(tmp))))
        server = ServerProcess("--stream-stall-timeout", str(STALL_TIMEOUT), upstream=emulator.url)
        admin = EmulatorAdmin(emulator.url)
        try:
            rows = run(server, admin, args.seconds)
        finally:
            server.stop()
        try:
            memory = memory_rows(emulator)
        finally:
            emulator.stop()
    print_table(rows, args.seconds)
    print(
        f"\nMemory, each flood run to its end on a fresh server with --upstream-qps 0 and "
        f"--cache-max-bytes {MEMORY_CACHE_BYTES // 2**20} MiB (50 calls at a time):\n"
    )
    print("| flood | answers | RSS before (MiB) | RSS after (MiB) | growth | cache bytes (MiB) |")
    print("|---|---|---|---|---|---|")
    for row in memory:
        print(row)
    return 0


def run(server: ServerProcess, admin: EmulatorAdmin, seconds: float) -> list[Row]:
    with grpc.insecure_channel(server.target) as channel:  # warm the cached list and the big one
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        for image in (HIT, BIG):
            list(stub.ListImageShares(Request(region_id=REGION, image_id=image), timeout=60))
    cold_from = 0
    before = sample(server)
    calls_before = upstream_calls(admin)
    baseline = run_victims(server.target, seconds, cold_from)
    cold_from += baseline.cold_used + 10
    rows = [
        Row(
            "idle (baseline)",
            baseline,
            upstream_calls(admin) - calls_before,
            before,
            sample(server),
            sample(server),
            "",
        )
    ]
    for name, attack in ATTACKS.items():
        before = sample(server)
        calls_before = upstream_calls(admin)
        sampler = Sampler(server)
        stop = attack(server)
        victims = run_victims(server.target, seconds, cold_from)
        cold_from += victims.cold_used + 10
        note = stop()
        during = sampler.stop()
        settle_until = time.monotonic() + STALL_TIMEOUT + 2
        while time.monotonic() < settle_until and sample(server).tasks > before.tasks + 5:
            time.sleep(0.25)
        after = sample(server)
        upstream = upstream_calls(admin) - calls_before - victims.cold_used
        rows.append(Row(name, victims, upstream, before, during, after, note))
        print(f"done: {name}", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[Row], seconds: float) -> None:
    base = rows[0].victims
    print(
        f"Victims for {seconds:g} s per row: three callers reading a cached 137-account list "
        "and one reading cold 2-account lists (at most ten a second), each on its own channel, "
        "in a process of their own. Latency p50 / p99 in ms. Upstream calls: those the attack "
        "caused (the victims' own cold reads taken out). RSS in MiB and asyncio tasks of the "
        "server process: before / peak during / after.\n"
    )
    print(
        "| attack | hits p50 / p99 (ms) | hits p99 vs idle | cold reads p50 / p99 (ms) | "
        "victim errors | upstream calls | RSS MiB | tasks | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    base_p99 = sorted(base.hits)[max(0, int(len(base.hits) * 0.99) - 1)]
    for row in rows:
        hits = sorted(row.victims.hits)
        p99 = hits[max(0, int(len(hits) * 0.99) - 1)] if hits else float("nan")
        errors = ", ".join(f"{k} {v}" for k, v in sorted(row.victims.errors.items())) or "0"
        print(
            f"| {row.name} | {VictimResult.summary(row.victims.hits)} | {p99 / base_p99:.2f}x | "
            f"{VictimResult.summary(row.victims.cold)} | {errors} | {row.upstream} | "
            f"{row.before.rss:.0f} / {row.during.rss:.0f} / {row.after.rss:.0f} | "
            f"{row.before.tasks} / {row.during.tasks} / {row.after.tasks} | {row.note} |"
        )


if __name__ == "__main__":
    sys.exit(main())
