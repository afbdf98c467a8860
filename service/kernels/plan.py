"""SparseConvPlan: a pruned conv layer prepared once and run many times.

The engine builds one plan per layer, calls `prepare(input_hw)` for each input size it will see
(before any CUDA-graph capture), and then calls the plan like a function. A call on the CUDA
path launches one kernel on torch's current stream, with no host sync and no allocation beyond
the output tensor (from torch's caching allocator), so it can be captured in a CUDA graph.
Which kernel variant runs (variants.py) and with which config is decided per input size,
batch and storage type (configs.py, `tune`): on CUDA an fp16 input runs an fp16 variant, fp16
in and fp16 out, once `prepare` has been given that dtype; any other input runs fp32.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from service.kernels import cuda as cuda_backend
from service.kernels.configs import KernelConfig, candidate_configs
from service.kernels.configs import default_config as _default_config
from service.kernels.launch import KernelLaunch, run_launch
from service.kernels.reference import check_activation, conv2d_reference
from service.kernels.stretched_csr import (
    ConvGeometry,
    SparseWeight,
    StretchedCSR,
    make_geometry,
    stretch,
)
from service.kernels.variants import dtypes as variant_dtypes
from service.kernels.variants import variant_for

IMPLS = ("auto", "cuda", "reference")
_KERNEL_IMPLS = ("auto", "cuda")
# Batch sizes whose kernel configs prepare() builds ahead of any capture.
PREPARED_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_F32 = torch.float32


@dataclass
class _Geometry:
    """What a plan keeps per input size."""

    geometry: ConvGeometry
    csr: StretchedCSR
    csr_on: dict[str, StretchedCSR] = field(default_factory=dict)
    metas: dict[Any, Any] = field(default_factory=dict)  # by _meta_key: a variant's metadata
    by_batch: dict[tuple[int, torch.dtype], KernelConfig] = field(default_factory=dict)
    launches: dict[tuple[int, str | None, KernelConfig], KernelLaunch] = field(default_factory=dict)


class SparseConvPlan:
    """A pruned Conv2d in stretched-CSR form, runnable by the CUDA kernel or the reference.

    `plan(x, residual, activation)` equals `activation(conv2d(x, weight, bias, ...) + residual)`
    with activation None, "relu" or "relu6". `padding` takes what F.conv2d takes, plus a 4-tuple
    (left, right, top, bottom) for TF "SAME" padding."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
    ) -> None:
        if weight.dim() != 4:
            raise ValueError(f"conv weight must be (K, C/groups, R, S), got {tuple(weight.shape)}")
        if weight.shape[0] % groups:
            raise ValueError(f"out_channels {weight.shape[0]} not divisible by groups {groups}")
        self.weight_shape = tuple(int(v) for v in weight.shape)
        self._args = (stride, padding, dilation, int(groups))
        # Validates the arguments once, on a size every kernel fits.
        self._probe = make_geometry(self.weight_shape, (64, 64), stride, padding, dilation, groups)
        self._sparse = SparseWeight.from_dense(weight)
        self.device = weight.device
        self._bias_cpu = None if bias is None else bias.detach().to("cpu", torch.float32).clone()
        if self._bias_cpu is not None and self._bias_cpu.shape != (self.out_channels,):
            raise ValueError(f"bias must be [{self.out_channels}], got {tuple(bias.shape)}")
        self._bias = self._bias_cpu
        self._geometries: dict[tuple[int, int], _Geometry] = {}
        self._tuned: dict[tuple[int, int, int, torch.dtype], KernelConfig] = {}
        # (input shape, dtype, activation) -> ready launch: the hot path is one dict lookup.
        self._fast: dict[tuple[torch.Size, torch.dtype, str | None], Any] = {}
        self.to(self.device)

    # Facts about the layer -------------------------------------------------------------------
    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        """The input dtypes a kernel runs natively here (fp32 first); others are cast to fp32."""
        return variant_dtypes() if self._uses_cuda_kernel() else (_F32,)

    @property
    def nnz(self) -> int:
        return self._sparse.nnz

    @property
    def sparsity(self) -> float:
        """The fraction of weights that are zero."""
        return 1.0 - self._sparse.nnz / max(1, self._sparse.numel)

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight_shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.weight_shape[2], self.weight_shape[3])

    @property
    def groups(self) -> int:
        return self._args[3]

    @property
    def stride(self) -> tuple[int, int]:
        return self._probe.stride

    @property
    def dilation(self) -> tuple[int, int]:
        return self._probe.dilation

    @property
    def padding(self) -> tuple[int, int, int, int]:
        """(left, right, top, bottom)."""
        return self._probe.padding

    def geometry(self, input_hw: tuple[int, int]) -> ConvGeometry:
        stride, padding, dilation, groups = self._args
        return make_geometry(self.weight_shape, input_hw, stride, padding, dilation, groups)

    def stretched(self, input_hw: tuple[int, int]) -> StretchedCSR:
        """The stretched-CSR form for one input size (CPU tensors)."""
        return self._prepare_geometry(tuple(input_hw)).csr

    # Preparation --------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> SparseConvPlan:
        """Moves the prepared arrays to `device` and returns the plan itself."""
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._device_index = self.device.index if self.device.type == "cuda" else -2
        self._bias = None if self._bias_cpu is None else self._bias_cpu.to(self.device)
        prepared = {
            hw: {dtype for _, dtype in entry.by_batch} or {_F32}
            for hw, entry in self._geometries.items()
        }
        self._geometries.clear()
        self._fast.clear()
        for hw, dtypes in prepared.items():
            self.prepare(hw, dtypes=sorted(dtypes, key=str))
        return self

    def prepare(
        self,
        input_hw: tuple[int, int],
        batch_sizes: Iterable[int] | None = None,
        dtypes: Iterable[torch.dtype] = (_F32,),
    ) -> SparseConvPlan:
        """Builds and caches the stretched form (and, on CUDA, the kernel's metadata for the
        configs chosen for `batch_sizes` and each of `dtypes` the plan runs) for one input
        size. Call it before graph capture."""
        entry = self._prepare_geometry((int(input_hw[0]), int(input_hw[1])))
        self._fast.clear()
        if self._uses_cuda_kernel():
            cuda_backend.compile_kernels(self.device.index)  # now, not in a capture
            for dtype in dict.fromkeys(dtypes):
                if dtype not in self.dtypes:
                    continue
                for n in batch_sizes or PREPARED_BATCHES:
                    config = _default_config(entry.geometry, int(n), self.density, dtype)
                    self._meta(entry, config)
                    entry.by_batch[(int(n), dtype)] = config
        return self

    def prepared_dtypes(self, input_hw: tuple[int, int]) -> tuple[torch.dtype, ...]:
        """The dtypes `prepare` has built kernel metadata for at this input size."""
        entry = self._geometries.get((int(input_hw[0]), int(input_hw[1])))
        found = {dtype for _, dtype in entry.by_batch} if entry is not None else set()
        return tuple(d for d in self.dtypes if d in found)

    def tune(
        self,
        input_hw: tuple[int, int],
        batch: int,
        reps: int = 5,
        limit: int | None = 12,
        dtype: torch.dtype = _F32,
    ) -> dict[KernelConfig, float]:
        """Times every candidate config of `dtype` at this size and keeps the fastest for
        (input_hw, batch, dtype); returns milliseconds per launch. Each candidate runs from a CUDA graph of
        back-to-back launches, so host overhead does not hide kernel differences. `limit`
        caps the candidates (the default and its nearest variants). Syncs and captures: call
        it at load time, never inside a capture."""
        self._require_cuda_kernel()
        if dtype not in self.dtypes:
            raise ValueError(f"no kernel runs {dtype} here; the plan runs {self.dtypes}")
        hw = (int(input_hw[0]), int(input_hw[1]))
        entry = self._prepare_geometry(hw)
        g = entry.geometry
        x = torch.randn(batch, g.in_channels, *hw, device=self.device, dtype=dtype)
        out = torch.empty(batch, g.out_channels, *g.output_hw, device=self.device, dtype=dtype)
        times: dict[KernelConfig, float] = {}
        for config in candidate_configs(g, batch, self.density, limit, dtype):
            launch = self._launch(entry, batch, None, config)
            times[config] = _time_launches(launch, x, out, replays=reps)
        self.use_config(hw, batch, min(times, key=times.__getitem__))
        return times

    def use_config(self, input_hw: tuple[int, int], batch: int, config: KernelConfig) -> None:
        """Runs (input_hw, batch) with `config` from now on, for its variant's dtype (what
        `tune` keeps; tests and benchmarks pin a config with it)."""
        hw = (int(input_hw[0]), int(input_hw[1]))
        self._tuned[(hw[0], hw[1], int(batch), variant_for(config).dtype)] = config
        self._fast.clear()

    def config_for(
        self, input_hw: tuple[int, int], batch: int, dtype: torch.dtype = _F32
    ) -> KernelConfig:
        """The kernel config a call with this input size, batch and dtype uses."""
        hw = (int(input_hw[0]), int(input_hw[1]))
        tuned = self._tuned.get((hw[0], hw[1], batch, dtype))
        if tuned is not None:
            return tuned
        entry = self._geometries.get(hw)
        if entry is not None and (batch, dtype) in entry.by_batch:
            return entry.by_batch[(batch, dtype)]
        config = _default_config(self.geometry(hw), batch, self.density, dtype)
        if entry is None or _meta_key(config) in entry.metas or not _capturing():
            return config
        # Inside a capture no metadata can be uploaded: use the nearest prepared batch's.
        prepared = [n for n, d in entry.by_batch if d == dtype]
        if not prepared:
            raise RuntimeError(f"call plan.prepare({hw}, dtypes=[{dtype}]) before capturing")
        below = [n for n in prepared if n <= batch]
        return entry.by_batch[(max(below) if below else min(prepared), dtype)]

    # Running ------------------------------------------------------------------------------------
    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        activation: str | None = None,
        impl: str = "auto",
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [N, C, H, W]. `out`, if given, is a contiguous [N, K, OH, OW] tensor of the dtype
        the kernel runs (x's when the plan runs it natively, else fp32) to write into (and is
        returned)."""
        if out is None and (impl == "auto" or impl == "cuda"):
            # Hot path (the engine's eager calls): a prepared launch for this exact input. Only
            # CUDA launches are cached and a CPU tensor's device index (-1) never matches, so
            # the device check also stands for x.is_cuda.
            launch = self._fast.get((x.shape, x.dtype, activation))
            if (
                launch is not None
                and x.get_device() == self._device_index
                and x.is_contiguous()
                and (residual is None or _plain_like(residual, launch.out_shape, x))
            ):
                return launch.fire(x, x.new_empty(launch.out_shape), residual)
        check_activation(activation)
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")
        use_cuda = impl == "cuda" or (
            impl == "auto"
            and x.is_cuda
            and x.device == self.device
            and cuda_backend.cuda_available()
        )
        dtype = x.dtype
        if use_cuda:
            y = self._run_cuda(x, residual, activation, out)
        else:
            hw = (int(x.shape[2]), int(x.shape[3]))
            entry = self._geometries.get(hw) or self._prepare_geometry(hw)
            bias = None if self._bias is None else self._bias.to(x.device)
            y = conv2d_reference(x, self._csr_on(entry, x.device), bias, residual, activation)
            if out is not None:
                return out.copy_(y)
        return y if y.dtype == dtype or out is not None else y.to(dtype)

    def _run_cuda(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        activation: str | None,
        out: torch.Tensor | None,
    ) -> torch.Tensor:
        cuda_backend.require_cuda()
        if not x.is_cuda or x.device != self.device:
            raise ValueError(
                f"impl='cuda' needs the input on the plan's device {self.device}, got {x.device}"
            )
        n, hw = int(x.shape[0]), (int(x.shape[2]), int(x.shape[3]))
        run = self._run_dtype(x.dtype, hw)
        x = x.to(run).contiguous()
        launch = self._fast.get((x.shape, run, activation))
        if launch is None:
            launch = self._slow_launch(hw, n, activation, run)
            self._fast[(x.shape, run, activation)] = launch
        if out is None:
            out = torch.empty(launch.out_shape, device=x.device, dtype=run)
        elif (
            tuple(out.shape) != launch.out_shape
            or out.dtype != run
            or not out.is_contiguous()
            or out.device != x.device
        ):
            raise ValueError(f"out must be a contiguous {run} {launch.out_shape} on {x.device}")
        if residual is not None:
            if tuple(residual.shape) != launch.out_shape:
                raise ValueError(
                    f"residual must be {launch.out_shape}, got {tuple(residual.shape)}"
                )
            residual = residual.to(device=x.device, dtype=run).contiguous()
        return run_launch(launch, x, out, residual)

    def _run_dtype(self, dtype: torch.dtype, hw: tuple[int, int]) -> torch.dtype:
        """x's dtype when a kernel runs it and it is prepared (or can be, outside a capture);
        otherwise fp32."""
        if dtype is _F32 or dtype not in self.dtypes:
            return _F32
        if dtype in self.prepared_dtypes(hw) or not _capturing():
            return dtype
        return _F32

    def _slow_launch(
        self, hw: tuple[int, int], n: int, activation: str | None, dtype: torch.dtype
    ) -> Any:
        entry = self._geometries.get(hw)
        if entry is None or (dtype not in self.prepared_dtypes(hw) and not _capturing()):
            if _capturing():
                raise RuntimeError(f"call plan.prepare({hw}) before capturing a CUDA graph")
            self.prepare(hw, batch_sizes=(n,), dtypes=(dtype,))
            entry = self._geometries[hw]
        return self._launch(entry, n, activation, self.config_for(hw, n, dtype))

    # Internals ----------------------------------------------------------------------------------
    def _uses_cuda_kernel(self) -> bool:
        return self.device.type == "cuda" and cuda_backend.cuda_available()

    def _require_cuda_kernel(self) -> None:
        cuda_backend.require_cuda()
        if self.device.type != "cuda":
            raise ValueError(f"the plan is on {self.device}; call plan.to('cuda') first")

    def _prepare_geometry(self, hw: tuple[int, int]) -> _Geometry:
        entry = self._geometries.get(hw)
        if entry is None:
            geometry = self.geometry(hw)
            entry = _Geometry(geometry=geometry, csr=stretch(self._sparse, geometry))
            self._geometries[hw] = entry
        return entry

    def _csr_on(self, entry: _Geometry, device: torch.device) -> StretchedCSR:
        if device.type == "cpu":
            return entry.csr
        key = str(device)
        csr = entry.csr_on.get(key)
        if csr is None:
            c = entry.csr
            csr = StretchedCSR(
                geometry=c.geometry,
                rowptr=c.rowptr.to(device),
                colidx=c.colidx.to(device),
                values=c.values.to(device),
                rows=c.rows.to(device),
            )
            entry.csr_on[key] = csr
        return csr

    def _meta(self, entry: _Geometry, config: KernelConfig) -> Any:
        key = _meta_key(config)
        meta = entry.metas.get(key)
        if meta is None:
            if _capturing():
                raise RuntimeError("kernel metadata must be built before graph capture")
            variant = variant_for(config)
            meta = variant.build_meta(self._sparse, entry.geometry, config).to(self.device)
            entry.metas[key] = meta
        return meta

    def _launch(
        self, entry: _Geometry, batch: int, activation: str | None, config: KernelConfig
    ) -> KernelLaunch:
        key = (batch, activation, config)
        launch = entry.launches.get(key)
        if launch is None:
            if _capturing():
                raise RuntimeError("prepare the plan for this batch size before graph capture")
            meta = self._meta(entry, config)
            launch = variant_for(config).prepare_launch(
                entry.geometry, meta, config, self._bias, batch, activation, self.device.index
            )
            entry.launches[key] = launch
        return launch


def _time_launches(
    launch: KernelLaunch, x: torch.Tensor, out: torch.Tensor, replays: int = 5, per_graph: int = 10
) -> float:
    """Median milliseconds per launch, over replays of a graph of `per_graph` launches."""
    side = torch.cuda.Stream(x.device)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run_launch(launch, x, out, None)
    torch.cuda.current_stream(x.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            run_launch(launch, x, out, None)
    samples = []
    for _ in range(max(1, replays)):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / per_graph)
    return sorted(samples)[len(samples) // 2]


def _meta_key(config: KernelConfig) -> Any:
    """Configs of one variant whose metadata is the same share it (variant.meta_key)."""
    variant = variant_for(config)
    return (variant.name, variant.meta_key(config))


def _plain_like(t: torch.Tensor, shape: tuple[int, ...], x: torch.Tensor) -> bool:
    return (
        t.shape == shape
        and t.dtype is x.dtype
        and t.get_device() == x.get_device()
        and t.is_contiguous()
    )


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
