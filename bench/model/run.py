"""`escort bench model`: whole models on every backend, side by side, in one run.

For each model and batch size it builds each configuration (dense fp32/TF32/fp16, sparse, auto,
and the im2col+cuBLAS / im2col+cuSPARSE lowerings), warms and captures it like the service
does, and measures:
- device time of one batch: CUDA events around a graph replay (eager when graphs are off),
  the median over `--reps` (batch 1: latency; larger batches: throughput = batch / time);
- end-to-end `infer` time: numpy in, pinned copies, replay, numpy out;
- the largest logit difference from dense fp32 on the same input (a correctness check).
Results: bench/results/<date>-<device>-model.{json,md,png}. Lives outside the package (the serving
process never imports it); `escort bench model` runs it from a checkout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.model import report as bench_report
from service.engine.assemble import build_backend
from service.engine.autotune import TuningCache
from service.engine.build import PreparedModel, prepare_model
from service.engine.engine import ModelSource, load_source, resolve_device
from service.engine.errors import BackendUnavailableError
from service.engine.runner import Runner

log = logging.getLogger(__name__)

# name -> (backend, precision)
CONFIGS: dict[str, tuple[str, str]] = {
    "dense-fp32": ("dense", "fp32"),
    "dense-tf32": ("dense", "tf32"),
    "dense-fp16": ("dense", "fp16"),
    "sparse-fp32": ("sparse", "fp32"),
    "auto-fp32": ("auto", "fp32"),
    "im2col-cublas": ("im2col-cublas", "fp32"),
    "im2col-cusparse": ("im2col-cusparse", "fp32"),
    "sparse-tf32": ("sparse", "tf32"),
    "auto-tf32": ("auto", "tf32"),
    "sparse-fp16": ("sparse", "fp16"),
    "auto-fp16": ("auto", "fp16"),
}
DEFAULT_CONFIGS = tuple(list(CONFIGS)[:7])
# What means something on the CPU: TF32, fp16 and the cuBLAS/cuSPARSE lowerings are GPU ideas.
CPU_CONFIGS = ("dense-fp32", "sparse-fp32", "auto-fp32")
DEFAULT_MODELS = (
    "resnet50-uniform90",
    "resnet50-skimcaffe",
    "efficientnet-lite0",
    "alexnet-deepcompression",
    "vgg16-deepcompression",
)
DEFAULT_BATCHES = (1, 64)
REFERENCE = "dense-fp32"


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if not enabled or tqdm is None:
        return None
    return tqdm(total=total, desc="bench model", unit="run")


def _median_time(fn: Callable[[], Any], runner: Runner, reps: int, budget_s: float) -> list[float]:
    """Per-call seconds, at least 5 samples, stopping at `reps` or when the budget is spent."""
    samples: list[float] = []
    deadline = time.perf_counter() + budget_s
    for i in range(reps):
        if runner.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(runner.stream)
            fn()
            end.record(runner.stream)
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        if i >= 4 and time.perf_counter() > deadline:
            break
    return samples


def measure(runner: Runner, batch: int, inputs: np.ndarray, reps: int, budget_s: float) -> dict:
    """Device time of the graph (or eager pass) and end-to-end infer time at one batch size."""
    x = torch.from_numpy(inputs[:batch])
    with runner.context():
        if runner.cuda:
            bucket = runner.bucket_for(batch)
            runner.static_input(bucket)[:batch].copy_(x)

            def step() -> None:
                runner.run_bucket(bucket)

        else:
            x = x.to(runner.built.dtype)

            def step() -> None:
                runner.forward(x)

        for _ in range(3):
            step()
        if runner.cuda:
            runner.stream.synchronize()
        device = _median_time(step, runner, reps, budget_s)
    e2e = []
    for _ in range(max(3, min(10, reps // 3))):
        t0 = time.perf_counter()
        logits = runner.infer(inputs[:batch])
        e2e.append(time.perf_counter() - t0)
    med = statistics.median(device)
    return {
        "batch": batch,
        "graph": runner.cuda and batch in runner.graph_buckets,
        "device_s": med,
        "device_p10_s": float(np.percentile(device, 10)),
        "device_p90_s": float(np.percentile(device, 90)),
        "samples": len(device),
        "throughput_img_s": batch / med if med > 0 else None,
        "e2e_s": statistics.median(e2e),
        "logits": logits,
    }


def bench_config(
    prepared: PreparedModel,
    model: str,
    config: str,
    device: torch.device,
    batches: tuple[int, ...],
    inputs: np.ndarray,
    *,
    cuda_graphs: bool,
    reps: int,
    budget_s: float,
    cache: TuningCache,
    plan_factory=None,
    sparse_ops: dict | None = None,
) -> list[dict]:
    backend, precision = CONFIGS[config]
    t0 = time.perf_counter()
    built = build_backend(
        prepared,
        backend,
        device,
        precision,
        buckets=batches,
        cache=cache,
        plan_factory=plan_factory,
        cuda_graphs=cuda_graphs,
        sparse_ops=sparse_ops,
    )
    runner = Runner(
        built,
        model_name=model,
        input_shape=prepared.input_shape,
        max_batch_size=max(batches),
        buckets=batches,
        cuda_graphs=cuda_graphs,
        probabilities=False,
    )
    runner.warm()
    build_s = time.perf_counter() - t0
    sparse_layers = sum(1 for c in built.choices.values() if "sparse" in c.values())
    base = {"model": model, "config": config, "backend": backend, "precision": precision}
    base.update(build_s=round(build_s, 3), sparse_layers=sparse_layers, notes=built.notes)
    if device.type == "cuda":
        base["gpu_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    rows = [dict(base, **measure(runner, b, inputs, reps, budget_s)) for b in batches]
    runner.close()
    del runner, built
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return rows


def run_bench(
    sources: Iterable[ModelSource | Callable[[], ModelSource]],
    configs: tuple[str, ...],
    batches: tuple[int, ...],
    device: torch.device,
    *,
    cuda_graphs: bool = True,
    reps: int = 30,
    budget_s: float = 2.0,
    cache: TuningCache | None = None,
    plan_factory=None,
    progress: bool = True,
    on_model: Callable[[list[dict]], None] | None = None,
) -> list[dict]:
    """Every config of every model; a config that fails is recorded, not fatal."""
    sources = list(sources)
    batches = tuple(sorted(set(batches)))
    cache = cache or TuningCache(None)
    bar = _progress(len(sources) * len(configs), progress)
    rows: list[dict] = []
    rng = np.random.default_rng(0)
    for source in sources:
        source = source() if callable(source) else source
        shape = (3, source.preprocessing.crop, source.preprocessing.crop)
        prepared = prepare_model(source.module, shape)
        inputs = rng.standard_normal((max(batches), *shape)).astype(np.float32)
        reference: dict[int, np.ndarray] = {}
        sparse_ops: dict = {}  # one prepared, tuned set of plans per model, for all configs
        ordered = sorted(configs, key=lambda c: c != REFERENCE)  # reference first
        for config in ordered:
            if bar is not None:
                bar.set_postfix_str(f"{source.name} {config}")
            try:
                got = bench_config(
                    prepared,
                    source.name,
                    config,
                    device,
                    batches,
                    inputs,
                    cuda_graphs=cuda_graphs,
                    reps=reps,
                    budget_s=budget_s,
                    cache=cache,
                    plan_factory=plan_factory,
                    sparse_ops=sparse_ops,
                )
            except (BackendUnavailableError, RuntimeError, ValueError) as exc:
                log.warning("%s %s failed: %s", source.name, config, exc)
                got = [{"model": source.name, "config": config, "error": str(exc)}]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for row in got:
                logits = row.pop("logits", None)
                if logits is None:
                    continue
                if config == REFERENCE:
                    reference[row["batch"]] = logits
                elif row["batch"] in reference:
                    ref = reference[row["batch"]]
                    row["max_abs_diff"] = float(np.abs(logits - ref).max())
                    row["top5_match"] = bool(
                        (np.argsort(-logits, 1)[:, :5] == np.argsort(-ref, 1)[:, :5]).all()
                    )
            rows += got
            if bar is not None:
                bar.update(1)
        if on_model is not None:
            on_model(rows)
        del prepared, source, sparse_ops
        gc.collect()
    if bar is not None:
        bar.close()
    return rows


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    try:
        import cupy

        env["cupy"] = cupy.__version__
    except ImportError:
        env["cupy"] = None
    return env


def replot(path: Path) -> int:
    """Markdown and plot again from saved JSON (e.g. on a machine that has matplotlib)."""
    payload = json.loads(path.read_text())
    payload["targets"] = bench_report.targets(payload["results"])
    path.with_suffix(".md").write_text(bench_report.markdown(payload))
    png = bench_report.plot(payload["results"], path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.md')}" + (f" and {png}" if png else " (no matplotlib)"))
    return 0


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="escort bench model", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=_csv, default=DEFAULT_MODELS, help="manifest names")
    p.add_argument(
        "--configs", type=_csv, default=None, help=f"{', '.join(CONFIGS)} (default: the first 7)"
    )
    p.add_argument("--batches", type=_csv, default=tuple(map(str, DEFAULT_BATCHES)))
    p.add_argument("--reps", type=int, default=30, help="timed runs per measurement (max)")
    p.add_argument("--budget-s", type=float, default=1.0, help="time cap per measurement (s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-graphs", action="store_true", help="eager runs, no CUDA graphs")
    p.add_argument("--models-dir", default="", help="folders searched before the shipped ones")
    p.add_argument("--cache-dir", default=".escort-cache", help="auto's tuning cache")
    p.add_argument("--out", default="bench/results", help="folder for json/md/png")
    p.add_argument("--quick", action="store_true", help="resnet50-uniform90, batches 1,8")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replot", metavar="JSON", help="only redo .md and .png from a results file")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.reps = ("resnet50-uniform90",), ("1", "8"), 10
    args.batches = tuple(int(b) for b in args.batches)
    args.configs_given = args.configs is not None
    args.configs = args.configs or DEFAULT_CONFIGS
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}")
    return args


def cpu_refusal(configs: tuple[str, ...], given: bool) -> str | None:
    """Why a CPU run should not start, or None. The default sweep is for GPUs (35 runs of up to
    30 s on the CPU, half of them meaningless there); CPU configs run only when asked for."""
    cpu_ok = ", ".join(CPU_CONFIGS)
    if not given:
        return (
            "no CUDA GPU here, and the default configs are for GPUs; on the CPU ask for the "
            f"ones that mean something there: --configs {cpu_ok} (slow: sparse layers run on "
            "the pure-torch reference)"
        )
    gpu_only = [c for c in configs if c not in CPU_CONFIGS]
    if gpu_only:
        return f"{', '.join(gpu_only)} need a CUDA GPU; on the CPU use {cpu_ok}"
    return None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    device = resolve_device(args.device)
    if device.type == "cpu":
        refusal = cpu_refusal(args.configs, args.configs_given)
        if refusal:
            print(f"escort bench model: {refusal}", file=sys.stderr)
            return 2
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    stem = f"{dt.date.today().isoformat()}-{device_slug(device)}-model"
    settings = {k: v for k, v in vars(args).items() if k not in ("no_progress",)}
    meta = {"environment": environment(device), "settings": settings}

    def save(rows: list[dict]) -> None:
        # Written after every model, so a run cut short still leaves its results.
        out.mkdir(parents=True, exist_ok=True)
        payload = {**meta, "results": rows, "targets": bench_report.targets(rows)}
        (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=str))
        (out / f"{stem}.md").write_text(bench_report.markdown(payload))

    loaders = [
        lambda name=name: load_source(name, args.models_dir, progress=False) for name in args.models
    ]
    rows = run_bench(
        loaders,
        args.configs,
        args.batches,
        device,
        cuda_graphs=not args.no_graphs,
        reps=args.reps,
        budget_s=args.budget_s,
        cache=TuningCache(Path(args.cache_dir) / "autotune.json"),
        progress=not args.no_progress,
        on_model=save,
    )
    save(rows)
    png = bench_report.plot(rows, out / f"{stem}.png")
    print(bench_report.summary_table(rows))
    print(f"\nwrote {out / stem}.json, .md" + (", .png" if png else " (no matplotlib: no plot)"))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
