"""Times every kernel config of the layer suite at one batch and sparsity (a tuning study).

    python3 bench/probe_configs.py --batch 1 --sparsity 0.9 --out DIR [--layers a,b]

For each layer: every candidate config (tiling.candidate_configs, no limit) timed the way
SparseConvPlan.tune times them (a graph of back-to-back launches), the config tune() would
pick with its default limit, and the launch floors of the timing methods (an empty kernel,
eager and in a graph). Writes DIR/probe-b<batch>-s<sparsity>.json and prints one line per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.kernels import methods as bm  # noqa: E402
from bench.kernels.layers import (  # noqa: E402
    SUITE,
    config_record,
    select_layers,
    time_eager,
    time_graph,
)
from service.kernels.plan import SparseConvPlan  # noqa: E402


def floors() -> dict[str, float]:
    """Milliseconds of an (almost) empty kernel: eager, single graph replay, back-to-back."""
    empty = torch.empty(1, device="cuda")

    def fn() -> None:
        empty.zero_()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return {
        "eager": time_eager(fn, 10, 50),
        "graph": time_graph(fn, 10, 50),
        "back_to_back": start.elapsed_time(end) / 10,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--layers", default="all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    layers = SUITE if args.layers == "all" else select_layers(args.layers)
    report = {"floors_ms": floors(), "layers": []}
    print("floors (us):", {k: round(v * 1e3, 1) for k, v in report["floors_ms"].items()})
    started = time.monotonic()
    for layer in layers:
        gen = torch.Generator().manual_seed(0)
        fan_in = layer.c * layer.r * layer.r
        dense = torch.randn(layer.k, layer.c, layer.r, layer.r, generator=gen) / math.sqrt(fan_in)
        weight = bm.magnitude_prune(dense, args.sparsity).cuda()
        plan = SparseConvPlan(weight, None, layer.stride, layer.pad)
        hw = (layer.hw, layer.hw)
        plan.prepare(hw, batch_sizes=(args.batch,))
        limited = plan.tune(hw, args.batch, reps=args.reps)
        picked = min(limited, key=limited.__getitem__)
        times = plan.tune(hw, args.batch, reps=args.reps, limit=None)
        best = min(times, key=times.__getitem__)
        x = torch.randn(args.batch, layer.c, layer.hw, layer.hw, device="cuda")
        eager = time_eager(lambda plan=plan, x=x: plan(x, impl="cuda"), 5, 25)
        graph = time_graph(lambda plan=plan, x=x: plan(x, impl="cuda"), 5, 25)
        oh = layer.output_hw()
        flop = 2 * plan.nnz * args.batch * oh * oh
        report["layers"].append(
            {
                "layer": layer.name,
                "useful_flop": flop,
                "picked": config_record(picked),
                "picked_ms": limited[picked],
                "best": config_record(best),
                "best_ms": times[best],
                "best_eager_ms": eager,
                "best_graph_ms": graph,
                "candidates": [{**config_record(c), "ms": t} for c, t in times.items()],
            }
        )
        print(
            f"{layer.name:20s} picked {limited[picked] * 1e3:6.1f} best {times[best] * 1e3:6.1f} "
            f"eager {eager * 1e3:6.1f} graph {graph * 1e3:6.1f} of {len(times)}; {best}",
            flush=True,
        )
        del plan
        torch.cuda.empty_cache()
    report["elapsed_s"] = time.monotonic() - started
    out = Path(args.out) / f"probe-b{args.batch}-s{args.sparsity}.json"
    out.write_text(json.dumps(report, indent=1))
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
