"""The dashboard and alerts query only what the server exports, and logs never leak secrets.

Every PromQL expression in the Grafana dashboard and in the rendered
PrometheusRule is parsed with a real PromQL parser; each selector must name a
series the code exports, filtered on labels that series has. A misspelt
metric or label would otherwise give an empty panel or an alert that can
never fire, and nothing would say so. Every alert links to its section of
docs/runbook.md, which says what it means, what callers feel, what to check and how
to fix it.
"""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from imageshare_server.observability.grpc_metrics import GrpcMetricsInterceptor
from imageshare_server.observability.logging import (
    JsonFormatter,
    RedactingFilter,
    _StderrJsonHandler,
    configure_logging,
    log_fields,
)
from imageshare_server.observability.metrics import ServiceMetrics
from imageshare_server.redaction import REDACTED, redact, register_secret
from tests.support.waiting import until

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "imageshare"
DASHBOARD = CHART / "dashboards" / "imageshare.json"
RUNBOOK = ROOT / "docs" / "runbook.md"
ALERTS = {
    "ImageShareHighErrorRatio",
    "ImageShareHighLatencyP99",
    "ImageShareUpstreamThrottled",
    "ImageShareUpstreamCredentialsRejected",
    "ImageShareUpstreamPermissionDenied",
    "ImageShareCacheHitRatioLow",
    "ImageShareRedisUnavailable",
    "ImageShareImageBecamePublic",
}

# Labels Prometheus adds at scrape time (ServiceMonitor targets) or histograms carry.
TARGET_LABELS = {"namespace", "job", "instance", "pod", "service", "container", "endpoint"}


def _sample_names(name: str, kind: str) -> set[str]:
    # No _created: the server does not export them (nothing may read them).
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }.get(kind, ("",))
    return {name + suffix for suffix in suffixes}


def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, for everything /metrics can show."""
    grpc_registry = CollectorRegistry()
    interceptor = GrpcMetricsInterceptor(grpc_registry, log_rpcs=False)
    wrappers: list[MetricWrapperBase] = [
        *(
            m
            for m in vars(ServiceMetrics.unregistered()).values()
            if isinstance(m, MetricWrapperBase)
        ),
        *(m for m in vars(interceptor).values() if isinstance(m, MetricWrapperBase)),
    ]
    series: dict[str, set[str]] = {}
    for wrapper in wrappers:
        for family in wrapper.describe():
            for name in _sample_names(family.name, family.type):
                extra = {"le"} if name.endswith("_bucket") else set()
                series[name] = set(wrapper._labelnames) | extra
    # Default collectors (process_*, python_*), as served by the global registry.
    for family in REGISTRY.collect():
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return series


def _grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so the expression is plain PromQL."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", "value", expr)


def dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    expressions = [
        target["expr"]
        for panel in board["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
        assert match, variable["definition"]
        expressions.append(match.group(1))
    return [_grafana_to_promql(e) for e in expressions]


def render_rule(**overrides: Any) -> dict[str, Any]:
    values = {"prometheusRule": {"enabled": True, **overrides}}
    rendered = helm.Chart.load(CHART).render(values, name="rel", namespace="obs")
    (rule,) = [
        doc
        for path, text in rendered.items()
        if path.endswith("prometheusrule.yaml")
        for doc in yaml.safe_load_all(text)
        if doc
    ]
    return rule  # type: ignore[no-any-return]


def alert_rules() -> list[dict[str, Any]]:
    return [r for group in render_rule()["spec"]["groups"] for r in group["rules"]]


def selectors(node: Any) -> Iterator[tuple[str, set[str]]]:
    """(metric name, label names matched) for every vector selector in an AST."""
    if isinstance(node, promql_parser.VectorSelector):
        matchers = node.matchers.matchers
        name = node.name or next(m.value for m in matchers if m.name == "__name__")
        yield name, {m.name for m in matchers if m.name != "__name__"}
        return
    for attribute in ("lhs", "rhs", "expr", "param", "vector_selector"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from selectors(child)
    for child in getattr(node, "args", None) or []:
        yield from selectors(child)


def check_expression(expr: str, series: dict[str, set[str]]) -> set[str]:
    used = set()
    for name, labels in selectors(promql_parser.parse(expr)):
        assert name in series, f"{name} is not exported by the server (in {expr!r})"
        unknown = labels - series[name] - TARGET_LABELS
        assert not unknown, f"{name} has no label(s) {unknown} (in {expr!r})"
        used.add(name)
    return used


def test_dashboard_queries_only_exported_series() -> None:
    series = exported_series()
    expressions = dashboard_expressions()
    assert len(expressions) > 20
    used = set().union(*(check_expression(e, series) for e in expressions))
    # The panels the issue asks for, by the series behind them.
    assert {
        "grpc_server_handled_total",
        "grpc_server_started_total",
        "grpc_server_msg_sent_total",
        "grpc_server_handling_seconds_bucket",
        "imageshare_upstream_request_duration_seconds_bucket",
        "imageshare_upstream_requests_total",
        "imageshare_upstream_retries_total",
        "imageshare_upstream_rate_limit_wait_seconds_bucket",
        "imageshare_upstream_in_flight_requests",
        "imageshare_cache_requests_total",
        "imageshare_cache_entries",
        "imageshare_cache_bytes",
        "imageshare_upstream_credentials_rejected_total",
        "imageshare_upstream_permission_denied_total",
        "imageshare_upstream_pages_per_listing_sum",
        "imageshare_upstream_pages_per_listing_count",
        "imageshare_redis_up",
        "imageshare_redis_errors_total",
        "imageshare_redis_cache_requests_total",
        "imageshare_redis_lease_waits_total",
        "imageshare_asyncio_tasks",
        "imageshare_build_info",
        "imageshare_watchers",
        "imageshare_watched_images",
        "imageshare_watch_polls_total",
        "imageshare_share_changes_total",
    } <= used


def _panels() -> dict[str, dict[str, Any]]:
    board = json.loads(DASHBOARD.read_text())
    return {panel["title"]: panel for panel in board["panels"]}


def test_pages_per_listing_is_a_mean_not_a_quantile_of_whole_numbers() -> None:
    """histogram_quantile interpolates inside a bucket: "p50 = 0.75 pages" for one-page lists."""
    (mean, *_) = _panels()["Pages per listing"]["targets"]
    assert "histogram_quantile" not in json.dumps(_panels()["Pages per listing"])
    assert re.fullmatch(
        r"sum\(rate\(imageshare_upstream_pages_per_listing_sum\{.*\}\[\$__rate_interval\]\)\)"
        r" / sum\(rate\(imageshare_upstream_pages_per_listing_count\{.*\}\[\$__rate_interval\]\)\)",
        mean["expr"],
    )


def test_dashboard_shows_redis_tasks_and_the_signals_of_every_alert() -> None:
    panels = _panels()
    redis_row = next(title for title in panels if title.startswith("Redis ("))
    assert panels[redis_row]["type"] == "row"
    row_y = panels[redis_row]["gridPos"]["y"]
    below = sorted(
        (p["gridPos"]["y"], title)
        for title, p in panels.items()
        if p["type"] == "row" and p["gridPos"]["y"] > row_y
    )
    next_row_y = below[0][0] if below else 10**6
    in_row = {title for title, p in panels.items() if row_y < p["gridPos"]["y"] < next_row_y}
    assert {
        "Redis up",
        "Redis errors by operation",
        "Shared (L2) cache lookups",
        "Lease waits",
    } <= in_row
    assert "imageshare_asyncio_tasks" in json.dumps(panels["asyncio tasks"])
    # What each alert reads is on some panel: the permission and Redis signals included.
    board = DASHBOARD.read_text()
    for rule in alert_rules():
        for name, _ in selectors(promql_parser.parse(rule["expr"])):
            assert name in board, f"{rule['alert']} reads {name}, which no panel shows"
    identity = json.dumps(panels["Own identity refused"])
    assert 'grpc_code=\\"PermissionDenied\\"' in identity
    assert "imageshare_upstream_permission_denied_total" in identity
    assert "imageshare_redis_up" in json.dumps(panels["Redis up"])


def test_dashboard_is_templated_on_datasource_namespace_and_job() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "job"} <= set(variables)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
            assert 'job=~"$job"' in target["expr"], panel["title"]


def test_alert_expressions_query_only_exported_series() -> None:
    series = exported_series()
    rules = alert_rules()
    for rule in rules:
        check_expression(rule["expr"], series)
        # Scoped to this release's own series.
        assert 'namespace="obs"' in rule["expr"]
        assert 'job="rel-imageshare"' in rule["expr"]


def runbook_sections() -> dict[str, str]:
    """GitHub's anchor of each ``##`` heading of docs/runbook.md -> the section's text."""
    sections: dict[str, str] = {}
    anchor = ""
    for line in RUNBOOK.read_text().splitlines():
        if line.startswith("## "):
            anchor = re.sub(r"[^\w\- ]", "", line[3:].strip().lower()).replace(" ", "-")
            sections[anchor] = ""
        elif anchor:
            sections[anchor] += line + "\n"
    return sections


def test_every_alert_links_to_its_runbook_section() -> None:
    sections = runbook_sections()
    for rule in alert_rules():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md", url  # the chart's default: the path in this repo
        assert anchor == rule["alert"].lower()
        assert anchor in sections, f"docs/runbook.md has no section for {rule['alert']}"
        text = sections[anchor]
        for part in ("**Means.**", "**Impact.**", "**Check.**", "**Fix.**"):
            assert part in text, f"{rule['alert']}: the runbook section lacks {part}"
    assert "SIGUSR1" in RUNBOOK.read_text()
    served = render_rule(runbookUrl="https://git.example/imageshare/-/blob/main/docs/runbook.md")
    for group in served["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["runbook_url"] == (
                f"https://git.example/imageshare/-/blob/main/docs/runbook.md#{rule['alert'].lower()}"
            )


def test_every_alert_is_actionable() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == ALERTS
    for rule in rules.values():
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert re.fullmatch(r"\d+m", rule["for"])
        # Alertmanager templates survive Helm rendering unescaped.
        assert "{{ $labels." in rule["annotations"]["description"]
    assert rules["ImageShareUpstreamCredentialsRejected"]["labels"]["severity"] == "critical"
    assert (
        "imageshare_upstream_credentials_rejected_total"
        in (rules["ImageShareUpstreamCredentialsRejected"]["expr"])
    )
    error_codes = "Unknown|Internal|Unavailable|DataLoss|DeadlineExceeded"
    assert error_codes in rules["ImageShareHighErrorRatio"]["expr"]
    # A lost RAM permission pages: upstream Forbidden* or PERMISSION_DENIED answered.
    permission = rules["ImageShareUpstreamPermissionDenied"]
    assert permission["labels"]["severity"] == "critical"
    assert "imageshare_upstream_permission_denied_total" in permission["expr"]
    assert 'grpc_code="PermissionDenied"' in permission["expr"]
    credentials = rules["ImageShareUpstreamCredentialsRejected"]["annotations"]["description"]
    assert "permission" not in credentials  # that is the other alert's business now
    redis = rules["ImageShareRedisUnavailable"]
    assert redis["labels"]["severity"] == "warning"
    assert "imageshare_redis_up" in redis["expr"]
    public = rules["ImageShareImageBecamePublic"]
    assert "imageshare_share_changes_total{" in public["expr"]
    assert 'change="became_public"' in public["expr"]
    assert public["labels"]["severity"] == "critical"
    # A watch lasts as long as its caller and ends UNAVAILABLE on every drain: the RPC
    # alerts leave watches out.
    for name in ("ImageShareHighErrorRatio", "ImageShareHighLatencyP99"):
        assert 'grpc_method!="WatchImageShares"' in rules[name]["expr"]


def test_the_watch_change_counters_exist_at_zero_before_the_first_change() -> None:
    """increase() misses a counter whose series appears already at 1: the alert on the first
    image to turn public would never fire."""
    registry = CollectorRegistry()
    ServiceMetrics(registry)
    for change in ("became_public", "account_added", "group_removed"):
        assert registry.get_sample_value("imageshare_share_changes_total", {"change": change}) == 0


def test_thresholds_and_labels_come_from_values() -> None:
    rule = render_rule(
        labels={"release": "kube-prometheus-stack"},
        errorRatioThreshold=0.125,
        latencyP99Seconds=7.5,
        cacheHitRatioMin=0.25,
    )
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/name"] == "imageshare"
    exprs = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert re.search(r"\) > 0\.125\s*$", exprs["ImageShareHighErrorRatio"])
    assert re.search(r"\) > 7\.5\s*$", exprs["ImageShareHighLatencyP99"])
    assert ") < 0.25" in exprs["ImageShareCacheHitRatioLow"]


def test_rule_is_off_by_default() -> None:
    rendered = helm.Chart.load(CHART).render(None, name="rel", namespace="obs")
    assert not rendered.get("imageshare/templates/prometheusrule.yaml", "").strip()


# --- secrets never reach log output -------------------------------------------------

SECRET = "kS3cr3tAccessKeySecretValue0123"
TOKEN = "CAIS+sts/token==with+slashes/and=padding" * 3
V1_STRING_TO_SIGN = (
    "GET&%2F&AccessKeyId%3DLTAI5tDemoAccessKeyId%26Action%3DDescribeImageSharePermission"
    "%26SecurityToken%3D" + TOKEN[:20]
)
SIGNATURE_ERROR = (
    "Specified signature is not matched with our calculation. "
    f"server string to sign is:{V1_STRING_TO_SIGN}"
)
V3_SIGNATURE_ERROR = (
    "The request signature does not conform to Aliyun standards. "
    "server string to sign is:ACS3-HMAC-SHA256\n" + "ab" * 32
)


def _assert_clean(output: str) -> None:
    for forbidden in (SECRET, TOKEN, "CAIS%2Bsts%2Ftoken", "LTAI5tDemoAccessKeyId", "ab" * 32):
        assert forbidden not in output, forbidden


@pytest.fixture
def json_log() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    register_secret(SECRET)
    register_secret(TOKEN)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.redaction.json")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def _fail_with_secret() -> None:
    try:
        raise ConnectionError(f"GET https://ecs.example/?SecurityToken={TOKEN}&k={SECRET}")
    except ConnectionError as inner:
        raise RuntimeError(SIGNATURE_ERROR) from inner


def test_secrets_and_string_to_sign_never_reach_json_logs(
    json_log: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = json_log
    logger.info("credentials %s / %s", SECRET, TOKEN)
    logger.warning("upstream said: %s", SIGNATURE_ERROR)
    logger.warning(V3_SIGNATURE_ERROR)
    logger.info("rpc", extra={"fields": {"url": "https://x/?SecurityToken=" + TOKEN}})
    logger.info("nested", extra={"detail": {"secrets": [SECRET, {"t": TOKEN}]}})
    try:
        _fail_with_secret()
    except RuntimeError:
        logger.exception("call failed")
    logger.info("stack", stack_info=True, extra={"secret": SECRET})

    output = stream.getvalue()
    lines = [json.loads(line) for line in output.splitlines()]
    assert len(lines) == 7  # every record still written, as valid JSON
    _assert_clean(output)
    assert lines[0]["msg"] == f"credentials {REDACTED} / {REDACTED}"
    assert lines[1]["msg"].endswith(f"server string to sign is: {REDACTED}")
    assert lines[2]["msg"].endswith(f"server string to sign is: {REDACTED}")
    # The traceback is kept (both exceptions), only scrubbed.
    assert "ConnectionError" in lines[5]["exc"]
    assert "RuntimeError" in lines[5]["exc"]
    assert "_fail_with_secret" in lines[5]["exc"]


def test_redacting_filter_scrubs_records_for_other_formatters() -> None:
    register_secret(SECRET)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger("test.redaction.plain")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        try:
            _fail_with_secret()
        except RuntimeError:
            logger.error("failed with %s", SECRET, exc_info=True)
    finally:
        logger.removeHandler(handler)
    output = stream.getvalue()
    _assert_clean(output)
    assert f"failed with {REDACTED}" in output
    assert "Traceback" in output


def test_configure_logging_routes_uncaught_exceptions_through_redaction() -> None:
    register_secret(TOKEN)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, sys.excepthook, threading.excepthook)
    stream = io.StringIO()
    try:
        configure_logging("debug", stream=stream)
        configure_logging("info", stream=stream)  # idempotent: one handler, not two
        logging.getLogger("httpx").info("HTTP Request: GET https://x/?SecurityToken=%s", TOKEN)
        logging.getLogger("imageshare.test").debug("not at info")
        try:
            _fail_with_secret()
        except RuntimeError:
            sys.excepthook(*sys.exc_info())
        thread = threading.Thread(target=_fail_with_secret, name="metrics-http")
        thread.start()
        thread.join()
    finally:
        for handler in [h for h in root.handlers if h not in saved[0]]:
            root.removeHandler(handler)
        root.setLevel(saved[1])
        sys.excepthook = saved[2]
        threading.excepthook = saved[3]
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 2  # httpx quiet below WARNING; debug filtered at info
    for line in lines:
        assert line["level"] == "critical"
        assert "RuntimeError" in line["exc"]
    assert "metrics-http" in lines[1]["msg"]
    _assert_clean(stream.getvalue())


def _logger_with(handler: logging.Handler) -> logging.Logger:
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"test.log_fields.{id(handler)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    return logger


def _without_ts(text: str) -> list[dict[str, Any]]:
    """Each line's keys but the time and the (test's own) logger name."""
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("ts", "logger")}
        for line in text.splitlines()
    ]


def test_lines_written_without_a_record_are_the_lines_records_give() -> None:
    """``log_fields`` writes directly to the stderr handler of configure_logging, and
    through logging anywhere else: the same line either way, redacted the same way."""
    register_secret(SECRET)
    direct, via_records = io.StringIO(), io.StringIO()
    direct_logger = _logger_with(_StderrJsonHandler(direct))
    records_logger = _logger_with(logging.StreamHandler(via_records))
    cases: list[dict[str, Any]] = [
        {"event": "rpc", "code": "OK", "duration_ms": 0.397, "peer": "ipv4:10.0.0.7:53122"},
        {"event": "rpc", "upstream_request_ids": ["r-1", SECRET], "image": f"m-{SECRET}"},
        {"event": "rpc", "code": "Unauthenticated", "error": V3_SIGNATURE_ERROR},
        {"event": "rpc", "groups": {"all"}, "nested": {"t": [TOKEN, 1.5, None, True]}},
    ]
    for fields in cases:
        log_fields(direct_logger, logging.INFO, "rpc", fields)  # no event loop: written now
        log_fields(records_logger, logging.INFO, "rpc", fields)
    assert _without_ts(direct.getvalue()) == _without_ts(via_records.getvalue())
    _assert_clean(direct.getvalue())
    lines = _without_ts(direct.getvalue())
    assert lines[0] == {
        "level": "info",
        "msg": "rpc",
        "event": "rpc",
        "code": "OK",
        "duration_ms": 0.397,
        "peer": "ipv4:10.0.0.7:53122",
    }
    assert lines[1]["upstream_request_ids"] == ["r-1", REDACTED]
    assert lines[2]["error"].endswith(f"server string to sign is: {REDACTED}")
    assert lines[3]["groups"] == ["all"]


async def test_lines_written_on_an_event_loop_are_gathered_and_keep_their_order() -> None:
    stream = io.StringIO()
    logger = _logger_with(_StderrJsonHandler(stream))
    log_fields(logger, logging.INFO, "rpc", {"n": 1})
    log_fields(logger, logging.INFO, "rpc", {"n": 2})
    assert stream.getvalue() == ""  # gathered for one write
    logger.warning("a record")  # written after the lines gathered before it
    log_fields(logger, logging.INFO, "rpc", {"n": 3})
    await until(lambda: stream.getvalue().count("\n") == 4)  # the timer writes the last
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line.get("n", line["msg"]) for line in lines] == [1, 2, "a record", 3]


def test_configure_logging_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("verbose", stream=io.StringIO())


def test_redact_is_idempotent_and_ignores_short_values() -> None:
    register_secret("short")
    register_secret(SECRET)
    assert redact("a short note") == "a short note"
    once = redact(f"{SECRET} then {SIGNATURE_ERROR}")
    assert (
        once == f"{REDACTED} then Specified signature is not matched with our calculation. "
        f"server string to sign is: {REDACTED}"
    )
    assert redact(once) == once
