"""`imageshare` CLI against the live session server: output formats, progress, exit codes.

`watch` runs against a server of its own polling every second, as a real process;
`audit` against the session server, and one that keeps to a small upstream quota."""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imageshare_client.cli import main
from imageshare_emulator import EmulatorAdmin
from tests.support.images import new_image
from tests.support.processes import ServerProcess, base_env

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
    code, out, _ = run(capsys, *common, "--image", "m-demo0000001", "--account", listed)
    assert code == 0
    assert out == f"{listed} may use m-demo0000001 (listed, shared 2025-01-01T00:00:00Z)\n"
    code, out, _ = run(capsys, *common, "--image", "m-demo0000001", "--account", "999")
    assert (code, out) == (1, "999 may not use m-demo0000001\n")
    code, out, _ = run(capsys, *common, "--image", "m-demo0000002", "--account", "999")
    assert (code, out) == (0, "999 may use m-demo0000002 (the image is public)\n")
    code, out, _ = run(capsys, *common, "--image", "m-demo0000003", "--account", listed, "-q")
    assert (code, out) == (1, "")


def test_check_of_an_account_id_that_is_not_digits_is_a_failed_call(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, "check", "--target", target, "--region", REGION, "--image", "m-demo0000002",
        "--account", "nobody",
    )  # fmt: skip
    assert (code, out) == (3, "")
    assert err.startswith("imageshare: INVALID_ARGUMENT: ")
    assert "field aliyun_id" in err


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


# --- watch: a real process against a server that polls every second --------------------


def test_watch_prints_the_list_then_each_change(
    start_server: Callable[..., ServerProcess], emulator: EmulatorAdmin
) -> None:
    server = start_server("--watch-interval", "1")
    image_id, ids = new_image(emulator, 2)
    argv = [str(BIN / "imageshare"), "watch", "--target", server.target, "--region", REGION]
    watcher = subprocess.Popen(
        [*argv, "--image", image_id, "--json", "--max-changes", "2"],
        stdout=subprocess.PIPE,
        text=True,
        env=base_env(),
    )
    assert watcher.stdout is not None
    snapshot = json.loads(watcher.stdout.readline())
    assert snapshot["type"] == "snapshot"
    assert [a["aliyun_id"] for a in snapshot["added"]] == ids
    emulator.modify_share(REGION, image_id, add_accounts=["8600000000000001"])
    added = json.loads(watcher.stdout.readline())
    emulator.modify_share(REGION, image_id, remove_accounts=[ids[0]], add_groups=["all"])
    public = json.loads(watcher.stdout.readline())
    assert watcher.wait(10) == 0  # --max-changes 2
    assert added["type"] == "change"
    assert [a["aliyun_id"] for a in added["added"]] == ["8600000000000001"]
    assert added["total_count"] == 3
    assert public["removed"] == [ids[0]]
    assert public["groups_added"] == ["all"]
    assert public["became_public"] is True
    assert public["public"] is True

    text = subprocess.Popen(
        [*argv, "--image", image_id, "--max-changes", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env=base_env(),
    )
    assert text.stdout is not None
    assert text.stdout.readline().endswith(f"{image_id}: public, 2 accounts\n")
    emulator.modify_share(REGION, image_id, remove_groups=["all"])
    assert text.wait(10) == 0
    rest = text.stdout.read()
    assert "  - group all\n" in rest
    assert rest.endswith("  = 2 accounts\n")


def test_watch_of_a_missing_image_exits_3(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "watch", "--target", target, "--region", REGION, "--image", "m-doesnotexist0"
    )
    assert (code, out) == (3, "")
    assert err.startswith("imageshare: NOT_FOUND: ")


# --- audit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    clean: str
    public: str
    outside: str
    images: Path
    allow: Path


@pytest.fixture
def fleet(emulator: EmulatorAdmin, tmp_path: Path) -> Fleet:
    """Three images: clean, public, shared outside the allow list (two accounts)."""
    clean, allowed = new_image(emulator, 3)
    public, _ = new_image(emulator, 1, first_id=int(allowed[0]), groups=("all",))
    outside, _ = new_image(emulator, 4, first_id=int(allowed[0]) + 1)
    images = tmp_path / "images.txt"
    images.write_text(f"# golden images\n{clean}\n\n{public}\n{outside}  # web\n")
    allow = tmp_path / "allow.txt"
    allow.write_text("\n".join(allowed) + "\n")
    return Fleet(clean, public, outside, images, allow)


def audit(target: str, *args: str | Path) -> list[str]:
    return ["audit", "--target", target, "--region", REGION, *(str(a) for a in args)]


def test_audit_reports_public_images_and_shares_outside_the_allow_list(
    target: str, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys, *audit(target, "--images", fleet.images, "--allow-accounts", fleet.allow)
    )
    assert code == 1, err
    assert err == ""  # no progress bar when stderr is not a terminal
    table, _, summary = out.partition("\n\n")
    header, *rows = table.splitlines()
    assert header.split() == ["IMAGE", "PUBLIC", "ACCOUNTS", "OUTSIDE", "DETAIL"]
    found = {row.split()[0]: row.split()[1:4] for row in rows}
    assert found == {fleet.public: ["yes", "1", "0"], fleet.outside: ["no", "4", "2"]}
    assert "images:         3 in " in summary
    assert "public:         1\n" in summary
    assert "shared outside: 1 images, 2 account shares\n" in summary

    code, out, _ = run(
        capsys,
        *audit(target, "--images", fleet.images, "--allow-accounts", fleet.allow, "--json"),
    )
    lines = [json.loads(line) for line in out.splitlines()]
    *images, summary_line = lines
    assert [i["image_id"] for i in images] == [fleet.clean, fleet.public, fleet.outside]
    assert [i["public"] for i in images] == [False, True, False]
    assert [i["outside_count"] for i in images] == [0, 0, 2]
    assert summary_line["images"] == 3
    assert (summary_line["public"], summary_line["outside"], summary_line["errors"]) == (1, 1, 0)


def test_audit_exit_status_clean_found_and_errors(
    target: str,
    fleet: Fleet,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{fleet.clean}\n"))
    code, out, _ = run(capsys, *audit(target, "--images", "-", "--allow-accounts", fleet.allow))
    assert code == 0
    assert out.startswith("no public images, no shares outside the allow list\n")
    # Without an allow list only public images are findings.
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{fleet.clean}\n{fleet.outside}\n"))
    assert run(capsys, *audit(target, "--images", "-"))[0] == 0
    missing = f"{fleet.public}\nm-doesnotexist0\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(missing))
    code, out, err = run(capsys, *audit(target, "--images", "-", "--json"))
    assert code == 3  # an image could not be read: the audit is incomplete
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["public"] is True  # what was found is still reported
    assert lines[1]["error"]["code"] == "NOT_FOUND"
    assert "imageshare: m-doesnotexist0: NOT_FOUND" in err
    code, _, err = run(capsys, *audit(target, "--images", "/nonexistent/file"))
    assert code == 2
    assert "cannot read /nonexistent/file" in err


def test_audit_keeps_to_the_servers_quota_and_waits_out_refusals(
    start_server: Callable[..., ServerProcess],
    emulator: EmulatorAdmin,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Twelve images, five upstream calls a second: most listings are refused at first
    (RESOURCE_EXHAUSTED with a retry hint, their 0.5 s deadline too short for the queue);
    the audit waits each out and completes without one throttled upstream call."""
    server = start_server("--upstream-qps", "5", "--upstream-burst", "1", "--cache-ttl", "0")
    emulator.set(qps_limit=5)
    images = [new_image(emulator, 2)[0] for _ in range(12)]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(images) + "\n")
    started = time.monotonic()
    code, out, err = run(
        capsys,
        *audit(server.target, "--images", listing, "--concurrency", "12", "--timeout", "0.5"),
        "--json",
    )
    took = time.monotonic() - started
    assert code == 0, err
    *rows, summary = [json.loads(line) for line in out.splitlines()]
    assert [r["error"] for r in rows] == [None] * 12
    assert summary["errors"] == 0
    counters = emulator.counters()
    assert counters["calls_by_action"]["DescribeImageSharePermission"] == 12  # one each
    assert "Throttling.User" not in counters["outcomes"]
    refused = [r for r in server.records() if r.get("code") == "ResourceExhausted"]
    assert len(refused) >= 3  # the waits happened: refused first, listed later
    assert took >= 11 / 5 - 0.3  # the quota's floor: 11 intervals of 0.2 s after the first


def test_audit_progress_bar_on_a_terminal(target: str, fleet: Fleet) -> None:
    leader, follower = pty.openpty()
    proc = subprocess.run(
        [str(BIN / "imageshare"), *audit(target, "--images", fleet.images)],
        stdout=subprocess.PIPE,
        stderr=follower,
        timeout=60,
        check=False,
        env=base_env(),
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    progress = b"".join(chunks).decode()
    assert proc.returncode == 1  # the public image
    assert "] 3/3 images, 1 public" in progress
    assert "[" + "#" * 24 + "]" in progress
    assert progress.endswith("\r\x1b[K")
    assert "images" in proc.stdout.decode()
