"""A real Prometheus (Debian's 2.42) scrapes the real server and evaluates every expression.

The server runs as a process with its shared Redis, behind the emulator; Prometheus
scrapes it every second as job ``rel-imageshare`` in namespace ``obs`` (what the chart's
ServiceMonitor gives) and loads the rule groups rendered from the chart. The test drives
OK, NOT_FOUND, INVALID_ARGUMENT, cache hits (in-process and shared), throttling, a lost
permission, rejected credentials, a deadline, an upstream outage and a Redis outage,
then evaluates through the HTTP API every expression of the dashboard (panels and
variables) and of the rules: none may error, and each must return data (for an alert,
the signal it compares against its threshold). Every rule must load and evaluate.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import promql_parser
import pytest
import yaml

from imageshare.v1 import image_share_pb2_grpc
from imageshare_emulator import EmulatorAdmin
from tests.support.processes import ServerProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.rpc import Request
from tests.support.waiting import wait_until
from tests.test_observability_assets import ALERTS, DASHBOARD, render_rule

pytestmark = [pytest.mark.toolchain, pytest.mark.redis, pytest.mark.subprocess]

JOB, NAMESPACE = "rel-imageshare", "obs"
# The rate window of the dashboard's panels: the whole test fits in it.
RATE_INTERVAL = "1m"
COMPARISONS = {">", "<", ">=", "<=", "==", "!="}


class Prometheus:
    """``prometheus`` on a free loopback port, scraping ``target`` every second."""

    def __init__(self, workdir: Path, target: str, rules: dict[str, Any]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed: run make bootstrap (Debian package)"
        (workdir / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}],
                }
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                "--config.file", str(workdir / "prometheus.yml"),
                "--storage.tsdb.path", str(workdir / "data"),
                "--web.listen-address", self.url.removeprefix("http://"),
                "--log.level", "warn",
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.http = httpx.Client(base_url=self.url, timeout=5)
        wait_until(self._ready, within=30)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited"
        try:
            return self.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    def query(self, expr: str) -> dict[str, Any]:
        answer: dict[str, Any] = self.http.get("/api/v1/query", params={"query": expr}).json()
        return answer

    def series(self, expr: str) -> list[dict[str, Any]]:
        answer = self.query(expr)
        assert answer["status"] == "success", (expr, answer)
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        result = self.series(expr)
        return sum(float(r["value"][1]) for r in result)

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@dataclass(frozen=True)
class Expression:
    where: str
    expr: str


def dashboard_expressions() -> list[Expression]:
    board = json.loads(DASHBOARD.read_text())

    def plain(expr: str) -> str:
        return (
            expr.replace("$__rate_interval", RATE_INTERVAL)
            .replace("$namespace", NAMESPACE)
            .replace("$job", JOB)
        )

    out = [
        Expression(f"panel {panel['title']!r} {target['refId']}", plain(target["expr"]))
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            assert match
            out.append(Expression(f"variable {variable['name']}", plain(match.group(1))))
    return out


def signals(node: Any) -> Iterator[Any]:
    """The parts of an alert expression that its thresholds and set operators combine."""
    if type(node).__name__ == "BinaryExpr":
        op = str(node.op)
        if op in {"and", "or", "unless"}:
            yield from signals(node.lhs)
            yield from signals(node.rhs)
            return
        if op in COMPARISONS and type(node.rhs).__name__ == "NumberLiteral":
            yield from signals(node.lhs)
            return
    if type(node).__name__ == "ParenExpr":
        yield from signals(node.expr)
        return
    yield node


def rule_expressions(rules: dict[str, Any]) -> tuple[list[Expression], list[Expression]]:
    """(each rule's expression, each signal of each rule)."""
    full, parts = [], []
    for group in rules["groups"]:
        for rule in group["rules"]:
            full.append(Expression(f"alert {rule['alert']}", rule["expr"]))
            for n, node in enumerate(signals(promql_parser.parse(rule["expr"]))):
                parts.append(Expression(f"alert {rule['alert']} signal {n}", node.prettify()))
    return full, parts


def code_of(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


def drive(
    server: ServerProcess, emulator: EmulatorAdmin, scraped: Callable[[], None]
) -> dict[str, grpc.StatusCode]:
    """Every kind of traffic the panels and alerts are about; returns what each call got.

    ``scraped`` waits for the next scrape, once the first upstream read is done: a rate
    needs two samples of a series, and the rest of the traffic can take less than one
    scrape interval.
    """
    codes: dict[str, grpc.StatusCode] = {}
    with grpc.insecure_channel(server.target) as channel:
        stub = image_share_pb2_grpc.ImageShareServiceStub(channel)

        def listing(
            name: str, image: str, region: str = "cn-hangzhou", timeout: float = 10, **kw: Any
        ) -> None:
            request = Request(region_id=region, image_id=image, **kw)
            codes[name] = code_of(lambda: list(stub.ListImageShares(request, timeout=timeout)))

        for image in ("m-demo0000001", "m-demo0000002", "m-demo0000003"):
            listing(f"ok {image}", image)  # one cache entry: each evicts the one before
            if image == "m-demo0000001":
                scraped()
        listing("hit", "m-demo0000003")
        listing("shared hit", "m-demo0000001")  # gone from this pod's cache, not from Redis
        listing("not found", "m-missing0001")
        listing("invalid", "m-demo0000001", region="bad region")
        emulator.throttle_next(2)
        listing("throttled", "m-demo0000002", bypass_cache=True)
        emulator.fault("error_code", count=1, status=403, code="Forbidden.RAM")
        listing("permission", "m-demo0000002", bypass_cache=True)
        emulator.fault("error_code", count=1, status=400, code="SignatureDoesNotMatch")
        listing("credentials", "m-demo0000002", bypass_cache=True)
        emulator.set(latency_ms=400)
        listing("deadline", "m-demo0000002", timeout=0.2, bypass_cache=True)
        emulator.set(latency_ms=0, down=True)
        for n in range(4):
            listing(f"outage {n}", "m-demo0000003", bypass_cache=True)
        emulator.set(down=False)
    return codes


def test_a_real_prometheus_evaluates_every_dashboard_and_rule_expression(
    start_server: Callable[..., ServerProcess], emulator: EmulatorAdmin, tmp_path: Path
) -> None:
    started = time.monotonic()
    for folder in ("redis", "prometheus"):
        (tmp_path / folder).mkdir()
    redis = RedisServer(tmp_path / "redis")
    rules = {"groups": render_rule()["spec"]["groups"]}
    server = start_server(
        "--redis-url", redis.url, "--cache-max-entries", "1", "--upstream-max-attempts", "2"
    )
    prometheus = Prometheus(tmp_path / "prometheus", f"127.0.0.1:{server.metrics_port}", rules)
    try:
        up = f'up{{job="{JOB}", namespace="{NAMESPACE}"}}'
        wait_until(lambda: prometheus.value(f"count_over_time({up}[1m])") >= 2, within=20)
        assert prometheus.value(up) == 1

        def scraped() -> None:
            last = prometheus.value(f"timestamp({up})")
            wait_until(lambda: prometheus.value(f"timestamp({up})") > last, within=20)

        codes = drive(server, emulator, scraped)
        assert codes == {
            "ok m-demo0000001": grpc.StatusCode.OK,
            "ok m-demo0000002": grpc.StatusCode.OK,
            "ok m-demo0000003": grpc.StatusCode.OK,
            "hit": grpc.StatusCode.OK,
            "shared hit": grpc.StatusCode.OK,
            "not found": grpc.StatusCode.NOT_FOUND,
            "invalid": grpc.StatusCode.INVALID_ARGUMENT,
            "throttled": grpc.StatusCode.RESOURCE_EXHAUSTED,
            "permission": grpc.StatusCode.PERMISSION_DENIED,
            "credentials": grpc.StatusCode.INTERNAL,
            "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
            **{f"outage {n}": grpc.StatusCode.UNAVAILABLE for n in range(4)},
        }
        # Redis goes away last: the replica falls back (and the Redis alert's signal shows).
        redis.stop()
        handled = f'sum(grpc_server_handled_total{{job="{JOB}", grpc_method="ListImageShares"}})'
        wait_until(lambda: prometheus.value(handled) >= len(codes), within=20)
        wait_until(lambda: prometheus.series(f'imageshare_redis_up{{job="{JOB}"}} == 0'), within=20)
        # One more scrape, so that every rate() window holds the last counts twice.
        scrapes = prometheus.value(f"count_over_time({up}[1m])")
        wait_until(lambda: prometheus.value(f"count_over_time({up}[1m])") > scrapes, within=20)

        full, parts = rule_expressions(rules)
        board = dashboard_expressions()
        assert len(board) > 30
        assert {e.where.split()[1] for e in full} == ALERTS
        errors = [
            (e.where, e.expr, answer.get("error"))
            for e in (*board, *full, *parts)
            if (answer := prometheus.query(e.expr))["status"] != "success"
        ]
        assert not errors, errors
        # Data, and numbers: a ratio of two empty rates would be NaN.
        empty = [
            (e.where, e.expr)
            for e in (*board, *parts)
            if all(r["value"][1] == "NaN" for r in prometheus.series(e.expr))
        ]
        assert not empty, f"no data for traffic that was driven: {empty}"

        # The chart's rule groups load and evaluate in Prometheus itself.
        loaded = prometheus.http.get("/api/v1/rules").json()["data"]["groups"]
        evaluated = {r["name"]: r for g in loaded for r in g["rules"]}
        assert set(evaluated) == ALERTS
        wait_until(
            lambda: all(
                r["health"] == "ok"
                for g in prometheus.http.get("/api/v1/rules").json()["data"]["groups"]
                for r in g["rules"]
            ),
            within=10,
        )
    finally:
        prometheus.stop()
        redis.stop()
    assert time.monotonic() - started < 60
