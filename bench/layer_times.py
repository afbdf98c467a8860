"""Offline per-layer benchmark of a served model's own layers: the reference that the live
`escort_layer_duration_seconds` (service/engine/profiler.py) is compared with.

    python -m bench.layer_times --model resnet50-uniform90 --backends sparse,dense --batch 32 \
        --precision fp32 --device cuda --out bench/results/layers.json [--cache-dir DIR]

`--batch` takes a comma list (say every CUDA-graph bucket the server captures: the load test
compares a step's live layer means with these records weighted by the batch sizes that step's
sampled batches ran at, `escort_layer_timings_total{batch}`); each size is built and tuned
on its own, as the engine's bucket is.

The model is built exactly as the engine builds it (load_source, prepare_model, build_backend,
Runner.warm). One eager forward captures each layer's real inputs at that batch size (forward
pre-hooks; a "layer" is what the profiler calls one: profiled_layers). Then each layer is
replayed alone: on CUDA a graph of `--calls` back-to-back calls (eager calls between events if
it cannot be captured), timed with CUDA events; on the CPU perf_counter around the same loop.
A record's seconds is the median per call over `--reps` repeats. Two more rows per backend
hold the whole model's graph replay time (op "model_graph") and the sum of the layers'
times (op "layers_sum"): their gap is the work outside layers (adds, flatten) plus launch gaps.
Writes FILE.json (a list of records) and FILE.md (a table) next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.model.run import environment, measure
from service.engine.assemble import build_backend
from service.engine.autotune import TuningCache
from service.engine.build import PreparedModel, prepare_model
from service.engine.engine import ModelSource, load_source, resolve_device
from service.engine.profiler import op_name, profiled_layers
from service.engine.runner import Runner

log = logging.getLogger(__name__)

Call = Callable[[], Any]


def build_runner(
    prepared: PreparedModel,
    model: str,
    backend: str,
    device: torch.device,
    precision: str,
    batch: int,
    *,
    cache: TuningCache | None = None,
    plan_factory=None,
    sparse_ops: dict | None = None,
) -> Runner:
    """One backend built, warmed and (on CUDA) captured at one bucket, as the engine does it."""
    built = build_backend(
        prepared,
        backend,
        device,
        precision,
        buckets=(batch,),
        cache=cache or TuningCache(None),
        plan_factory=plan_factory,
        sparse_ops=sparse_ops,
    )
    runner = Runner(
        built,
        model_name=model,
        input_shape=prepared.input_shape,
        max_batch_size=batch,
        buckets=(batch,),
        probabilities=False,
    )
    runner.warm()
    return runner


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()  # in-place layers (ReLU) would otherwise change later inputs
    if isinstance(value, tuple | list):
        return type(value)(_clone(v) for v in value)
    return value


def capture_inputs(runner: Runner, x: torch.Tensor) -> list[tuple[str, torch.nn.Module, Call, int]]:
    """(layer, module, a call of it on its real input, calls per forward) for every layer the
    profiler times, from one eager forward of `x`; call inside `runner.context()`."""
    seen: dict[str, list] = {}

    def hook(name: str) -> Callable:
        def pre(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if name in seen:
                seen[name][2] += 1
            else:
                seen[name] = [module, (_clone(args), _clone(kwargs)), 1]

        return pre

    handles = [
        module.register_forward_pre_hook(hook(name), with_kwargs=True)
        for name, module in profiled_layers(runner.module)
    ]
    try:
        runner.forward(x)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for name, (module, (args, kwargs), count) in seen.items():

        def call(module=module, args=args, kwargs=kwargs) -> Any:
            return module(*args, **kwargs)

        out.append((name, module, call, count))
    return out


def _graph_of(call: Call, calls: int, runner: Runner) -> torch.cuda.CUDAGraph | None:
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=runner.stream, capture_error_mode="thread_local"):
            for _ in range(calls):
                call()
    except RuntimeError as exc:  # host syncs or allocations in the op: time it eagerly
        log.info("eager timing, capture failed: %s", exc)
        torch.cuda.synchronize(runner.device)
        return None
    return graph


def time_call(call: Call, runner: Runner, *, calls: int = 10, reps: int = 7) -> tuple[float, bool]:
    """Median seconds per call of `call`, and whether a CUDA graph replayed it; call inside
    `runner.context()`. Each repeat runs `calls` calls back to back between two stamps."""
    for _ in range(3):  # warm: lazy inits, cuDNN algorithm picks, and capture needs a warm op
        call()
    if runner.cuda:
        runner.stream.synchronize()
        graph = _graph_of(call, calls, runner)

        def step() -> None:
            if graph is not None:
                graph.replay()
            else:
                for _ in range(calls):
                    call()

        step()
        samples = []
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(runner.stream)
            step()
            end.record(runner.stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / calls)
        return statistics.median(samples), graph is not None
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            call()
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples), False


def layer_times(runner: Runner, x: torch.Tensor, *, calls: int = 10, reps: int = 7) -> list[dict]:
    """One row per layer: layer, op, seconds (median per call), graph, calls_per_pass."""
    rows = []
    with runner.context():
        captured = capture_inputs(runner, x)
        for name, module, call, count in captured:
            seconds, graphed = time_call(call, runner, calls=calls, reps=reps)
            # After the calls: AutoConv names the op it ran at this batch size.
            row = {"layer": name, "op": op_name(module), "seconds": seconds}
            rows.append(dict(row, graph=graphed, calls_per_pass=count))
        del captured
    if runner.cuda:
        torch.cuda.empty_cache()
    return rows


def run(
    source: ModelSource,
    backends: Sequence[str],
    batch: int,
    precision: str,
    device: torch.device,
    *,
    cache: TuningCache | None = None,
    plan_factory=None,
    calls: int = 10,
    reps: int = 7,
) -> list[dict]:
    """Records of every layer of every backend, then each backend's two total rows."""
    shape = (3, source.preprocessing.crop, source.preprocessing.crop)
    prepared = prepare_model(source.module, shape)
    inputs = np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32)
    effective = precision if device.type == "cuda" else "fp32"  # as the engine runs it
    sparse_ops: dict = {}  # one set of prepared, tuned plans for all backends, as in the engine
    records: list[dict] = []
    for backend in backends:
        runner = build_runner(
            prepared,
            source.name,
            backend,
            device,
            precision,
            batch,
            cache=cache,
            plan_factory=plan_factory,
            sparse_ops=sparse_ops,
        )
        x = torch.from_numpy(inputs).to(device=device, dtype=runner.built.dtype)
        layers = layer_times(runner, x, calls=calls, reps=reps)
        model_s = measure(runner, batch, inputs, max(reps, 10), budget_s=1.0)["device_s"]
        base = {
            "model": source.name,
            "backend": backend,
            "batch": batch,
            "precision": effective,
            "device": str(device),
        }
        records += [dict(base, **row) for row in layers]
        layers_sum = sum(r["seconds"] * r["calls_per_pass"] for r in layers)
        records.append(dict(base, layer="(model)", op="model_graph", seconds=model_s))
        records.append(dict(base, layer="(model)", op="layers_sum", seconds=layers_sum))
        runner.close()
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return records


def markdown(records: Sequence[dict], env: dict | None = None) -> str:
    lines = ["# Per-layer device times", ""]
    if env:
        lines += [", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["backend"], r["batch"], r["precision"]), []).append(r)
    for (model, backend, batch, precision), rows in groups.items():
        lines += [f"## {model} / {backend}, batch {batch}, {precision}", ""]
        lines += ["| layer | op | ms | graph |", "|---|---|---:|---|"]
        for r in rows:
            graph = "" if "graph" not in r else ("yes" if r["graph"] else "no")
            lines.append(f"| {r['layer']} | {r['op']} | {r['seconds'] * 1e3:.4f} | {graph} |")
        lines.append("")
    return "\n".join(lines)


def write(records: Sequence[dict], out: Path, env: dict | None = None) -> tuple[Path, Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(list(records), indent=1))
    md = out.with_suffix(".md")
    md.write_text(markdown(records, env))
    return out, md


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.layer_times", description=__doc__.split("\n")[0]
    )
    p.add_argument("--model", default="resnet50-uniform90", help="manifest name")
    p.add_argument("--backends", default="sparse,dense", help="comma list")
    p.add_argument("--batch", type=_batches, default=(32,), help="a size or a comma list")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "fp16"))
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--out", default="bench/results/layer_times.json")
    p.add_argument("--cache-dir", default=".escort-cache", help="auto's tuning cache")
    p.add_argument("--models-dir", default="", help="folders searched before the shipped ones")
    p.add_argument("--calls", type=int, default=10, help="calls per timed repeat")
    p.add_argument("--reps", type=int, default=7, help="repeats (the median is kept)")
    return p.parse_args(argv)


def _batches(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of batch sizes: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1: {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the engine: fixed shapes per bucket
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    source = load_source(args.model, args.models_dir)
    cache = TuningCache(Path(args.cache_dir) / "autotune.json")
    records: list[dict] = []
    for batch in args.batch:
        records += run(
            source, backends, batch, args.precision, device,
            cache=cache, calls=args.calls, reps=args.reps,
        )  # fmt: skip
        print(f"batch {batch}: {len(records)} records so far", file=sys.stderr, flush=True)
    json_path, md_path = write(records, Path(args.out), environment(device))
    for r in records:
        print(f"{r['backend']:>8} {r['layer']:<28} {r['op']:<12} {r['seconds'] * 1e3:9.4f} ms")
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
