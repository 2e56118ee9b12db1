"""`imageshare audit` over a fleet of images under the upstream's own QPS limit.

The emulator answers `Throttling.User` beyond `--qps` calls a second, as ECS does; the
server runs with `--upstream-qps` at that limit and a burst of 1. The audit (the real
CLI, a process of its own) lists every image through the server, with an allow list
that leaves some images shared outside it and a few images public. The table gives the
wall time against the floor the quota implies (one call per image: images / qps), the
upstream calls, the throttled answers, and what the audit found.

    .venv/bin/python bench/audit.py [--images 500] [--qps 20] [--concurrency 16]
        [--latency-ms 50]

About half a minute at the defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageshare_emulator import EmulatorAdmin
from tests.support.processes import BIN, EmulatorProcess, ServerProcess, base_env

REGION = "cn-hangzhou"
ALLOWED = [str(1_950_000_000_000_000 + i) for i in range(50)]
OUTSIDE = "1990000000000000"


def fleet(directory: Path, images: int) -> tuple[Path, Path, Path]:
    """Images of 1 to 50 allowed accounts; every 50th also shared outside, every 100th public."""
    rows = []
    for n in range(images):
        accounts = [{"aliyun_id": a} for a in ALLOWED[: 1 + n % 50]]
        if n % 50 == 7:
            accounts.append({"aliyun_id": OUTSIDE})
        groups = ["all"] if n % 100 == 3 else []
        rows.append(
            {
                "region_id": REGION,
                "image_id": f"m-audit{n:05d}",
                "accounts": accounts,
                "share_groups": groups,
            }
        )
    data = directory / "images.json"
    data.write_text(json.dumps({"images": rows}))
    ids = directory / "images.txt"
    ids.write_text("\n".join(r["image_id"] for r in rows) + "\n")  # type: ignore[misc]
    allow = directory / "allow.txt"
    allow.write_text("\n".join(ALLOWED) + "\n")
    return data, ids, allow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--qps", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    args = parser.parse_args()
    floor = args.images / args.qps
    with tempfile.TemporaryDirectory() as tmp:
        data, ids, allow = fleet(Path(tmp), args.images)
        emulator = EmulatorProcess("--data", str(data))
        admin = EmulatorAdmin(emulator.url)
        admin.set(latency_ms=args.latency_ms, qps_limit=args.qps)
        server = ServerProcess(
            "--upstream-qps", str(args.qps), "--upstream-burst", "1", upstream=emulator.url
        )
        try:
            started = time.monotonic()
            done = subprocess.run(
                [
                    str(BIN / "imageshare"), "audit",
                    "--target", server.target,
                    "--region", REGION,
                    "--images", str(ids),
                    "--allow-accounts", str(allow),
                    "--concurrency", str(args.concurrency),
                    "--json",
                ],
                capture_output=True,
                text=True,
                timeout=10 * floor + 60,
                check=False,
                env=base_env(),
            )  # fmt: skip
            took = time.monotonic() - started
            counters = admin.counters()
        finally:
            server.stop()
            emulator.stop()
            admin.close()
    *rows, summary = [json.loads(line) for line in done.stdout.splitlines()]
    calls = counters["calls_by_action"].get("DescribeImageSharePermission", 0)
    throttled = sum(v for k, v in counters["outcomes"].items() if k.startswith("Throttling"))
    refused = sum(1 for r in rows if r["error"])
    print(
        f"{args.images} images of 1 to 50 accounts (one upstream page each), emulator latency "
        f"{args.latency_ms:g} ms, emulator throttling beyond {args.qps} calls a second; server "
        f"--upstream-qps {args.qps} --upstream-burst 1; audit --concurrency {args.concurrency}.\n"
    )
    print(
        "| run | wall time (s) | vs floor | upstream calls | throttled answers | findings | exit |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| imageshare audit, {args.images} images | {took:.1f} | {took / floor:.2f}x the "
        f"{floor:.0f} s floor | {calls} | {throttled} | {summary['public']} public, "
        f"{summary['outside']} shared outside the allow list, {refused} errors | "
        f"{done.returncode} |"
    )


if __name__ == "__main__":
    main()
