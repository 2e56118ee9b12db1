"""The Node.js client (clients/node) against a live server, with node's own runner.

The suite runs against a server of its own that polls watched images every second, in
front of the session emulator, whose admin API the watch test uses to change a list."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.processes import EmulatorProcess, ServerProcess

NODE_DIR = Path(__file__).resolve().parent.parent / "clients" / "node"


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """A fresh clone has no node_modules: install exactly what package-lock.json pins."""
    modules = NODE_DIR / "node_modules"
    if not (modules / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            timeout=600,
        )
    return modules


def run_node(
    args: list[str], target: str, emulator_url: str = ""
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["node", *args],
        cwd=NODE_DIR,
        env={**os.environ, "IMAGESHARE_TARGET": target, "IMAGESHARE_EMULATOR_URL": emulator_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_node_client_suite(
    node_modules: Path,
    emulator_process: EmulatorProcess,
    start_server: Callable[..., ServerProcess],
) -> None:
    server = start_server("--cache-ttl", "0", "--watch-interval", "1")
    result = run_node(["--test", "test/"], server.target, emulator_process.url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout
    assert "# pass 10" in result.stdout


def test_node_example_runs(node_modules: Path, server: ServerProcess) -> None:
    result = run_node(["example.js", server.target, "cn-hangzhou", "m-demo0000001"], server.target)
    assert result.returncode == 0, result.stderr
    *rows, summary = result.stdout.splitlines()
    assert len(rows) >= 120
    assert summary.startswith(f"# {len(rows)} of {len(rows)} accounts")
    missing = run_node(
        ["example.js", server.target, "cn-hangzhou", "m-doesnotexist0"], server.target
    )
    assert missing.returncode == 3
    assert "NOT_FOUND" in missing.stderr
