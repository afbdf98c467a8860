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

from loadtest.report import REPORT_JSON, write_report  # noqa: E402
from loadtest.summary import plotted_series, title_suffix  # noqa: E402

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
    for index, (name, points) in enumerate(plotted_series(report).items()):
        xs = [u for u, _ in points]
        users.update(xs)
        colour = _colour(name, index)
        for quantile, style in (("p50", "-"), ("p95", ":"), ("p99", "--")):
            ys = [s["latency_ms"][quantile] for _, s in points]
            ax.plot(xs, ys, style, marker="o", color=colour, label=f"{name} {quantile}")
    _concurrency_axis(ax, sorted(users) or [1])
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{report['model']} {title_suffix(report)}: latency", fontsize="medium")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(report: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    users: set[int] = set()
    for index, (name, points) in enumerate(plotted_series(report).items()):
        xs = [u for u, _ in points]
        users.update(xs)
        ys = [s["images_per_s"] for _, s in points]
        ax.plot(xs, ys, marker="o", color=_colour(name, index), label=name)
    _concurrency_axis(ax, sorted(users) or [1])
    ax.set_ylabel("images per second (answered correctly)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{report['model']} {title_suffix(report)}: throughput", fontsize="medium")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slowest_layers(report: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The `limit` slowest layers, slowest first (by their slowest backend); ties keep the
    model's order, since sorted() is stable."""
    layers = [row for row in report["layers"] if row["mean_ms"]]
    return sorted(layers, key=lambda row: max(row["mean_ms"].values()), reverse=True)[:limit]


def plot_layers(report: dict[str, Any], path: Path, limit: int) -> None:
    """Horizontal bars of the slowest `limit` layers, slowest on top, one bar per backend."""
    slowest = slowest_layers(report, limit)
    backends = sorted({b for row in slowest for b in row["mean_ms"]})
    height = max(3.0, 0.32 * len(slowest) * max(1, len(backends)) + 1.5)
    fig, ax = plt.subplots(figsize=(8, height))
    bar = 0.8 / len(backends)
    for index, backend in enumerate(backends):
        ys = [row_index + index * bar for row_index in range(len(slowest))]
        xs = [row["mean_ms"].get(backend, 0.0) for row in slowest]
        ax.barh(ys, xs, height=bar, color=_colour(backend, index), label=backend)
    ax.set_yticks([i + bar * (len(backends) - 1) / 2 for i in range(len(slowest))])
    ax.set_yticklabels([row["layer"] for row in slowest], fontsize="small")
    ax.invert_yaxis()  # the first row, the slowest layer, on top
    ax.set_xlabel("mean sampled layer time (ms)")
    ax.legend(fontsize="small")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title(
        f"{report['model']} {title_suffix(report)}:\nslowest {len(slowest)} of "
        f"{len(report['layers'])} layers",
        fontsize="medium",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


NO_ANSWERS = "no step got a correct answer (see the steps above)"
NO_LAYERS = (
    "no per-layer samples: the server times the layers of 1 batch in "
    "ESCORT_LAYER_PROFILE_EVERY (default 1000; 0 turns it off), so a short run may see none"
)


def write_plots(report: dict[str, Any], out_dir: str | Path, layer_limit: int = 24) -> list[str]:
    """Write the PNGs that have data; returns their file names (relative to the report folder)
    and records in report["plots_omitted"] why any other was left out."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    drawn, omitted = [], {}
    answered = bool(plotted_series(report))
    for name, draw, reason in (
        (LATENCY_PNG, lambda p: plot_latency(report, p), None if answered else NO_ANSWERS),
        (THROUGHPUT_PNG, lambda p: plot_throughput(report, p), None if answered else NO_ANSWERS),
        (LAYERS_PNG, lambda p: plot_layers(report, p, layer_limit),
         None if slowest_layers(report, 1) else NO_LAYERS),
    ):  # fmt: skip
        if reason:
            omitted[name] = reason
            (folder / name).unlink(missing_ok=True)  # not a stale figure from an earlier run
        else:
            draw(folder / name)
            drawn.append(name)
    report["plots_omitted"] = omitted
    return drawn


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
