"""deploy/prometheus/alerts.yml: loaded by Prometheus (config and Compose), valid, querying only
exported metrics, each alert unit-tested with `promtool test rules`, and its thresholds in step
with the service's settings."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.conftest import ROOT
from tests.ops.test_monitoring import (
    CONTRACT,
    TARGET_LABELS,
    query_labels,
    series_names,
    service_metrics,
)

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
# Series from Prometheus itself rather than from the service.
PROMETHEUS_SERIES = {"up": {"job", "instance"}}
EXPECTED = {
    "EscortTargetDown", "EscortModelNotReady", "EscortHighP99Latency", "EscortQueueNearFull",
    "EscortBatchFailures", "EscortDeviceMemoryNearFull", "EscortHigh5xxRatio", "EscortShedding",
}  # fmt: skip


def _rules() -> list[dict]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return binary


def test_prometheus_loads_the_rules_in_the_checkout_and_in_compose() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (relative,) = config["rule_files"]
    assert (DEPLOY / relative).resolve() == ALERTS.resolve()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    config_in_container = Path(mounts["./deploy/prometheus.yml"])
    assert mounts["./deploy/prometheus/alerts.yml"] == str(config_in_container.parent / relative)


def test_every_alert_is_named_labelled_and_explained() -> None:
    rules = _rules()
    assert {r["alert"] for r in rules} == EXPECTED
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


@pytest.mark.parametrize("source", ["contract", "service.metrics"])
def test_alerts_query_only_exported_metrics(source: str) -> None:
    metrics = service_metrics() if source == "service.metrics" else CONTRACT
    if metrics is None:
        pytest.skip("service/metrics.py is not in this checkout")
    exported = {**series_names(metrics), **PROMETHEUS_SERIES}
    for rule in _rules():
        expr = rule["expr"]
        names = re.findall(r"\b(escort_\w+|up)\b", expr)
        assert names, rule["alert"]
        for name in names:
            assert name in exported, f"{rule['alert']}: {name} is not exported ({source})"
        labels = set().union(*(exported[n] for n in names)) | TARGET_LABELS
        used = query_labels(expr)
        assert used <= labels, f"{rule['alert']}: labels {used - labels} are not on {names}"


def test_queue_threshold_is_80_percent_of_the_default_queue_size() -> None:
    settings = pytest.importorskip("service.config").Settings
    limit = settings.model_fields["max_queue_size"].default
    rule = next(r for r in _rules() if r["alert"] == "EscortQueueNearFull")
    threshold = float(re.search(r">\s*([\d.]+)\s*$", rule["expr"].strip()).group(1))
    assert threshold == pytest.approx(0.8 * limit, abs=1), "alerts.yml: keep it at 80%"
    assert str(limit) in rule["annotations"]["description"]
    # The latency alert must fire well before requests reach their deadline.
    timeout = settings.model_fields["request_timeout_s"].default
    rule = next(r for r in _rules() if r["alert"] == "EscortHighP99Latency")
    assert float(re.search(r">\s*([\d.]+)\s*$", rule["expr"].strip()).group(1)) < timeout / 10


def test_every_alert_has_a_unit_test_that_fires_it() -> None:
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check.get("exp_alerts")
    }
    quiet = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if not check.get("exp_alerts")
    }
    assert fired == EXPECTED and quiet == EXPECTED  # each fires, and each stays quiet somewhere
    # Samples are one a minute in every case (promtool's default spacing is not).
    assert all(case.get("interval") == "1m" for case in cases)


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = subprocess.run([_promtool(), "test", "rules", ALERT_TESTS.name],
                            cwd=ALERT_TESTS.parent, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    # The unit tests are only worth something if a wrong threshold fails them.
    broken = ALERTS.read_text().replace("> 410", "> 460")
    assert broken != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / ALERT_TESTS.name).write_text(ALERT_TESTS.read_text())
    result = subprocess.run([_promtool(), "test", "rules", ALERT_TESTS.name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "EscortQueueNearFull" in result.stdout + result.stderr
