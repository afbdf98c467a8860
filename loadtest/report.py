"""Turn what the load test saw (client samples, /metrics deltas) into the report: JSON and
markdown. Plots live in loadtest/plots.py. No Locust here, so tests can build reports directly.

Client-side latency is exact (every request's time, percentiles by numpy); server-side facts come
from the histograms' deltas over each step's measured window.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.ceilings import ceilings_markdown
from loadtest.envelope import envelope_markdown
from loadtest.layerbench import layer_bench_markdown
from loadtest.promtext import Scrape, bucket_counts, counter_by, histogram_by, histogram_quantile
from loadtest.stages import (
    cores_busy,
    cores_markdown,
    stage_means,
    stage_quantiles,
    stages_markdown,
    tails_markdown,
    users_label,
    worker_spread,
)
from loadtest.summary import conclusion, series

__all__ = ["series"]  # plots and scaling read the lines from here

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def latency_stats(latencies_ms: Sequence[float]) -> dict[str, float | None]:
    if not latencies_ms:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "max": None}
    values = np.asarray(latencies_ms, dtype=np.float64)
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "mean": float(values.mean()),
        "max": float(values.max()),
    }


def traffic_stats(samples: Sequence[Any], window_s: float) -> dict[str, Any]:
    """Requests, successes, rates and latency of the successful requests, errors by status.
    Status "0" means no HTTP answer (connection refused or reset, or the client's timeout)."""
    ok = [s for s in samples if s.ok]
    errors = Counter(str(s.status) for s in samples if not s.ok)
    window = max(window_s, 1e-9)
    return {
        "requests": len(samples),
        "ok": len(ok),
        "throughput_rps": len(ok) / window,
        "images_per_s": sum(s.images for s in ok) / window,
        "latency_ms": latency_stats([s.latency_ms for s in ok]),
        "errors": dict(sorted(errors.items())),
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def server_stats(delta: Scrape, model: str) -> dict[str, Any]:
    """What the server's own metrics say about one step of one model."""
    where = {"model": model}
    batches = histogram_by(delta, "escort_batch_size", ("backend",), where)
    compute = histogram_by(delta, "escort_compute_duration_seconds", ("backend",), where)
    request = histogram_by(delta, "escort_request_duration_seconds", ("backend",), where)
    queue = histogram_by(delta, "escort_queue_duration_seconds", (), where).get(())
    codes = counter_by(delta, "escort_requests_total", ("code",), where)
    rejected = counter_by(delta, "escort_rejected_total", ("reason",), where)
    return {
        "batches": {b: int(h["count"]) for (b,), h in batches.items() if h["count"]},
        "mean_batch_size": {b: h["mean"] for (b,), h in batches.items() if h["count"]},
        "batch_size_counts": {
            b: {le: int(n) for le, n in bucket_counts(h["buckets"]).items() if n}
            for (b,), h in batches.items()
            if h["count"]
        },
        "mean_compute_ms": {b: _ms(h["mean"]) for (b,), h in compute.items() if h["count"]},
        "request_p99_ms": {
            b: _ms(histogram_quantile(0.99, h["buckets"]))
            for (b,), h in request.items()
            if h["count"]
        },
        "mean_queue_ms": _ms(queue["mean"]) if queue else None,
        "queue_p99_ms": _ms(histogram_quantile(0.99, queue["buckets"])) if queue else None,
        "compute_p99_ms": {
            b: _ms(histogram_quantile(0.99, h["buckets"]))
            for (b,), h in compute.items()
            if h["count"]
        },
        "requests_by_code": {code: int(n) for (code,), n in sorted(codes.items()) if n},
        "rejected": {reason: int(n) for (reason,), n in sorted(rejected.items()) if n},
        "mean_stage_ms": stage_means(delta, model),
        "p99_stage_ms": stage_quantiles(delta, model),
    }


def step_summary(
    index: int,
    phase: str,
    users: int,
    window_s: float,
    samples: Sequence[Any],
    delta: Scrape,
    model: str,
) -> dict[str, Any]:
    """One step: overall traffic, broken down by backend and protocol, and the server's view."""
    summary: dict[str, Any] = {"step": index, "phase": phase, "users": users, "window_s": window_s}
    summary.update(traffic_stats(samples, window_s))
    for key, attribute in (("by_backend", "backend"), ("by_protocol", "protocol")):
        groups: dict[str, list[Any]] = {}
        for sample in samples:
            groups.setdefault(getattr(sample, attribute), []).append(sample)
        summary[key] = {
            name: traffic_stats(group, window_s) for name, group in sorted(groups.items())
        }
    summary["server"] = server_stats(delta, model)
    summary["server"]["cores_busy"] = cores_busy(delta, window_s)
    summary["server"]["workers"] = worker_spread(delta, window_s)
    return summary


def layer_table(delta: Scrape, model: str) -> list[dict[str, Any]]:
    """Mean sampled time of every layer on every backend, in the model's layer order, with the
    dense/sparse ratio where both ran (above 1: sparse is faster)."""
    groups = histogram_by(
        delta, "escort_layer_duration_seconds", ("layer", "backend", "op"), {"model": model}
    )
    rows: dict[str, dict[str, Any]] = {}
    for (layer, backend, op), hist in groups.items():
        if not hist["count"]:
            continue
        row = rows.setdefault(layer, {"layer": layer, "op": {}, "mean_ms": {}, "samples": {}})
        count = row["samples"].get(backend, 0) + int(hist["count"])
        total_ms = row["mean_ms"].get(backend, 0.0) * row["samples"].get(backend, 0)
        row["mean_ms"][backend] = (total_ms + float(hist["sum"]) * 1e3) / count
        row["samples"][backend] = count
        row["op"][backend] = op if backend not in row["op"] else f"{row['op'][backend]}+{op}"
    for row in rows.values():
        sparse, dense = row["mean_ms"].get("sparse"), row["mean_ms"].get("dense")
        row["dense_over_sparse"] = dense / sparse if sparse and dense else None
    return list(rows.values())


def layer_totals(layers: Iterable[dict[str, Any]]) -> dict[str, float]:
    """Sum of the per-layer means by backend: a forward pass as the profiler saw it."""
    totals: dict[str, float] = {}
    for row in layers:
        for backend, value in row["mean_ms"].items():
            totals[backend] = totals.get(backend, 0.0) + value
    return totals


def build_report(
    config: dict[str, Any],
    model: str,
    card: dict[str, Any],
    mode: str,
    backends: Sequence[str],
    steps: list[dict[str, Any]],
    run_delta: Scrape,
    started_at: str,
    wall_s: float,
) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    for step in steps:
        errors.update(step["errors"])
    layers = layer_table(run_delta, model)
    report = {
        "schema": SCHEMA_VERSION,
        "started_at": started_at,
        "wall_s": wall_s,
        "config": config,
        "model": model,
        "server": {
            key: card.get(key)
            for key in ("device", "precision", "max_batch_size", "backends", "architecture")
        },
        "mode": mode,
        "backends": list(backends),
        "steps": steps,
        "totals": {
            "requests": sum(step["requests"] for step in steps),
            "ok": sum(step["ok"] for step in steps),
            "errors_by_status": dict(sorted(errors.items())),
        },
        "layers": layers,
        "layer_totals_ms": layer_totals(layers),
        "plots": [],
        "plots_omitted": {},  # file name -> why it was not drawn
    }
    report["conclusion"] = conclusion(report)
    return report


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mapping(values: dict[str, Any], digits: int = 1) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return _f(next(iter(values.values())), digits)
    return ", ".join(f"{k} {_f(v, digits)}" for k, v in values.items())


def side_by_side_markdown(report: dict[str, Any]) -> str:
    """Rows by users, a column group per backend: the table compare mode prints."""
    lines = series(report)
    names = list(lines)
    header = "| users | " + " | ".join(f"{n} img/s | {n} p50 ms | {n} p99 ms" for n in names)
    out = [header + " |", "|---" * (1 + 3 * len(names)) + "|"]
    users = sorted({u for points in lines.values() for u, _ in points})
    for count in users:
        cells = [str(count)]
        for name in names:
            stats = next((s for u, s in lines[name] if u == count), None)
            if stats is None:
                cells += ["-", "-", "-"]
                continue
            latency = stats["latency_ms"]
            cells += [_f(stats["images_per_s"]), _f(latency["p50"]), _f(latency["p99"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def to_markdown(report: dict[str, Any]) -> str:
    config, server = report["config"], report["server"]
    out = [
        f"# Load test: {report['model']}",
        "",
        f"**{conclusion(report)}**",
        "",
        f"- Started {report['started_at']}, {report['wall_s']:.0f} s in all; target "
        f"{', '.join(config['urls'])}.",
        f"- Server: device {server.get('device')}, precision {server.get('precision')}, "
        f"max batch {server.get('max_batch_size')}, backends {server.get('backends')}.",
        f"- Mode: {report['mode']} over backends {report['backends'] or ['(server default)']}; "
        f"protocols {', '.join(config['protocols'])}; {config['images_per_request']} image(s) "
        "per request; photos at several sizes.",
        f"- Requests: {report['totals']['requests']} sent, {report['totals']['ok']} answered "
        f"correctly; errors by status: {report['totals']['errors_by_status'] or 'none'}.",
        "",
        "## Steps",
        "",
        "| phase | users | requests | ok | req/s | img/s | p50 ms | p95 ms | p99 ms | errors "
        "| mean batch | queue ms | compute ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for step in report["steps"]:
        lat, srv = step["latency_ms"], step["server"]
        out.append(
            f"| {step['phase']} | {users_label(step)} | {step['requests']} | {step['ok']} | "
            f"{_f(step['throughput_rps'])} | {_f(step['images_per_s'])} | {_f(lat['p50'])} | "
            f"{_f(lat['p95'])} | {_f(lat['p99'])} | {step['errors'] or '-'} | "
            f"{_mapping(srv['mean_batch_size'], 2)} | {_f(srv['mean_queue_ms'], 2)} | "
            f"{_mapping(srv['mean_compute_ms'], 2)} |"
        )
    if any(step.get("think_ms") for step in report["steps"]):
        out += ["", "Users marked \"think N\" pause a random time of mean N ms before each "
                "request (exponential), so that many of them arrive almost like an open load; "
                "their latency is read at that step's share of the best step's rate."]  # fmt: skip
    empty = [step for step in report["steps"] if step.get("empty_reason")]
    if empty:
        out += ["", "Steps without a correct answer (left out of the plots):", ""]
        out += [f"- step {s['step'] + 1} ({s['phase']}, {s['users']} users): {s['empty_reason']}"
                for s in empty]  # fmt: skip
    out += ["", "## Backends side by side", "", side_by_side_markdown(report), ""]
    out += envelope_markdown(report)
    out += stages_markdown(report)
    out += tails_markdown(report)
    out += cores_markdown(report)
    out += _layers_markdown(report)
    # Sections of the wrk-era additions, present only when measured (issue 10).
    out += ceilings_markdown(report) + layer_bench_markdown(report)
    omitted = report.get("plots_omitted") or {}
    if report["plots"] or omitted:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in report["plots"]] + [""]
        out += [f"- `{name}` not drawn: {why}" for name, why in omitted.items()] + [""]
    return "\n".join(out)


def _layers_markdown(report: dict[str, Any]) -> list[str]:
    layers = report["layers"]
    out = ["## Per-layer latency (sampled by the server)", ""]
    if not layers:
        return out + [
            "No layer samples: the server times layers of 1 batch in ESCORT_LAYER_PROFILE_EVERY "
            "(0 turns it off), so a short run may see none.",
            "",
        ]
    backends = sorted({b for row in layers for b in row["mean_ms"]})
    out.append("| layer | op | " + " | ".join(f"{b} ms" for b in backends) + " | dense/sparse |")
    out.append("|---|---|" + "---|" * len(backends) + "---|")
    for row in layers:
        ops = sorted(set(row["op"].values()))
        cells = [_f(row["mean_ms"].get(b), 3) for b in backends]
        out.append(
            f"| {row['layer']} | {'/'.join(ops)} | "
            + " | ".join(cells)
            + f" | {_f(row['dense_over_sparse'], 2)} |"
        )
    totals = report["layer_totals_ms"]
    sparse, dense = totals.get("sparse"), totals.get("dense")
    ratio = dense / sparse if sparse and dense else None
    cells = [_f(totals.get(b), 3) for b in backends]
    out.append("| **all layers** | | " + " | ".join(cells) + f" | {_f(ratio, 2)} |")
    return out + [""]


def write_report(report: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / REPORT_JSON, folder / REPORT_MD
    json_path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    md_path.write_text(to_markdown(report))
    return json_path, md_path
