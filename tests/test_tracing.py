"""OpenTelemetry tracing end to end: a caller's trace continued into a real OTLP receiver.

The app runs in the test process, configured only through the standard ``OTEL_*``
variables; a real OTLP/gRPC receiver (``tests/support/otlp.py``) gets its spans. A
Python caller and the Node client send a W3C ``traceparent``; the server's spans must
join that trace as one tree: the RPC, the cache decision, the read (flight), each
upstream page and each attempt of it (a retried page as two attempt spans), the
rate-limit waits, and the Redis operations when Redis is configured. Log lines written
inside carry the trace and span ids, the latency histograms carry exemplars, and no
secret, signature or string-to-sign reaches a span. Without the ``otel`` extra, or
without the variables, nothing of opentelemetry is even imported.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from imageshare_emulator import Emulator
from imageshare_server.app import StartupError
from imageshare_server.observability.logging import JsonFormatter
from imageshare_server.observability.tracing_setup import tracing_requested
from tests.support.inprocess import InProcessApp, Request, running
from tests.support.node import NODE_DIR, install_node_modules
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import DEMO_ENV, base_env
from tests.support.redis_server import RedisServer
from tests.support.rpc import details
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parent.parent
RPC_SPAN = "imageshare.v1.ImageShareService/ListImageShares"
SECRET = DEMO_ENV["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]
# What ECS echoes on SignatureDoesNotMatch (V1: the STS token travels in it).
STRING_TO_SIGN = "POST&%2F&AccessKeyId%3DLTAI5tDemoAccessKeyId%26SecurityToken%3DCAIStok"


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture
def otel_env(otlp: OtlpReceiver, monkeypatch: pytest.MonkeyPatch) -> OtlpReceiver:
    """Tracing asked for exactly as in a pod: the standard variables, nothing else."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "imageshare-test")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_always_on")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    return otlp


class Caller:
    """A traced caller: its own trace and span ids, as a W3C ``traceparent``."""

    def __init__(self) -> None:
        self.trace_id = secrets.randbits(128) | 1
        self.span_id = secrets.randbits(64) | 1

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_hex(self) -> str:
        return f"{self.span_id:016x}"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Injected by OpenTelemetry's own W3C propagator, as any traced Python caller does."""
        context = SpanContext(
            self.trace_id, self.span_id, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
        )
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(
            carrier, context=set_span_in_context(NonRecordingSpan(context))
        )
        return tuple(carrier.items())


@contextmanager
def json_lines(*debug: str) -> Iterator[io.StringIO]:
    """Every log record as the server writes it (JsonFormatter), while the block runs;
    the ``debug`` loggers (libraries the call runs through) at DEBUG meanwhile."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    levels = {name: logging.getLogger(name).level for name in debug}
    for name in debug:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def parsed(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def traced_list(app: InProcessApp, caller: Caller, **fields: object) -> list[object]:
    call = app.stub().ListImageShares(
        Request(**fields),  # type: ignore[arg-type]
        metadata=caller.metadata(),
        timeout=10,
    )
    return [message async for message in call]


async def openmetrics(app: InProcessApp) -> dict[str, set[str]]:
    """Histogram series name -> trace ids of the exemplars the OpenMetrics exposition shows."""
    url = f"http://127.0.0.1:{app.runtime.metrics_port}/metrics"
    response = await asyncio.to_thread(
        httpx.get, url, headers={"Accept": "application/openmetrics-text"}, timeout=5
    )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    exemplars: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(response.text):  # type: ignore[no-untyped-call]
        for sample in family.samples:
            if sample.exemplar is not None:
                exemplars.setdefault(sample.name, set()).add(sample.exemplar.labels["trace_id"])
    return exemplars


async def spans_of(otlp: OtlpReceiver, trace_hex: str, count: int) -> list[ReceivedSpan]:
    await until(lambda: len(otlp.spans(trace_hex)) >= count, within=10)
    return otlp.spans(trace_hex)


def children(spans: list[ReceivedSpan], parent: ReceivedSpan, name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_id == parent.span_id and s.name == name]


@pytest.fixture
async def traced_app(ecs: Emulator, otel_env: OtlpReceiver) -> AsyncIterator[InProcessApp]:
    async with running(ecs, "--metrics-listen", "127.0.0.1:0") as app:
        yield app


async def test_a_python_callers_trace_continues_through_every_upstream_attempt(
    traced_app: InProcessApp, ecs: Emulator, otlp: OtlpReceiver
) -> None:
    app, caller = traced_app, Caller()
    # Page 1's first attempt fails with HTTP 500; the page is read again.
    ecs.knobs.fault("error_code", count=1)
    with json_lines("httpx") as stream:
        messages = await traced_list(app, caller, region_id="cn-hangzhou", image_id="m-demo0000001")
    assert len(messages) == 3
    assert app.upstream_calls() == 3

    # 1 RPC + 1 cache + 1 flight + 2 pages + 3 attempts + 3 rate-limit waits.
    spans = await spans_of(otlp, caller.trace_hex, 11)
    assert {s.trace_id for s in spans} == {caller.trace_hex}
    assert {s.service for s in spans} == {"imageshare-test"}
    (rpc,) = [s for s in spans if s.name == RPC_SPAN]
    assert rpc.kind == "server"
    assert rpc.parent_id == caller.span_hex  # the caller's span is the parent
    assert rpc.attributes["rpc.system"] == "grpc"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert rpc.attributes["imageshare.cache"] == "miss"
    (cache,) = children(spans, rpc, "imageshare.cache")
    assert cache.attributes["imageshare.cache.result"] == "miss"
    (flight,) = children(spans, cache, "imageshare.flight")
    pages = sorted(
        children(spans, flight, "imageshare.upstream.page"),
        key=lambda s: int(s.attributes["imageshare.page"]),
    )
    assert [p.attributes["imageshare.page"] for p in pages] == [1, 2]
    assert [p.attributes["imageshare.attempts"] for p in pages] == [2, 1]

    first_page = sorted(
        children(spans, pages[0], "ecs DescribeImageSharePermission"),
        key=lambda s: int(s.attributes["imageshare.attempt"]),
    )
    failed, retried = first_page
    assert failed.kind == retried.kind == "client"
    assert failed.failed
    assert failed.attributes["imageshare.attempt"] == 1
    assert failed.attributes["http.response.status_code"] == 500
    assert failed.attributes["imageshare.upstream.outcome"] == "InternalError"
    assert failed.attributes["imageshare.upstream.request_id"]
    assert "imageshare.retry.reason" not in failed.attributes
    assert not retried.failed
    assert retried.attributes["imageshare.attempt"] == 2
    assert retried.attributes["imageshare.retry.reason"] == "InternalError"
    assert retried.attributes["http.response.status_code"] == 200
    assert retried.attributes["imageshare.upstream.outcome"] == "OK"
    (second_page,) = children(spans, pages[1], "ecs DescribeImageSharePermission")
    for attempt in (failed, retried, second_page):
        assert len(children(spans, attempt, "imageshare.rate_limit.wait")) == 1

    # The log line of the call: the caller's trace, the RPC span; every RequestId.
    lines = parsed(stream)
    (line,) = [entry for entry in lines if entry.get("event") == "rpc"]
    assert line["trace_id"] == caller.trace_hex
    assert line["span_id"] == rpc.span_id
    ids = [a.attributes["imageshare.upstream.request_id"] for a in (failed, retried, second_page)]
    assert sorted(line["upstream_request_ids"]) == sorted(ids)
    # Whatever else was logged inside the call's tasks (the HTTP client's lines) is in the
    # trace too, each with the span it was written in.
    inside = [entry for entry in lines if str(entry["logger"]).startswith("httpx")]
    assert inside
    span_ids = {s.span_id for s in spans}
    assert all(e["trace_id"] == caller.trace_hex for e in inside)
    assert all(e["span_id"] in span_ids for e in inside)

    exemplars = await openmetrics(app)
    assert caller.trace_hex in exemplars["grpc_server_handling_seconds_bucket"]
    assert caller.trace_hex in exemplars["imageshare_upstream_request_duration_seconds_bucket"]

    # A second call, from the cache: its own RPC span, a hit, no flight.
    hit_caller = Caller()
    await traced_list(app, hit_caller, region_id="cn-hangzhou", image_id="m-demo0000001")
    hit = await spans_of(otlp, hit_caller.trace_hex, 2)
    assert sorted(s.name for s in hit) == ["imageshare.cache", RPC_SPAN]
    assert (
        next(s for s in hit if s.name == "imageshare.cache").attributes["imageshare.cache.result"]
        == "hit"
    )

    # Health checks (kubelet probes every few seconds) start no trace, even when asked to.
    probe = Caller()
    health: Any = health_pb2_grpc.HealthStub(app.channel())
    await health.Check(health_pb2.HealthCheckRequest(), metadata=probe.metadata(), timeout=5)
    marker = Caller()  # spans are exported in the order they end: the probe's would be first
    await traced_list(app, marker, region_id="cn-hangzhou", image_id="m-demo0000001")
    await spans_of(otlp, marker.trace_hex, 2)
    assert not otlp.spans(probe.trace_hex)


async def test_no_secret_signature_or_string_to_sign_reaches_a_span(
    traced_app: InProcessApp, ecs: Emulator, otlp: OtlpReceiver
) -> None:
    app, caller = traced_app, Caller()
    ecs.knobs.fault(
        "error_code",
        count=1,
        status=400,
        code="SignatureDoesNotMatch",
        message=f"Specified signature is not matched. server string to sign is:{STRING_TO_SIGN}",
    )
    with json_lines() as stream, pytest.raises(grpc.aio.AioRpcError) as failure:
        await traced_list(app, caller, region_id="cn-hangzhou", image_id="m-demo0000002")
    assert details(failure.value).code is grpc.StatusCode.INTERNAL
    spans = await spans_of(otlp, caller.trace_hex, 6)
    (rpc,) = [s for s in spans if s.name == RPC_SPAN]
    assert rpc.failed
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    (attempt,) = [s for s in spans if s.name == "ecs DescribeImageSharePermission"]
    assert attempt.attributes["imageshare.upstream.outcome"] == "SignatureDoesNotMatch"
    (flight,) = [s for s in spans if s.name == "imageshare.flight"]
    assert flight.failed
    assert "[redacted]" in flight.status_message  # the error is there, scrubbed
    raw = otlp.raw()
    for forbidden in (SECRET, STRING_TO_SIGN, "AccessKeyId%3D", "Signature=", "SecurityToken"):
        assert forbidden.encode() not in raw, forbidden
    # The loud log line about rejected credentials belongs to the attempt's span.
    (loud,) = [e for e in parsed(stream) if "rejected the service's own credentials" in str(e)]
    assert loud["trace_id"] == caller.trace_hex
    assert loud["span_id"] == attempt.span_id


@pytest.mark.redis
async def test_redis_operations_are_spans_of_the_trace(
    ecs: Emulator, otel_env: OtlpReceiver, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path, password="redis-trace-password-1")
    try:
        async with running(ecs, "--redis-url", redis.url) as app:
            caller = Caller()
            await traced_list(app, caller, region_id="cn-hangzhou", image_id="m-demo0000003")
            wanted = {"get", "lease_acquire", "rate_limit", "set"}

            def whole() -> bool:
                spans = otel_env.spans(caller.trace_hex)
                ids = {s.span_id for s in spans}
                redis = [s for s in spans if s.name.startswith("redis ")]
                ops = {s.attributes["db.operation.name"] for s in redis}
                return wanted <= ops and all(s.parent_id in ids for s in redis)

            # The shared-cache write may finish (and its span, or a parent's, be exported)
            # after the call's last message: wait for them rather than for a span count.
            await until(whole, within=10)
            spans = otel_env.spans(caller.trace_hex)
            redis_spans = [s for s in spans if s.name.startswith("redis ")]
            by_id = {s.span_id: s for s in spans}
            for span in redis_spans:
                assert span.kind == "client"
                assert span.attributes["db.system.name"] == "redis"
                assert span.parent_id in by_id  # inside the call's tree
                assert span.attributes["server.address"].startswith("redis://127.0.0.1:")
            assert redis.password.encode() not in otel_env.raw()
        # The link's background probe pinged at start (and every second), outside any trace:
        # it never starts one.
        assert not [s for s in otel_env.spans() if s.name == "redis ping"]
    finally:
        redis.stop()


NODE_CALLER = textwrap.dedent(
    """
    const { ImageShareClient } = require('./client.js');
    const [target, traceparent] = process.argv.slice(1);
    const client = new ImageShareClient(target);
    (async () => {
      const metadata = { traceparent };
      const listing = client.listShares('cn-hangzhou', 'm-demo0000001', { metadata });
      let n = 0;
      for await (const _ of listing) n += 1;
      console.log(JSON.stringify({ accounts: n }));
      client.close();
    })().catch((err) => { console.error(err); process.exit(3); });
    """
)


@pytest.mark.toolchain
async def test_the_node_clients_trace_continues_too(
    traced_app: InProcessApp, otlp: OtlpReceiver
) -> None:
    await asyncio.to_thread(install_node_modules)
    caller = Caller()
    traceparent = f"00-{caller.trace_hex}-{caller.span_hex}-01"
    process = await asyncio.create_subprocess_exec(
        "node", "-e", NODE_CALLER, traced_app.target, traceparent,
        cwd=NODE_DIR, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert json.loads(out) == {"accounts": 137}
    spans = await spans_of(otlp, caller.trace_hex, 9)
    (rpc,) = [s for s in spans if s.name == RPC_SPAN]
    assert rpc.parent_id == caller.span_hex
    names = {s.name for s in spans}
    assert {"imageshare.cache", "imageshare.flight", "imageshare.upstream.page"} <= names
    assert len([s for s in spans if s.name == "ecs DescribeImageSharePermission"]) == 2
    exemplars = await openmetrics(traced_app)
    assert caller.trace_hex in exemplars["grpc_server_handling_seconds_bucket"]


async def test_an_otlp_protocol_that_is_not_installed_is_a_start_up_error(
    ecs: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    with pytest.raises(StartupError, match="OTLP protocol 'http/protobuf' is not installed"):
        async with running(ecs):
            pass


def test_tracing_is_off_unless_the_standard_variables_ask_for_it() -> None:
    assert not tracing_requested({})
    assert not tracing_requested({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing_requested(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}
    )
    assert not tracing_requested({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"})


# Runs the whole app in a fresh interpreter, makes one call with a traceparent, and reports
# which opentelemetry modules were imported. "blocked" makes opentelemetry unimportable,
# as on an install without the otel extra.
OPTIONAL_PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    if sys.argv[1] == "blocked":
        sys.modules["opentelemetry"] = None
    import grpc
    from prometheus_client import CollectorRegistry
    from imageshare.v1 import image_share_pb2, image_share_pb2_grpc
    from imageshare_server import app
    from imageshare_server.config import parse_settings
    from imageshare_server.observability.logging import configure_logging

    async def main():
        configure_logging("info")
        settings = parse_settings(
            ["--emulator", "--listen", "127.0.0.1:0", "--metrics-listen", ""], env={}
        )
        runtime = await app.start(settings, registry=CollectorRegistry())
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
                stub = image_share_pb2_grpc.ImageShareServiceStub(channel)
                request = image_share_pb2.ListImageSharesRequest(
                    region_id="cn-hangzhou", image_id="m-demo0000001"
                )
                traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                call = stub.ListImageShares(request, metadata=(("traceparent", traceparent),))
                messages = [m async for m in call]
        finally:
            await app.shutdown(runtime)
        loaded = sorted(
            m for m, mod in sys.modules.items()
            if m.split(".")[0] == "opentelemetry" and mod is not None
        )
        print(json.dumps({"messages": len(messages), "opentelemetry": loaded}))

    asyncio.run(main())
    """
)


@pytest.mark.subprocess
@pytest.mark.parametrize(
    ("case", "endpoint", "loads_opentelemetry"),
    [
        ("blocked", "http://127.0.0.1:9", False),  # no extra: asked for, runs without
        ("installed", "", False),  # the extra, but no OTEL_* variables: off
        ("installed", "http://127.0.0.1:9", True),  # the control: on when asked for
    ],
)
def test_without_the_extra_or_the_variables_nothing_of_opentelemetry_is_loaded(
    case: str, endpoint: str, loads_opentelemetry: bool
) -> None:
    env = {k: v for k, v in base_env().items() if not k.startswith("OTEL_")}
    if endpoint:  # nothing listens there: exports fail fast, the server must not care
        env.update(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="0.1")
    result = subprocess.run(
        [sys.executable, "-c", OPTIONAL_PROBE, case],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["messages"] == 3  # served unchanged
    assert bool(report["opentelemetry"]) is loads_opentelemetry, report
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    events = {r.get("event") for r in records}
    (rpc,) = [r for r in records if r.get("event") == "rpc"]
    if case == "blocked":
        assert "tracing_unavailable" in events
    if not loads_opentelemetry:
        assert "trace_id" not in rpc  # no span, no ids (the caller's traceparent is ignored)
        assert "tracing" not in events
    else:
        assert rpc["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
