"""The Node client's dependencies, installed once for every test that runs Node."""

from __future__ import annotations

import fcntl
import subprocess
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"


def install_node_modules() -> Path:
    """``npm ci`` in clients/node when a fresh clone has no node_modules yet.

    Exactly what package-lock.json pins. A lock file keeps test processes running at the
    same time (and scripts/buf_check.sh, which installs buf the same way) from installing
    over each other: the second waits, then finds the modules there.
    """
    modules = NODE_DIR / "node_modules"
    with (NODE_DIR / ".npm-install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (modules / "@grpc" / "grpc-js").is_dir():
            subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=NODE_DIR,
                check=True,
                timeout=600,
            )
    return modules
