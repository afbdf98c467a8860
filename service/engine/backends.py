"""The per-layer conv ops each backend puts in place of nn.Conv2d, and the precision switches.

Every op takes (x, residual=None) and returns activation(conv(x) + bias + residual): the epilogue
the graph builder fused into it. `dense` runs torch/cuDNN and does the epilogue in torch;
`sparse` hands everything to the Escort kernel's SparseConvPlan; `auto` holds both and picks per
batch bucket from measured timings.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.engine.errors import BackendUnavailableError

log = logging.getLogger(__name__)

Pair = tuple[int, int]
Pad4 = tuple[int, int, int, int]  # left, right, top, bottom, as F.pad and ZeroPad2d order them
PlanFactory = Callable[..., Any]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a conv layer except its weights; hashable, so it keys the tuning cache."""

    in_channels: int
    out_channels: int
    kernel: Pair
    stride: Pair
    padding: Pad4
    dilation: Pair
    groups: int
    in_hw: Pair  # spatial size of the op's input (before its folded padding)
    out_hw: Pair
    activation: str | None = None  # None | "relu" | "relu6"
    residual: bool = False

    @property
    def symmetric_padding(self) -> Pair | None:
        left, right, top, bottom = self.padding
        return (top, left) if left == right and top == bottom else None

    @property
    def epilogue(self) -> str:
        parts = ["bias"] + (["residual"] if self.residual else [])
        return "+".join(parts + ([self.activation] if self.activation else []))

    @property
    def macs_per_image(self) -> int:
        kh, kw = self.kernel
        per_out = (self.in_channels // self.groups) * kh * kw
        return self.out_channels * self.out_hw[0] * self.out_hw[1] * per_out


@dataclass
class ConvLayer:
    """One conv as the built model runs it: BN folded in, epilogue fused, fp32 weights on CPU."""

    name: str
    geometry: ConvGeometry
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def nnz(self) -> int:
        return int(torch.count_nonzero(self.weight))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.weight.numel()

    def pattern_hash(self) -> str:
        """A short digest of where the nonzeros are: same pattern, same tuning decision."""
        mask = (self.weight != 0).flatten().numpy()
        digest = hashlib.sha1(np.packbits(mask).tobytes())
        digest.update(repr(tuple(self.weight.shape)).encode())
        return digest.hexdigest()[:16]


# ---------------------------------------------------------------- precision


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """fp16 only means half storage on CUDA; a CPU build stays fp32 (the card says so)."""
    return torch.float16 if precision == "fp16" and device.type == "cuda" else torch.float32


def set_precision_flags(precision: str) -> None:
    """TF32 on only for 'tf32'. torch's cuDNN default allows TF32, so 'fp32' must turn it off.
    The flags are process-wide and read when kernels are chosen: at eager calls and at graph
    capture. Runners set them (never restore them: a restore from one thread would flip them
    under another thread's eager pass); an engine has one precision, so they always agree."""
    tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32


@contextmanager
def precision_scope(precision: str) -> Iterator[None]:
    """The flags for `precision` inside, the previous ones after: for single-threaded code
    that mixes precisions (tuning, benchmarks)."""
    prev = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    set_precision_flags(precision)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = prev


# ---------------------------------------------------------------- ops


def apply_epilogue(y: torch.Tensor, residual: torch.Tensor | None, activation: str | None):
    """In place on y: y is always a fresh conv output that nothing else holds."""
    if residual is not None:
        y = y.add_(residual)
    if activation == "relu":
        y = y.relu_()
    elif activation == "relu6":
        y = y.clamp_(0.0, 6.0)
    return y


class ConvOp(nn.Module):
    """Base of the ops; the profiler treats each one as a single layer."""

    op_kind = "conv"

    def __init__(self, layer: ConvLayer) -> None:
        super().__init__()
        self.geometry = layer.geometry

    def extra_repr(self) -> str:
        g = self.geometry
        return (
            f"{g.in_channels}, {g.out_channels}, kernel={g.kernel}, stride={g.stride}, "
            f"padding={g.padding}, groups={g.groups}, epilogue={g.epilogue}"
        )


class DenseConv(ConvOp):
    """torch.nn.functional.conv2d (cuDNN on GPU) with the epilogue in torch."""

    op_kind = "conv_dense"

    def __init__(self, layer: ConvLayer) -> None:
        super().__init__(layer)
        g = layer.geometry
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        bias = layer.bias if layer.bias is not None else torch.zeros(g.out_channels)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        sym = g.symmetric_padding
        # Asymmetric (TF "SAME") padding has no conv2d spelling; pad explicitly first.
        self._pre_pad = None if sym is not None else g.padding
        self._padding = sym if sym is not None else (0, 0)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        g = self.geometry
        if self._pre_pad is not None:
            x = F.pad(x, self._pre_pad)
        y = F.conv2d(x, self.weight, self.bias, g.stride, self._padding, g.dilation, g.groups)
        return apply_epilogue(y, residual, g.activation)


def default_plan_factory() -> PlanFactory:
    from service.kernels import SparseConvPlan

    return SparseConvPlan


def check_sparse_available(device: torch.device) -> None:
    """Fail at load, not at the first request, when the sparse kernel cannot run here."""
    if device.type != "cuda":
        return
    try:
        from service.kernels import cuda_available
    except ImportError as exc:
        raise BackendUnavailableError(f"the sparse kernel is not importable: {exc}") from exc
    if not cuda_available():
        raise BackendUnavailableError(
            "the sparse backend on CUDA needs CuPy (pip install 'escort-serve[gpu]'); "
            "use ESCORT_BACKEND=dense, or ESCORT_DEVICE=cpu for the reference kernel"
        )


class SparseConv(ConvOp):
    """The Escort kernel through a SparseConvPlan (the CPU reference off-GPU).

    The plan is kept out of the module tree on purpose: model-wide `.half()` or `.to()` must not
    touch its fp32 stretched-CSR buffers, which are built for one device once.

    On CUDA the op runs each dtype of `dtypes` natively where a kernel variant takes the
    layer (an fp16 model's layer in the fp16 kernel, fp16 in and out); any other dtype, or a
    layer no variant of that dtype takes, runs the fp32 kernel with casts around it.
    `ready_for` adds a dtype later (one op serves the builds of several precisions)."""

    op_kind = "conv_sparse"

    def __init__(
        self,
        layer: ConvLayer,
        device: torch.device,
        plan_factory: PlanFactory | None = None,
        buckets: tuple[int, ...] = (1,),
        tune: bool = False,
        dtypes: tuple[torch.dtype, ...] = (torch.float32,),
    ) -> None:
        super().__init__(layer)
        g = layer.geometry
        factory = plan_factory or default_plan_factory()
        padding = g.symmetric_padding or g.padding
        plan = factory(
            layer.weight.detach().float(),
            None if layer.bias is None else layer.bias.detach().float(),
            stride=g.stride,
            padding=padding,
            dilation=g.dilation,
            groups=g.groups,
        )
        moved = plan.to(device)
        plan = plan if moved is None else moved
        self.__dict__["plan"] = plan
        self.plan_dtypes = tuple(getattr(plan, "dtypes", (torch.float32,)))
        self.buckets = tuple(buckets)
        self.layer_name = layer.name
        self.ready_dtypes: tuple[torch.dtype, ...] = ()
        self._tune_kernel = tune and hasattr(plan, "tune")
        if device.type == "cuda":
            # Kernel metadata for every bucket must exist before any graph capture.
            for dtype in dtypes:
                self.ready_for(dtype)
        else:
            plan.prepare(g.in_hw)
            self.ready_dtypes = (torch.float32,)

    def ready_for(self, dtype: torch.dtype) -> None:
        """Prepares (and tunes, if this op tunes) the plan to run `dtype` at every bucket;
        when no kernel runs `dtype` for this layer, the fp32 kernel instead (with casts)."""
        if dtype in self.ready_dtypes:
            return
        if dtype not in self.plan_dtypes:
            self.ready_for(torch.float32)
            return
        plan, hw = self.plan, self.geometry.in_hw
        if dtype == torch.float32:
            plan.prepare(hw, batch_sizes=self.buckets)
        else:
            plan.prepare(hw, batch_sizes=self.buckets, dtypes=(dtype,))
        prepared = plan.prepared_dtypes(hw) if hasattr(plan, "prepared_dtypes") else (dtype,)
        if dtype not in prepared:  # no variant of this dtype takes the layer
            self.ready_for(torch.float32)
            return
        if self._tune_kernel:
            self._tune(dtype)
        self.ready_dtypes += (dtype,)

    def _tune(self, dtype: torch.dtype) -> None:
        """Let the kernel pick its config per bucket; its default is a fine fallback."""
        for batch in self.buckets:
            try:
                self.plan.tune(self.geometry.in_hw, batch, dtype=dtype)
            except Exception as exc:  # a tuning failure must not stop the model loading
                log.warning(
                    "kernel tuning failed for %s (%s) at batch %d: %s",
                    self.layer_name, dtype, batch, exc,
                )  # fmt: skip
                return

    def runs_natively(self, dtype: torch.dtype) -> bool:
        """True when a `dtype` input runs a kernel of its own dtype (no casts)."""
        return dtype in self.ready_dtypes

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        # A dtype no kernel runs for this layer is cast to fp32 and back.
        run = dtype if dtype in self.ready_dtypes else torch.float32
        x = x.to(run).contiguous()
        if residual is not None:
            residual = residual.to(run).contiguous()
        y = self.plan(x, residual=residual, activation=self.geometry.activation)
        return y if y.dtype == dtype else y.to(dtype)


class AutoConv(ConvOp):
    """Both ops of one layer and the faster one per batch bucket, as measured at load.

    The choice is a Python branch on the batch size, so each captured CUDA graph holds only
    the op chosen for its bucket."""

    def __init__(
        self, layer: ConvLayer, dense: DenseConv, sparse: SparseConv, choice: dict[int, str]
    ) -> None:
        super().__init__(layer)
        self.dense = dense
        self.__dict__["sparse"] = sparse  # see SparseConv: kept out of .half()/.to()
        self.choice = dict(sorted(choice.items()))
        self.op_kind = dense.op_kind

    def pick(self, batch: int) -> str:
        """The choice for the smallest tuned bucket holding this batch (the largest past it)."""
        for bucket, backend in self.choice.items():
            if batch <= bucket:
                return backend
        return next(reversed(self.choice.values()), "dense")

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        op = self.sparse if self.pick(x.shape[0]) == "sparse" else self.dense
        self.op_kind = op.op_kind
        return op(x, residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", choice={self.choice}"
