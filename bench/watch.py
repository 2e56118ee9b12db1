"""WatchImageShares at scale: many watchers over a hundred images, one poll per image.

Everything on loopback: the emulator and the server as real processes, the watchers as
a process of their own (grpc.aio, 50 streams per channel, under the server's
per-connection stream limit). The table gives, for 1,000 watchers over 100 images
polled every second:

- upstream reads a second (from the emulator's counters) while nothing changes:
  the target is the number of images, however many watchers;
- the server's CPU (utime + stime from /proc/<pid>/stat, over the window) and RSS
  (VmRSS), idle and with the watchers, and the difference per 1,000 watchers;
- the time from a change upstream (the emulator's admin call returned) to the event
  at each watcher of the image, p50 and p99 (target: at most the interval + 100 ms).

    .venv/bin/python bench/watch.py [--watchers 1000] [--images 100] [--interval 1]
        [--seconds 20] [--changes-per-second 10] [--latency-ms 20]

About a minute. Run it on an otherwise idle machine: the watchers' own process shares
the CPUs with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from tests.support.processes import EmulatorProcess, ServerProcess

REGION = "cn-hangzhou"
STREAMS_PER_CHANNEL = 50  # under --max-streams-per-connection (100)
TICKS = os.sysconf("SC_CLK_TCK")
FIRST_ACCOUNT = 1_800_000_000_000_000


def image_ids(count: int) -> list[str]:
    return [f"m-watch{i:05d}" for i in range(count)]


def data_file(directory: Path, images: int) -> Path:
    rows = [
        {
            "region_id": REGION,
            "image_id": image_id,
            "accounts": [
                {"aliyun_id": str(1_800_000_000_000_000 + n * 100 + i)} for i in range(10)
            ],
        }
        for n, image_id in enumerate(image_ids(images))
    ]
    path = directory / "images.json"
    path.write_text(json.dumps({"images": rows}))
    return path


# --- the watchers: a process of their own --------------------------------------------------


def watchers_main(target: str, watchers: int, images: int) -> None:
    """Open the watches; print {"ready"} once every snapshot arrived, then one line per event."""
    out_lock = threading.Lock()

    def emit(line: dict[str, object]) -> None:
        with out_lock:
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()

    async def run() -> None:
        ids = image_ids(images)
        # A connection of its own per channel: grpc shares one between channels to the same
        # target otherwise, and a connection carries at most 100 streams.
        own = [("grpc.use_local_subchannel_pool", 1)]
        channels = [
            grpc.aio.insecure_channel(target, options=own)
            for _ in range(-(-watchers // STREAMS_PER_CHANNEL))
        ]
        snapshots = 0
        ready = asyncio.Event()

        async def one(n: int) -> None:
            nonlocal snapshots
            stub = image_share_pb2_grpc.ImageShareServiceStub(channels[n // STREAMS_PER_CHANNEL])
            image = ids[n % images]
            call = stub.WatchImageShares(
                image_share_pb2.WatchImageSharesRequest(region_id=REGION, image_id=image)
            )
            async for message in call:
                received = time.time()
                if message.snapshot:
                    snapshots += 1
                    if snapshots == watchers:
                        ready.set()
                    continue
                emit(
                    {
                        "image": image,
                        "added": [a.aliyun_id for a in message.accounts],
                        "t": received,
                    }
                )

        tasks = [asyncio.create_task(one(n)) for n in range(watchers)]
        await ready.wait()
        emit({"ready": snapshots})
        await asyncio.gather(*tasks)

    asyncio.run(run())


@dataclass(frozen=True)
class Event:
    image: str
    added: list[str]
    received: float


@dataclass
class Watchers:
    proc: subprocess.Popen[str]
    events: list[Event] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = json.loads(line)
            if "ready" in record:
                self.ready.set()
            else:
                self.events.append(Event(record["image"], record["added"], record["t"]))


def start_watchers(target: str, watchers: int, images: int) -> Watchers:
    argv = [sys.executable, __file__, "--watchers-child", target]
    argv += ["--watchers", str(watchers), "--images", str(images)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    started = Watchers(proc)
    threading.Thread(target=started.read, daemon=True).start()
    return started


# --- measurements -----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def reads(admin: EmulatorAdmin) -> int:
    return int(admin.counters()["calls_by_action"].get("DescribeImageSharePermission", 0))


@dataclass
class Window:
    seconds: float
    reads: int
    cpu: float
    rss: float

    @property
    def reads_per_second(self) -> float:
        return self.reads / self.seconds

    @property
    def cpu_percent(self) -> float:
        return 100 * self.cpu / self.seconds


def measure(server: ServerProcess, admin: EmulatorAdmin, seconds: float) -> Window:
    pid = server.proc.pid
    reads0, cpu0, t0 = reads(admin), cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - t0
    return Window(elapsed, reads(admin) - reads0, cpu_seconds(pid) - cpu0, rss_mib(pid))


def percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=1000)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--changes-per-second", type=float, default=10.0)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--watchers-child", metavar="TARGET", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.watchers_child:
        watchers_main(args.watchers_child, args.watchers, args.images)
        return

    with tempfile.TemporaryDirectory() as tmp:
        emulator = EmulatorProcess("--data", str(data_file(Path(tmp), args.images)))
        admin = EmulatorAdmin(emulator.url)
        admin.set(latency_ms=args.latency_ms)
        # The rate limit stays on, above what the polls need (one read per image a second).
        qps = max(20.0, 1.5 * args.images / args.interval)
        server = ServerProcess(
            "--watch-interval", str(args.interval),
            "--upstream-qps", str(qps),
            upstream=emulator.url,
        )  # fmt: skip
        watchers: Watchers | None = None
        try:
            time.sleep(1.0)  # let start-up settle before the idle window
            idle = measure(server, admin, args.seconds / 2)
            started = time.monotonic()
            watchers = start_watchers(server.target, args.watchers, args.images)
            if not watchers.ready.wait(120):
                raise SystemExit("the watchers did not all get their snapshots")
            ready_in = time.monotonic() - started
            time.sleep(2 * args.interval)  # the first polls after the snapshots
            steady = measure(server, admin, args.seconds)

            # Changes: a new account on a random image, at random moments.
            changes: dict[str, tuple[str, float]] = {}
            rng = random.Random(16)
            stop = time.monotonic() + args.seconds
            n = 0
            while time.monotonic() < stop:
                image = rng.choice(image_ids(args.images))
                account = str(1_900_000_000_000_000 + n)
                admin.modify_share(REGION, image, add_accounts=[account])
                changes[account] = (image, time.time())
                n += 1
                time.sleep(rng.expovariate(args.changes_per_second))
            time.sleep(2 * args.interval + 1)  # the last changes' polls
            latencies: list[float] = []
            delivered = 0
            for event in watchers.events:
                for account in event.added:
                    if account in changes:
                        delivered += 1
                        latencies.append(event.received - changes[account][1])
            expected = len(changes) * (args.watchers // args.images)
            rss_watching = rss_mib(server.proc.pid)
        finally:
            if watchers is not None:
                watchers.proc.terminate()
                watchers.proc.wait(10)
            server.stop()
            emulator.stop()
            admin.close()

    ordered = sorted(latencies)
    p50, p99 = statistics.median(ordered), percentile(ordered, 0.99)
    per_thousand = 1000 / args.watchers
    print(
        f"{args.watchers} watchers over {args.images} images, --watch-interval "
        f"{args.interval:g} s, emulator latency {args.latency_ms:g} ms, --upstream-qps {qps:g}; "
        f"windows of {args.seconds:g} s. All snapshots received {ready_in:.1f} s after the "
        "watchers started.\n"
    )
    print("| measure | idle (no watchers) | with the watchers | note |")
    print("|---|---|---|---|")
    print(
        f"| upstream reads per second | {idle.reads_per_second:.1f} | "
        f"{steady.reads_per_second:.1f} | target {args.images / args.interval:g} "
        "(one per image and interval) |"
    )
    print(
        f"| server CPU (% of one core) | {idle.cpu_percent:.1f} | {steady.cpu_percent:.1f} | "
        f"{(steady.cpu_percent - idle.cpu_percent) * per_thousand:.1f} points per 1,000 "
        "watchers (the polls included) |"
    )
    print(
        f"| server RSS (MiB) | {idle.rss:.1f} | {steady.rss:.1f} | "
        f"+{(steady.rss - idle.rss) * per_thousand:.1f} MiB per 1,000 watchers |"
    )
    print(
        f"| change to event, p50 / p99 (ms) | - | {p50 * 1000:.0f} / {p99 * 1000:.0f} | "
        f"target p99 <= {args.interval * 1000 + 100:.0f} ms; {len(changes)} changes, "
        f"{delivered} of {expected} events delivered |"
    )
    print(f"\nServer RSS after the change window: {rss_watching:.1f} MiB.")


if __name__ == "__main__":
    main()
