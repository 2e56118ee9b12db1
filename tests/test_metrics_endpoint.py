"""Scrape the app's /metrics over HTTP after real calls: exact counts, labels and no leaks.

The app runs in this process with ``--metrics-listen 127.0.0.1:0`` and a registry of its own
(so counts are exact); the scrape goes through the real exposition endpoint. The per-RPC
log line is the synchronisation point: the interceptor writes it after it has counted the
call.
"""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from imageshare_emulator import Emulator
from tests.support.client_health import CheckRequest as HealthCheckRequest
from tests.support.client_health import check
from tests.support.inprocess import InProcessApp, Request, running
from tests.support.waiting import until

METHOD = {"grpc_service": "imageshare.v1.ImageShareService", "grpc_method": "ListImageShares"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
CODES = ("OK", "NotFound", "InvalidArgument", "DeadlineExceeded", "Canceled")


async def scrape_text(app: InProcessApp) -> str:
    assert app.runtime.metrics_port is not None
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://127.0.0.1:{app.runtime.metrics_port}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def scrape(app: InProcessApp) -> Samples:
    samples = {}
    for family in text_string_to_metric_families(await scrape_text(app)):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, code: str) -> float:
    return value(
        samples, "grpc_server_handled_total", grpc_type="server_stream", grpc_code=code, **METHOD
    )


def list_calls_logged(app: InProcessApp) -> int:
    return sum(1 for line in app.logs.rpc_lines() if line["method"].endswith("/ListImageShares"))


async def _drive(app: InProcessApp, ecs: Emulator) -> None:
    stub = app.stub()
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
    ecs.knobs.set(latency_ms=2000)
    with pytest.raises(grpc.aio.AioRpcError) as late:
        _ = [
            m
            async for m in stub.ListImageShares(
                Request(region_id="cn-hangzhou", image_id="m-demo0000002"), timeout=0.3
            )
        ]
    assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    call = stub.ListImageShares(Request(region_id="cn-hangzhou", image_id="m-demo0000003"))
    # Cancel only once the server has started the call.
    started = {"grpc_type": "server_stream", **METHOD}
    await until(lambda: app.metric("grpc_server_started_total", **started) == 5)
    call.cancel()


async def test_grpc_server_metrics_count_every_call_exactly_once(ecs: Emulator) -> None:
    async with running(ecs, "--cache-ttl", "0", "--metrics-listen", "127.0.0.1:0") as app:
        await _drive(app, ecs)
        await until(lambda: list_calls_logged(app) == 5)  # the cancelled call too
        samples = await scrape(app)
        assert value(samples, "grpc_server_started_total", grpc_type="server_stream", **METHOD) == 5
        for code in CODES:
            assert handled(samples, code) == 1, code
        assert handled(samples, "Unknown") == 0
        assert handled(samples, "Internal") == 0
        assert (
            value(samples, "grpc_server_msg_received_total", grpc_type="server_stream", **METHOD)
            == 5
        )
        assert (
            value(samples, "grpc_server_msg_sent_total", grpc_type="server_stream", **METHOD) == 3
        )
        assert (
            value(
                samples, "grpc_server_handling_seconds_count", grpc_type="server_stream", **METHOD
            )
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
        text = await scrape_text(app)
        assert "m-demo0000001" not in text
        assert "m-missing0001" not in text
        assert "DemoAccessKeySecretForTheEmulator" not in text


async def test_health_checks_are_counted_as_unary_calls(ecs: Emulator) -> None:
    async with running(ecs, "--cache-ttl", "0", "--metrics-listen", "127.0.0.1:0") as app:
        await check(app.channel())(HealthCheckRequest(), timeout=5)
        await until(lambda: len(app.logs.rpc_lines()) == 1)
        samples = await scrape(app)
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


async def test_asyncio_tasks_gauge_is_read_from_the_apps_event_loop(ecs: Emulator) -> None:
    """The gauge is sampled when /metrics is scraped, from the scraping thread."""
    async with running(ecs, "--metrics-listen", "127.0.0.1:0") as app:
        hold = asyncio.Event()
        waiting = [asyncio.create_task(hold.wait()) for _ in range(50)]
        try:
            samples = await scrape(app)
        finally:
            hold.set()
            await asyncio.gather(*waiting)
        tasks = [v for (name, _), v in samples.items() if name == "imageshare_asyncio_tasks"]
        assert len(tasks) == 1
        assert tasks[0] >= 50
