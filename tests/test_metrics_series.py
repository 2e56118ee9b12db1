"""What /metrics holds before and after traffic: zero-valued series, no _created, build facts;
and the RPC log line's list of upstream RequestIds, failed attempts included.

A labelled counter born at 1 on its first event is invisible to ``increase()``: a single
rejected credential would never alert, and panels stay empty until then. So every
labelled counter a panel or an alert reads is exported at zero from start-up, for every
label value known without traffic.
"""

from __future__ import annotations

import grpc
import promql_parser
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from imageshare_emulator import Emulator
from imageshare_server.observability.metrics import (
    CACHE_RESULTS,
    CREDENTIAL_OUTCOMES,
    LEASE_WAIT_OUTCOMES,
    PERMISSION_OUTCOMES,
    REDIS_CACHE_RESULTS,
    REDIS_OPS,
    RETRY_REASONS,
    ServiceMetrics,
)
from imageshare_server.redis_tier.link import RedisLink
from imageshare_server.upstream.client import ACTION
from tests.support.inprocess import running
from tests.test_observability_assets import alert_rules, dashboard_expressions, selectors

# Labelled by region: a series per region appears with the first call for it (the known
# regions times every outcome would be thousands of series).
REGION_LABELLED = {"imageshare_upstream_requests_total"}
# Exported only with --redis-url (initialised by the Redis link): see the test below.
REDIS_SERIES = {
    "imageshare_redis_errors_total",
    "imageshare_redis_cache_requests_total",
    "imageshare_redis_lease_waits_total",
}


def counters_read_by_panels_and_alerts() -> set[str]:
    expressions = [*dashboard_expressions(), *(rule["expr"] for rule in alert_rules())]
    names = {name for e in expressions for name, _ in selectors(promql_parser.parse(e))}
    # process_* come from the default registry's process collector, not from the app.
    return {n for n in names if n.endswith("_total") and not n.startswith("process_")}


def labelled(metrics: ServiceMetrics) -> dict[str, MetricWrapperBase]:
    return {
        f"{m._name}_total": m
        for m in vars(metrics).values()
        if isinstance(m, MetricWrapperBase) and m._labelnames and m._type == "counter"
    }


async def test_every_labelled_counter_a_panel_or_alert_reads_starts_at_zero(ecs: Emulator) -> None:
    read = counters_read_by_panels_and_alerts()
    assert {
        "imageshare_upstream_credentials_rejected_total",
        "imageshare_upstream_permission_denied_total",
        "imageshare_cache_requests_total",
    } <= read
    async with running(ecs) as app:
        families = {f.name: f for f in app.registry.collect()}
        exported = {s.name for f in families.values() for s in f.samples}
        expected = read - REGION_LABELLED - REDIS_SERIES
        missing = expected - exported
        assert not missing, f"not exported before the first event: {missing}"
        # Every known label value, at zero.
        for result in CACHE_RESULTS:
            assert (
                app.registry.get_sample_value("imageshare_cache_requests_total", {"result": result})
                == 0.0
            )
        for code in CREDENTIAL_OUTCOMES:
            assert app.metric("imageshare_upstream_credentials_rejected_total", code=code) == 0
            assert (
                app.registry.get_sample_value(
                    "imageshare_upstream_credentials_rejected_total", {"code": code}
                )
                is not None
            )
        assert "InvalidAccessKeyId.NotFound" in CREDENTIAL_OUTCOMES
        assert {"Forbidden", "Forbidden.RAM", "other"} <= set(PERMISSION_OUTCOMES)
        for code in PERMISSION_OUTCOMES:
            assert (
                app.registry.get_sample_value(
                    "imageshare_upstream_permission_denied_total", {"code": code}
                )
                == 0.0
            )
        assert {"Throttling.User", "InternalError", "timeout"} <= set(RETRY_REASONS)
        for reason in RETRY_REASONS:
            assert (
                app.registry.get_sample_value(
                    "imageshare_upstream_retries_total", {"action": ACTION, "reason": reason}
                )
                == 0.0
            )
        # Nothing Redis without Redis: the row says "No data", not a flat zero.
        assert not exported & REDIS_SERIES
        # The first event moves a series that was already there: increase() sees it.
        ecs.knobs.fault("error_code", count=1, status=403, code="Forbidden.RAM")
        failure = await app.error(region_id="cn-hangzhou", image_id="m-demo0000001")
        assert failure.code is grpc.StatusCode.PERMISSION_DENIED
        assert app.metric("imageshare_upstream_permission_denied_total", code="Forbidden.RAM") == 1
        assert (
            app.metric("imageshare_upstream_credentials_rejected_total", code="Forbidden.RAM") == 0
        )


async def test_redis_series_start_at_zero_when_redis_is_configured() -> None:
    registry = CollectorRegistry()
    link = RedisLink.from_url("redis://127.0.0.1:9/0", metrics=ServiceMetrics(registry))
    try:
        for op in REDIS_OPS:
            assert registry.get_sample_value("imageshare_redis_errors_total", {"op": op}) == 0.0
        for result in REDIS_CACHE_RESULTS:
            assert (
                registry.get_sample_value(
                    "imageshare_redis_cache_requests_total", {"result": result}
                )
                == 0.0
            )
        for outcome in LEASE_WAIT_OUTCOMES:
            assert (
                registry.get_sample_value(
                    "imageshare_redis_lease_waits_total", {"outcome": outcome}
                )
                == 0.0
            )
    finally:
        await link.aclose()
    assert set(REDIS_SERIES) <= set(labelled(ServiceMetrics.unregistered()))


async def test_no_created_series_are_exported(ecs: Emulator) -> None:
    async with running(ecs) as app:
        await app.list(region_id="cn-hangzhou", image_id="m-demo0000001")
        text = generate_latest(app.registry).decode()
    assert "imageshare_upstream_requests_total{" in text
    assert "grpc_server_handling_seconds_bucket{" in text
    assert "_created" not in text


async def test_the_rpc_log_line_lists_every_upstream_request_id_failed_ones_too(
    ecs: Emulator,
) -> None:
    async with running(ecs) as app:
        # Page 1 fails once (HTTP 500) and is read again: three attempts, three RequestIds.
        ecs.knobs.fault("error_code", count=1)
        messages = await app.list(region_id="cn-hangzhou", image_id="m-demo0000001")
        answered = [rid for m in messages for rid in m.upstream_request_ids]
        assert len(answered) == 2
        # A call that fails: its log line still names the attempt that failed.
        ecs.knobs.fault("error_code", count=1, status=403, code="Forbidden.RAM")
        failure = await app.error(region_id="cn-hangzhou", image_id="m-demo0000002")
        assert failure.error_info is not None
        failed_id = failure.error_info.metadata["requestId"]
        retried, denied = app.logs.rpc_lines()
    assert app.upstream_calls() == 4
    assert len(retried["upstream_request_ids"]) == 3
    assert set(answered) < set(retried["upstream_request_ids"])
    assert len(set(retried["upstream_request_ids"])) == 3
    assert denied["code"] == "PermissionDenied"
    assert denied["upstream_request_ids"] == [failed_id]
    # No tracing configured: no trace ids on the line.
    assert "trace_id" not in retried
