"""buf lint and buf breaking run through scripts/buf_check.sh, as CI runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "buf_check.sh"
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"


def run(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.fixture(scope="module")
def repo_check() -> subprocess.CompletedProcess[str]:
    """The real repository's check; it also installs buf from npm on a fresh clone."""
    return run(ROOT)


def test_repository_protos_lint_clean_and_do_not_break(
    repo_check: subprocess.CompletedProcess[str],
) -> None:
    assert repo_check.returncode == 0, repo_check.stdout + repo_check.stderr
    assert "buf lint: ok" in repo_check.stdout
    assert "buf breaking" in repo_check.stdout
    assert BUF.exists()


def git(cwd: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@127.0.0.1", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


def test_breaking_change_and_missing_comment_are_caught(
    tmp_path: Path, repo_check: subprocess.CompletedProcess[str]
) -> None:
    assert repo_check.returncode == 0
    git(tmp_path, "init", "-q")
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "-q", "-m", "first")
    env = {"BUF": str(BUF), "BUF_CHECK_ROOT": str(tmp_path)}

    first = run(tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert "skipped" in first.stdout  # no previous commit: nothing to break

    proto = tmp_path / "protos" / "imageshare" / "v1" / "image_share.proto"
    text = proto.read_text()
    proto.write_text(text.replace("string image_id = 2;", "string image_id = 12;"))
    uncommitted = run(tmp_path, **env)  # compared with HEAD while protos/ is dirty
    assert uncommitted.returncode != 0
    assert "image_id" in uncommitted.stdout + uncommitted.stderr

    git(tmp_path, "commit", "-q", "-am", "renumber")
    committed = run(tmp_path, **env)  # compared with HEAD~1 once committed
    assert committed.returncode != 0
    assert "image_id" in committed.stdout + committed.stderr

    proto.write_text(text.replace("// ShareGroup is a group the image is shared with.\n", ""))
    lint = run(tmp_path, **env)
    assert lint.returncode != 0
    assert "ShareGroup" in lint.stdout + lint.stderr
