"""The Go and Java callers (clients/go, clients/java) make live calls to the service.

Each program is built offline from Debian's packages by its ``build.sh``, with stubs that
scripts/gen_callers.sh generates here and now, and run against the app in this process.
The Python client is the reference: the same accounts in the same order, the same groups
and total; errors carry the same status and rich details.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from imageshare_client import AsyncImageShareClient
from imageshare_emulator import Emulator
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


async def call(caller: Path, app: InProcessApp, *args: str) -> Run:
    """Run the program against the app; the event loop serves the call meanwhile."""
    process = await asyncio.create_subprocess_exec(
        str(caller),
        app.target,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode().splitlines(), stderr.decode())


async def python_listing(app: InProcessApp, image_id: str) -> list[str]:
    """What the Python client reads, in the programs' output format."""
    async with AsyncImageShareClient(app.target) as client:
        listing = await client.list_shares(REGION, image_id).collect()
    return [
        *(f"account {account.aliyun_id}" for account in listing.accounts),
        *(f"group {group}" for group in listing.metadata.share_groups),
        f"total {listing.metadata.total_count}",
    ]


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
