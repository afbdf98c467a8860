"""auto's whole-model check: per-layer choices that each won alone must also win together.

`auto` times every layer dense and sparse in isolation (autotune.py). Put together, a mix can
still lose: a sparse layer's NCHW output feeds a channels-last cuDNN layer (a layout change
the dense layer's own timing never saw), or small gains are eaten by the ops between layers.
So, once the model is built, each batch bucket is timed as a whole three ways (the per-layer
mix, every switchable layer dense, every switchable layer sparse), each a CUDA-graph replay of
the whole forward, and the bucket keeps the fastest; a uniform choice replaces the mix only
when it wins by more than `MARGIN` (timing noise must not flip a measured per-layer choice).
The result is in the model card's notes and in `BuiltModel.whole_model`.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterable

import torch
from torch import nn

from service.engine.backends import AutoConv, precision_scope

log = logging.getLogger(__name__)

MARGIN = 0.03
# (module, batch) -> seconds per forward of the whole model.
ModelTimer = Callable[[nn.Module, int], float]
KINDS = ("mix", "dense", "sparse")


def make_model_timer(
    device: torch.device,
    precision: str,
    dtype: torch.dtype,
    input_shape: tuple[int, int, int],
    channels_last: bool,
    reps: int = 3,
    trials: int = 5,
) -> ModelTimer:
    """CUDA events around a graph of `reps` forwards on random input (eager if capture fails)."""

    def time_model(module: nn.Module, batch: int) -> float:
        x = torch.randn(batch, *input_shape, device=device, dtype=dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), precision_scope(precision), torch.cuda.stream(stream):
            for _ in range(2):
                module(x)
            stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                    for _ in range(reps):
                        module(x)
                run, calls = graph.replay, reps
            except RuntimeError as exc:
                log.warning("whole-model capture failed (%s); timing eagerly", exc)
                run, calls = (lambda: module(x)), 1
            samples = []
            for _ in range(trials):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record(stream)
                run()
                end.record(stream)
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3 / calls)
        return statistics.median(samples)

    return time_model


def check_whole_model(
    module: nn.Module, buckets: Iterable[int], timer: ModelTimer
) -> dict[int, dict[str, float | str]]:
    """Times each bucket three ways and keeps the fastest in the module's AutoConv ops.
    Returns {bucket: {"mix": s, "dense": s, "sparse": s, "kept": kind}}."""
    autos = [m for m in module.modules() if isinstance(m, AutoConv)]
    report: dict[int, dict[str, float | str]] = {}
    if not autos:
        return report
    for bucket in sorted(set(buckets)):
        mix = {id(op): op.choice.get(bucket, op.pick(bucket)) for op in autos}
        times: dict[str, float] = {}
        for kind in KINDS:
            for op in autos:
                op.choice[bucket] = mix[id(op)] if kind == "mix" else kind
            times[kind] = float(timer(module, bucket))
        uniform = min(("dense", "sparse"), key=times.__getitem__)
        kept = uniform if times[uniform] < times["mix"] * (1 - MARGIN) else "mix"
        for op in autos:
            op.choice[bucket] = mix[id(op)] if kept == "mix" else kept
            op.choice = dict(sorted(op.choice.items()))  # pick() walks buckets in order
        report[bucket] = {**times, "kept": kept}
    return report


def guard_notes(report: dict[int, dict[str, float | str]]) -> list[str]:
    """One note per bucket where a uniform choice beat the per-layer mix."""
    notes = []
    for bucket, row in sorted(report.items()):
        if row["kept"] != "mix":
            notes.append(
                f"auto at batch {bucket}: every layer {row['kept']} "
                f"({float(row[str(row['kept'])]) * 1e3:.3f} ms) beat the per-layer mix "
                f"({float(row['mix']) * 1e3:.3f} ms) as a whole model"
            )
    return notes
