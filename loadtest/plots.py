"""PNG plots of a load test report: latency and throughput against concurrency, and per-layer
latency with the backends side by side. matplotlib with the Agg backend: no display needed.

`python -m loadtest.plots <report folder>` draws them again from its report.json (for a run made
on a host without matplotlib) and rewrites report.md to show them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

from loadtest.report import REPORT_JSON, series, write_report  # noqa: E402

LATENCY_PNG = "latency_vs_concurrency.png"
THROUGHPUT_PNG = "throughput_vs_concurrency.png"
LAYERS_PNG = "layers_sparse_vs_dense.png"
# Sparse and dense keep their colours on every plot, so figures can be compared at a glance.
COLOURS = {"sparse": "tab:blue", "dense": "tab:orange", "auto": "tab:green", "mixed": "tab:gray"}


def _colour(name: str, index: int) -> str:
    return COLOURS.get(name, f"C{(index + 3) % 10}")


def _concurrency_axis(ax: Any, users: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(users)
    ax.set_xticklabels([str(u) for u in users])
    ax.set_xlabel("concurrent users")
    ax.grid(True, which="both", alpha=0.3)


def plot_latency(report: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    users: set[int] = set()
    for index, (name, points) in enumerate(series(report).items()):
        points = [(u, s) for u, s in points if s["latency_ms"]["p50"] is not None]
        if not points:
            continue
        xs = [u for u, _ in points]
        users.update(xs)
        colour = _colour(name, index)
        for quantile, style in (("p50", "-"), ("p95", ":"), ("p99", "--")):
            ys = [s["latency_ms"][quantile] for _, s in points]
            ax.plot(xs, ys, style, marker="o", color=colour, label=f"{name} {quantile}")
    _concurrency_axis(ax, sorted(users) or [1])
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{report['model']}: request latency against concurrency")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    users: set[int] = set()
    for index, (name, points) in enumerate(series(report).items()):
        xs = [u for u, _ in points]
        users.update(xs)
        ys = [s["images_per_s"] for _, s in points]
        ax.plot(xs, ys, marker="o", color=_colour(name, index), label=name)
    _concurrency_axis(ax, sorted(users) or [1])
    ax.set_ylabel("images per second (answered correctly)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report['model']}: throughput against concurrency")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(report: dict[str, Any], path: Path, limit: int) -> None:
    """Horizontal bars of the slowest `limit` layers, one bar per backend."""
    layers = report["layers"]
    backends = sorted({b for row in layers for b in row["mean_ms"]})
    slowest = sorted(layers, key=lambda row: max(row["mean_ms"].values()), reverse=True)[:limit]
    slowest = [row for row in layers if row in slowest]  # back to the model's order
    height = max(3.0, 0.32 * len(slowest) * max(1, len(backends)) + 1.5)
    fig, ax = plt.subplots(figsize=(8, height))
    if not slowest:
        ax.text(0.5, 0.5, "no per-layer samples in this run\n(ESCORT_LAYER_PROFILE_EVERY)",
                ha="center", va="center", transform=ax.transAxes)  # fmt: skip
        ax.set_axis_off()
    else:
        bar = 0.8 / len(backends)
        for index, backend in enumerate(backends):
            ys = [row_index + index * bar for row_index in range(len(slowest))]
            xs = [row["mean_ms"].get(backend, 0.0) for row in slowest]
            ax.barh(ys, xs, height=bar, color=_colour(backend, index), label=backend)
        ax.set_yticks([i + bar * (len(backends) - 1) / 2 for i in range(len(slowest))])
        ax.set_yticklabels([row["layer"] for row in slowest], fontsize="small")
        ax.invert_yaxis()
        ax.set_xlabel("mean sampled layer time (ms)")
        ax.legend(fontsize="small")
        ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(f"{report['model']}: per-layer latency, slowest {len(slowest)} layers")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(report: dict[str, Any], out_dir: str | Path, layer_limit: int = 24) -> list[str]:
    """Write the three PNGs; returns their file names (relative to the report folder)."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    plot_latency(report, folder / LATENCY_PNG)
    plot_throughput(report, folder / THROUGHPUT_PNG)
    plot_layers(report, folder / LAYERS_PNG, layer_limit)
    return [LATENCY_PNG, THROUGHPUT_PNG, LAYERS_PNG]


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    folder = Path(argv[0])
    report = json.loads((folder / REPORT_JSON).read_text())
    report["plots"] = write_plots(report, folder, int(report["config"].get("plot_layers", 24)))
    write_report(report, folder)
    print(f"plots in {folder}: {', '.join(report['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
