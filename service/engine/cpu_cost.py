"""What the sparse path costs on the CPU, said once at load.

Without a GPU the sparse layers run on the pure-torch reference of the Escort algorithm: a
correctness oracle, not a fast path (a 90%-sparse resnet18 ran at 720 ms a batch against 45 ms
dense). A user who serves `sparse` on a laptop should read that in the log and the model card,
measured on their own machine, rather than find it out from the latency.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any

import torch

from service.engine.assemble import BuiltModel, build_backend
from service.engine.build import PreparedModel

log = logging.getLogger(__name__)

TIMED_RUNS = 3


def sparse_layer_count(built: BuiltModel) -> int:
    return sum(1 for choice in built.choices.values() if "sparse" in choice.values())


def _batch1_s(module: torch.nn.Module, input_shape: tuple[int, ...]) -> float:
    x = torch.zeros((1, *input_shape))
    times = []
    with torch.inference_mode():
        module(x)  # first call pays for allocation
        for _ in range(TIMED_RUNS):
            start = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_reference_cost(
    model: str, prepared: PreparedModel, builts: dict[str, BuiltModel]
) -> dict[str, Any] | None:
    """For a CPU engine whose backends run sparse layers: batch-1 time of each such backend
    against dense, logged once and returned for the model card; None when no layer is sparse."""
    sparse = {name: b for name, b in builts.items() if sparse_layer_count(b)}
    if not sparse:
        return None
    dense = builts.get("dense") or build_backend(prepared, "dense", torch.device("cpu"), "fp32")
    dense_s = _batch1_s(dense.module, prepared.input_shape)
    cost: dict[str, Any] = {"dense_batch1_ms": round(dense_s * 1e3, 3), "backends": {}}
    for name, built in sparse.items():
        seconds = _batch1_s(built.module, prepared.input_shape)
        layers = sparse_layer_count(built)
        slowdown = seconds / dense_s if dense_s > 0 else float("inf")
        cost["backends"][name] = {
            "sparse_layers": layers,
            "batch1_ms": round(seconds * 1e3, 3),
            "vs_dense": round(slowdown, 2),
        }
        log.warning(
            "%s/%s: %d sparse layers run on the CPU reference (an exact oracle, not a fast "
            "path): batch 1 takes %.1f ms against %.1f ms dense (%.1fx); on the CPU serve "
            "ESCORT_BACKEND=dense, and use a GPU for the sparse kernels",
            model,
            name,
            layers,
            seconds * 1e3,
            dense_s * 1e3,
            slowdown,
        )
    cost["note"] = (
        "no GPU: sparse layers run on the pure-torch reference, a correctness oracle; the "
        "Escort CUDA kernels need a GPU"
    )
    return cost
