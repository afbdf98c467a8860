"""Summaries, markdown, JSON and plots for the layer benchmark (no GPU needed)."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.kernels.methods import BASELINES, LABELS, METHODS, OURS


def _geomean(values: list[float]) -> float | None:
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(records: list[dict[str, Any]], sgemm_tflops: float) -> list[dict[str, Any]]:
    """Per (kernel, sparsity, batch, mode), for each of ours (`OURS`: the fp32 and the fp16
    kernel): geomean over layers of baseline_ms / our ms, and our useful TFLOP/s
    (2 * nnz * N * OH * OW / t)."""
    times: dict[tuple, float] = {}
    for r in records:
        if r.get("ms"):
            times[(r["layer"], r["batch"], r["mode"], r["method"], r["sparsity"])] = r["ms"]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r["method"] in OURS and r.get("ms"):
            groups[(OURS.index(r["method"]), r["sparsity"], r["batch"], r["mode"])].append(r)
    summary = []
    for (ours, sparsity, batch, mode), rows in sorted(groups.items()):
        per_layer = {}
        for r in rows:
            ratios = {}
            for method in BASELINES:
                dense_key = (r["layer"], batch, mode, method, None)
                t = times.get(dense_key) or times.get((r["layer"], batch, mode, method, sparsity))
                if t:
                    ratios[method] = t / r["ms"]
            tflops = r["useful_flop"] / (r["ms"] * 1e-3) / 1e12
            per_layer[r["layer"]] = {"escort_ms": r["ms"], "tflops": tflops, "ratios": ratios}
        ratios = {m: _geomean([v["ratios"].get(m) for v in per_layer.values()]) for m in BASELINES}
        tflops = _geomean([v["tflops"] for v in per_layer.values()])
        summary.append(
            {
                "kernel": OURS[ours],
                "sparsity": sparsity,
                "batch": batch,
                "mode": mode,
                "layers": len(per_layer),
                "ratios": ratios,
                "escort_tflops": tflops,
                "escort_pct_sgemm": None if tflops is None else 100 * tflops / sgemm_tflops,
                "per_layer": per_layer,
            }
        )
    return summary


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_table(summary: list[dict[str, Any]]) -> list[str]:
    head = ["kernel", "sparsity", "batch", "mode", "layers"]
    head += [f"vs {LABELS[m]}" for m in BASELINES] + ["Escort useful TFLOP/s", "% SGEMM"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        kernel = LABELS[s.get("kernel", "escort")]
        cells = [kernel, f"{s['sparsity']:.2f}", str(s["batch"]), s["mode"], str(s["layers"])]
        cells += [_fmt(s["ratios"].get(m)) for m in BASELINES]
        cells += [_fmt(s["escort_tflops"]), _fmt(s["escort_pct_sgemm"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_lines(summary: list[dict[str, Any]], sgemm_tflops: float) -> list[str]:
    return [
        f"SGEMM fp32 ceiling: {sgemm_tflops:.1f} TFLOP/s; ratios are baseline time / Escort time",
        *summary_table(summary),
    ]


def _layer_tables(records: list[dict[str, Any]], sparsity: float) -> list[str]:
    lines: list[str] = []
    keys = sorted({(r["batch"], r["mode"]) for r in records})
    for batch, mode in keys:
        rows: dict[str, dict[str, Any]] = defaultdict(dict)
        for r in records:
            if r["batch"] != batch or r["mode"] != mode:
                continue
            if r["sparsity"] not in (None, sparsity):
                continue
            rows[r["layer"]][r["method"]] = r.get("ms")
            if r["method"] == "escort" and r.get("ms"):
                rows[r["layer"]]["tflops"] = r["useful_flop"] / (r["ms"] * 1e-3) / 1e12
        if not any("escort" in v for v in rows.values()):
            continue
        lines += [f"### Sparsity {sparsity:.2f}, batch {batch}, {mode} (µs)", ""]
        head = ["layer"] + [LABELS[m] for m in METHODS] + ["Escort TFLOP/s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for layer, row in rows.items():
            cells = [layer] + [
                _fmt(None if row.get(m) is None else 1000 * row[m], 1) for m in METHODS
            ]
            lines.append("| " + " | ".join(cells + [_fmt(row.get("tflops"))]) + " |")
        lines.append("")
    return lines


def markdown(meta: dict[str, Any], records: list[dict[str, Any]], summary: list[dict]) -> str:
    args = meta.get("args", {})
    lines = [
        f"# Layer benchmark: {meta['device']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, CuPy {meta['cupy']}. SGEMM fp32 (TF32 off) measured here: "
        f"{meta['sgemm_tflops']:.1f} TFLOP/s. CUDA events, median of {args.get('reps')} runs "
        f"after {args.get('warmup')} warm-up runs; every method computes conv + bias in NCHW. "
        "Escort's kernel config is tuned per shape unless --no-tune. "
        "Ratios are baseline time / Escort time (above 1: Escort is faster), geomean over layers.",
        "",
        "## Summary",
        "",
        *summary_table(summary),
        "",
        "## Per layer",
        "",
    ]
    for sparsity in sorted({s["sparsity"] for s in summary}):
        if abs(sparsity - 0.9) < 1e-9 or len({s["sparsity"] for s in summary}) == 1:
            lines += _layer_tables(records, sparsity)
    errors = [r for r in records if r.get("error")]
    if errors:
        lines += ["## Not measured", ""]
        lines += [
            f"- {r['layer']} b{r['batch']} {r['mode']} {r['method']}"
            f"{'' if r['sparsity'] is None else ' s' + str(r['sparsity'])}: {r['error']}"
            for r in errors
        ]
        lines.append("")
    if meta.get("skipped_for_time"):
        lines.append(f"{meta['skipped_for_time']} measurements skipped by --time-budget-s.")
    return "\n".join(lines) + "\n"


def _plots(stem: Path, summary: list[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # The fp16 kernel's rows have the summary table; the plots are the fp32 kernel's.
    summary = [s for s in summary if s.get("kernel", "escort") == "escort"]
    at90 = [s for s in summary if abs(s["sparsity"] - 0.9) < 1e-9]
    if at90:
        fig, axes = plt.subplots(len(at90), 1, figsize=(14, 3.2 * len(at90)), squeeze=False)
        for ax, s in zip(axes[:, 0], at90, strict=True):
            layers = list(s["per_layer"])
            width = 0.8 / len(BASELINES)
            for i, m in enumerate(BASELINES):
                vals = [s["per_layer"][name]["ratios"].get(m, 0.0) for name in layers]
                ax.bar([j + i * width for j in range(len(layers))], vals, width, label=LABELS[m])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks([j + 0.4 for j in range(len(layers))])
            ax.set_xticklabels(layers, rotation=30, ha="right", fontsize=7)
            ax.set_ylabel("baseline / Escort")
            ax.set_title(f"90% sparsity, batch {s['batch']}, {s['mode']}")
        axes[0, 0].legend(fontsize=7, ncol=3)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-speedup.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    keys = sorted({(s["batch"], s["mode"]) for s in summary})
    if keys:
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
        for ax, (batch, mode) in zip(axes[0], keys, strict=True):
            rows = sorted(
                (s for s in summary if (s["batch"], s["mode"]) == (batch, mode)),
                key=lambda s: s["sparsity"],
            )
            for m in BASELINES:
                pts = [(s["sparsity"], s["ratios"].get(m)) for s in rows if s["ratios"].get(m)]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[m])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xlabel("sparsity")
            ax.set_title(f"batch {batch}, {mode}: geomean baseline / Escort")
        axes[0, 0].legend(fontsize=7)
        fig.tight_layout()
        path = stem.with_name(stem.name + "-sparsity.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(
    stem: Path,
    meta: dict[str, Any],
    records: list[dict[str, Any]],
    tuning: list[dict[str, Any]],
    summary: list[dict[str, Any]],
    plots: bool = False,
) -> list[Path]:
    """Writes <stem>.json and <stem>.md (and the PNG plots); returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path = stem.with_suffix(".json")
    payload = {"meta": meta, "summary": summary, "records": records, "tuning": tuning}
    json_path.write_text(json.dumps(payload, indent=1, default=str))
    md_path = stem.with_suffix(".md")
    md_path.write_text(markdown(meta, records, summary))
    paths = [json_path, md_path]
    if plots:
        paths += _plots(stem, summary)
    return paths
