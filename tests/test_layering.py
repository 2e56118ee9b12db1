"""Dependencies inside the server point one way, as CONTRIBUTING.md draws them.

Every import of an ``imageshare_server`` package, at module level, inside a function or
under ``TYPE_CHECKING``, must name a package drawn below the importing one (or its own).
The core imports nothing that talks to the network: no gRPC, HTTP or Redis.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER = ROOT / "server" / "imageshare_server"

# CONTRIBUTING.md's drawing, top to bottom: a package may import those with a lower rank.
RANK = {
    "__main__": 10,
    "app": 9,
    "grpcapi": 8,
    "watch": 7,
    "redis_tier": 6,
    "listing": 5,
    "credentials": 4,
    "upstream": 3,
    "ratelimit": 3,
    "cache": 3,
    "config": 2,
    "observability": 2,
    "core": 1,
    "redaction": 0,
    "__init__": 0,
}


def _imports(path: Path) -> Iterator[str]:
    """Every ``imageshare_server.*`` module ``path`` imports, wherever the import is."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        yield from (name for name in names if name.startswith("imageshare_server."))


def _package(path: Path) -> str:
    return path.relative_to(SERVER).parts[0].removesuffix(".py")


def test_every_part_of_the_server_has_a_place_in_the_drawing() -> None:
    parts = {_package(path) for path in SERVER.rglob("*.py")}
    assert parts == set(RANK)


def test_the_contributing_guide_draws_the_same_order() -> None:
    text = (ROOT / "CONTRIBUTING.md").read_text()
    drawing = text.split("dependencies point one way", 1)[1].split("```")[1]
    rows = [line.split("  ")[0].replace(",", " ").split() for line in drawing.splitlines()]
    drawn = [name for row in rows for name in row if name in RANK]
    ranks = [RANK[name] for name in drawn]
    assert ranks == sorted(ranks, reverse=True), drawn
    assert set(drawn) == set(RANK) - {"__main__", "__init__"}


def test_imports_point_down_the_drawing() -> None:
    upward = [
        f"{path.relative_to(SERVER)} imports {name}"
        for path in sorted(SERVER.rglob("*.py"))
        for name in _imports(path)
        if (target := name.split(".")[1]) != _package(path) and RANK[target] >= RANK[_package(path)]
    ]
    assert not upward


@pytest.mark.subprocess
def test_the_core_loads_no_grpc_http_or_redis() -> None:
    modules = sorted(
        f"imageshare_server.core.{path.stem}"
        for path in (SERVER / "core").glob("*.py")
        if path.stem != "__init__"
    )
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "imageshare_server" in loaded
    assert not {"grpc", "httpx", "httpcore", "redis", "h2", "prometheus_client"} & set(loaded)
