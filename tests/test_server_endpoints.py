"""What operators and their tools meet first: reflection, the HTTP checks, start-up errors."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from imageshare_emulator import Emulator
from tests.support.inprocess import running
from tests.support.processes import DEMO_ENV, base_env

SERVER = [sys.executable, "-m", "imageshare_server"]


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_under_v1_and_v1alpha(ecs: Emulator, version: str) -> None:
    async with running(ecs) as app:
        method = app.channel().stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = method(
            iter(
                [
                    reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="imageshare.v1.ImageShareService"
                    ),
                ]
            ),
            timeout=5,
        )
        answers = [answer async for answer in call]
    services = {s.name for s in answers[0].list_services_response.service}
    assert {
        "imageshare.v1.ImageShareService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    assert answers[1].file_descriptor_response.file_descriptor_proto


async def test_the_metrics_listener_serves_metrics_and_checks_and_nothing_else(
    ecs: Emulator,
) -> None:
    async with running(ecs, "--metrics-listen", "127.0.0.1:0") as app:
        base = f"http://127.0.0.1:{app.runtime.metrics_port}"

        def get(path: str) -> httpx.Response:
            return httpx.get(base + path, timeout=5)

        metrics = await asyncio.to_thread(get, "/metrics")
        assert metrics.status_code == 200
        assert "imageshare_build_info" in metrics.text
        assert "grpc_server_handled_total" in metrics.text
        for path in ("/", "/health", "/metrics/extra", "/healthz/"):
            assert (await asyncio.to_thread(get, path)).status_code == 404, path
        assert (await asyncio.to_thread(get, "/healthz")).status_code == 200
        assert (await asyncio.to_thread(get, "/readyz")).status_code == 200
        await app.runtime.health.enter_graceful_shutdown()
        assert (await asyncio.to_thread(get, "/readyz")).status_code == 503
        assert (await asyncio.to_thread(get, "/healthz")).status_code == 200


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def start_failure(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the server with ``args``; it must exit 2 with one JSON line and no traceback."""
    done = subprocess.run(
        [*SERVER, "--metrics-listen", "", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=base_env(env),
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]
    failed = [line for line in lines if line.get("event") == "startup_failed"]
    assert len(failed) == 1, done.stderr
    assert failed[0]["level"] == "critical"
    assert done.stdout == ""
    return str(failed[0]["msg"])


@pytest.mark.subprocess
def test_every_start_up_failure_is_one_json_line_and_exit_2(busy_port: int, tmp_path: Path) -> None:
    """The process boundary is the point: exit code, stderr, no traceback."""
    demo = dict(DEMO_ENV)
    emulator = ["--upstream-endpoint", "http://127.0.0.1:9"]
    assert "Address already in use" in start_failure(
        "--listen", f"127.0.0.1:{busy_port}", *emulator, env=demo
    )
    missing = str(tmp_path / "missing.pem")
    assert "TLS" in start_failure(
        "--listen", "127.0.0.1:0", "--tls-cert", missing, "--tls-key", missing, *emulator, env=demo
    )
    no_credentials = {"HOME": str(tmp_path), "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true"}
    assert "no upstream credentials" in start_failure(
        "--listen", "127.0.0.1:0", *emulator, env=no_credentials
    )
    assert "--cache-ttl" in start_failure("--cache-ttl", "soon")
    assert "upstream_page_size" in start_failure("--upstream-page-size", "101")
    assert "--no-such-flag" in start_failure("--no-such-flag")
    assert "IMAGESHARE_UPSTREAM_QPS" in start_failure(env={"IMAGESHARE_UPSTREAM_QPS": "fast"})


@pytest.mark.subprocess
def test_version_and_effective_configuration_print_and_exit_0() -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [*SERVER, "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == f"imageshare-server {version('imageshare-server')}\n"
    env = base_env(
        {
            "IMAGESHARE_REDIS_URL": "redis://:secret-redis-password@redis:6379/0",
            "IMAGESHARE_CACHE_TTL": "42",
        }
    )
    done = subprocess.run(
        [*SERVER, "--print-config", "--upstream-qps", "7"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    config = json.loads(done.stdout)
    assert config["cache_ttl"] == 42.0  # environment
    assert config["upstream_qps"] == 7.0  # flag
    assert config["listen"] == ":50051"  # default
    assert config["redis_url"] == "redis://:[redacted]@redis:6379/0"
    assert "secret-redis-password" not in done.stdout + done.stderr
