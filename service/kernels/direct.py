"""The direct kernel's config, metadata and launch. Metadata building is pure torch (CPU).

`escort_direct<P>` (direct_cuda.py) gives `splits` warps one output channel and 32 * P output
pixels; a block of `warps` warps shares its pixels, so the input values one warp loads are
in L1 for the block's other channels. Rows are sorted by nonzero count, so the warps of a
block finish together. Its metadata is the stretched CSR of the paper taken against the
unpadded input (offset = (c * H + r * dil_h) * W + s * dil_w), one int4 record per nonzero
with the tap's index r * S + s beside it for the bounds checks at the borders.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from service.kernels import cuda as cuda_backend
from service.kernels.direct_cuda import DIRECT_PIXELS_PER_LANE, DIRECT_SPLITS, direct_kernel_name
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
        act=cuda_backend.ACTIVATION_CODES[activation],
    )
    return values


def prepare_direct_launch(
    geometry: ConvGeometry,
    meta: DirectMeta,
    config: DirectConfig,
    bias: torch.Tensor | None,
    batch: int,
    activation: str | None,
    device_index: int,
) -> cuda_backend.EscortLaunch:
    """A ready launch of escort_direct (`meta` and `bias` already on the device)."""
    pointers = {
        "meta": meta.meta.data_ptr(),
        "rowptr": meta.rowptr.data_ptr(),
        "perm": meta.perm.data_ptr(),
        "bias": 0 if bias is None else bias.data_ptr(),
    }
    record = np.zeros(1, dtype=DIRECT_PARAMS_DTYPE)
    for key, value in direct_params(geometry, config, batch, activation, pointers).items():
        record[key] = value
    slots = (ctypes.c_uint64 * 3)()
    base = ctypes.addressof(slots)
    arg_pointers = (ctypes.c_void_p * 4)(base, base + 8, base + 16, record.ctypes.data)
    function = cuda_backend.get_kernel(device_index, direct_kernel_name(config.pixels_per_lane))
    return cuda_backend.EscortLaunch(
        function=function,
        grid=config.grid(geometry, batch),
        block=(config.threads, 1, 1),
        shared_bytes=0,
        record=record,
        slots=slots,
        arg_pointers=arg_pointers,
        arg_address=ctypes.addressof(arg_pointers),
        function_ptr=int(function.ptr),
        meta=meta,
        keep=(bias,),
        device_index=device_index,
        out_shape=(batch, geometry.out_channels, *geometry.output_hw),
    )
