"""The direct kernel's config, metadata and launch. Metadata building is pure torch (CPU).

`escort_direct<P>` (direct_cuda.py) gives `splits` warps one output channel and 32 * P output
pixels; a block of `warps` warps shares its pixels, so the input values one warp loads are
in L1 for the block's other channels. Rows are sorted by nonzero count, so the warps of a
block finish together. Its metadata is the stretched CSR of the paper taken against the
unpadded input (offset = (c * H + r * dil_h) * W + s * dil_w), one int4 record per nonzero
with the tap's index r * S + s beside it for the bounds checks at the borders.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np
import torch

from service.kernels.direct_cuda import (
    DIRECT_KERNEL_NAMES,
    DIRECT_PIXELS_PER_LANE,
    DIRECT_SOURCE,
    DIRECT_SPLITS,
    direct_kernel_name,
)
from service.kernels.launch import ACTIVATION_CODES, KernelLaunch, assemble_launch
from service.kernels.stretched_csr import ConvGeometry, SparseWeight

DIRECT_WARPS = (4, 8)
MAX_TAPS = 64  # R * S: a pixel's in-image taps are a 64-bit mask
_MAX_OFFSET = 2**31 - 1


def supports(geometry: ConvGeometry) -> bool:
    return geometry.kernel_size[0] * geometry.kernel_size[1] <= MAX_TAPS


@dataclass(frozen=True)
class DirectConfig:
    pixels_per_lane: int  # P: output pixels per lane (pixel j = lane + 32 * i)
    warps: int  # warps per block
    splits: int = 1  # warps sharing one output channel's nonzeros

    def __post_init__(self) -> None:
        if self.pixels_per_lane not in DIRECT_PIXELS_PER_LANE:
            raise ValueError(f"no compiled direct kernel for {self}")
        if self.warps not in DIRECT_WARPS:
            raise ValueError(f"direct kernel blocks have {DIRECT_WARPS} warps, got {self}")
        if self.splits not in DIRECT_SPLITS or self.warps % self.splits:
            raise ValueError(f"splits must be one of {DIRECT_SPLITS} and divide warps: {self}")

    @property
    def rows_per_block(self) -> int:
        return self.warps // self.splits

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def grid(self, geometry: ConvGeometry, batch: int) -> tuple[int, int, int]:
        oh, ow = geometry.output_hw
        pixels = batch * oh * ow
        return (
            -(-pixels // (32 * self.pixels_per_lane)),
            -(-geometry.out_channels // self.rows_per_block),
            1,
        )


@dataclass(frozen=True)
class DirectMeta:
    """Depends on the geometry only: every DirectConfig of a geometry shares one."""

    meta: torch.Tensor  # int32 [nnz, 4]: value bits, offset, tap r * S + s, 0
    rowptr: torch.Tensor  # int32 [K + 1], sorted rows
    perm: torch.Tensor  # int32 [K]

    def to(self, device: torch.device | str) -> DirectMeta:
        return DirectMeta(
            meta=self.meta.to(device),
            rowptr=self.rowptr.to(device),
            perm=self.perm.to(device),
        )


def build_direct_meta(weight: SparseWeight, geometry: ConvGeometry) -> DirectMeta:
    """The direct kernel's metadata for one geometry (CPU tensors)."""
    h, w = geometry.input_hw
    if geometry.in_channels * h * w > _MAX_OFFSET:
        raise ValueError(f"input planes too large for 32-bit offsets: {geometry}")
    if not supports(geometry):
        raise ValueError(f"the direct kernel takes kernels of at most {MAX_TAPS} taps: {geometry}")
    (dh, dw), kg, cg = geometry.dilation, geometry.outputs_per_group, geometry.channels_per_group
    counts = weight.row_nnz
    # Stable, so equal counts keep channel order (deterministic metadata).
    perm = torch.sort(counts, descending=True, stable=True).indices
    pos_of_row = torch.empty(geometry.out_channels, dtype=torch.int64)
    pos_of_row[perm] = torch.arange(geometry.out_channels)
    # Sorted row by row, and within a row by tap, then channel (the order the kernel was
    # measured with: a run of records reads one position of consecutive channel planes).
    taps = geometry.kernel_size[0] * geometry.kernel_size[1]
    tap = weight.taps_r * geometry.kernel_size[1] + weight.taps_s
    order = torch.sort((pos_of_row[weight.rows] * taps + tap) * cg + weight.chans).indices
    chan = (weight.rows // kg) * cg + weight.chans
    rr, ss = weight.taps_r * dh, weight.taps_s * dw
    meta = torch.zeros(weight.nnz, 4, dtype=torch.int32)
    meta[:, 0] = weight.values.view(torch.int32)[order]
    meta[:, 1] = ((chan * h + rr) * w + ss)[order].to(torch.int32)
    meta[:, 2] = tap[order].to(torch.int32)
    rowptr = torch.zeros(geometry.out_channels + 1, dtype=torch.int64)
    torch.cumsum(counts[perm], 0, out=rowptr[1:])
    return DirectMeta(
        meta=meta.contiguous(),
        rowptr=rowptr.to(torch.int32),
        perm=perm.to(torch.int32),
    )


_POINTERS = ("meta", "rowptr", "perm", "bias")
_INTS = [
    "H",
    "W",
    "K",
    "OH",
    "OW",
    "sh",
    "sw",
    "pt",
    "pl",
    "R",
    "S",
    "dh",
    "dw",
    "reach_h",
    "reach_w",
    "pixels",
    "splits",
    "act",
]
# The DirectParams struct of the CUDA source, field for field (aligned as C lays it out).
DIRECT_PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in _POINTERS]
    + [("image_floats", np.int64)]
    + [(name, np.int32) for name in _INTS],
    align=True,
)


def direct_params(
    geometry: ConvGeometry,
    config: DirectConfig,
    batch: int,
    activation: str | None,
    pointers: dict[str, int] | None = None,
) -> dict[str, int]:
    """The DirectParams fields for one launch; device pointers default to 0."""
    h, w = geometry.input_hw
    oh, ow = geometry.output_hw
    (r, s), (dh, dw) = geometry.kernel_size, geometry.dilation
    left, _, top, _ = geometry.padding
    values = dict.fromkeys(_POINTERS, 0)
    values.update(pointers or {})
    values.update(
        image_floats=geometry.in_channels * h * w,
        H=h,
        W=w,
        K=geometry.out_channels,
        OH=oh,
        OW=ow,
        sh=geometry.stride[0],
        sw=geometry.stride[1],
        pt=top,
        pl=left,
        R=r,
        S=s,
        dh=dh,
        dw=dw,
        reach_h=(r - 1) * dh,
        reach_w=(s - 1) * dw,
        pixels=batch * oh * ow,
        splits=config.splits,
        act=ACTIVATION_CODES[activation],
    )
    return values


def direct_default(geometry: ConvGeometry, batch: int, density: float = 1.0) -> DirectConfig:
    """Two pixels per lane, eight warps per block, and enough warps per output channel that
    each walks at most about 64 of its nonzeros (the row's latency is one walk). From H100
    runs of the layer suite at batch 1."""
    r, s = geometry.kernel_size
    per_row = density * geometry.channels_per_group * r * s
    splits = next((n for n in DIRECT_SPLITS if per_row / n <= 64), DIRECT_SPLITS[-1])
    return DirectConfig(2, 8, splits)


def direct_candidates(
    geometry: ConvGeometry, batch: int, density: float = 1.0
) -> list[DirectConfig]:
    """The default direct config, then its neighbours: half and twice the splits, one and
    four pixels per lane."""
    if not supports(geometry):
        return []
    first = direct_default(geometry, batch, density)
    i = DIRECT_SPLITS.index(first.splits)
    near = [DIRECT_SPLITS[j] for j in (i - 1, i + 1) if 0 <= j < len(DIRECT_SPLITS)]
    configs = [first, *(DirectConfig(first.pixels_per_lane, 8, n) for n in near)]
    configs += [DirectConfig(p, 8, first.splits) for p in (1, 4)]
    return configs


class DirectVariant:
    """The direct kernel as the registry (variants.py) sees it: behind the tiled kernel,
    unless that one has to split its channel loop."""

    name = "direct"
    dtype = torch.float32  # of the input, output and residual
    config_type = DirectConfig
    sources = (DIRECT_SOURCE,)
    kernel_names = DIRECT_KERNEL_NAMES
    params_dtype = DIRECT_PARAMS_DTYPE

    def supports(self, geometry: ConvGeometry) -> bool:
        return supports(geometry)

    def default_config(
        self, geometry: ConvGeometry, batch: int, density: float
    ) -> tuple[DirectConfig, int]:
        return direct_default(geometry, batch, density), 1

    def candidates(self, geometry: ConvGeometry, batch: int, density: float) -> list[DirectConfig]:
        return direct_candidates(geometry, batch, density)

    def kernel_name(self, config: DirectConfig) -> str:
        return direct_kernel_name(config.pixels_per_lane)

    def meta_key(self, config: DirectConfig) -> Hashable:
        return None  # every config of a geometry shares one metadata

    def build_meta(
        self, weight: SparseWeight, geometry: ConvGeometry, config: DirectConfig
    ) -> DirectMeta:
        return build_direct_meta(weight, geometry)

    def prepare_launch(
        self,
        geometry: ConvGeometry,
        meta: DirectMeta,
        config: DirectConfig,
        bias: torch.Tensor | None,
        batch: int,
        activation: str | None,
        device_index: int,
    ) -> KernelLaunch:
        """A ready launch of escort_direct (`meta` and `bias` already on the device)."""
        pointers = {
            "meta": meta.meta.data_ptr(),
            "rowptr": meta.rowptr.data_ptr(),
            "perm": meta.perm.data_ptr(),
            "bias": 0 if bias is None else bias.data_ptr(),
        }
        return assemble_launch(
            self.kernel_name(config),
            device_index,
            config.grid(geometry, batch),
            config.threads,
            0,
            DIRECT_PARAMS_DTYPE,
            direct_params(geometry, config, batch, activation, pointers),
            meta,
            (bias,),
            (batch, geometry.out_channels, *geometry.output_hw),
        )


DIRECT = DirectVariant()
