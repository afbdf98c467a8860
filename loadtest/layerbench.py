"""Live per-layer times against an offline benchmark (LOADTEST_LAYER_BENCH).

The offline file is a JSON list of records {"model", "backend", "batch", "layer", "op",
"seconds"}. The live side is the mean of `escort_layer_duration_seconds{model,backend,layer,op}`
(sum / count of the delta between the scrapes around the step with the fullest batches). For
each backend the offline records at the batch closest to that step's mean batch size are
compared; a layer is "within" when live / offline is within 25% of 1, which says that the service
runs its layers as fast as the benchmark did and that the time lost elsewhere is not in them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loadtest.promtext import Scrape, histogram_by

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


def compare(
    live: dict[tuple[str, str, str], dict[str, float]],
    records: list[dict[str, Any]],
    model: str,
    batch_by_backend: dict[str, float],
) -> dict[str, Any]:
    """Per backend: the offline batch used and a row per live layer with its offline match."""
    mine = [r for r in records if r.get("model", model) == model]
    out: dict[str, Any] = {}
    for backend in sorted({key[0] for key in live}):
        offline = [r for r in mine if r["backend"] == backend]
        batches = sorted({int(r["batch"]) for r in offline})
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
) -> dict[str, Any]:
    """Live layer means over the step with the fullest batches (each phase's, in compare mode)
    against `records`."""
    live: dict[tuple[str, str, str], dict[str, float]] = {}
    batches: dict[str, float] = {}
    for summary, delta in fullest:
        live.update(live_layers(delta, model))
        batches.update(summary["server"]["mean_batch_size"])
    return {"path": path, "backends": compare(live, records, model, batches)}


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
    for backend, table in section["backends"].items():
        batch = table["live_mean_batch"]
        out += [f"### {backend} (live mean batch {'-' if batch is None else f'{batch:.2f}'}, "
                f"offline batch {table['offline_batch']})", "",
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
