"""The stretched-CSR form of a pruned convolution weight (Escort, arXiv 1802.10280).

A convolution is a sparse-matrix times "stretched input" product once every nonzero weight
(k, c, r, s) is written as a single offset into the zero-padded input plane:

    colidx = (c * Hp + r * dil_h) * Wp + s * dil_w

An output pixel (oh, ow) then reads `x_pad[base(oh, ow) + colidx]` with
`base = oh * stride_h * Wp + ow * stride_w`, so the inner loop is a gather with no im2col.

The offsets depend on the padded geometry (Hp, Wp), so the form is built per input size from a
geometry-free list of nonzeros (`SparseWeight`) that is extracted once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Pair = tuple[int, int]
# (left, right, top, bottom): the order torch.nn.functional.pad uses for the last two dims.
Padding4 = tuple[int, int, int, int]


def _pair(value: Any, name: str) -> Pair:
    pair = (value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or a pair, got {value!r}")
    return (int(pair[0]), int(pair[1]))


def normalize_padding(padding: Any, kernel_size: Pair, dilation: Pair, stride: Pair) -> Padding4:
    """Padding as (left, right, top, bottom).

    Accepts what F.conv2d accepts (an int, a pair (pad_h, pad_w), "valid", "same") and a
    4-tuple (left, right, top, bottom) for TF "SAME" padding, which is asymmetric at stride 2.
    "same" puts the odd pixel on the right/bottom, as torch does."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError("padding='same' needs stride 1 (as in F.conv2d)")
            total_h = dilation[0] * (kernel_size[0] - 1)
            total_w = dilation[1] * (kernel_size[1] - 1)
            return (total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2)
        raise ValueError(f"padding must be 'valid', 'same', an int or a tuple, got {padding!r}")
    if isinstance(padding, int):
        values: tuple[int, ...] = (padding,) * 4
    else:
        raw = tuple(int(v) for v in padding)
        if len(raw) == 2:
            values = (raw[1], raw[1], raw[0], raw[0])
        elif len(raw) == 4:
            values = raw
        else:
            raise ValueError(
                "padding must be an int, (pad_h, pad_w) or (left, right, top, bottom); "
                f"got {padding!r}"
            )
    if min(values) < 0:
        raise ValueError(f"padding must not be negative, got {padding!r}")
    return (values[0], values[1], values[2], values[3])


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a convolution except its weights and batch size."""

    in_channels: int
    out_channels: int
    groups: int
    kernel_size: Pair
    stride: Pair
    dilation: Pair
    padding: Padding4  # (left, right, top, bottom)
    input_hw: Pair

    def __post_init__(self) -> None:
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                f"must be divisible by groups ({self.groups})"
            )
        if min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError("stride and dilation must be >= 1")
        oh, ow = self.output_hw
        if oh < 1 or ow < 1:
            raise ValueError(
                f"input {self.input_hw} is too small for kernel {self.kernel_size} with "
                f"dilation {self.dilation} and padding {self.padding}"
            )

    @property
    def padded_hw(self) -> Pair:
        left, right, top, bottom = self.padding
        return (self.input_hw[0] + top + bottom, self.input_hw[1] + left + right)

    @property
    def output_hw(self) -> Pair:
        hp, wp = self.padded_hw
        (r, s), (dh, dw), (sh, sw) = self.kernel_size, self.dilation, self.stride
        return ((hp - dh * (r - 1) - 1) // sh + 1, (wp - dw * (s - 1) - 1) // sw + 1)

    @property
    def channels_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def outputs_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def symmetric(self) -> bool:
        left, right, top, bottom = self.padding
        return left == right and top == bottom


@dataclass(frozen=True)
class SparseWeight:
    """The nonzeros of a (K, C/groups, R, S) weight, row-major: by k, then c, r, s.

    Geometry-free; every stretched form (and the CUDA kernel's metadata) is derived from it."""

    out_channels: int
    channels_per_group: int
    kernel_size: Pair
    rowptr: torch.Tensor  # int64 [K + 1]
    rows: torch.Tensor  # int64 [nnz], k of each nonzero
    chans: torch.Tensor  # int64 [nnz], c within the group
    taps_r: torch.Tensor  # int64 [nnz]
    taps_s: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # float32 [nnz]

    @classmethod
    def from_dense(cls, weight: torch.Tensor) -> SparseWeight:
        if weight.dim() != 4:
            raise ValueError(f"conv weight must be (K, C/groups, R, S), got {tuple(weight.shape)}")
        w = weight.detach().to("cpu", torch.float32)
        k_out, cg, r, s = w.shape
        idx = torch.nonzero(w, as_tuple=True)  # row-major order, which is the CSR order
        counts = torch.bincount(idx[0], minlength=k_out)
        rowptr = torch.zeros(k_out + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=rowptr[1:])
        return cls(
            out_channels=k_out,
            channels_per_group=cg,
            kernel_size=(r, s),
            rowptr=rowptr,
            rows=idx[0],
            chans=idx[1],
            taps_r=idx[2],
            taps_s=idx[3],
            values=w[idx].contiguous(),
        )

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def numel(self) -> int:
        return (
            self.out_channels * self.channels_per_group * self.kernel_size[0] * self.kernel_size[1]
        )

    @property
    def row_nnz(self) -> torch.Tensor:
        return self.rowptr[1:] - self.rowptr[:-1]


@dataclass(frozen=True)
class StretchedCSR:
    """CSR over output channels with columns stretched into the padded input plane.

    `colidx` is relative to the first channel of the row's group (per-group CSR, as in the paper);
    `group_offset` gives the absolute offset of each row's group in a padded image, so
    `colidx + group_offset[k]` indexes the whole padded image (C * Hp * Wp)."""

    geometry: ConvGeometry
    rowptr: torch.Tensor  # int64 [K + 1]
    colidx: torch.Tensor  # int32 [nnz]
    values: torch.Tensor  # float32 [nnz]
    rows: torch.Tensor  # int64 [nnz], the row (output channel) of each nonzero

    @property
    def group_offset(self) -> torch.Tensor:
        g = self.geometry
        hp, wp = g.padded_hw
        groups = torch.arange(g.out_channels, device=self.rowptr.device) // g.outputs_per_group
        return groups * (g.channels_per_group * hp * wp)

    def absolute_colidx(self) -> torch.Tensor:
        """int64 [nnz]: offsets into a whole padded image, group base included."""
        return self.colidx.to(torch.int64) + self.group_offset[self.rows]

    def group(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rowptr, colidx, values) of group g alone, rowptr starting at 0."""
        kg = self.geometry.outputs_per_group
        ptr = self.rowptr[g * kg : (g + 1) * kg + 1]
        lo, hi = int(ptr[0]), int(ptr[-1])
        return ptr - lo, self.colidx[lo:hi], self.values[lo:hi]

    def base_offsets(self) -> torch.Tensor:
        """int64 [OH * OW]: where each output pixel's receptive field starts in a padded plane."""
        g = self.geometry
        (oh, ow), (_, wp), (sh, sw) = g.output_hw, g.padded_hw, g.stride
        rows = torch.arange(oh, dtype=torch.int64) * (sh * wp)
        cols = torch.arange(ow, dtype=torch.int64) * sw
        return (rows[:, None] + cols[None, :]).reshape(-1)


def stretch(weight: SparseWeight, geometry: ConvGeometry) -> StretchedCSR:
    """The stretched form of `weight` for one input geometry."""
    if weight.kernel_size != geometry.kernel_size:
        raise ValueError("weight and geometry disagree on the kernel size")
    hp, wp = geometry.padded_hw
    dh, dw = geometry.dilation
    col = (weight.chans * hp + weight.taps_r * dh) * wp + weight.taps_s * dw
    if weight.nnz and int(col.max()) >= 2**31:
        raise ValueError("the padded input plane is too large for 32-bit offsets")
    return StretchedCSR(
        geometry=geometry,
        rowptr=weight.rowptr,
        colidx=col.to(torch.int32),
        values=weight.values,
        rows=weight.rows,
    )


def make_geometry(
    weight_shape: tuple[int, ...],
    input_hw: tuple[int, int],
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> ConvGeometry:
    """A ConvGeometry from F.conv2d-style arguments and a weight shape."""
    k_out, cg, r, s = (int(v) for v in weight_shape)
    stride_p, dilation_p = _pair(stride, "stride"), _pair(dilation, "dilation")
    return ConvGeometry(
        in_channels=cg * groups,
        out_channels=k_out,
        groups=int(groups),
        kernel_size=(r, s),
        stride=stride_p,
        dilation=dilation_p,
        padding=normalize_padding(padding, (r, s), dilation_p, stride_p),
        input_hw=(int(input_hw[0]), int(input_hw[1])),
    )
