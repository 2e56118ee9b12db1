"""Server CPU per warm listing: the service against a bare grpc.aio server, read from the OS.

Starts the emulator, the real server with its default settings (the JSON RPC
log line at info, the metrics interceptor, the cache) and, for each listing,
``floor_server.py`` streaming the very bytes the server sent for it (captured
after warming the cache). A caller process (``cpu_caller.py``: grpc.aio,
``--concurrency`` callers on one channel per server) runs blocks of
``--streams`` listings against each server in turn, and reads the server's
CPU time (utime + stime in ``/proc/<pid>/stat``) around each block. Prints a
Markdown table: CPU per stream, streams a second and the ratio to the floor
(median over the rounds, and the range), for a one-message listing (50
accounts) and a three-message one (120 accounts), both at the default page size.

With two or more CPUs the servers are pinned to the first and the caller to
the others (``--no-pin``: everything shares them). ``--profile DIR`` also
records the server (and the ``--compare`` one) under the same load with py-spy,
one more block per listing, and prints the functions that took the most samples. ``--compare
DIR`` runs the server of another source tree (a checkout of an earlier
commit) as a third target in the same blocks: a before and after in one run.
``--ladder`` adds floor_server.py's two rungs between the floor and the service
(grpc.aio used as the service uses it; the service's per-call work written flat),
so the table shows where the distance to the floor comes from.

    .venv/bin/python bench/cpu.py [--streams 2000] [--rounds 5] [--profile DIR]
        [--compare DIR] [--ladder] [--server-arg=--cache-ttl --server-arg=300]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from floor_server import capture, write_messages

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from tests.support.processes import EmulatorProcess, Process, ServerProcess, base_env

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
REGION = "cn-hangzhou"
# (image id, accounts): one message and three at the default page size (50).
LISTINGS = [("m-cpu00000050", 50), ("m-cpu00000120", 120)]


class QuietReading(Process):
    """A process whose stderr is read line by line only up to its ready line; after it,
    in large chunks, keeping the last RPC log line: the parent must not spend a core
    parsing thousands of lines a second next to the processes it measures."""

    last_rpc_line = ""

    def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := self.proc.stderr.readline():
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                self._events.put(record)
                if record.get("event") == "serving":
                    break
        fd = self.proc.stderr.fileno()
        tail = b""
        while chunk := os.read(fd, 1 << 16):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            for raw in reversed(lines):
                if b'"event":"rpc"' in raw:
                    self.last_rpc_line = raw.decode()
                    break
        self._events.put(None)


class QuietServer(QuietReading, ServerProcess):
    """The server, read as ``QuietReading`` says."""


# The rungs between the floor and the service (``--ladder``): floor_server.py's variants.
RUNGS = {"grpc_like": "--grpc-like-service", "minimal": "--minimal-handler"}


def cpu_split(pin: bool) -> tuple[set[int], set[int]] | None:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None
    return {cpus[0]}, set(cpus[1:])


def pin_process(pid: int, cpus: set[int]) -> None:
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:
            continue


def run_caller(
    image_id: str,
    expect: int,
    targets: dict[str, tuple[str, int]],
    args: argparse.Namespace,
    cpus: set[int] | None,
    *,
    rounds: int,
) -> list[dict[str, Any]]:
    argv = [
        sys.executable,
        str(HERE / "cpu_caller.py"),
        *("--image", image_id, "--expect", str(expect)),
        *("--streams", str(args.streams), "--rounds", str(rounds)),
        *("--concurrency", str(args.concurrency)),
    ]
    for name, (address, pid) in targets.items():
        argv += ["--target", f"{name}={address}@{pid}"]
    if cpus:
        argv += ["--cpus", ",".join(str(c) for c in sorted(cpus))]
    done = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=1800)
    blocks: list[dict[str, Any]] = json.loads(done.stdout)
    return blocks


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "imageshare_server/", "lib/python3"):
        if marker in path:
            path = path[path.index(marker) :]
            break
    return f"{match['func']} ({path})"


def profile_summary(raw: Path, top: int) -> str:
    """The functions that took most samples: on the stack (inclusive) and on top (self)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if not f.startswith("process ")]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [f"{total} samples", "", "| function | inclusive | self |", "|---|---|---|"]
    names = [n for n, _ in inclusive.most_common()]
    shown = sorted(
        set(names[:top]) | {n for n, _ in own.most_common(top)},
        key=lambda n: (-inclusive[n], -own[n]),
    )
    lines.extend(
        f"| `{name}` | {100 * inclusive[name] / total:.1f}% | {100 * own[name] / total:.1f}% |"
        for name in shown
    )
    return "\n".join(lines)


def profile(
    server: ServerProcess,
    listing: tuple[str, int],
    args: argparse.Namespace,
    cpus: set[int] | None,
    out: Path,
) -> None:
    """One more block of ``listing`` against the server alone, recorded by py-spy."""
    spy = subprocess.Popen(
        [
            str(BIN / "py-spy"),
            "record",
            *("--pid", str(server.proc.pid), "--rate", "500", "--format", "raw"),
            *("--output", str(out), "--nonblocking"),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        target = {"facade": (server.target, server.proc.pid)}
        run_caller(*listing, target, args, cpus, rounds=1)
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(60)


def summarize(blocks: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    by_target: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for block in blocks:
        by_target[block["target"]].append(block)
    result = {}
    for target, runs in by_target.items():
        us = [1e6 * (b["user"] + b["system"]) / b["streams"] for b in runs]
        system = [1e6 * b["system"] / b["streams"] for b in runs]
        rates = [b["streams"] / b["wall"] for b in runs]
        result[target] = {"us": us, "system": system, "rates": rates}
    floor = result["floor"]["us"]
    for data in result.values():
        data["ratios"] = [u / f for u, f in zip(data["us"], floor, strict=True)]
    return result


def _spread(values: Sequence[float], fmt: str) -> str:
    """The median and the range: ``median (min to max)``."""
    low, mid, high = (format(v, fmt) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid} ({low} to {high})"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--streams", type=int, default=2000, help="listings per block")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per server and listing")
    parser.add_argument("--concurrency", type=int, default=16, help="callers on the channel")
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument(
        "--accounts",
        default=",".join(str(count) for _, count in LISTINGS),
        help="which listings to measure, by account count",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not give servers and caller separate CPUs"
    )
    parser.add_argument("--profile", type=Path, help="also record the server with py-spy into DIR")
    parser.add_argument("--top", type=int, default=25, help="functions shown per profile")
    parser.add_argument("--raw", action="store_true", help="also print every block's figures")
    parser.add_argument(
        "--ladder",
        action="store_true",
        help="also measure floor_server.py's two rungs between the floor and the service",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        help="also measure the server of another source tree (its server/ directory) next to "
        "this one: a checkout of an earlier commit, for a before and after in one run",
    )
    parser.add_argument(
        "--server-arg", action="append", default=[], help="an extra flag for the server"
    )
    return parser.parse_args()


Result: TypeAlias = tuple[str, int, dict[str, dict[str, Any]]]


def measure(
    args: argparse.Namespace,
    servers: dict[str, QuietServer],
    listings: list[tuple[str, int]],
) -> tuple[list[Result], str]:
    """Each listing against every server and its floor; the results and a sample RPC line."""
    server = servers["facade"]
    split = cpu_split(not args.no_pin)
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for image_id, count in listings:
            request = image_share_pb2.ListImageSharesRequest(region_id=REGION, image_id=image_id)
            for each in servers.values():  # warms each cache
                with grpc.insecure_channel(each.target) as channel:
                    stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
                    messages = list(stub.ListImageShares(request, timeout=30))
                    assert sum(len(m.accounts) for m in messages) == count
            path = Path(tmp) / f"{image_id}.bin"
            with grpc.insecure_channel(server.target) as channel:
                write_messages(path, capture(channel, request))
            floors: dict[str, QuietReading] = {}
            try:
                for name, flag in {"floor": "", **(RUNGS if args.ladder else {})}.items():
                    argv = [sys.executable, str(HERE / "floor_server.py"), str(path), flag]
                    floors[name] = QuietReading(list(filter(None, argv)), base_env(), "serving")
                if split:
                    for process in (*servers.values(), *floors.values()):
                        pin_process(process.proc.pid, split[0])
                targets = {
                    name: (f"127.0.0.1:{floor.ready['grpc_port']}", floor.proc.pid)
                    for name, floor in floors.items()
                }
                targets.update({name: (s.target, s.proc.pid) for name, s in servers.items()})
                caller_cpus = split[1] if split else None
                blocks = run_caller(image_id, count, targets, args, caller_cpus, rounds=args.rounds)
                results.append((image_id, len(messages), summarize(blocks)))
                if args.raw:
                    for block in blocks:
                        print(json.dumps({"image": image_id, **block}), file=sys.stderr)
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    for name, each in servers.items():  # the baseline too: before and after
                        out = args.profile / f"{name}-{len(messages)}msg.txt"
                        profile(each, (image_id, count), args, caller_cpus, out)
            finally:
                for process in floors.values():
                    process.stop()
    where = (
        f"servers on CPU {min(split[0])}, caller on CPU {','.join(map(str, sorted(split[1])))}"
        if split
        else "servers and caller share the CPUs"
    )
    return results, where


def report(args: argparse.Namespace, results: list[Result], where: str, sample_line: str) -> None:
    extra = " ".join(args.server_arg) or "none"
    print(
        f"\nWarm listings, {args.concurrency} concurrent callers on one grpc.aio channel; "
        f"{args.rounds} alternating blocks of {args.streams} listings per server; {where}; "
        f"server flags beyond the defaults: {extra}. Server CPU is utime + stime of the whole "
        "process (/proc/<pid>/stat); median over the blocks (range).\n"
    )
    print(
        "| listing | server | CPU per stream (µs) | of which system (µs) | streams/s "
        "| ratio to floor |"
    )
    print("|---|---|---|---|---|---|")
    names = {
        "floor": "bare grpc.aio (floor)",
        "grpc_like": "grpc.aio as the service uses it (floor_server.py --grpc-like-service)",
        "minimal": "the service's per-call work, flat (floor_server.py --minimal-handler)",
        "facade": "imageshare-server",
        "baseline": f"imageshare-server from {args.compare}",
    }
    for image_id, sent, summary in results:
        count = dict(LISTINGS)[image_id]
        for target, name in names.items():
            if target not in summary:
                continue
            data = summary[target]
            ratio = "1.00" if target == "floor" else _spread(data["ratios"], ".2f") + "x"
            print(
                f"| {count} accounts, {sent} message{'s' if sent > 1 else ''} | {name} | "
                f"{_spread(data['us'], '.0f')} | {statistics.median(data['system']):.0f} | "
                f"{_spread(data['rates'], ',.0f')} | {ratio} |"
            )
    if sample_line:
        print(f"\nThe server's last RPC log line:\n\n    {sample_line}")
    if args.profile:
        for path in sorted(args.profile.glob("*-*msg.txt"), key=lambda p: p.name):
            which = names[path.name.split("-")[0]]
            print(f"\nProfile of {which} ({path.name}, py-spy, Python frames):\n")
            print(profile_summary(path, args.top))


def main() -> None:
    args = parse_args()
    emulator = EmulatorProcess()
    admin = EmulatorAdmin(emulator.url)
    admin.set(latency_ms=args.latency_ms)
    listings = [(i, c) for i, c in LISTINGS if str(c) in args.accounts.split(",")]
    for image_id, count in listings:
        admin.upsert_image(
            {
                "region_id": REGION,
                "image_id": image_id,
                "accounts": [
                    {"aliyun_id": f"5{count:03d}{i:012d}", "shared_time": "2025-01-01T00:00:00Z"}
                    for i in range(count)
                ],
            }
        )
    servers: dict[str, QuietServer] = {}
    try:
        servers["facade"] = QuietServer(*args.server_arg, upstream=emulator.url)
        if args.compare:
            # The same server from another source tree (`git worktree add DIR COMMIT`).
            source = str(args.compare.resolve() / "server")
            path = os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))
            servers["baseline"] = QuietServer(
                *args.server_arg, upstream=emulator.url, env={"PYTHONPATH": path}
            )
        results, where = measure(args, servers, listings)
        sample_line = servers["facade"].last_rpc_line
    finally:
        for server in servers.values():
            server.stop()
        emulator.stop()
    report(args, results, where, sample_line)


if __name__ == "__main__":
    main()
