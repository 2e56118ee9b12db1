"""The Node.js client (clients/node) against the app, with node's own test runner.

The app runs in this process (on the test's event loop, cache off, polling watched images
every second); ``node`` is a child process started with asyncio, so the loop keeps serving
while node calls it. Its watch test changes a list through the admin API of the emulator
behind the app (IMAGESHARE_EMULATOR_URL), which the in-process emulator serves too, and
waits for the app's next poll in real time: hence the one-second interval.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageshare_emulator import Emulator
from tests.support.inprocess import running
from tests.support.node import NODE_DIR


@dataclass(frozen=True)
class NodeRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
async def target(ecs: Emulator) -> AsyncIterator[str]:
    async with running(ecs, "--cache-ttl", "0", "--watch-interval", "1") as app:
        yield app.target


async def run_node(args: list[str], target: str, emulator_url: str = "") -> NodeRun:
    process = await asyncio.create_subprocess_exec(
        "node",
        *args,
        cwd=NODE_DIR,
        env={**os.environ, "IMAGESHARE_TARGET": target, "IMAGESHARE_EMULATOR_URL": emulator_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 100)  # within pytest's 120
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return NodeRun(process.returncode, out.decode(), err.decode())


@pytest.mark.toolchain
async def test_node_client_suite(node_modules: Path, target: str, ecs: Emulator) -> None:
    # A watch waiting for a change that never comes would wait forever: node stops the file
    # after 30 s (it takes about 2) and reports which tests passed, rather than pytest's
    # timeout killing the run with nothing to read.
    result = await run_node(["--test", "--test-timeout=30000", "test/"], target, ecs.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout
    assert "# pass 10" in result.stdout


@pytest.mark.toolchain
async def test_node_example_runs(node_modules: Path, target: str) -> None:
    listed, missing = await asyncio.gather(
        run_node(["example.js", target, "cn-hangzhou", "m-demo0000001"], target),
        run_node(["example.js", target, "cn-hangzhou", "m-doesnotexist0"], target),
    )
    assert listed.returncode == 0, listed.stderr
    *rows, summary = listed.stdout.splitlines()
    assert len(rows) >= 120
    assert summary.startswith(f"# {len(rows)} of {len(rows)} accounts")
    assert missing.returncode == 3
    assert "NOT_FOUND" in missing.stderr
