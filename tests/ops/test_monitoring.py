"""Prometheus's config and the Grafana dashboard: valid, provisioned, and querying only metrics
(and labels) that the service exports."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.ops.conftest import ROOT

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "escort-serve.json"

# The contract (product.md): metric -> (type, labels).
CONTRACT = {
    "escort_requests": ("counter", {"model", "backend", "protocol", "code"}),
    "escort_request_duration_seconds": ("histogram", {"model", "backend"}),
    "escort_queue_duration_seconds": ("histogram", {"model"}),
    "escort_preprocess_duration_seconds": ("histogram", {"model"}),
    "escort_compute_duration_seconds": ("histogram", {"model", "backend"}),
    "escort_batch_size": ("histogram", {"model", "backend"}),
    "escort_queue_depth": ("gauge", {"model"}),
    "escort_rejected": ("counter", {"model", "reason"}),
    "escort_layer_duration_seconds": ("histogram", {"model", "backend", "layer", "op"}),
    "escort_layer_sparsity": ("gauge", {"model", "layer"}),
    "escort_model_ready": ("gauge", {"model"}),
    "escort_batch_failures": ("counter", {"model", "backend"}),
    "escort_inflight_requests": ("gauge", set()),
    "escort_device_memory_bytes": ("gauge", {"device", "kind"}),
    # Per role (engine, worker) of the process layout; docs/service.md "Metrics".
    "escort_process_resident_memory_bytes": ("gauge", {"role"}),
    "escort_process_cpu_seconds": ("counter", {"role"}),
    "escort_process_open_fds": ("gauge", {"role"}),
    "escort_processes": ("gauge", {"role"}),
    "escort_stage_duration_seconds": ("histogram", {"model", "backend", "stage"}),
    # Connections the HTTP layer closed before any route; docs/service.md "Connection limits".
    "escort_connections_refused": ("counter", {"reason"}),
}
# Prometheus adds these to every scraped series: per-replica panels group by instance.
TARGET_LABELS = {"job", "instance"}
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def series_names(metrics: dict[str, tuple[str, set[str]]]) -> dict[str, set[str]]:
    """Every series name a query can use, with its labels (`le` on buckets)."""
    out = {}
    for name, (kind, labels) in metrics.items():
        for suffix in SUFFIXES[kind]:
            out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def service_metrics() -> dict[str, tuple[str, set[str]]] | None:
    """The metrics service/metrics.py defines, read from its metric objects."""
    if importlib.util.find_spec("service.metrics") is None:
        return None
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import ServiceMetrics

    found = {}
    for value in vars(ServiceMetrics()).values():
        if isinstance(value, MetricWrapperBase):
            found[value._name] = (value._type, set(value._labelnames))
    return found


def query_labels(expr: str) -> set[str]:
    """The labels a PromQL expression groups, matches or selects on."""
    used: set[str] = set()
    for group in re.findall(r"\b(?:by|ignoring|on) \(([^)]*)\)", expr):
        used |= {label.strip() for label in group.split(",")}
    for selector in re.findall(r"\{([^}]*)\}", expr):
        used |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
    used.discard("")
    return used


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p["targets"]]
    for variable in board["templating"]["list"]:
        queries.append((f"${variable['name']}", variable["definition"]))
    return queries


def test_prometheus_config_scrapes_every_escort_replica() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "escort")
    assert job["metrics_path"] == "/metrics"
    dns = job["dns_sd_configs"][0]
    assert dns["names"] == ["escort"] and dns["port"] == 8000 and dns["type"] == "A"


def test_promtool_accepts_the_config() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus.yml")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_the_dashboard_and_datasource(tmp_path: Path) -> None:
    sources = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/escort.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    board = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in board["panels"]}
    uids |= {t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]}
    assert uids == {source["uid"]}
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_dashboard_json_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("dashboard", DEPLOY / "grafana" / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run `python deploy/grafana/dashboard.py`"


def test_dashboard_covers_the_operational_questions() -> None:
    titles = " | ".join(p["title"].lower() for p in json.loads(DASHBOARD.read_text())["panels"])
    for topic in (
        "requests per second by backend",
        "latency by backend",
        "queue time",
        "batch size",
        "per-layer latency, sparse against dense",
        "errors by http code",
        "device memory",
        "in-flight requests",
        "failed engine batches",
        "process resident memory",
        "process cpu",
        "open file descriptors",
    ):
        assert topic in titles, topic  # fmt: skip
    used = {m for _, q in dashboard_queries() for m in re.findall(r"\bescort_\w+", q)}
    for metric in (
        "escort_requests_total",
        "escort_request_duration_seconds_bucket",
        "escort_queue_duration_seconds_bucket",
        "escort_batch_size_bucket",
        "escort_layer_duration_seconds_sum",
        "escort_rejected_total",
        "escort_device_memory_bytes",
        "escort_inflight_requests",
        "escort_batch_failures_total",
        "escort_process_resident_memory_bytes",
        "escort_process_cpu_seconds_total",
        "escort_process_open_fds",
    ):
        assert metric in used, metric  # fmt: skip


@pytest.mark.parametrize("source", ["contract", "service.metrics"])
def test_dashboard_queries_only_exported_metrics_and_labels(source: str) -> None:
    metrics = CONTRACT if source == "contract" else service_metrics()
    if metrics is None:
        pytest.skip("service/metrics.py is not in this checkout")
    exported = series_names(metrics)
    for title, query in dashboard_queries():
        names = re.findall(r"\bescort_\w+", query)
        assert names, (title, query)
        for name in names:
            assert name in exported, f"{title}: {name} is not exported ({source})"
        labels = set().union(*(exported[name] for name in names)) | TARGET_LABELS
        used = query_labels(query)
        assert used <= labels, f"{title}: labels {used - labels} are not on {names}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    rules = []
    for index, (_, query) in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        expr = query.replace("$__rate_interval", "1m").replace("$__range", "30m")
        rules.append(
            {"record": f"escort:dashboard_query_{index}", "expr": expr.replace("$model", ".*")}
        )
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
