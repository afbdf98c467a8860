"""Tables, target checks and the plot for `escort bench model` results (plain dicts in, text out)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

# auto against the best single backend: a measured tie counts, within this noise margin.
AUTO_NOISE = 1.03


def _times(rows: list[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """(model, batch) -> {config: device seconds}."""
    table: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for row in rows:
        if "device_s" in row:
            table[(row["model"], row["batch"])][row["config"]] = row["device_s"]
    return table


def _best(times: dict[str, float], configs: tuple[str, ...]) -> tuple[str, float] | None:
    have = [(times[c], c) for c in configs if c in times]
    return (min(have)[1], min(have)[0]) if have else None


def targets(rows: list[dict]) -> list[dict[str, Any]]:
    """The project's whole-model targets that these rows can decide."""
    out: list[dict[str, Any]] = []
    table = _times(rows)
    ours = ("sparse-fp32", "auto-fp32")

    def add(target, model, batch, value, threshold, higher_is_better, detail=""):
        ok = value >= threshold if higher_is_better else value <= threshold
        out.append(
            {
                "target": target,
                "model": model,
                "batch": batch,
                "value": round(value, 4),
                "threshold": threshold,
                "pass": bool(ok),
                "detail": detail,
            }
        )

    for (model, batch), times in sorted(table.items()):
        best = _best(times, ours)
        if model == "resnet50-uniform90" and best and batch == 1:
            add("b1 latency (ms)", model, batch, best[1] * 1e3, 0.6, False, best[0])
        if model == "resnet50-uniform90" and best and batch >= 64 and "dense-fp32" in times:
            add("speedup vs dense fp32", model, batch, times["dense-fp32"] / best[1], 1.5, True)
        if model == "resnet50-skimcaffe" and best:
            for base, need in (("im2col-cublas", 1.43), ("im2col-cusparse", 1.69)):
                if base in times:
                    add(f"speedup vs {base}", model, batch, times[base] / best[1], need, True)
        for precision in ("fp32", "tf32", "fp16"):
            auto = times.get(f"auto-{precision}")
            single = _best(times, (f"dense-{precision}", f"sparse-{precision}"))
            if auto is not None and single is not None:
                add(
                    f"auto {precision} / best single (<= {AUTO_NOISE})",
                    model,
                    batch,
                    auto / single[1],
                    AUTO_NOISE,
                    False,
                    f"best single: {single[0]}",
                )
    return out


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def markdown(payload: dict[str, Any]) -> str:
    env, rows = payload["environment"], payload["results"]
    lines = [
        "# escort bench model",
        "",
        f"Device: {env.get('device')} · torch {env.get('torch')} · CUDA {env.get('cuda')} · "
        f"CuPy {env.get('cupy')}",
        "",
        "Device time is the median of CUDA-event-timed graph replays (eager where noted); "
        "e2e is `infer()` with host copies. Δ is the largest |logit| difference from dense fp32 "
        "on the same random input.",
    ]
    by_model: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_model[row["model"]].append(row)
    table = _times(rows)
    for model, model_rows in by_model.items():
        lines += ["", f"## {model}", ""]
        lines += [
            "| config | batch | device ms | img/s | e2e ms | vs dense-fp32 | Δ logits | top-5 | "
            "graph |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in model_rows:
            if "error" in row:
                lines.append(f"| {row['config']} | - | failed: {row['error'][:80]} |||||||")
                continue
            dense = table[(model, row["batch"])].get("dense-fp32")
            ratio = dense / row["device_s"] if dense else None
            lines.append(
                f"| {row['config']} | {row['batch']} | {_fmt(row['device_s'] * 1e3)} | "
                f"{_fmt(row['throughput_img_s'], 5)} | {_fmt(row['e2e_s'] * 1e3)} | "
                f"{_fmt(ratio)} | {_fmt(row.get('max_abs_diff'), 2)} | "
                f"{row.get('top5_match', '-')} | {'yes' if row['graph'] else 'no'} |"
            )
    checks = payload.get("targets") or []
    if checks:
        lines += ["", "## Targets", ""]
        lines += ["| target | model | batch | value | threshold | result | note |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for t in checks:
            verdict = "PASS" if t["pass"] else "MISS"
            lines.append(
                f"| {t['target']} | {t['model']} | {t['batch']} | {t['value']} | "
                f"{t['threshold']} | {verdict} | {t['detail']} |"
            )
    return "\n".join(lines) + "\n"


def summary_table(rows: list[dict]) -> str:
    """A short fixed-width table for the terminal: device ms per config and batch."""
    table = _times(rows)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    head = f"{'model':<26}{'batch':>6}" + "".join(f"{c[:15]:>16}" for c in configs)
    lines = [head, "-" * len(head)]
    for (model, batch), times in sorted(table.items()):
        cells = "".join(
            f"{_fmt(times[c] * 1e3) + ' ms' if c in times else '-':>16}" for c in configs
        )
        lines.append(f"{model[:25]:<26}{batch:>6}{cells}")
    for t in targets(rows):
        lines.append(
            f"{'PASS' if t['pass'] else 'MISS'}  {t['model']} b{t['batch']} {t['target']}: "
            f"{t['value']} (threshold {t['threshold']})"
        )
    errors = [r for r in rows if "error" in r]
    lines += [f"FAILED {r['model']} {r['config']}: {r['error'][:120]}" for r in errors]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Grouped bars: device time per config for each model, one panel per batch size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    table = _times(rows)
    batches = sorted({b for _, b in table})
    models = list(dict.fromkeys(m for m, _ in table))
    configs = list(dict.fromkeys(r["config"] for r in rows if "device_s" in r))
    if not batches:
        return None
    fig, axes = plt.subplots(1, len(batches), figsize=(7 * len(batches), 4.5), squeeze=False)
    width = 0.8 / max(1, len(configs))
    for ax, batch in zip(axes[0], batches, strict=True):
        for i, config in enumerate(configs):
            values = [table.get((m, batch), {}).get(config, 0) * 1e3 for m in models]
            xs = [j + i * width for j in range(len(models))]
            ax.bar(xs, values, width, label=config)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
        ax.set_xticklabels(models, rotation=20, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms per batch (log)")
        ax.set_title(f"batch {batch}")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
