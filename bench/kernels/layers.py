"""`escort bench layers`: the Escort kernel against cuDNN, lowering and the paper's code shape.

For each suite layer (docs/kernels.md), batch and sparsity it times, with CUDA events after a
warm-up (median): the Escort kernel (configs tuned per shape), a port of the paper's sconv_shm,
cuDNN fp32 (TF32 off), cuDNN TF32, cuDNN fp16 channels-last, im2col+cuBLAS and
im2col+cuSPARSE. Batch 1 is timed eagerly and replayed from a CUDA graph. It writes JSON, a
markdown table and PNG plots to bench/results/<date>-<device>-layers.*; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import math
import re
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.kernels import methods as bm
from bench.kernels.report import summarize, summary_lines, write_report
from service.kernels.configs import default_config
from service.kernels.plan import SparseConvPlan
from service.kernels.variants import variant_for


@dataclass(frozen=True)
class Layer:
    name: str
    c: int
    k: int
    hw: int
    r: int
    stride: int
    pad: int

    def output_hw(self) -> int:
        return (self.hw + 2 * self.pad - self.r) // self.stride + 1


SUITE = tuple(
    Layer(n, *map(int, rest.split()))
    for n, rest in (
        line.split(maxsplit=1)
        for line in """
alexnet.conv2 64 192 27 5 1 2
alexnet.conv3 192 384 13 3 1 1
alexnet.conv4 384 256 13 3 1 1
alexnet.conv5 256 256 13 3 1 1
vgg16.conv1_2 64 64 224 3 1 1
vgg16.conv2_2 128 128 112 3 1 1
vgg16.conv3_2 256 256 56 3 1 1
vgg16.conv4_2 512 512 28 3 1 1
vgg16.conv5_2 512 512 14 3 1 1
resnet50.l1.3x3 64 64 56 3 1 1
resnet50.l1.1x1up 64 256 56 1 1 0
resnet50.l2.3x3s2 128 128 56 3 2 1
resnet50.l2.3x3 128 128 28 3 1 1
resnet50.l3.3x3 256 256 14 3 1 1
resnet50.l3.1x1dn 1024 256 14 1 1 0
resnet50.l4.3x3 512 512 7 3 1 1
resnet50.l4.1x1up 512 2048 7 1 1 0
resnet50.conv1 3 64 224 7 2 3
""".strip().splitlines()
    )
)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="escort bench layers", description=__doc__)
    parser.add_argument("--sparsity", type=_floats, default=[0.7, 0.9, 0.95, 0.98])
    parser.add_argument("--batch", type=_ints, default=[1, 16, 64])
    parser.add_argument("--layers", default="all", help="comma list of suite names or prefixes")
    parser.add_argument("--methods", default=",".join(bm.METHODS))
    parser.add_argument("--reps", type=int, default=25, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-graph", action="store_true", help="skip CUDA-graph timings")
    parser.add_argument("--no-tune", action="store_true", help="use the default kernel config")
    parser.add_argument("--max-unfold-gb", type=float, default=6.0)
    parser.add_argument("--time-budget-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="only launch the Escort kernel a few times per shape (to run under ncu/nsys)",
    )
    args = parser.parse_args(argv)
    unknown = set(args.methods.split(",")) - set(bm.METHODS)
    if unknown or "escort" not in args.methods.split(","):
        parser.error(f"--methods must include escort and be among {bm.METHODS}")
    return args


def select_layers(spec: str) -> list[Layer]:
    if spec == "all":
        return list(SUITE)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [layer for layer in SUITE if any(layer.name.startswith(w) for w in wanted)]
    if not chosen:
        raise SystemExit(f"no suite layer matches {spec!r}; known: {[s.name for s in SUITE]}")
    return chosen


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def time_eager(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median milliseconds per call, each call bracketed by CUDA events on the current stream
    (so launch gaps count when the GPU waits for the host)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends, strict=True):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    samples = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return samples[len(samples) // 2]


def time_graph(fn: Callable[[], Any], warmup: int, reps: int) -> float:
    """Median milliseconds per replay of a CUDA graph holding one call of fn."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    try:
        return time_eager(graph.replay, warmup, reps)
    finally:
        del graph


def measure_sgemm(size: int = 8192, reps: int = 10) -> float:
    """fp32 SGEMM TFLOP/s with TF32 off: the ceiling that useful TFLOP/s are compared with."""
    bm.set_tf32(False)
    a = torch.randn(size, size, device="cuda")
    b = torch.randn(size, size, device="cuda")
    ms = time_eager(lambda: torch.mm(a, b), 2, reps)
    return 2 * size**3 / (ms * 1e-3) / 1e12


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.methods = set(args.methods.split(","))
        self.records: list[dict[str, Any]] = []
        self.tuning: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.skipped_for_time = 0

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > self.args.time_budget_s

    def measure(self, base: dict[str, Any], method: str, fn: Callable[[], Any]) -> None:
        modes = ["eager"] + (["graph"] if base["batch"] == 1 and not self.args.no_graph else [])
        for mode in modes:
            if self.over_budget():
                self.skipped_for_time += 1
                return
            record = {**base, "method": method, "mode": mode}
            try:
                bm.set_tf32(method == "cudnn_tf32")
                timer = time_eager if mode == "eager" else time_graph
                record["ms"] = timer(fn, self.args.warmup, self.args.reps)
            except Exception as exc:  # a baseline that cannot run here is reported, not fatal
                record["ms"] = None
                record["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                torch.cuda.synchronize()
            self.records.append(record)

    def run_layer(self, layer: Layer, batch: int) -> None:
        gen = torch.Generator(device="cpu").manual_seed(
            self.args.seed + zlib.crc32(layer.name.encode())
        )
        fan_in = layer.c * layer.r * layer.r
        dense = torch.randn(layer.k, layer.c, layer.r, layer.r, generator=gen) / math.sqrt(fan_in)
        bias = (torch.randn(layer.k, generator=gen) * 0.1).cuda()
        x = torch.randn(batch, layer.c, layer.hw, layer.hw, device="cuda")
        oh = layer.output_hw()
        base = {"layer": layer.name, "batch": batch, "sparsity": None}
        too_big = bm.unfold_bytes(layer.c, layer.r, batch, oh, oh) > self.args.max_unfold_gb * 2**30
        w_dense = dense.cuda()
        for method in bm.DENSE_METHODS:
            if method not in self.methods:
                continue
            if method == "im2col_cublas" and too_big:
                self.records.append(
                    {
                        **base,
                        "method": method,
                        "mode": "eager",
                        "ms": None,
                        "error": "unfold larger than --max-unfold-gb",
                    }
                )
                continue
            if method.startswith("cudnn"):
                fn = bm.cudnn_runner(w_dense, bias, x, layer.stride, layer.pad, method[6:])
            else:
                fn = bm.im2col_cublas_runner(w_dense, bias, x, layer.stride, layer.pad)
            self.measure(base, method, fn)
        for sparsity in self.args.sparsity:
            self.run_sparse(layer, batch, sparsity, dense, bias, x, too_big)

    def run_sparse(
        self,
        layer: Layer,
        batch: int,
        sparsity: float,
        dense: torch.Tensor,
        bias: torch.Tensor,
        x: torch.Tensor,
        too_big: bool,
    ) -> None:
        weight = bm.magnitude_prune(dense, sparsity).cuda()
        plan = SparseConvPlan(weight, bias, layer.stride, layer.pad)
        hw = (layer.hw, layer.hw)
        plan.prepare(hw, batch_sizes=(batch,))
        oh = layer.output_hw()
        base = {
            "layer": layer.name,
            "batch": batch,
            "sparsity": sparsity,
            "nnz": plan.nnz,
            "useful_flop": 2 * plan.nnz * batch * oh * oh,
        }
        if not self.args.no_tune and not self.over_budget():
            times = plan.tune(hw, batch, reps=3)
            default = default_config(plan.geometry(hw), batch, plan.density)
            self.tuning.append(
                {
                    **base,
                    "default": config_record(default),
                    "default_ms": times.get(default),
                    "chosen": config_record(plan.config_for(hw, batch)),
                    "candidates": [{**config_record(c), "ms": t} for c, t in times.items()],
                }
            )
        base["config"] = config_record(plan.config_for(hw, batch))
        self.measure(base, "escort", bm.escort_runner(plan, x))
        if "escort_fp16" in self.methods:
            self.run_half(plan, hw, batch, base, x)
        if "escort_port" in self.methods:
            port = bm.port_runner(weight, bias, hw, layer.stride, layer.pad)
            self.measure(base, "escort_port", lambda: port(x))
        if "im2col_cusparse" in self.methods:
            if too_big:
                self.records.append(
                    {
                        **base,
                        "method": "im2col_cusparse",
                        "mode": "eager",
                        "ms": None,
                        "error": "unfold larger than --max-unfold-gb",
                    }
                )
            else:
                fn = bm.im2col_cusparse_runner(weight, bias, x, layer.stride, layer.pad)
                self.measure(base, "im2col_cusparse", fn)

    def run_half(
        self,
        plan: SparseConvPlan,
        hw: tuple[int, int],
        batch: int,
        base: dict[str, Any],
        x: torch.Tensor,
    ) -> None:
        """The fp16 kernel on the same layer (fp16 in and out), tuned like the fp32 one; a
        shape no fp16 variant takes is recorded as such."""
        plan.prepare(hw, batch_sizes=(batch,), dtypes=(torch.float16,))
        if torch.float16 not in plan.prepared_dtypes(hw):
            self.records.append(
                {**base, "method": "escort_fp16", "mode": "eager", "ms": None,
                 "error": "no fp16 kernel variant takes this shape"}
            )  # fmt: skip
            return
        if not self.args.no_tune and not self.over_budget():
            plan.tune(hw, batch, reps=3, dtype=torch.float16)
        config = config_record(plan.config_for(hw, batch, torch.float16))
        self.measure({**base, "config": config}, "escort_fp16", bm.escort_runner(plan, x.half()))


def config_record(config: Any) -> dict[str, Any]:
    """A kernel config as JSON: which kernel variant ("tiled", "direct", ...) and its fields."""
    return {"kernel": variant_for(config).name, **asdict(config)}


def profile(layers: list[Layer], args: argparse.Namespace) -> int:
    """Launches each shape's default config three times (the fp16 kernel's too, with
    escort_fp16 in --methods) and the sconv_shm port once, for an external profiler."""
    for layer in layers:
        for batch in args.batch:
            gen = torch.Generator().manual_seed(args.seed)
            dense = torch.randn(layer.k, layer.c, layer.r, layer.r, generator=gen)
            x = torch.randn(batch, layer.c, layer.hw, layer.hw, device="cuda")
            for sparsity in args.sparsity:
                weight = bm.magnitude_prune(dense, sparsity).cuda()
                plan = SparseConvPlan(weight, None, layer.stride, layer.pad)
                plan.prepare((layer.hw, layer.hw), batch_sizes=(batch,))
                for _ in range(3):
                    plan(x, impl="cuda")
                if "escort_fp16" in args.methods.split(","):
                    plan.prepare(
                        (layer.hw, layer.hw), batch_sizes=(batch,), dtypes=(torch.float16,)
                    )
                    xh = x.half()
                    for _ in range(3):
                        plan(xh, impl="cuda")
                    half = plan.config_for((layer.hw, layer.hw), batch, torch.float16)
                    print(f"{layer.name} b{batch} s{sparsity} fp16: {half}")
                port = bm.port_runner(
                    weight,
                    torch.zeros(layer.k, device="cuda"),
                    (layer.hw, layer.hw),
                    layer.stride,
                    layer.pad,
                )
                port(x)
                torch.cuda.synchronize()
                config = plan.config_for((layer.hw, layer.hw), batch)
                print(f"{layer.name} b{batch} s{sparsity}: {config}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from service.kernels.cuda import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        print(f"escort bench layers needs a CUDA GPU and CuPy: {reason}", file=sys.stderr)
        return 2
    layers = select_layers(args.layers)
    if args.profile:
        return profile(layers, args)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name()
    sgemm = measure_sgemm()
    bench = Bench(args)
    work = [(layer, batch) for batch in args.batch for layer in layers]
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        progress = tqdm(total=len(work), file=sys.stderr, unit="layer")
    meta = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "cupy": __import__("cupy").__version__,
        "sgemm_tflops": sgemm,
        "args": vars(args),
    }
    stem = Path(args.out) / f"{meta['date']}-{device_slug(name)}-layers"
    for i, (layer, batch) in enumerate(work):
        if progress is not None:
            progress.set_postfix_str(f"{layer.name} b{batch}")
        bench.run_layer(layer, batch)
        torch.cuda.empty_cache()
        if progress is not None:
            progress.update()
        if i % 6 == 5:  # partial results survive an interrupted run
            write_report(stem, meta, bench.records, bench.tuning, summarize(bench.records, sgemm))
    if progress is not None:
        progress.close()
    meta["elapsed_s"] = time.monotonic() - bench.started
    meta["skipped_for_time"] = bench.skipped_for_time
    summary = summarize(bench.records, sgemm)
    paths = write_report(stem, meta, bench.records, bench.tuning, summary, plots=True)
    print("\n".join(summary_lines(summary, sgemm)))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
