"""`imageshare` CLI against the app: output formats, progress, exit codes.

The app runs in this process (on the test's event loop, cache off); the CLI's ``main()``
is a blocking grpc client, so it runs in a worker thread, and its exit status is what it
returns (the ``imageshare`` command is ``sys.exit(main())``). stdout and stderr are those of
the test process: capsys, or a real terminal (a pty) where the CLI must see one.

`watch` runs against an app on a ``SteppedClock``: its poll happens when the test moves
the clock, after the test changed the list with the emulator's knobs, and the CLI's lines
are read as it writes them. `audit` runs against the app with the cache off, and against
one that keeps to a small upstream quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import os
import pty
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from imageshare_client.cli import main
from imageshare_emulator import Emulator
from tests.support.clock import SteppedClock
from tests.support.images import new_image
from tests.support.inprocess import InProcessApp, running
from tests.support.waiting import until

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
    """One CheckImageShare call each; the answer says how the account may use the image."""
    code, out, _ = await run(
        capsys, "list", "--target", target, "--region", REGION, "--image", "m-demo0000001", "--json"
    )
    assert code == 0
    first = json.loads(out.splitlines()[0])
    listed, shared = first["aliyun_id"], first["shared_time"]
    assert shared is not None
    common = ["check", "--target", target, "--region", REGION]
    code, out, _ = await run(capsys, *common, "--image", "m-demo0000001", "--account", listed)
    assert (code, out) == (0, f"{listed} may use m-demo0000001 (listed, shared {shared})\n")
    code, out, _ = await run(capsys, *common, "--image", "m-demo0000001", "--account", "999")
    assert (code, out) == (1, "999 may not use m-demo0000001\n")
    code, out, _ = await run(capsys, *common, "--image", "m-demo0000002", "--account", "999")
    assert (code, out) == (0, "999 may use m-demo0000002 (the image is public)\n")
    code, out, _ = await run(capsys, *common, "--image", "m-demo0000003", "--account", listed, "-q")
    assert (code, out) == (1, "")


async def test_check_of_an_account_id_that_is_not_digits_is_a_failed_call(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "may not use" (exit 1): a caller's typo must not read as a verdict, even for a
    public image, which every real account may use."""
    code, out, err = await run(
        capsys, "check", "--target", target, "--region", REGION, "--image", "m-demo0000002",
        "--account", "nobody",
    )  # fmt: skip
    assert (code, out) == (3, "")
    assert err.startswith("imageshare: INVALID_ARGUMENT: ")
    assert "field aliyun_id" in err


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
    assert (code, out) == (0, "1 may use m-demo0000002 (the image is public)\n")


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


# --- watch: the app polls when the test moves its clock ------------------------------------

WATCH_INTERVAL = 1.0
WATCHED = "8600000000000001"


class Lines(io.TextIOBase):
    """A stdout for the CLI in its worker thread: each whole line it writes, handed to the
    test's event loop as it is written (the CLI flushes after each event)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._lines: asyncio.Queue[str] = asyncio.Queue()
        self._partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str, /) -> int:
        *whole, self._partial = (self._partial + text).split("\n")
        for line in whole:
            self._loop.call_soon_threadsafe(self._lines.put_nowait, line)
        return len(text)

    async def next(self, within: float = 10.0) -> str:
        return await asyncio.wait_for(self._lines.get(), within)

    def rest(self) -> list[str]:
        """The lines written and not read yet."""
        lines = []
        while not self._lines.empty():
            lines.append(self._lines.get_nowait())
        return lines


@dataclass
class WatchCli:
    lines: Lines
    status: asyncio.Future[int]


@contextlib.asynccontextmanager
async def watch_cli(
    app: InProcessApp,
    clock: SteppedClock,
    monkeypatch: pytest.MonkeyPatch,
    image_id: str,
    *args: str,
) -> AsyncIterator[WatchCli]:
    """``imageshare watch`` of ``image_id`` in a worker thread, its stdout line by line.

    Nothing can stop a thread from outside, and a watch goes on by itself: should the test
    fail with the CLI still running, the image is deleted, and the watch ends NOT_FOUND at
    the next poll (or reconnection), and with it the thread.
    """
    lines = Lines()
    monkeypatch.setattr(sys, "stdout", lines)
    argv = ["watch", "--target", app.target, "--region", REGION, "--image", image_id, *args]
    cli = WatchCli(lines, asyncio.ensure_future(asyncio.to_thread(main, argv)))
    try:
        yield cli
    finally:
        if not cli.status.done():
            app.emulator.knobs.delete_image(REGION, image_id)
            for _ in range(100):
                clock.advance(WATCH_INTERVAL)
                if (await asyncio.wait({cli.status}, timeout=0.1))[0]:
                    break
        await cli.status


async def poll(clock: SteppedClock) -> None:
    """One watch interval: once the image's poller sleeps, move the clock past its poll."""
    await until(lambda: clock.sleepers >= 1)
    clock.advance(WATCH_INTERVAL)


async def test_watch_prints_the_list_then_each_change(
    ecs: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = SteppedClock()
    image_id, ids = new_image(ecs.knobs, 2)
    async with running(ecs, "--watch-interval", str(WATCH_INTERVAL), clock=clock) as app:
        async with watch_cli(
            app, clock, monkeypatch, image_id, "--json", "--max-changes", "2"
        ) as cli:
            snapshot = json.loads(await cli.lines.next())
            assert snapshot["type"] == "snapshot"
            assert [a["aliyun_id"] for a in snapshot["added"]] == ids
            assert (snapshot["total_count"], snapshot["public"]) == (2, False)
            ecs.knobs.modify_share(REGION, image_id, add_accounts=[WATCHED])
            await poll(clock)
            added = json.loads(await cli.lines.next())
            ecs.knobs.modify_share(REGION, image_id, remove_accounts=[ids[0]], add_groups=["all"])
            await poll(clock)
            public = json.loads(await cli.lines.next())
            assert await asyncio.wait_for(cli.status, 10) == 0  # --max-changes 2
        assert added["type"] == "change"
        assert [a["aliyun_id"] for a in added["added"]] == [WATCHED]
        assert added["added"][0]["shared_time"] is not None
        assert added["total_count"] == 3
        assert public["type"] == "change"
        assert public["removed"] == [ids[0]]
        assert public["groups_added"] == ["all"]
        assert public["became_public"] is True
        assert public["public"] is True
        assert public["total_count"] == 2

        async with watch_cli(app, clock, monkeypatch, image_id, "--max-changes", "1") as cli:
            assert (await cli.lines.next()).endswith(f"{image_id}: public, 2 accounts")
            ecs.knobs.modify_share(REGION, image_id, remove_groups=["all"])
            await poll(clock)
            assert await asyncio.wait_for(cli.status, 10) == 0
            rest = cli.lines.rest()
    assert any(line.endswith(f"    {WATCHED}  {added['added'][0]['shared_time']}") for line in rest)
    assert any(line.endswith("    group all") for line in rest)  # the snapshot's
    assert rest[-2].endswith("  - group all")
    assert rest[-1].endswith("  = 2 accounts")


async def test_watch_of_a_missing_image_exits_3(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run(
        capsys, "watch", "--target", target, "--region", REGION, "--image", "m-doesnotexist0"
    )
    assert (code, out) == (3, "")
    assert err.startswith("imageshare: NOT_FOUND: ")


# --- audit ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    clean: str
    public: str
    outside: str
    images: Path
    allow: Path


@pytest.fixture
def fleet(ecs: Emulator, tmp_path: Path) -> Fleet:
    """Three images: clean, public, shared outside the allow list (two accounts)."""
    clean, allowed = new_image(ecs.knobs, 3)
    public, _ = new_image(ecs.knobs, 1, first_id=int(allowed[0]), groups=("all",))
    outside, _ = new_image(ecs.knobs, 4, first_id=int(allowed[0]) + 1)
    images = tmp_path / "images.txt"
    images.write_text(f"# golden images\n{clean}\n\n{public}\n{outside}  # web\n")
    allow = tmp_path / "allow.txt"
    allow.write_text("\n".join(allowed) + "\n")
    return Fleet(clean, public, outside, images, allow)


def audit(target: str, *args: str | Path) -> list[str]:
    return ["audit", "--target", target, "--region", REGION, *(str(a) for a in args)]


async def test_audit_reports_public_images_and_shares_outside_the_allow_list(
    target: str, fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run(
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
    assert "errors:         0\n" in summary

    code, out, _ = await run(
        capsys,
        *audit(target, "--images", fleet.images, "--allow-accounts", fleet.allow, "--json"),
    )
    assert code == 1
    *images, summary_line = [json.loads(line) for line in out.splitlines()]
    assert [i["image_id"] for i in images] == [fleet.clean, fleet.public, fleet.outside]
    assert [i["public"] for i in images] == [False, True, False]
    assert [i["outside_count"] for i in images] == [0, 0, 2]
    assert len(images[2]["outside_accounts"]) == 2
    assert summary_line["images"] == 3
    assert (summary_line["public"], summary_line["outside"], summary_line["errors"]) == (1, 1, 0)


async def test_audit_exit_status_clean_found_and_errors(
    target: str,
    fleet: Fleet,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{fleet.clean}\n"))
    code, out, _ = await run(
        capsys, *audit(target, "--images", "-", "--allow-accounts", fleet.allow)
    )
    assert code == 0
    assert out.startswith("no public images, no shares outside the allow list\n")
    # Without an allow list only public images are findings.
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{fleet.clean}\n{fleet.outside}\n"))
    assert (await run(capsys, *audit(target, "--images", "-")))[0] == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{fleet.public}\nm-doesnotexist0\n"))
    code, out, err = await run(capsys, *audit(target, "--images", "-", "--json"))
    assert code == 3  # an image could not be read: the audit is incomplete
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[0]["public"] is True  # what was found is still reported
    assert lines[1]["error"]["code"] == "NOT_FOUND"
    assert "imageshare: m-doesnotexist0: NOT_FOUND" in err
    code, _, err = await run(capsys, *audit(target, "--images", "/nonexistent/file"))
    assert code == 2
    assert "cannot read /nonexistent/file" in err


@pytest.mark.slow
async def test_audit_keeps_to_the_servers_quota_and_waits_out_refusals(
    ecs: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Twelve images, five upstream calls a second: most listings are refused at first
    (RESOURCE_EXHAUSTED with a retry hint, their 0.5 s deadline too short for the queue);
    the audit waits each out and completes without one throttled upstream call.

    Seconds on purpose: the quota is the server's real rate limiter. The emulator is its
    witness: it throttles a seventh call within one second, which a server keeping to five
    a second never makes (six is possible at the edges of a second, one of them late), and
    a server that sent the twelve at once would.
    """
    images = [new_image(ecs.knobs, 2)[0] for _ in range(12)]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(images) + "\n")
    quota = ("--upstream-qps", "5", "--upstream-burst", "1", "--cache-ttl", "0")
    async with running(ecs, *quota) as app:
        ecs.knobs.set(qps_limit=6)
        code, out, err = await run(
            capsys,
            *audit(app.target, "--images", listing, "--concurrency", "12", "--timeout", "0.5"),
            "--json",
        )
        codes = [line["code"] for line in app.logs.rpc_lines()]
    assert code == 0, err
    *rows, summary = [json.loads(line) for line in out.splitlines()]
    assert [r["error"] for r in rows] == [None] * 12
    assert summary["errors"] == 0
    counters = ecs.knobs.counters()
    # One call each; on a loaded machine a listing let through just before its deadline
    # may not finish in time and is listed again (the next test): one more call for each.
    late = codes.count("DeadlineExceeded")
    assert 12 <= counters["calls_by_action"]["DescribeImageSharePermission"] <= 12 + late
    assert "Throttling.User" not in counters["outcomes"]
    assert codes.count("OK") == 12
    assert codes.count("ResourceExhausted") >= 3  # the waits happened: refused first, listed later


@pytest.mark.slow
async def test_audit_tries_again_a_listing_let_through_too_late_to_finish(
    ecs: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A turn for the quota just before the deadline leaves no time for a 150 ms upstream
    call: DEADLINE_EXCEEDED. The server finishes the read as a cache fill, and the audit's
    next try is served from the cache, so no image fails and no page is read twice."""
    images = [new_image(ecs.knobs, 2)[0] for _ in range(12)]
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(images) + "\n")
    quota = ("--upstream-qps", "5", "--upstream-burst", "1", "--max-orphan-reads", "16")
    async with running(ecs, *quota) as app:
        ecs.knobs.set(qps_limit=6, latency_ms=150)
        code, out, err = await run(
            capsys,
            *audit(app.target, "--images", listing, "--concurrency", "12", "--timeout", "0.5"),
            "--json",
        )
        codes = [line["code"] for line in app.logs.rpc_lines()]
    assert code == 0, err
    *rows, summary = [json.loads(line) for line in out.splitlines()]
    assert [r["error"] for r in rows] == [None] * 12
    assert summary["errors"] == 0
    assert "DeadlineExceeded" in codes  # the case happened, and was tried again
    assert ecs.knobs.counters()["calls_by_action"]["DescribeImageSharePermission"] == 12


async def test_audit_progress_bar_on_a_terminal(
    target: str, fleet: Fleet, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With stderr on a terminal, a self-erasing bar; stdout stays the report."""
    leader, follower = pty.openpty()
    terminal = os.fdopen(follower, "w", encoding="utf-8")
    assert terminal.isatty()
    monkeypatch.setattr(sys, "stderr", terminal)
    try:
        code, out, _ = await run(capsys, *audit(target, "--images", fleet.images))
    finally:
        terminal.close()
    try:
        progress = _read_all(leader).decode()
    finally:
        os.close(leader)
    assert code == 1  # the public image
    assert "] 3/3 images, 1 public" in progress
    assert "[" + "#" * 24 + "]" in progress
    assert progress.endswith("\r\x1b[K")
    assert "images" not in progress.rsplit("\r", 1)[-1]  # the bar is erased at the end
    assert out.startswith("IMAGE")
    assert "3/3" not in out
