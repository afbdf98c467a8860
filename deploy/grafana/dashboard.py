"""Writes the Escort Serve Grafana dashboard (deploy/grafana/dashboards/escort-serve.json).

The JSON is generated so that every query is written once, readably, here; tests/ops checks
that the committed JSON matches this script and that it only queries metrics the service
exports. Regenerate after editing: `python deploy/grafana/dashboard.py`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "escort-serve.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
SEL = 'model=~"$model"'
RATE = "$__rate_interval"


def _target(expr: str, legend: str, ref: str, instant: bool = False, fmt: str = "") -> dict:
    target: dict[str, Any] = {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
        "range": not instant,
        "instant": instant,
    }
    if fmt:
        target["format"] = fmt
    return target


def _panel(kind: str, title: str, description: str, grid: tuple[int, int, int, int],
           targets: list[dict], unit: str = "", **extra: Any) -> dict:  # fmt: skip
    x, y, w, h = grid
    panel: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit} if unit else {}, "overrides": []},
        "options": {},
    }
    panel.update(extra)
    return panel


def _quantiles(metric: str, by: str, qs: tuple[float, ...]) -> list[dict]:
    out = []
    for index, q in enumerate(qs):
        expr = (
            f"histogram_quantile({q}, sum by (le{', ' + by if by else ''}) "
            f"(rate({metric}_bucket{{{SEL}}}[{RATE}])))"
        )
        legend = (f"{{{{{by}}}}} " if by else "") + f"p{round(q * 100)}"
        out.append(_target(expr, legend, chr(ord("A") + index)))
    return out


def _layer_mean(backend: str) -> str:
    where = f'{SEL}, backend="{backend}"'
    return (
        f"sum by (layer) (rate(escort_layer_duration_seconds_sum{{{where}}}[$__range])) / "
        f"sum by (layer) (rate(escort_layer_duration_seconds_count{{{where}}}[$__range]))"
    )


def panels() -> list[dict]:
    rate_by_backend = f"sum by (backend) (rate(escort_requests_total{{{SEL}}}[{RATE}]))"
    errors = f'sum by (code) (rate(escort_requests_total{{{SEL}, code!~"2.."}}[{RATE}]))'
    rejected = f"sum by (reason) (rate(escort_rejected_total{{{SEL}}}[{RATE}]))"
    refused = f"sum by (reason) (rate(escort_connections_refused_total[{RATE}]))"
    mean_batch = (
        f"sum by (backend) (rate(escort_batch_size_sum{{{SEL}}}[{RATE}])) / "
        f"sum by (backend) (rate(escort_batch_size_count{{{SEL}}}[{RATE}]))"
    )
    layer_by_backend = (
        f"sum by (layer, backend) (rate(escort_layer_duration_seconds_sum{{{SEL}}}[$__range])) / "
        f"sum by (layer, backend) (rate(escort_layer_duration_seconds_count{{{SEL}}}[$__range]))"
    )
    compute_mean = (
        f"sum by (backend) (rate(escort_compute_duration_seconds_sum{{{SEL}}}[{RATE}])) / "
        f"sum by (backend) (rate(escort_compute_duration_seconds_count{{{SEL}}}[{RATE}]))"
    )
    return [
        _panel("stat", "Models ready", "1 when every replica has the model loaded and warmed.",
               (0, 0, 6, 4), [_target(f"min by (model) (escort_model_ready{{{SEL}}})",
                                      "{{model}}", "A", instant=True)]),
        _panel("timeseries", "Requests per second by backend",
               "Inference requests answered (all codes), summed over replicas.",
               (6, 0, 9, 8), [_target(rate_by_backend, "{{backend}}", "A")], "reqps"),
        _panel("timeseries", "Request latency by backend (p50, p95, p99)",
               "From receiving a request to sending its answer, server side.",
               (15, 0, 9, 8), _quantiles("escort_request_duration_seconds", "backend",
                                         (0.5, 0.95, 0.99)), "s"),
        _panel("timeseries", "Queue time (p50, p99) and queue depth",
               "Time an image waits in the batcher before its batch starts; the depth is on "
               "the right axis. Rising queue time at flat throughput means the GPU is saturated.",
               (0, 8, 12, 8),
               _quantiles("escort_queue_duration_seconds", "", (0.5, 0.99))
               + [_target(f"sum by (model) (escort_queue_depth{{{SEL}}})", "depth {{model}}",
                          "C")], "s",
               fieldConfig={"defaults": {"unit": "s"}, "overrides": [{
                   "matcher": {"id": "byFrameRefID", "options": "C"},
                   "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                  {"id": "unit", "value": "short"}]}]}),
        _panel("heatmap", "Batch sizes", "How many images each engine batch held (buckets at "
               "powers of two). Small batches under load: raise ESCORT_MAX_BATCH_DELAY_MS.",
               (12, 8, 6, 8),
               [_target(f"sum by (le) (increase(escort_batch_size_bucket{{{SEL}}}[{RATE}]))",
                        "{{le}}", "A", fmt="heatmap")],
               options={"calculate": False, "yAxis": {"unit": "short"},
                        "cellGap": 1, "color": {"scheme": "Blues", "mode": "scheme"}}),
        _panel("timeseries", "Mean batch size and compute time by backend",
               "Images per batch (left) and engine time per batch (right).",
               (18, 8, 6, 8),
               [_target(mean_batch, "batch {{backend}}", "A"),
                _target(compute_mean, "compute {{backend}}", "B")], "short",
               fieldConfig={"defaults": {}, "overrides": [{
                   "matcher": {"id": "byFrameRefID", "options": "B"},
                   "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                  {"id": "unit", "value": "s"}]}]}),
        _panel("barchart", "Per-layer latency, sparse against dense",
               "Mean sampled time of each layer over the dashboard's time range, one bar per "
               "backend (sampled 1 batch in ESCORT_LAYER_PROFILE_EVERY).",
               (0, 16, 16, 12), [_target(layer_by_backend, "{{backend}}", "A", instant=True,
                                         fmt="table")], "s",
               options={"orientation": "horizontal", "xField": "layer", "groupWidth": 0.8,
                        "barWidth": 0.9, "legend": {"showLegend": True, "displayMode": "list",
                                                    "placement": "bottom"}},
               transformations=[{"id": "groupingToMatrix", "options": {
                   "columnField": "backend", "rowField": "layer", "valueField": "Value"}},
                   {"id": "organize", "options": {"renameByName": {"layer\\backend": "layer"}}}]),
        _panel("bargauge", "Dense time / sparse time per layer",
               "Above 1: the sparse kernel is faster on that layer.", (16, 16, 8, 12),
               [_target(f"({_layer_mean('dense')}) / ({_layer_mean('sparse')})", "{{layer}}",
                        "A", instant=True)], "x",
               options={"orientation": "horizontal", "displayMode": "gradient"}),
        _panel("timeseries", "Errors by HTTP code and refusals by reason",
               "Non-2xx answers per second by code; requests refused or dropped before "
               "compute (overloaded, queue full, deadline, client gone, shutting down); and "
               "connections the HTTP layer closed itself (connection cap, oversized or slow "
               "headers, malformed requests: every model).",
               (0, 28, 12, 8), [_target(errors, "HTTP {{code}}", "A"),
                                _target(rejected, "refused: {{reason}}", "B"),
                                _target(refused, "connection: {{reason}}", "C")], "reqps"),
        _panel("timeseries", "Preprocessing time (p50, p99)",
               "Decode, resize and normalize of one image, in the preprocessing threads.",
               (12, 28, 6, 8), _quantiles("escort_preprocess_duration_seconds", "",
                                          (0.5, 0.99)), "s"),
        _panel("table", "Layer sparsity", "Fraction of zero weights in each layer.",
               (18, 28, 6, 8), [_target(f"max by (model, layer) (escort_layer_sparsity{{{SEL}}})",
                                        "", "A", instant=True, fmt="table")], "percentunit"),
        *health_panels(36),
    ]  # fmt: skip


def health_panels(y: int) -> list[dict]:
    """Device memory, requests in flight, failed batches, and the processes themselves. Per
    replica (instance) where one replica can be in trouble while the sum looks fine."""
    memory = (
        "max by (instance, device, kind) "
        '(escort_device_memory_bytes{kind=~"allocated|reserved|total"})'
    )
    failures = f"sum by (model, backend) (rate(escort_batch_failures_total{{{SEL}}}[{RATE}]))"
    per_process = (
        "sum by (role) (escort_process_resident_memory_bytes) / sum by (role) (escort_processes)"
    )
    return [
        _panel("timeseries", "Device memory by replica",
               "The engine's memory on each device: allocated by tensors, reserved by the "
               "caching allocator, and the device's total (alert at 90% used).",
               (0, y, 8, 8), [_target(memory, "{{instance}} {{device}} {{kind}}", "A")], "bytes"),
        _panel("timeseries", "In-flight requests by replica",
               "Inference requests being handled now, over every HTTP worker of a replica.",
               (8, y, 8, 8), [_target("sum by (instance) (escort_inflight_requests)",
                                      "{{instance}}", "A")], "short"),
        _panel("timeseries", "Failed engine batches per second",
               "Batches that raised or returned a wrong number of results; every request in "
               "them got an error. Any is worth a look at the server log.",
               (16, y, 8, 8), [_target(failures, "{{model}} {{backend}}", "A")], "short"),
        _panel("timeseries", "Process resident memory by role",
               "Resident memory of the engine core process and of the HTTP workers, summed "
               "over replicas; dashed: the mean per process.",
               (0, y + 8, 8, 8),
               [_target("sum by (role) (escort_process_resident_memory_bytes)", "{{role}}", "A"),
                _target(per_process, "{{role}} per process", "B")], "bytes",
               fieldConfig={"defaults": {"unit": "bytes"}, "overrides": [{
                   "matcher": {"id": "byFrameRefID", "options": "B"},
                   "properties": [{"id": "custom.lineStyle",
                                   "value": {"fill": "dash", "dash": [10, 10]}}]}]}),
        _panel("timeseries", "Process CPU by role (cores)",
               "CPU time per second of the engine process and of the workers. Workers near "
               "ESCORT_WORKERS cores: the HTTP layer, not the device, is the limit.",
               (8, y + 8, 8, 8),
               [_target(f"sum by (role) (rate(escort_process_cpu_seconds_total[{RATE}]))",
                        "{{role}}", "A")], "short"),
        _panel("timeseries", "Where the time goes: mean per stage",
               "receive, parse and encode per request in the HTTP workers; h2d, replay and "
               "d2h per batch, device time on the engine's streams (GPU only). Compare replay "
               "with the offline graph replay of `escort bench model`.",
               (0, y + 16, 24, 8),
               [_target(f"sum by (stage) (rate(escort_stage_duration_seconds_sum{{{SEL}}}[{RATE}]))"
                        f" / sum by (stage) (rate(escort_stage_duration_seconds_count{{{SEL}}}"
                        f"[{RATE}]))", "{{stage}}", "A")], "s"),
        _panel("timeseries", "Open file descriptors by role",
               "Sockets, pipes and files held by the service's processes. Steady growth at "
               "steady traffic is a leak.",
               (16, y + 8, 8, 8),
               [_target("sum by (role) (escort_process_open_fds)", "{{role}}", "A")], "short"),
    ]  # fmt: skip


def dashboard() -> dict:
    model_var = {
        "name": "model",
        "label": "model",
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": "label_values(escort_model_ready, model)", "refId": "model"},
        "definition": "label_values(escort_model_ready, model)",
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }
    return {
        "uid": "escort-serve",
        "title": "Escort Serve",
        "description": "Requests, latency, batching and per-layer sparse against dense.",
        "tags": ["escort", "inference"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {"list": [model_var]},
        "annotations": {"list": []},
        "panels": [{**panel, "id": index + 1} for index, panel in enumerate(panels())],
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    sys.stdout.write(f"wrote {OUT}\n")
