"""The Go and Java callers (clients/go, clients/java) make live calls to the service.

Each program is built offline from Debian's packages by its ``build.sh``, with stubs that
scripts/gen_callers.sh generates here and now, and run against the app in this process.
The Python client is the reference: the same accounts in the same order, the same groups
and total; errors carry the same status and rich details. Checks answer how an account
may launch an image; watches print their snapshot, apply each change and reconnect when
their stream ends UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from imageshare_client import AsyncImageShareClient, ShareList
from imageshare_emulator import Emulator
from tests.support.images import new_image
from tests.support.inprocess import InProcessApp, running

# The first test of each language waits for its build (Go about 25 s with a cold cache).
pytestmark = [pytest.mark.toolchain, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
BUILDS = {
    "go": ROOT / "clients" / "go" / "build.sh",
    "java": ROOT / "clients" / "java" / "build.sh",
}
REGION = "cn-hangzhou"
DEMO_IMAGES = ("m-demo0000001", "m-demo0000002", "m-demo0000003")


@pytest.fixture(scope="module", params=sorted(BUILDS))
def caller(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The language's program, built from its sources and freshly generated stubs."""
    out = tmp_path_factory.mktemp(request.param)
    built = subprocess.run(
        ["bash", str(BUILDS[request.param]), str(out)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    return out / "imageshare-caller"


Process = asyncio.subprocess.Process


@dataclass
class Run:
    returncode: int
    lines: list[str]
    stderr: str

    @property
    def code(self) -> int:
        """The numeric gRPC status code from the ``status CODE NAME`` line."""
        (status,) = [line for line in self.lines if line.startswith("status ")]
        return int(status.split()[1])

    def values(self, kind: str) -> list[str]:
        return [line.split(" ", 1)[1] for line in self.lines if line.startswith(f"{kind} ")]


@contextlib.asynccontextmanager
async def started(caller: Path, app: InProcessApp, *args: str) -> AsyncIterator[Process]:
    """The program running against the app; killed on the way out if it still runs."""
    process = await asyncio.create_subprocess_exec(
        str(caller),
        app.target,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def finish(process: Process, *read: str) -> Run:
    """Wait for the program to exit; ``read``: the lines of its output already read."""
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Run(process.returncode, [*read, *stdout.decode().splitlines()], stderr.decode())


async def call(caller: Path, app: InProcessApp, *args: str) -> Run:
    """Run the program against the app; the event loop serves the call meanwhile."""
    async with started(caller, app, *args) as process:
        return await finish(process)


async def next_message(process: Process) -> list[str]:
    """The lines of a watch's next message, up to its ``held`` line."""
    assert process.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("held "):
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line, f"the output ended after {lines}"
        lines.append(line.decode().rstrip("\n"))
    return lines


async def python_collect(app: InProcessApp, image_id: str) -> ShareList:
    async with AsyncImageShareClient(app.target) as client:
        return await client.list_shares(REGION, image_id).collect()


def listing_lines(listing: ShareList) -> list[str]:
    return [
        *(f"account {account.aliyun_id}" for account in listing.accounts),
        *(f"group {group}" for group in listing.metadata.share_groups),
        f"total {listing.metadata.total_count}",
    ]


async def python_listing(app: InProcessApp, image_id: str) -> list[str]:
    """What the Python client reads, in the programs' output format."""
    return listing_lines(await python_collect(app, image_id))


async def python_snapshot(app: InProcessApp, image_id: str) -> list[str]:
    """A watch's snapshot as the programs print it, from what the Python client lists."""
    listing = await python_collect(app, image_id)
    public = str(listing.metadata.is_public).lower()
    return ["snapshot", *listing_lines(listing), f"held {len(listing.accounts)} public {public}"]


async def test_lists_every_demo_image_as_the_python_client_does(
    caller: Path, ecs: Emulator
) -> None:
    async with running(ecs) as app:
        for image_id in DEMO_IMAGES:
            expected = await python_listing(app, image_id)
            run = await call(caller, app, "list", REGION, image_id)
            assert (run.returncode, run.stderr) == (0, ""), image_id
            assert run.lines == expected, image_id


async def test_full_listing_has_every_account_in_upstream_order(
    caller: Path, ecs: Emulator
) -> None:
    async with running(ecs) as app:
        run = await call(caller, app, "list", REGION, "m-demo0000001")
    image = ecs.data.get(REGION, "m-demo0000001")
    assert image is not None
    expected = [account.aliyun_id for account in image.accounts]
    assert len(expected) == 137
    assert run.values("account") == expected
    assert run.values("total") == ["137"]


async def test_unknown_image_is_not_found_with_error_info(caller: Path, ecs: Emulator) -> None:
    async with running(ecs) as app:
        run = await call(caller, app, "list", REGION, "m-doesnotexist0")
        python = await app.error(region_id=REGION, image_id="m-doesnotexist0")
    assert run.returncode == 3, run.stderr
    assert python.code is grpc.StatusCode.NOT_FOUND
    assert run.code == python.code.value[0]
    assert python.error_info is not None
    assert run.values("reason") == ["INVALID_IMAGE_ID_NOT_FOUND"] == [python.error_info.reason]
    assert run.values("account") == []


async def test_bad_region_is_invalid_argument_naming_the_field(caller: Path, ecs: Emulator) -> None:
    async with running(ecs) as app:
        run = await call(caller, app, "list", "Hangzhou!", "m-demo0000001")
        python = await app.error(region_id="Hangzhou!", image_id="m-demo0000001")
    assert run.returncode == 3, run.stderr
    assert python.code is grpc.StatusCode.INVALID_ARGUMENT
    assert run.code == python.code.value[0]
    assert python.bad_request is not None
    assert run.values("field") == ["region_id"]
    assert run.values("field") == [v.field for v in python.bad_request.field_violations]
    assert run.values("reason") == ["INVALID_REQUEST"]
    assert ecs.knobs.counters()["total"] == 0, "refused before the upstream"


async def test_health_check_is_serving(caller: Path, ecs: Emulator) -> None:
    async with running(ecs) as app:
        run = await call(caller, app, "health")
    assert (run.returncode, run.lines) == (0, ["health SERVING"]), run.stderr


# --- CheckImageShare ---------------------------------------------------------------------


async def test_check_says_via_account_via_public_not_shared_or_not_found(
    caller: Path, ecs: Emulator
) -> None:
    public, ids = new_image(ecs.knobs, 3, groups=("all",))
    shared_time = "2025-03-04T05:06:07Z"
    ecs.knobs.modify_share(
        REGION, public, add_accounts=[{"aliyun_id": ids[1], "shared_time": shared_time}]
    )
    private, _ = new_image(ecs.knobs, 2)
    async with running(ecs) as app:
        # One after the other: concurrent JVMs start no faster on a small machine.
        listed = await call(caller, app, "check", REGION, public, ids[1])
        unlisted = await call(caller, app, "check", REGION, public, "999")
        not_shared = await call(caller, app, "check", REGION, private, "999")
        missing = await call(caller, app, "check", REGION, "m-doesnotexist0", "999")
    for run in (listed, unlisted, not_shared):
        assert (run.returncode, run.stderr) == (0, ""), run.lines
    # Listed wins over public, and names the time of the share.
    assert listed.lines == [
        "shared true",
        "via SHARE_VIA_ACCOUNT",
        f"shared_time {shared_time}",
        "total 3",
    ]
    assert unlisted.lines == ["shared true", "via SHARE_VIA_PUBLIC", "total 3"]
    assert not_shared.lines == ["shared false", "via SHARE_VIA_UNSPECIFIED", "total 2"]

    assert missing.returncode == 3, missing.stderr
    assert missing.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert missing.values("reason") == ["INVALID_IMAGE_ID_NOT_FOUND"]
    assert missing.values("shared") == []


# --- WatchImageShares --------------------------------------------------------------------


async def test_watch_snapshot_is_what_the_python_client_lists(caller: Path, ecs: Emulator) -> None:
    # The long list and the empty one; the public image is watched by the reconnect test.
    async with running(ecs) as app:
        long = await call(caller, app, "watch", REGION, "m-demo0000001", "1")
        assert (long.returncode, long.stderr) == (0, "")
        assert long.lines == await python_snapshot(app, "m-demo0000001")
        empty = await call(caller, app, "watch", REGION, "m-demo0000003", "1")
        assert (empty.returncode, empty.stderr) == (0, "")
        assert empty.lines == await python_snapshot(app, "m-demo0000003")
    assert len(long.values("account")) == 137
    assert long.lines[-2:] == ["total 137", "held 137 public false"]
    assert empty.lines == ["snapshot", "total 0", "held 0 public false"]


async def test_watch_applies_each_change_to_its_snapshot(caller: Path, ecs: Emulator) -> None:
    image_id, ids = new_image(ecs.knobs, 3)
    async with (
        running(ecs, "--watch-interval", "1") as app,
        started(caller, app, "watch", REGION, image_id, "2") as process,
    ):
        snapshot = await next_message(process)
        assert snapshot == await python_snapshot(app, image_id)
        # Unshare one, share another again (a new time) and a new one, make it public.
        ecs.knobs.modify_share(
            REGION,
            image_id,
            remove_accounts=[ids[0]],
            add_accounts=[
                {"aliyun_id": ids[2], "shared_time": "2025-05-06T07:08:09Z"},
                {"aliyun_id": "4242", "shared_time": "2025-05-06T07:08:09Z"},
            ],
            add_groups=["all"],
        )
        run = await finish(process, *snapshot)
        after = await python_collect(app, image_id)
    assert (run.returncode, run.stderr) == (0, "")
    assert run.lines[len(snapshot) :] == [
        "change",
        f"removed {ids[0]}",
        f"account {ids[2]}",
        "account 4242",
        "group all",
        "total 3",
        "held 3 public true",
    ]
    assert [a.aliyun_id for a in after.accounts] == [ids[1], ids[2], "4242"]
    assert after.metadata.is_public


async def test_watch_reconnects_when_its_stream_ends_unavailable(
    caller: Path, ecs: Emulator
) -> None:
    # The connection is closed soon after its maximum age: the open watch ends UNAVAILABLE,
    # and the program opens another on a new connection.
    async with running(
        ecs, "--max-connection-age", "0.5", "--max-connection-age-grace", "0.3"
    ) as app:
        expected = await python_snapshot(app, "m-demo0000002")
        run = await call(caller, app, "watch", REGION, "m-demo0000002", "2")
    assert (run.returncode, run.stderr) == (0, "")
    reconnects = run.values("reconnect")
    assert reconnects
    assert {line.split()[0] for line in reconnects} == {str(grpc.StatusCode.UNAVAILABLE.value[0])}
    messages = [line for line in run.lines if not line.startswith("reconnect ")]
    assert messages == expected * 2
    # The second snapshot came on a stream opened after the first one ended.
    first, second = [i for i, line in enumerate(run.lines) if line == "snapshot"]
    assert any(line.startswith("reconnect ") for line in run.lines[first:second])
