"""The container image, built with podman and run the way production runs it.

``scripts/image/build.sh`` (``make image``) builds the Dockerfile, on a stand-in base made
from Debian packages where no registry is reachable; every step is cached, so when the
image is current the build takes seconds and this module always tests the source as it is.
The container runs read-only, without capabilities or new privileges, as the image's user,
on the host network, against the emulator on the host through ``--upstream-endpoint`` with
credentials from its environment: the production path, not ``--emulator``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from imageshare.v1 import image_share_pb2_grpc
from imageshare_emulator import DEMO_ACCESS_KEY_ID, DEMO_ACCESS_KEY_SECRET, EmulatorAdmin
from tests.support.processes import EmulatorProcess, Process, base_env
from tests.support.rpc import Response, account_ids, list_all
from tests.support.waiting import wait_until

# The first test waits for the build: about 90 s with nothing cached, the base included.
pytestmark = [pytest.mark.toolchain, pytest.mark.subprocess, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "image" / "build.sh"
CONTAINERS_CONF = ROOT / "scripts" / "image" / "containers.conf"
UID = 10001
GRACE_PERIOD = 10
DEMO_ACCOUNTS = 137


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args],
        env=base_env({"CONTAINERS_CONF": str(CONTAINERS_CONF)}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def image() -> str:
    """The image ID of the current source (built, or found in the layer cache)."""
    built = subprocess.run(
        ["bash", str(BUILD)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=850,
        check=False,
    )
    assert built.returncode == 0, built.stderr[-5000:]
    image_id = built.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", image_id), built.stdout
    return image_id


class Container(Process):
    """``podman run`` in the foreground: its stderr is the server's JSON log."""

    def __init__(self, image: str, upstream: str) -> None:
        self.name = f"imageshare-test-{uuid.uuid4().hex[:12]}"
        argv = [
            "podman",
            "run",
            "--rm",
            "--name",
            self.name,
            "--network",
            "host",
            "--read-only",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            # Credentials come from podman's environment, never from its command line.
            "--env",
            "ALIBABA_CLOUD_ACCESS_KEY_ID",
            "--env",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET",
            "--env",
            "ALIBABA_CLOUD_ECS_METADATA_DISABLED=true",
            "--env",
            f"IMAGESHARE_GRACE_PERIOD={GRACE_PERIOD}",
            image,
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--upstream-endpoint",
            upstream,
        ]
        env = base_env(
            {
                "CONTAINERS_CONF": str(CONTAINERS_CONF),
                "ALIBABA_CLOUD_ACCESS_KEY_ID": DEMO_ACCESS_KEY_ID,
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": DEMO_ACCESS_KEY_SECRET,
            }
        )
        try:
            super().__init__(argv, env, "serving")
        except BaseException:
            # It never served (or the wait was cut short): leave no container behind.
            podman("rm", "--force", "--time", "0", self.name)
            raise
        self.target = f"127.0.0.1:{self.ready['grpc_port']}"
        self.metrics_url = f"http://127.0.0.1:{self.ready['metrics_port']}/metrics"

    def host_pid(self) -> int:
        inspected = podman("inspect", "--format", "{{.State.Pid}}", self.name)
        assert inspected.returncode == 0, inspected.stderr
        return int(inspected.stdout)

    def remove(self) -> None:
        if self.proc.poll() is None:
            podman("rm", "--force", "--time", "0", self.name)
        self.stop()


@pytest.fixture(scope="module")
def container(image: str, emulator_process: EmulatorProcess) -> Iterator[Container]:
    started = Container(image, emulator_process.url)
    yield started
    started.remove()


def test_labels_carry_the_version_and_revision(image: str) -> None:
    inspected = podman("image", "inspect", "--format", "{{json .Labels}}", image)
    assert inspected.returncode == 0, inspected.stderr
    labels = json.loads(inspected.stdout)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    prefix = "org.opencontainers.image."
    assert labels[f"{prefix}version"] == importlib.metadata.version("imageshare-server")
    assert labels[f"{prefix}revision"] in (head, f"{head}-dirty")
    base = os.environ.get("PYTHON_IMAGE") or "localhost/imageshare-python-standin:"
    assert labels[f"{prefix}base.name"].startswith(base)


def test_runs_confined_as_uid_10001_and_pid_1(container: Container) -> None:
    """What the kernel says about the server process, seen from the host."""
    proc = Path("/proc") / str(container.host_pid())
    status = dict(
        line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line
    )
    assert status["Uid"].split() == [str(UID)] * 4
    assert status["Gid"].split() == [str(UID)] * 4
    assert status["NoNewPrivs"].strip() == "1"
    for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[capabilities], 16) == 0, capabilities
    assert status["NSpid"].split()[-1] == "1", "the server is PID 1 (no shell, no init)"
    assert (proc / "cmdline").read_bytes().split(b"\0")[1].endswith(b"imageshare-server")
    root_mount = next(
        line.split()
        for line in (proc / "mountinfo").read_text().splitlines()
        if line.split()[4] == "/"
    )
    assert "ro" in root_mount[5].split(","), "the root file system is read-only"


def test_health_is_serving(container: Container) -> None:
    with grpc.insecure_channel(container.target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        for service in ("", "imageshare.v1.ImageShareService"):
            answer = check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_lists_every_account_from_the_upstream_endpoint(
    container: Container, emulator: EmulatorAdmin
) -> None:
    """Signed calls with the environment's AccessKey reach the emulator on the host."""
    assert container.ready["upstream"] == container.argv[-1]
    (credentials,) = [r for r in container.records() if r.get("event") == "credentials"]
    assert credentials["source"] == "env"
    with grpc.insecure_channel(container.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        messages: list[Response] = list_all(
            stub, region_id="cn-hangzhou", image_id="m-demo0000001", bypass_cache=True
        )
    ids = account_ids(messages)
    assert len(ids) == len(set(ids)) == DEMO_ACCOUNTS
    assert messages[0].total_count == DEMO_ACCOUNTS
    assert emulator.counters()["calls_by_action"]["DescribeImageSharePermission"] == 2


def test_metrics_answer_with_the_build_the_image_was_made_from(
    image: str, container: Container
) -> None:
    with urllib.request.urlopen(container.metrics_url, timeout=10) as answer:
        assert answer.status == 200
        text = answer.read().decode()
    (info,) = [
        family
        for family in text_string_to_metric_families(text)
        if family.name == "imageshare_build_info"
    ]
    labels = info.samples[0].labels
    assert labels["version"] == importlib.metadata.version("imageshare-server")
    inspected = podman("image", "inspect", "--format", "{{json .Labels}}", image)
    revision = json.loads(inspected.stdout)["org.opencontainers.image.revision"]
    assert labels["revision"] == revision != "unknown"
    assert "grpc_server_handled_total" in text


def test_podman_stop_drains_a_call_and_exits_0(
    image: str, emulator_process: EmulatorProcess, emulator: EmulatorAdmin
) -> None:
    """SIGTERM to PID 1: the call under way finishes, then the server exits 0 on its own."""
    container = Container(image, emulator_process.url)
    try:
        emulator.set(latency_ms=1500)
        listed: list[list[Response]] = []

        def listing() -> None:
            with grpc.insecure_channel(container.target) as channel:
                stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
                listed.append(list_all(stub, region_id="cn-hangzhou", image_id="m-demo0000001"))

        caller = threading.Thread(target=listing)
        caller.start()
        wait_until(lambda: emulator.counters()["in_flight"] >= 1)
        started = time.monotonic()
        stopped = podman("stop", "--time", str(GRACE_PERIOD + 20), container.name)
        took = time.monotonic() - started
        caller.join(30)
        assert stopped.returncode == 0, stopped.stderr
        assert took < GRACE_PERIOD, f"podman stop took {took:.1f} s"
        assert container.proc.wait(30) == 0, "the container's exit status"
        assert len(account_ids(listed[0])) == DEMO_ACCOUNTS
        records = container.records()
        events = [record["event"] for record in records if "event" in record]
        assert events.index("draining") < events.index("stopped")
        assert events[-1] == "stopped", container.log_text[-3000:]
        after = records[[r.get("event") for r in records].index("draining") :]
        errors = [r for r in after if r.get("level") in ("error", "critical")]
        assert not errors, container.log_text[-3000:]
    finally:
        container.remove()


def image_files(image: str) -> list[str]:
    """Every file and link (not directory) of the image, as a container of it sees them."""
    created = podman("create", image)
    assert created.returncode == 0, created.stderr
    container_id = created.stdout.strip()
    try:
        exported = subprocess.Popen(
            ["podman", "export", container_id],
            env=base_env({"CONTAINERS_CONF": str(CONTAINERS_CONF)}),
            stdout=subprocess.PIPE,
        )
        assert exported.stdout is not None
        with tarfile.open(fileobj=exported.stdout, mode="r|") as tar:
            paths = ["/" + m.name.removeprefix("./") for m in tar if not m.isdir()]
        assert exported.wait(60) == 0
    finally:
        podman("rm", "--force", container_id)
    return paths


def test_image_holds_no_compiler_pip_emulator_or_tests(image: str) -> None:
    paths = image_files(image)
    site = "/opt/venv/lib/python3.11/site-packages"
    # What it must hold, so that the scan below is not vacuous.
    for present in (
        f"{site}/imageshare_server/app.py",
        f"{site}/imageshare/v1/image_share_pb2.py",
        f"{site}/grpc/__init__.py",
        "/opt/venv/bin/imageshare-server",
    ):
        assert present in paths, present

    compiler = re.compile(r"(.*-)?(gcc|g\+\+|cc|c\+\+|cc1|clang|tcc)(-[\d.]+)?")
    assert not [p for p in paths if compiler.fullmatch(p.rsplit("/", 1)[-1])]
    assert not [p for p in paths if re.search(r"/(site|dist)-packages/pip/", p)]
    assert not [p for p in paths if re.fullmatch(r".*/bin/pip[\d.]*", p)]
    assert not [p for p in paths if "imageshare_emulator" in p]
    ours = {
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py") if p.name != "__init__.py"
    }
    assert not [p for p in paths if p.endswith(tuple(f"/{t}" for t in ours))]
    assert not [p for p in paths if p.startswith("/src/")], "no source tree"


def test_no_python_in_the_image_can_run_pip(image: str) -> None:
    for python in ("/opt/venv/bin/python", "/usr/local/bin/python"):
        ran = podman("run", "--rm", "--network", "none", "--entrypoint", python, image, "-m", "pip")
        assert ran.returncode != 0
        assert "No module named pip" in ran.stderr, ran.stderr
