"""How the retry budget behaves around an outage, with and without refilling over time.

For each ``--retry-budget-refill`` value, a fresh server (cache off) against
the emulator: listings of a two-page image at a steady rate through four
phases: healthy, a full outage (every call 503), then 30% random 5xx
(seeded, the same draws every run) right after it, and 30% on a budget
that had time to recover. Prints, per phase, the share of listings that
succeeded and the upstream calls per listing. About a minute.

    .venv/bin/python bench/retry_budget.py [--rate 20] [--seconds 10]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from tests.support.processes import EmulatorProcess, ServerProcess

REGION = "cn-hangzhou"
IMAGE = "m-demo0000001"  # 137 accounts: two upstream pages


def calls(admin: EmulatorAdmin) -> int:
    return int(admin.counters()["calls_by_action"].get("DescribeImageSharePermission", 0))


def phase(
    stub: image_share_pb2_grpc.ImageShareServiceStub,
    admin: EmulatorAdmin,
    rate: float,
    seconds: float,
) -> tuple[float, float]:
    """Listings at ``rate`` per second for ``seconds``: success share, upstream calls each."""
    request = image_share_pb2.ListImageSharesRequest(region_id=REGION, image_id=IMAGE)
    before = calls(admin)
    ok = total = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        due = start + total / rate
        time.sleep(max(0.0, due - time.monotonic()))
        total += 1
        try:
            list(stub.ListImageShares(request, timeout=10))
            ok += 1
        except grpc.RpcError:
            pass
    return ok / total, (calls(admin) - before) / total


def run(refill: float, rate: float, seconds: float, emulator: EmulatorProcess) -> list[str]:
    admin = EmulatorAdmin(emulator.url)
    admin.reset()
    server = ServerProcess(
        "--cache-ttl", "0", "--retry-budget-refill", str(refill), upstream=emulator.url
    )
    cells = []
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
            cells.append(phase(stub, admin, rate, seconds / 2))
            admin.fault("error_code", rate=1.0, code="ServiceUnavailable", status=503)
            cells.append(phase(stub, admin, rate, seconds))
            admin.clear_faults()
            admin.set(error_rate=0.3, seed=7)
            cells.append(phase(stub, admin, rate, seconds))
            cells.append(phase(stub, admin, rate, seconds))
    finally:
        server.stop()
    return [f"{share * 100:.0f}% ok, {per:.2f} calls" for share, per in cells]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=20.0, help="listings per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each phase")
    parser.add_argument("--refills", default="0,0.5,1,2")
    args = parser.parse_args()
    emulator = EmulatorProcess()
    try:
        rows = [
            (refill, run(refill, args.rate, args.seconds, emulator))
            for refill in (float(r) for r in args.refills.split(","))
        ]
    finally:
        emulator.stop()
    print(
        f"Listings of a two-page image at {args.rate:g} a second; each phase "
        f"{args.seconds:g} s (healthy: half that). Budget: 20 tokens, ratio 1.0.\n"
    )
    print(
        "| --retry-budget-refill | healthy | full outage | 30% 5xx right after | "
        "30% 5xx, next period |"
    )
    print("|---|---|---|---|---|")
    for refill, cells in rows:
        print(f"| {refill:g} token/s | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
