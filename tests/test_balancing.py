"""Calls from one channel spread over every server the target names (round_robin).

Three servers behind one multi-address target stand in for a headless Service's pods:
300 calls from one Python client and from one Node client each reach all three, every one
with at least a fifth of the calls. Without round_robin in the service config, a channel
sends everything to the first server it connects to.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from imageshare_client import ImageShareClient
from imageshare_emulator import Emulator
from tests.support.inprocess import InProcessApp, running

ROOT = Path(__file__).resolve().parent.parent
CALLS = 300
LIST = {
    "grpc_type": "server_stream",
    "grpc_service": "imageshare.v1.ImageShareService",
    "grpc_method": "ListImageShares",
}
NODE_CALLS = """
const { ImageShareClient } = require(process.argv[2]);
(async () => {
  const client = new ImageShareClient(process.argv[3]);
  for (let i = 0; i < Number(process.argv[4]); i += 1) {
    await client.listShares('cn-hangzhou', 'm-demo0000002').collect();
  }
  client.close();
})().catch((err) => { console.error(err); process.exit(1); });
"""


def served(app: InProcessApp) -> int:
    return int(app.metric("grpc_server_started_total", **LIST))


@contextlib.asynccontextmanager
async def three_servers(ecs: Emulator) -> AsyncIterator[list[InProcessApp]]:
    async with (
        running(ecs, "--cache-ttl", "60") as a,
        running(ecs, "--cache-ttl", "60") as b,
        running(ecs, "--cache-ttl", "60") as c,
    ):
        yield [a, b, c]


def target_of(apps: list[InProcessApp]) -> str:
    return "ipv4:" + ",".join(app.target for app in apps)


def spread(apps: list[InProcessApp]) -> list[float]:
    return [served(app) / CALLS for app in apps]


async def test_one_python_channel_spreads_its_calls_over_every_server(ecs: Emulator) -> None:
    async with three_servers(ecs) as apps:

        def calls() -> None:
            with ImageShareClient(target_of(apps)) as client:
                for _ in range(CALLS):
                    client.list_shares("cn-hangzhou", "m-demo0000002").collect()

        await asyncio.to_thread(calls)
        shares = spread(apps)
    print("share of calls per server:", [f"{share:.0%}" for share in shares])
    assert sum(shares) == pytest.approx(1.0)
    assert min(shares) >= 0.2, shares


@pytest.mark.toolchain
async def test_one_node_client_spreads_its_calls_over_every_server(
    ecs: Emulator, tmp_path: Path, node_modules: Path
) -> None:
    node = shutil.which("node")
    assert node is not None, "node is not installed"
    script = tmp_path / "calls.js"
    script.write_text(NODE_CALLS)
    async with three_servers(ecs) as apps:
        process = await asyncio.create_subprocess_exec(
            node,
            str(script),
            str(ROOT / "clients" / "node" / "client.js"),
            target_of(apps),
            str(CALLS),
            cwd=ROOT / "clients" / "node",
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), 120)
        assert process.returncode == 0, err.decode()
        shares = spread(apps)
    print("share of calls per server:", [f"{share:.0%}" for share in shares])
    assert sum(shares) == pytest.approx(1.0)
    assert min(shares) >= 0.2, shares
