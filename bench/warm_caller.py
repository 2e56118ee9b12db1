"""The caller for (c): warm listings against several servers, in its own process.

A process of its own, so nothing else in the benchmark (log readers, the
emulator's admin client) shares its interpreter lock, and optionally pinned
to CPUs the servers do not use, the way gRPC's own benchmark harness gives
client and server separate cores: on a small machine, a caller competing with
the server for a core measures the caller as much as the server.

Each call is what a Python caller does: stream every message, decode it and
collect the account ids, on a channel with the options of the project's sync
client (``imageshare_client``), unless ``--spin-thread`` asks for grpc's
defaults. The targets are called in alternating blocks, so a
noisy minute on a shared machine lands on all of them alike. Prints one JSON
object, the latencies in seconds per target, on stdout.

    python bench/warm_caller.py --image m-1 --page-size 50 --expect 2000 \
        --target facade=127.0.0.1:50051 --target floor=127.0.0.1:50052 [--cpus 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", action="append", required=True, help="name=host:port")
    parser.add_argument("--region", default="cn-hangzhou")
    parser.add_argument("--image", required=True)
    parser.add_argument("--page-size", type=int, default=0)
    parser.add_argument("--expect", type=int, required=True, help="accounts every call must get")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--block", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to run on")
    parser.add_argument(
        "--spin-thread",
        action="store_true",
        help="grpc's default threading instead of the options imageshare_client sets",
    )
    args = parser.parse_args()
    if args.cpus:
        # Before grpc starts its threads, so they inherit the affinity.
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})

    import grpc

    from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
    from imageshare_client.client import SYNC_STREAM_OPTIONS

    request = image_share_pb2.ListImageSharesRequest(
        region_id=args.region, image_id=args.image, page_size=args.page_size
    )
    stubs = {}
    channels = []  # a Channel closes when collected, and stubs do not keep it alive
    options = () if args.spin_thread else SYNC_STREAM_OPTIONS
    for spec in args.target:
        name, _, address = spec.partition("=")
        channel = grpc.insecure_channel(address, options=options)
        grpc.channel_ready_future(channel).result(timeout=10)
        channels.append(channel)
        stubs[name] = image_share_pb2_grpc.ImageShareServiceStub(channel)

    def call(stub: image_share_pb2_grpc.ImageShareServiceStub) -> float:
        started = time.perf_counter()
        ids = [a.aliyun_id for m in stub.ListImageShares(request, timeout=30) for a in m.accounts]
        elapsed = time.perf_counter() - started
        if len(ids) != args.expect:
            raise SystemExit(f"got {len(ids)} accounts, expected {args.expect}")
        return elapsed

    for stub in stubs.values():
        for _ in range(args.warmup):
            call(stub)
    latencies: dict[str, list[float]] = {name: [] for name in stubs}
    while any(len(v) < args.calls for v in latencies.values()):
        for name, stub in stubs.items():
            block = min(args.block, args.calls - len(latencies[name]))
            latencies[name].extend(call(stub) for _ in range(block))
    json.dump(latencies, sys.stdout)


if __name__ == "__main__":
    main()
