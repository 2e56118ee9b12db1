"""The caller for ``cpu.py``: warm listings from concurrent grpc.aio callers, in blocks.

One process, one grpc.aio channel per target, ``--concurrency`` callers on it,
each running listings back to back (decode every message, count the
accounts). The targets are called in alternating blocks of ``--streams``
listings; around each block the caller reads the target server's CPU time
(utime + stime of ``/proc/<pid>/stat``, every thread of the process) and the
wall clock. The same code drives every target, so what differs between them
is the server. Prints one JSON list on stdout, one object per block.

    python bench/cpu_caller.py --image m-1 --expect 120 \
        --target facade=127.0.0.1:50051@1234 --target floor=127.0.0.1:50052@1240
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of every thread of ``pid`` so far, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import grpc

    from imageshare.v1 import image_share_pb2, image_share_pb2_grpc

    request = image_share_pb2.ListImageSharesRequest(
        region_id=args.region, image_id=args.image, page_size=args.page_size
    )
    targets: list[tuple[str, int, Any]] = []
    channels = []
    for spec in args.target:
        name, _, rest = spec.partition("=")
        address, _, pid = rest.rpartition("@")
        channel = grpc.aio.insecure_channel(address)
        await channel.channel_ready()
        channels.append(channel)
        targets.append((name, int(pid), image_share_pb2_grpc.ImageShareServiceStub(channel)))

    async def one(stub: Any) -> None:
        count = 0
        async for message in stub.ListImageShares(request, timeout=30):
            count += len(message.accounts)
        if count != args.expect:
            raise SystemExit(f"got {count} accounts, expected {args.expect}")

    async def block(stub: Any, streams: int) -> None:
        left = streams

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await one(stub)

        await asyncio.gather(*(caller() for _ in range(args.concurrency)))

    blocks: list[dict[str, Any]] = []
    for _, _, stub in targets:  # warm-up, not reported
        await block(stub, args.warmup)
    for round_ in range(args.rounds):
        for name, pid, stub in targets:
            (user, system), wall = cpu_seconds(pid), time.perf_counter()
            await block(stub, args.streams)
            wall = time.perf_counter() - wall
            user_after, system_after = cpu_seconds(pid)
            blocks.append(
                {
                    "target": name,
                    "round": round_,
                    "streams": args.streams,
                    "wall": wall,
                    "user": user_after - user,
                    "system": system_after - system,
                }
            )
    for channel in channels:
        await channel.close()
    return blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", action="append", required=True, help="name=host:port@pid")
    parser.add_argument("--region", default="cn-hangzhou")
    parser.add_argument("--image", required=True)
    parser.add_argument("--page-size", type=int, default=0)
    parser.add_argument("--expect", type=int, required=True, help="accounts every call must get")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--streams", type=int, default=2000, help="listings per block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on")
    args = parser.parse_args()
    if args.cpus:
        # Before grpc starts its threads, so they inherit the affinity.
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    json.dump(asyncio.run(run(args)), sys.stdout)


if __name__ == "__main__":
    main()
