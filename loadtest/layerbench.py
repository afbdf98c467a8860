"""Live per-layer times against an offline benchmark (LOADTEST_LAYER_BENCH).

The offline file is a JSON list of records {"model", "backend", "batch", "layer", "op",
"seconds"}. The live side is the mean of `escort_layer_duration_seconds{model,backend,layer,op}`
(sum / count of the delta between the scrapes around a step). The offline side it is held to:
where the step's `escort_layer_timings_total{batch}` says at which batch sizes its sampled
batches ran and the file has records at every one of them, the records weighted by those counts
(the mean the live samples should have); otherwise the records at the batch closest to the
step's mean batch size. A layer is "within" when live / offline is within 25% of 1, which says
that the service runs its layers as fast as the benchmark did and that the time lost elsewhere
is not in them. The report details the step with the fullest batches and summarises every step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.promtext import Scrape, counter_by, histogram_by

TOLERANCE = 0.25


def load_records(path: str | Path) -> list[dict[str, Any]]:
    records = json.loads(Path(path).read_text())
    if isinstance(records, dict):  # a benchmark that wraps its list: {"records": [...]}
        records = records.get("records", [])
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of layer records")
    for record in records:
        missing = {"backend", "batch", "layer", "seconds"} - set(record)
        if missing:
            raise ValueError(f"{path}: a record lacks {sorted(missing)}: {record}")
    return records


def live_layers(delta: Scrape, model: str) -> dict[tuple[str, str, str], dict[str, float]]:
    """(backend, layer, op) -> mean seconds and samples over the delta."""
    groups = histogram_by(delta, "escort_layer_duration_seconds", ("backend", "layer", "op"),
                          {"model": model})  # fmt: skip
    return {
        key: {"mean_s": float(h["sum"]) / float(h["count"]), "samples": float(h["count"])}  # type: ignore[arg-type]
        for key, h in groups.items()
        if h["count"]
    }


def sample_mix(delta: Scrape, model: str) -> dict[str, dict[int, float]]:
    """backend -> {batch size a sampled batch ran at: layer timings taken at it}."""
    counts = counter_by(delta, "escort_layer_timings_total", ("backend", "batch"), {"model": model})
    mix: dict[str, dict[int, float]] = {}
    for (backend, batch), count in counts.items():
        if count > 0 and batch.isdigit():
            mix.setdefault(backend, {})[int(batch)] = count
    return mix


def _weighted(offline: list[dict[str, Any]], mix: dict[int, float]) -> dict[tuple[str, str], float]:
    """(layer, op) -> the offline seconds weighted by how often each batch size was sampled;
    only layers with a record at every one of those sizes."""
    at: dict[tuple[str, str], dict[int, float]] = {}
    for r in offline:
        at.setdefault((r["layer"], r.get("op", "")), {})[int(r["batch"])] = float(r["seconds"])
    total = sum(mix.values())
    return {
        key: sum(by_batch[b] * n for b, n in mix.items()) / total
        for key, by_batch in at.items()
        if all(b in by_batch for b in mix)
    }


def compare(
    live: dict[tuple[str, str, str], dict[str, float]],
    records: list[dict[str, Any]],
    model: str,
    batch_by_backend: dict[str, float],
    mix: dict[str, dict[int, float]] | None = None,
) -> dict[str, Any]:
    """Per backend: the offline batch (or batch mix) used and a row per live layer with its
    offline match."""
    mine = [r for r in records if r.get("model", model) == model]
    out: dict[str, Any] = {}
    for backend in sorted({key[0] for key in live}):
        offline = [r for r in mine if r["backend"] == backend]
        batches = sorted({int(r["batch"]) for r in offline})
        sampled = (mix or {}).get(backend) or {}
        weighted = bool(sampled) and set(sampled) <= set(batches)
        if weighted:
            batch = None
            by_op = _weighted(offline, sampled)
        else:
            live_batch = batch_by_backend.get(backend) or 1.0
            batch = min(batches, key=lambda b: (abs(b - live_batch), b)) if batches else None
            by_op = {
                (r["layer"], r.get("op", "")): float(r["seconds"])
                for r in offline
                if int(r["batch"]) == batch
            }
        by_layer = {layer: seconds for (layer, _), seconds in by_op.items()}
        rows = []
        for (name, layer, op), stats in live.items():
            if name != backend:
                continue
            seconds = by_op.get((layer, op), by_layer.get(layer))
            ratio = stats["mean_s"] / seconds if seconds else None
            rows.append({
                "layer": layer, "op": op, "live_s": stats["mean_s"], "samples": int(stats["samples"]),
                "offline_s": seconds, "ratio": ratio,
                "within": ratio is not None and abs(ratio - 1.0) <= TOLERANCE,
            })  # fmt: skip
        compared = [row for row in rows if row["ratio"] is not None]
        out[backend] = {
            "live_mean_batch": batch_by_backend.get(backend),
            "offline_batch": batch,
            "offline_mix": {str(b): n for b, n in sorted(sampled.items())} if weighted else None,
            "rows": rows,
            "compared": len(compared),
            "within": sum(1 for row in compared if row["within"]),
        }
    return out


def fuller(summary: dict[str, Any], best: tuple[dict[str, Any], Scrape] | None) -> bool:
    """Whether this step's batches were fuller than the best so far (ties: more users)."""
    if best is None:
        return True

    def key(step: dict[str, Any]) -> tuple[float, int]:
        return (max(step["server"]["mean_batch_size"].values(), default=0.0), step["users"])

    return key(summary) > key(best[0])


def layer_bench_section(
    path: str,
    records: list[dict[str, Any]],
    fullest: list[tuple[dict[str, Any], Scrape]],
    model: str,
    steps: list[tuple[dict[str, Any], Scrape]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    """Live layer means over the step with the fullest batches (each phase's, in compare mode)
    against `records`, and a summary of the same comparison at every one of `steps`."""
    live: dict[tuple[str, str, str], dict[str, float]] = {}
    batches: dict[str, float] = {}
    mix: dict[str, dict[int, float]] = {}
    for summary, delta in fullest:
        live.update(live_layers(delta, model))
        batches.update(summary["server"]["mean_batch_size"])
        mix.update(sample_mix(delta, model))
    per_step = []
    for summary, delta in steps:
        tables = compare(
            live_layers(delta, model),
            records,
            model,
            summary["server"]["mean_batch_size"],
            sample_mix(delta, model),
        )
        if tables:
            per_step.append({
                "step": summary.get("step"), "phase": summary.get("phase"),
                "users": summary["users"], "think_ms": summary.get("think_ms", 0),
                "backends": {backend: conv_summary(t) for backend, t in tables.items()},
            })  # fmt: skip
    return {
        "path": path,
        "backends": compare(live, records, model, batches, mix),
        "steps": per_step,
    }


def conv_summary(table: dict[str, Any]) -> dict[str, Any]:
    """One backend's comparison at one step, in brief: its convolutions, the rest apart."""
    convs = [r for r in table["rows"] if r["ratio"] is not None and r["op"].startswith("conv")]
    ratios = [r["ratio"] for r in convs]
    return {
        "mix": table["offline_mix"],
        "offline_batch": table["offline_batch"],
        "samples": max((r["samples"] for r in table["rows"]), default=0),
        "convs": len(convs),
        "convs_within": sum(1 for r in convs if r["within"]),
        "conv_ratio_min": min(ratios, default=None),
        "conv_ratio_max": max(ratios, default=None),
        "compared": table["compared"],
        "within": table["within"],
        "outside": [
            r["layer"] for r in table["rows"] if r["ratio"] is not None and not r["within"]
        ],
    }


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def layer_bench_markdown(report: dict[str, Any]) -> list[str]:
    section = report.get("layer_bench")
    if not section:
        return []
    out = ["## Per-layer: live against the offline benchmark", "", f"From {section['path']}; live "
           "means over the step with the fullest batches; within = |live/offline - 1| <= "
           f"{TOLERANCE:.0%}.", ""]  # fmt: skip
    if not section["backends"]:
        return out + ["No live layer samples in that step (ESCORT_LAYER_PROFILE_EVERY).", ""]
    out += _steps_markdown(section.get("steps") or [])
    for backend, table in section["backends"].items():
        batch = table["live_mean_batch"]
        out += [f"### {backend} (live mean batch {'-' if batch is None else f'{batch:.2f}'}, "
                f"offline {_offline_label(table)})", "",
                "| layer | op | live ms | offline ms | live/offline | within 25% |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for row in table["rows"]:
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
            within = "-" if row["ratio"] is None else ("yes" if row["within"] else "no")
            out.append(f"| {row['layer']} | {row['op']} | {_ms(row['live_s'])} | "
                       f"{_ms(row['offline_s'])} | {ratio} | {within} |")  # fmt: skip
        out += ["", f"{table['within']} of {table['compared']} layers within 25% "
                f"({len(table['rows']) - table['compared']} without an offline record).", ""]  # fmt: skip
    return out


def _offline_label(table: dict[str, Any]) -> str:
    mix = table.get("offline_mix")
    if not mix:
        return f"batch {table['offline_batch']}"
    return "weighted by the sampled batch sizes " + ", ".join(f"{b}×{n:g}" for b, n in mix.items())


def _steps_markdown(steps: list[dict[str, Any]]) -> list[str]:
    if not steps:
        return []
    out = ["### Every step, in brief", "",
           "Per step and backend: the batch sizes its sampled batches ran at (size × layer "
           "timings; offline records weighted by them), the convolutions within 25%, their "
           "live/offline range, and any layer outside.", "",
           "| users | backend | sampled at | convs within 25% | conv live/offline | outside |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for step in steps:
        users = f"{step['users']}" + (f" (think {step['think_ms']} ms)" if step["think_ms"] else "")
        for backend, brief in step["backends"].items():
            mix = brief["mix"]
            at = (", ".join(f"{b}×{n:g}" for b, n in mix.items()) if mix
                  else f"closest offline batch {brief['offline_batch']}")  # fmt: skip
            low, high = brief["conv_ratio_min"], brief["conv_ratio_max"]
            spread = "-" if low is None else f"{low:.2f}-{high:.2f}"
            out.append(f"| {users} | {backend} | {at} | {brief['convs_within']} "
                       f"of {brief['convs']} | {spread} | {', '.join(brief['outside']) or '-'} |")  # fmt: skip
    return out + [""]
