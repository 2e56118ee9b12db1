"""Every alert of the chart, evaluated by Prometheus's own rule engine (``promtool test rules``).

The rule groups come from the chart as Helm renders them (release ``rel`` in namespace
``obs``); the cases live in ``tests/promtool/alerts.test.yaml``: for each alert one that
fires, with its exact labels and annotations (runbook link included), and one that must
not. ``make bootstrap`` installs Debian's ``prometheus`` package, which has ``promtool``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_observability_assets import ALERTS, render_rule

pytestmark = pytest.mark.toolchain

CASES = Path(__file__).resolve().parent / "promtool" / "alerts.test.yaml"
PRODUCTION = Path(__file__).resolve().parent.parent / "helm" / "values-production.yaml"


def promtool() -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed: run make bootstrap (Debian package prometheus)"
    return binary


def write_rules(directory: Path, rule: dict[str, Any]) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    return path


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *argv], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    cases = yaml.safe_load(CASES.read_text())
    rules = {r["alert"]: r for group in render_rule()["spec"]["groups"] for r in group["rules"]}
    assert set(rules) == ALERTS
    fires: dict[str, list[dict[str, Any]]] = {name: [] for name in rules}
    quiet: set[str] = set()
    for test in cases["tests"]:
        for check in test["alert_rule_test"]:
            if check["exp_alerts"]:
                fires[check["alertname"]] += check["exp_alerts"]
            else:
                quiet.add(check["alertname"])
    for name, rule in rules.items():
        assert fires[name], f"no case in which {name} fires"
        assert name in quiet, f"no case in which {name} must stay quiet"
        for alert in fires[name]:
            assert set(alert["exp_annotations"]) == set(rule["annotations"]), name
            assert alert["exp_labels"]["severity"] == rule["labels"]["severity"]
            assert alert["exp_annotations"]["runbook_url"].startswith("docs/runbook.md#")


def test_promtool_unit_tests_pass_against_the_rendered_chart(tmp_path: Path) -> None:
    write_rules(tmp_path, render_rule())
    shutil.copy(CASES, tmp_path / CASES.name)
    checked = run("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in checked.stdout
    tested = run("test", "rules", CASES.name, cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_production_values_render_valid_rules(tmp_path: Path) -> None:
    values = yaml.safe_load(PRODUCTION.read_text())["prometheusRule"]
    write_rules(tmp_path, render_rule(**{k: v for k, v in values.items() if k != "enabled"}))
    checked = run("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
