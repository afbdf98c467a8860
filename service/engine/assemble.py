"""Build one backend's runnable model from a prepared (folded, fused) model.

`dense`, `sparse` and the lowering baselines put one op kind in every conv's place; `auto` builds
both dense and sparse ops, times them per batch bucket (autotune.py) and keeps both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from service.engine.autotune import LayerTimings, Timer, TuningCache, device_name, make_timer, tune
from service.engine.backends import (
    AutoConv,
    ConvLayer,
    ConvOp,
    DenseConv,
    PlanFactory,
    SparseConv,
    check_sparse_available,
    compute_dtype,
)
from service.engine.build import PreparedModel, materialize
from service.engine.errors import BackendUnavailableError
from service.engine.guard import ModelTimer, check_whole_model, guard_notes, make_model_timer
from service.engine.lowering import LOWERINGS, lowered_op

log = logging.getLogger(__name__)


@dataclass
class BuiltModel:
    """One backend's runnable model (logits out) and what building it learned."""

    module: nn.Module
    backend: str
    precision: str
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    # layer -> {bucket: "dense"|"sparse"|...}; bucket 0 means "every batch size".
    choices: dict[str, dict[int, str]] = field(default_factory=dict)
    timings: dict[str, LayerTimings] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # auto only: bucket -> whole-model seconds of the mix, all dense, all sparse, and the kept
    whole_model: dict[int, dict[str, float | str]] = field(default_factory=dict)


def precision_notes(
    backend: str,
    precision: str,
    device: torch.device,
    sparse: dict[str, SparseConv],
    channels_last: bool,
) -> list[str]:
    if precision == "fp16" and device.type != "cuda":
        return ["fp16 needs CUDA: on CPU every layer runs in fp32"]
    layout = "channels-last" if channels_last else "NCHW (the layout the fp16 sparse kernel reads)"
    notes = {
        "fp32": ["fp32 strict: TF32 is off for cuDNN and cuBLAS"],
        "tf32": ["tf32: dense convs and matmuls may use TF32 tensor cores"],
        "fp16": [f"fp16: layers run in half precision, {layout}"],
    }[precision]
    if precision == "tf32" and backend in ("sparse", "auto"):
        notes.append("the sparse kernel computes in fp32 (TF32 applies to dense layers only)")
    if precision == "fp16" and backend in ("sparse", "auto") and sparse:
        cast = sorted(n for n, op in sparse.items() if not op.runs_natively(torch.float16))
        if cast:
            notes.append(
                f"{len(cast)} of {len(sparse)} sparse layers run the fp32 Escort kernel with "
                "fp16<->fp32 casts around them (no fp16 kernel variant takes their shape): "
                + ", ".join(cast[:8])
                + (", ..." if len(cast) > 8 else "")
            )
        else:
            notes.append("sparse layers run the fp16 Escort kernel (fp16 storage, fp32 sums)")
    return notes


def _on_device(op: ConvOp, device: torch.device, dtype: torch.dtype, channels_last: bool):
    op = op.to(device=device, dtype=dtype)
    return op.to(memory_format=torch.channels_last) if channels_last else op


def build_backend(
    prepared: PreparedModel,
    backend: str,
    device: torch.device,
    precision: str,
    *,
    buckets: tuple[int, ...] = (1,),
    cache: TuningCache | None = None,
    timer: Timer | None = None,
    plan_factory: PlanFactory | None = None,
    cuda_graphs: bool = True,
    on_layer: Callable[[str], None] | None = None,
    sparse_ops: dict[str, SparseConv] | None = None,
    tune_kernel: bool = True,
    model_timer: ModelTimer | None = None,
) -> BuiltModel:
    """Materialize `backend` ("dense", "sparse", "auto" or a lowering) on `device`.

    auto builds both ops of every layer, times them at each bucket (or takes the cached
    decision) and keeps both, switching per bucket; then, on CUDA (or with `model_timer`),
    checks each bucket as a whole model (guard.py)."""
    dtype = compute_dtype(precision, device)
    # cuDNN's fp16 convs are fastest channels-last; the fp16 sparse kernel reads NCHW, so an
    # all-sparse fp16 model stays NCHW (auto times its sparse ops with channels-last inputs,
    # conversions included).
    channels_last = dtype == torch.float16 and backend != "sparse"
    notes = list(prepared.notes)
    choices: dict[str, dict[int, str]] = {}
    timings: dict[str, LayerTimings] = {}
    sparse: dict[str, SparseConv] = {}
    autos: dict[str, AutoConv] = {}

    # Sparse ops hold fp32 plans that run every dtype they were made ready for, so the sparse
    # and auto builds of one model (and every precision of them) share one set, each layer
    # prepared and kernel-tuned once per dtype.
    shared = sparse_ops if sparse_ops is not None else {}

    def sparse_op(layer: ConvLayer) -> SparseConv:
        op = shared.get(layer.name)
        if op is None or not set(buckets) <= set(op.buckets):
            tune = tune_kernel and device.type == "cuda"
            op = SparseConv(layer, device, plan_factory, tuple(buckets), tune, (dtype,))
            shared[layer.name] = op
        op.ready_for(dtype)
        return op

    if backend in LOWERINGS:
        if precision != "fp32":
            raise ValueError(f"{backend} is an fp32 baseline; got precision {precision!r}")
        module = materialize(prepared, lambda layer: lowered_op(backend, layer, device))
        choices = {name: {0: backend} for name in prepared.layers}
    elif backend == "dense":
        module = materialize(prepared, DenseConv)
        choices = {name: {0: "dense"} for name in prepared.layers}
    elif backend == "sparse":
        check_sparse_available(device)
        sparse = {name: sparse_op(layer) for name, layer in prepared.layers.items()}
        module = materialize(prepared, lambda layer: sparse[layer.name])
        choices = {name: {0: "sparse"} for name in prepared.layers}
    elif backend == "auto":
        try:
            check_sparse_available(device)
            sparse = {name: sparse_op(layer) for name, layer in prepared.layers.items()}
        except BackendUnavailableError as exc:
            log.warning("auto falls back to dense: %s", exc)
            notes.append(f"auto: sparse kernel unavailable ({exc}); every layer runs dense")
            sparse = {}
        dense = {
            name: _on_device(DenseConv(layer), device, dtype, channels_last)
            for name, layer in prepared.layers.items()
        }
        if sparse:
            timer = timer or make_timer(
                device, precision, dtype, channels_last=channels_last, cuda_graphs=cuda_graphs
            )
            timings = tune(
                prepared.layers.values(),
                dense,
                sparse,
                buckets,
                timer,
                cache or TuningCache(None),
                device_name(device),
                precision,
                on_layer,
            )
        for name in prepared.layers:
            per_bucket = timings.get(name, {})
            choices[name] = {b: str(t["choice"]) for b, t in per_bucket.items()} or {0: "dense"}

        def auto_op(layer: ConvLayer) -> ConvOp:
            # Every layer with a sparse op stays switchable, dense-everywhere ones included:
            # the whole-model check's "every layer sparse" must mean every layer.
            choice = choices[layer.name]
            if not sparse:
                return dense[layer.name]
            autos[layer.name] = AutoConv(layer, dense[layer.name], sparse[layer.name], choice)
            return autos[layer.name]

        module = materialize(prepared, auto_op)
    else:
        raise ValueError(f"unknown backend {backend!r}")

    module = module.to(device)
    if dtype != torch.float32:
        module = module.to(dtype)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    module = module.eval()
    whole_model: dict[int, dict[str, float | str]] = {}
    if autos and (model_timer is not None or device.type == "cuda"):
        model_timer = model_timer or make_model_timer(
            device, precision, dtype, prepared.input_shape, channels_last
        )
        whole_model = check_whole_model(module, buckets, model_timer)
        for name, op in autos.items():
            choices[name] = dict(op.choice)
        notes += guard_notes(whole_model)
    notes += precision_notes(backend, precision, device, sparse, channels_last)
    return BuiltModel(
        module, backend, precision, device, dtype, channels_last, choices, timings, notes,
        whole_model,
    )  # fmt: skip
