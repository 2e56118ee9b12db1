"""`imageshare` CLI against the app: output formats, progress, exit codes.

The app runs in this process (on the test's event loop, cache off); the CLI's ``main()``
is a blocking grpc client, so it runs in a worker thread, and its exit status is what it
returns (the ``imageshare`` command is ``sys.exit(main())``). stdout and stderr are those of
the test process: capsys, or a real terminal (a pty) where the CLI must see one.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import pty
import sys
from collections.abc import AsyncIterator
from importlib.metadata import entry_points

import pytest

from imageshare_client.cli import main
from imageshare_emulator import Emulator
from tests.support.inprocess import running

REGION = "cn-hangzhou"


@pytest.fixture
async def target(ecs: Emulator) -> AsyncIterator[str]:
    """The address of an app of this test's own, cache off."""
    async with running(ecs, "--cache-ttl", "0") as app:
        yield app.target


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``imageshare *argv`` in a worker thread: its exit status, stdout and stderr."""
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_imageshare_command_is_this_main() -> None:
    """So the statuses ``main()`` returns below are the command's exit statuses."""
    commands = entry_points(group="console_scripts", name="imageshare")
    assert {command.value for command in commands} == {"imageshare_client.cli:main"}


async def test_list_prints_a_table_and_a_summary(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run(
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


async def test_list_json_lines(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run(
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


async def test_public_image_in_json(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run(
        capsys, "list", "--target", target, "--region", REGION, "--image", "m-demo0000002", "--json"
    )
    summary = json.loads(out.splitlines()[-1])
    assert code == 0
    assert summary["share_groups"] == ["all"]
    assert summary["public"] is True


async def test_check_exit_status(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run(
        capsys, "list", "--target", target, "--region", REGION, "--image", "m-demo0000001", "--json"
    )
    assert code == 0
    listed = json.loads(out.splitlines()[0])["aliyun_id"]
    common = ["check", "--target", target, "--region", REGION]
    code, out, _ = await run(capsys, *common, "--image", "m-demo0000001", "--account", listed)
    assert (code, out) == (0, f"{listed} may use m-demo0000001\n")
    code, out, _ = await run(capsys, *common, "--image", "m-demo0000001", "--account", "nobody")
    assert (code, out) == (1, "nobody may not use m-demo0000001\n")
    code, _, _ = await run(capsys, *common, "--image", "m-demo0000002", "--account", "nobody")
    assert code == 0
    code, out, _ = await run(capsys, *common, "--image", "m-demo0000003", "--account", listed, "-q")
    assert (code, out) == (1, "")


async def test_errors_name_the_grpc_status(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run(
        capsys, "list", "--target", target, "--region", REGION, "--image", "m-doesnotexist0"
    )
    assert (code, out) == (3, "")
    assert err.startswith("imageshare: NOT_FOUND: ")
    assert "reason: " in err
    code, _, err = await run(
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


async def test_target_defaults_to_environment(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGESHARE_TARGET", target)
    code, out, _ = await run(
        capsys, "check", "--region", REGION, "--image", "m-demo0000002", "--account", "1"
    )
    assert (code, out) == (0, "1 may use m-demo0000002\n")


def _read_all(leader: int) -> bytes:
    """Everything written to a pty whose follower side is closed."""
    chunks = []
    while True:  # a pty hands its buffer over in pieces; read until the writer is gone
        try:
            chunk = os.read(leader, 65536)
        except OSError as exc:
            if exc.errno != errno.EIO:  # EIO: no writer left
                raise
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def test_progress_on_a_terminal(
    target: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stderr on a terminal, a self-erasing progress line; stdout stays a clean table."""
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w", encoding="utf-8")
    assert terminal.isatty()
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        code, out, _ = await run(
            capsys,
            "list",
            "--target",
            target,
            "--region",
            REGION,
            "--image",
            "m-demo0000001",
            "--page-size",
            "10",
        )
    finally:
        terminal.close()
    try:
        progress = _read_all(leader).decode()
    finally:
        os.close(leader)
    assert code == 0
    assert "received 50/" in progress
    assert "received 100/" in progress
    assert progress.endswith("\r\x1b[K")
    assert "received" not in out
    assert out.startswith("ALIYUN_ID")
