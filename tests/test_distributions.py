"""The three distributions: what each wheel carries, what each needs, and one version for all.

- imageshare-server carries no emulator, no demo AccessKey and no tests, and
  ``--emulator`` without the emulator installed is a clear start-up error.
- imageshare-client works with exactly the floors it declares (a fresh venv,
  those versions, a live call and the CLI against a running server).
- The version is the package metadata's; the chart, the Node package, the
  image label and ``imageshare_build_info`` say the same.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from prometheus_client import CollectorRegistry

from imageshare_emulator import DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET, Emulator
from imageshare_server.observability.metrics import ServiceMetrics
from tests.support.inprocess import running

ROOT = Path(__file__).resolve().parent.parent
VERSION = version("imageshare-server")


def pyproject(path: Path) -> dict[str, object]:
    with path.open("rb") as fh:
        project: dict[str, object] = tomllib.load(fh)["project"]
    return project


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The server's and the client's wheels, built from a copy of this checkout.

    A copy, because setuptools leaves a build/ directory next to the sources it builds.
    """
    out = tmp_path_factory.mktemp("wheels")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    shutil.copytree(ROOT / "server", source / "server", ignore=skip)
    shutil.copytree(
        ROOT / "clients" / "python", source / "clients" / "python", symlinks=True, ignore=skip
    )
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("-w", str(out), str(source), str(source / "clients" / "python")),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    built = {path.name.split("-")[0]: path for path in out.glob("*.whl")}
    return {"server": built["imageshare_server"], "client": built["imageshare_client"]}


def test_the_server_wheel_carries_no_emulator_no_demo_key_and_no_tests(
    wheels: dict[str, Path],
) -> None:
    with zipfile.ZipFile(wheels["server"]) as wheel:
        names = wheel.namelist()
        assert names
        assert all(n.startswith(("imageshare_server/", "imageshare_server-")) for n in names)
        assert not [n for n in names if "emulator" in n or "/tests/" in n or "sts_stand" in n]
        for name in names:
            text = wheel.read(name)
            assert DEMO_ACCESS_KEY_ID.encode() not in text, name
            assert DEMO_ACCESS_KEY_SECRET.encode() not in text, name
        metadata = wheel.read(f"imageshare_server-{VERSION}.dist-info/METADATA").decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    assert not [r for r in requires if "emulator" in r]
    assert any(r.startswith("Requires-Dist: redis") and "extra ==" in r for r in requires)
    # Tracing is optional too: every OpenTelemetry package only with the otel extra.
    otel = [r for r in requires if r.startswith("Requires-Dist: opentelemetry")]
    assert {r.split()[1].split("<")[0].split(">")[0] for r in otel} == {
        "opentelemetry-api",
        "opentelemetry-sdk",
        "opentelemetry-exporter-otlp-proto-grpc",
    }
    assert all('extra == "otel"' in r for r in otel)


def test_the_client_wheel_is_the_client_and_needs_only_grpc_and_protobuf(
    wheels: dict[str, Path],
) -> None:
    with zipfile.ZipFile(wheels["client"]) as wheel:
        names = wheel.namelist()
        metadata = wheel.read(f"imageshare_client-{VERSION}.dist-info/METADATA").decode()
    assert all(
        n.startswith(("imageshare/", "imageshare_client/", "imageshare_client-")) for n in names
    )
    assert "imageshare/v1/image_share_pb2.py" in names
    requires = {
        Requirement(line.removeprefix("Requires-Dist: ")).name
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:")
    }
    assert requires == {"grpcio", "grpcio-status", "protobuf"}


def test_emulator_mode_without_the_emulator_installed_exits_2_naming_the_package() -> None:
    """A production install has no emulator: --emulator must say so, in one line."""
    script = (
        "import sys; sys.modules['imageshare_emulator'] = None\n"
        "from imageshare_server.app import main\n"
        "sys.exit(main(['--emulator', '--listen', '127.0.0.1:0', '--metrics-listen', '']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0]["event"] == "startup_failed"
    assert "imageshare-emulator" in lines[0]["msg"]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
async def test_the_client_works_with_exactly_its_declared_floors(
    tmp_path: Path, ecs: Emulator, wheels: dict[str, Path]
) -> None:
    """A fresh venv with the lowest versions the client declares, then a live call and the CLI."""
    declared = pyproject(ROOT / "clients" / "python" / "pyproject.toml")["dependencies"]
    assert isinstance(declared, list)
    floors = [
        f"{req.name}=={spec.version}"
        for req in map(Requirement, declared)
        for spec in req.specifier
        if spec.operator == ">="
    ]
    assert len(floors) == 3
    venv = tmp_path / "venv"
    # An empty venv (no pip of its own: this pip installs into it, a few seconds sooner).
    await _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", str(python))
    # The floors, and the client's wheel with whatever it needs beyond them: nothing, when
    # the floors are what it declares.
    await _run(*pip, "install", "-q", *floors, str(wheels["client"]))
    installed = await _run(*pip, "list", "--format", "json")
    versions = {p["name"].lower(): p["version"] for p in json.loads(installed)}
    for floor in floors:
        name, wanted = floor.split("==")
        assert versions[name] == wanted
    async with running(ecs) as app:
        call = (
            "import sys\n"
            "from imageshare_client import ImageShareClient\n"
            "with ImageShareClient(sys.argv[1]) as client:\n"
            "    ids = [a.aliyun_id for a in client.list_shares('cn-hangzhou', 'm-demo0000001')]\n"
            "print(len(ids))\n"
        )
        assert (await _run(str(python), "-c", call, app.target)).strip() == "137"
        cli = venv / "bin" / "imageshare"
        out = await _run(
            str(cli), "list", "--target", app.target,
            "--region", "cn-hangzhou", "--image", "m-demo0000002", "--json",
        )  # fmt: skip
        assert '"all"' in out


async def _run(*argv: str) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, f"{argv}: {err.decode()}"
    return out.decode()


def test_every_place_that_names_the_version_agrees() -> None:
    assert pyproject(ROOT / "clients" / "python" / "pyproject.toml")["version"] == VERSION
    assert pyproject(ROOT / "emulator" / "pyproject.toml")["version"] == VERSION
    assert version("imageshare-client") == version("imageshare-emulator") == VERSION
    chart = yaml.safe_load((ROOT / "helm" / "imageshare" / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION
    node = json.loads((ROOT / "clients" / "node" / "package.json").read_text())
    assert node["version"] == VERSION
    label = re.search(r"^ARG VERSION=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert label is not None
    assert label.group(1) == VERSION
    registry = CollectorRegistry()
    ServiceMetrics(registry, revision="abc1234")
    build = {
        "version": VERSION,
        "revision": "abc1234",
        "grpcio": version("grpcio"),
        "protobuf": version("protobuf"),
    }
    assert registry.get_sample_value("imageshare_build_info", build) == 1
    for pinned in ("imageshare-client==", "imageshare-server=="):
        dependents = [
            r
            for p in (ROOT / "pyproject.toml", ROOT / "emulator" / "pyproject.toml")
            for r in pyproject(p)["dependencies"]  # type: ignore[attr-defined]
            if r.startswith(pinned)
        ]
        assert dependents
        assert all(d == pinned + VERSION for d in dependents)
