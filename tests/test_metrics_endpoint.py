"""Scrape the real server's /metrics after real calls: exact counts, labels and no leaks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imageshare.v1 import image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from tests.support.processes import ServerProcess
from tests.support.rpc import Request

METHOD = {"grpc_service": "imageshare.v1.ImageShareService", "grpc_method": "ListImageShares"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(server: ServerProcess) -> Samples:
    text = httpx.get(server.metrics_url, timeout=5).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, code: str) -> float:
    return value(
        samples, "grpc_server_handled_total", grpc_type="server_stream", grpc_code=code, **METHOD
    )


@pytest.fixture
def metered(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--cache-ttl", "0")


async def _drive(server: ServerProcess, emulator: EmulatorAdmin) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
        ok = [
            m
            async for m in stub.ListImageShares(
                Request(region_id="cn-hangzhou", image_id="m-demo0000001")
            )
        ]
        assert len(ok) == 3
        for request in (
            Request(region_id="cn-hangzhou", image_id="m-missing0001"),
            Request(region_id="bad region", image_id="m-demo0000001"),
        ):
            with pytest.raises(grpc.aio.AioRpcError):
                _ = [m async for m in stub.ListImageShares(request)]
        emulator.set(latency_ms=2000)
        with pytest.raises(grpc.aio.AioRpcError) as late:
            _ = [
                m
                async for m in stub.ListImageShares(
                    Request(region_id="cn-hangzhou", image_id="m-demo0000002"), timeout=0.3
                )
            ]
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        call = stub.ListImageShares(Request(region_id="cn-hangzhou", image_id="m-demo0000003"))
        loop = asyncio.get_running_loop()
        # Cancel only once the server has started the call (the emulator's in-flight count
        # may still hold the previous, timed-out call's upstream request).
        await loop.run_in_executor(None, _wait_started, server, 5)
        call.cancel()


def _wait_started(server: ServerProcess, count: int) -> None:
    end = time.monotonic() + 10
    while (
        value(scrape(server), "grpc_server_started_total", grpc_type="server_stream", **METHOD)
        < count
    ):
        assert time.monotonic() < end, "the server never started the call"
        time.sleep(0.01)


def test_grpc_server_metrics_count_every_call_exactly_once(
    metered: ServerProcess, emulator: EmulatorAdmin
) -> None:
    asyncio.run(_drive(metered, emulator))
    end = time.monotonic() + 10
    while True:
        samples = scrape(metered)
        if (
            sum(
                handled(samples, c)
                for c in ("OK", "NotFound", "InvalidArgument", "DeadlineExceeded", "Canceled")
            )
            >= 5
        ):
            break
        assert time.monotonic() < end, "the cancelled call was never counted"
        time.sleep(0.02)
    assert value(samples, "grpc_server_started_total", grpc_type="server_stream", **METHOD) == 5
    for code in ("OK", "NotFound", "InvalidArgument", "DeadlineExceeded", "Canceled"):
        assert handled(samples, code) == 1, code
    assert handled(samples, "Unknown") == 0
    assert handled(samples, "Internal") == 0
    assert (
        value(samples, "grpc_server_msg_received_total", grpc_type="server_stream", **METHOD) == 5
    )
    assert value(samples, "grpc_server_msg_sent_total", grpc_type="server_stream", **METHOD) == 3
    assert (
        value(samples, "grpc_server_handling_seconds_count", grpc_type="server_stream", **METHOD)
        == 5
    )
    # Upstream: two OK pages, one NotFound; the region is a label, the image is not.
    assert (
        value(
            samples,
            "imageshare_upstream_requests_total",
            action="DescribeImageSharePermission",
            region="cn-hangzhou",
            outcome="OK",
        )
        >= 2
    )
    assert (
        value(
            samples,
            "imageshare_upstream_requests_total",
            action="DescribeImageSharePermission",
            region="cn-hangzhou",
            outcome="InvalidImageId.NotFound",
        )
        == 1
    )
    build = {"version": "0.1.0", "revision": "unknown", "grpcio": grpc.__version__}
    (info,) = [labels for name, labels in samples if name == "imageshare_build_info"]
    assert build.items() <= dict(info).items()
    assert "protobuf" in dict(info)
    text = httpx.get(metered.metrics_url, timeout=5).text
    assert "m-demo0000001" not in text
    assert "m-missing0001" not in text
    assert "DemoAccessKeySecretForTheEmulator" not in text


def test_health_checks_are_counted_as_unary_calls(metered: ServerProcess) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(metered.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    samples = scrape(metered)
    assert (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service="grpc.health.v1.Health",
            grpc_method="Check",
            grpc_code="OK",
        )
        == 1
    )
