"""`imageshare` CLI against the live session server: output formats, progress, exit codes."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from imageshare_client.cli import main
from tests.support.processes import ServerProcess

BIN = Path(sys.executable).parent
REGION = "cn-hangzhou"


@pytest.fixture
def target(server: ServerProcess) -> str:
    """The session server from conftest.py (embedded in front of the session emulator)."""
    return server.target


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_prints_a_table_and_a_summary(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "list", "--target", target, "--region", REGION, "--image", "m-demo0000001"
    )
    assert code == 0, err
    table, _, summary = out.partition("\n\n")
    header, *rows = table.splitlines()
    assert header.split() == ["ALIYUN_ID", "SHARED_TIME"]
    assert len(rows) >= 120
    assert len({row.split()[0] for row in rows}) == len(rows)
    assert f"total:        {len(rows)} accounts ({len(rows)} listed)" in summary
    assert "share groups: -" in summary
    assert "cache:" in summary
    assert err == ""  # no progress noise when stderr is not a terminal


def test_list_json_lines(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys,
        "list",
        "--target",
        target,
        "--region",
        REGION,
        "--image",
        "m-demo0000001",
        "--page-size",
        "9",
        "--bypass-cache",
        "--json",
    )
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    *accounts, summary = lines
    assert {line["type"] for line in accounts} == {"account"}
    assert all(isinstance(a["aliyun_id"], str) for a in accounts)
    assert summary["type"] == "summary"
    assert summary["total_count"] == summary["accounts"] == len(accounts)
    assert summary["cache_status"] == "BYPASS"
    assert summary["public"] is False
    assert summary["upstream_request_ids"]


def test_public_image_in_json(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "list", "--target", target, "--region", REGION, "--image", "m-demo0000002", "--json"
    )
    summary = json.loads(out.splitlines()[-1])
    assert code == 0
    assert summary["share_groups"] == ["all"]
    assert summary["public"] is True


def test_check_exit_status(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "list", "--target", target, "--region", REGION, "--image", "m-demo0000001", "--json"
    )
    assert code == 0
    listed = json.loads(out.splitlines()[0])["aliyun_id"]
    common = ["check", "--target", target, "--region", REGION]
    assert run(capsys, *common, "--image", "m-demo0000001", "--account", listed)[0] == 0
    assert run(capsys, *common, "--image", "m-demo0000001", "--account", "nobody")[0] == 1
    assert run(capsys, *common, "--image", "m-demo0000002", "--account", "nobody")[0] == 0
    code, out, _ = run(capsys, *common, "--image", "m-demo0000003", "--account", listed, "-q")
    assert (code, out) == (1, "")


def test_errors_name_the_grpc_status(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "list", "--target", target, "--region", REGION, "--image", "m-doesnotexist0"
    )
    assert (code, out) == (3, "")
    assert err.startswith("imageshare: NOT_FOUND: ")
    assert "reason: " in err
    code, _, err = run(
        capsys, "list", "--target", target, "--region", "Bad Region", "--image", "m-demo0000001"
    )
    assert code == 3
    assert "INVALID_ARGUMENT" in err
    assert "field region_id" in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["list", "--region", REGION])
    assert caught.value.code == 2
    assert "--image" in capsys.readouterr().err


def test_target_defaults_to_environment(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGESHARE_TARGET", target)
    assert (
        run(capsys, "check", "--region", REGION, "--image", "m-demo0000002", "--account", "1")[0]
        == 0
    )


def test_progress_on_a_terminal(target: str) -> None:
    """With stderr on a terminal, a self-erasing progress line; stdout stays a clean table."""
    leader, follower = pty.openpty()
    proc = subprocess.run(
        [
            str(BIN / "imageshare"),
            "list",
            "--target",
            target,
            "--region",
            REGION,
            "--image",
            "m-demo0000001",
            "--page-size",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=follower,
        timeout=60,
        check=False,
    )
    os.close(follower)
    chunks = []
    while True:  # a pty hands its buffer over in pieces; read until the writer is gone
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: no writer left
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    progress = b"".join(chunks).decode()
    assert proc.returncode == 0
    assert "received 50/" in progress
    assert progress.endswith("\r\x1b[K")
    assert "received" not in proc.stdout.decode()
