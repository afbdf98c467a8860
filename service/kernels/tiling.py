"""How the Escort CUDA kernel splits a layer, and the metadata it reads. Pure torch, no CUDA.

The kernel computes a block of `KB` output channels (rows) over a tile of output pixels: `NB`
images x `TH` x `TW`. The input window of the tile (halo and zero padding included) is staged in
shared memory `CC` channels at a time; offsets into that window are the stretched-CSR offsets of
the paper, taken against the window's own padded plane (TIH x TIW) instead of the whole image's.
Each warp owns `KW` rows and each lane `P` pixels (pixel j = lane + 32 * i), so one (value,
offset) pair loaded by a warp feeds P FMAs per lane, and one staged activation feeds every row of
the block that has a nonzero on it.

Rows are sorted by nonzero count (for groups == 1), so the warps of a block finish their chunks
together. The metadata per (geometry, config):
  meta    int32 [nnz, 2]   (float bits of the value, offset into the staged window)
  segptr  int32 [K, S]     start of chunk j of sorted row p in `meta` (S = max chunks + 1)
  perm    int32 [K]        the output channel of sorted row p
  blocks  int32 [KBLK, 2]  first input channel and channel count staged by each row block
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from service.kernels.stretched_csr import ConvGeometry, SparseWeight

# Compiled instantiations of the kernel: pixels per lane x rows per warp.
PIXELS_PER_LANE = (2, 4, 8)
ROWS_PER_WARP = (1, 2, 4, 8)
MAX_ACCUMULATORS = 32
# Two staging buffers of this many floats each (2 x 24 KB, under the 48 KB default limit).
STAGE_FLOATS = 6144
# Enough blocks to keep every SM of an H100 (132) busy with two resident blocks.
TARGET_BLOCKS = 264


@dataclass(frozen=True)
class TileConfig:
    pixels_per_lane: int  # P
    rows_per_warp: int  # KW
    warps: int
    images: int  # NB
    tile_h: int  # TH
    tile_w: int  # TW
    chunk_channels: int  # CC

    def __post_init__(self) -> None:
        if self.pixels_per_lane not in PIXELS_PER_LANE or self.rows_per_warp not in ROWS_PER_WARP:
            raise ValueError(f"no compiled kernel for {self}")
        if self.pixels_per_lane * self.rows_per_warp > MAX_ACCUMULATORS:
            raise ValueError(f"too many accumulators per thread in {self}")
        if self.images * self.tile_h * self.tile_w > 32 * self.pixels_per_lane:
            raise ValueError(f"tile larger than a warp's pixels in {self}")
        if not 1 <= self.warps <= 8:
            raise ValueError(f"1..8 warps per block, got {self.warps}")

    @property
    def rows_per_block(self) -> int:
        return self.warps * self.rows_per_warp

    @property
    def threads(self) -> int:
        return 32 * self.warps

    def window(self, geometry: ConvGeometry) -> tuple[int, int]:
        """(TIH, TIW): the staged input window of one output tile."""
        (r, s), (dh, dw), (sh, sw) = geometry.kernel_size, geometry.dilation, geometry.stride
        return (
            (self.tile_h - 1) * sh + (r - 1) * dh + 1,
            (self.tile_w - 1) * sw + (s - 1) * dw + 1,
        )

    def chunk_floats(self, geometry: ConvGeometry) -> int:
        tih, tiw = self.window(geometry)
        return self.images * self.chunk_channels * tih * tiw

    def tiles(self, geometry: ConvGeometry, batch: int) -> tuple[int, int, int]:
        """(tiles along N, along H, along W)."""
        oh, ow = geometry.output_hw
        return (
            -(-batch // self.images),
            -(-oh // self.tile_h),
            -(-ow // self.tile_w),
        )

    def row_blocks(self, geometry: ConvGeometry) -> int:
        return -(-geometry.out_channels // self.rows_per_block)


def _tile_for(geometry: ConvGeometry, batch: int, p: int) -> tuple[int, int, int]:
    """(NB, TH, TW) for P pixels per lane: the tile that wastes the fewest lanes, then the one
    with the least halo per useful pixel."""
    oh, ow = geometry.output_hw
    lanes = 32 * p
    if oh * ow <= lanes:
        return (max(1, min(batch, lanes // (oh * ow))), oh, ow)
    best: tuple[float, float, int, int] | None = None
    for tw in sorted({min(ow, w) for w in (ow, 64, 32, 16, 8, 4)}):
        if tw > lanes:
            continue
        th = min(oh, lanes // tw)
        used = -(-oh // th) * -(-ow // tw) * lanes
        lane_use = oh * ow / used
        (r, s), (dh, dw), (sh, sw) = geometry.kernel_size, geometry.dilation, geometry.stride
        window = ((th - 1) * sh + (r - 1) * dh + 1) * ((tw - 1) * sw + (s - 1) * dw + 1)
        halo_use = th * tw / window
        key = (round(lane_use, 2), halo_use, th, tw)
        if best is None or key > best:
            best = key
    assert best is not None
    return (1, best[2], best[3])


def make_config(
    geometry: ConvGeometry, batch: int, p: int, rows_per_block: int
) -> TileConfig | None:
    """The config with P pixels per lane and about `rows_per_block` rows, or None if it cannot
    be built (too many accumulators, or a window too large to stage)."""
    nb, th, tw = _tile_for(geometry, batch, p)
    warps = max(1, min(8, rows_per_block))
    kw = max(1, rows_per_block // warps)
    if kw not in ROWS_PER_WARP or p * kw > MAX_ACCUMULATORS:
        return None
    (r, s), (dh, dw), (sh, sw) = geometry.kernel_size, geometry.dilation, geometry.stride
    per_channel = nb * ((th - 1) * sh + (r - 1) * dh + 1) * ((tw - 1) * sw + (s - 1) * dw + 1)
    if per_channel > STAGE_FLOATS:
        return None
    span = _max_block_span(geometry, warps * kw)
    cc = max(1, min(span, STAGE_FLOATS // per_channel))
    return TileConfig(p, kw, warps, nb, th, tw, cc)


def _max_block_span(geometry: ConvGeometry, rows_per_block: int) -> int:
    if geometry.groups == 1:
        return geometry.in_channels
    kg, cg = geometry.outputs_per_group, geometry.channels_per_group
    # A block of consecutive rows touches at most this many groups.
    groups = min(geometry.groups, (rows_per_block + kg - 2) // kg + 1)
    return groups * cg


def default_config(geometry: ConvGeometry, batch: int) -> TileConfig:
    """A config chosen from the shape alone (no timing)."""
    oh, ow = geometry.output_hw
    pixels = oh * ow
    if pixels <= 64 and batch == 1:
        p = 2
    elif pixels <= 256 and batch * pixels <= 256:
        p = 8
    else:
        p = 4
    for kb in (64, 32, 16, 8, 4):
        config = make_config(geometry, batch, p, kb)
        if config is None:
            continue
        n_t, h_t, w_t = config.tiles(geometry, batch)
        if kb == 4 or n_t * h_t * w_t * config.row_blocks(geometry) >= TARGET_BLOCKS:
            return config
    raise ValueError(f"no kernel configuration fits {geometry}")  # pragma: no cover


def candidate_configs(geometry: ConvGeometry, batch: int) -> list[TileConfig]:
    """The configs worth timing for this shape, the default first."""
    seen = [default_config(geometry, batch)]
    for p in PIXELS_PER_LANE:
        for kb in (4, 8, 16, 32, 64):
            config = make_config(geometry, batch, p, kb)
            if config is not None and config not in seen:
                seen.append(config)
    return seen


@dataclass(frozen=True)
class EscortMeta:
    config: TileConfig
    window: tuple[int, int]  # (TIH, TIW)
    meta: torch.Tensor  # int32 [nnz, 2]
    segptr: torch.Tensor  # int32 [K, seg_stride]
    perm: torch.Tensor  # int32 [K]
    blocks: torch.Tensor  # int32 [KBLK, 2]
    seg_stride: int

    def to(self, device: torch.device | str) -> EscortMeta:
        return EscortMeta(
            config=self.config,
            window=self.window,
            meta=self.meta.to(device),
            segptr=self.segptr.to(device),
            perm=self.perm.to(device),
            blocks=self.blocks.to(device),
            seg_stride=self.seg_stride,
        )


def build_meta(weight: SparseWeight, geometry: ConvGeometry, config: TileConfig) -> EscortMeta:
    """The kernel's metadata for one (geometry, config); CPU tensors."""
    k_out, kg, cg = geometry.out_channels, geometry.outputs_per_group, geometry.channels_per_group
    kb = config.rows_per_block
    tih, tiw = config.window(geometry)
    cc = config.chunk_channels
    dh, dw = geometry.dilation

    counts = weight.row_nnz
    if geometry.groups == 1:
        # Stable, so equal counts keep channel order (deterministic metadata).
        perm = torch.sort(counts, descending=True, stable=True).indices
    else:
        perm = torch.arange(k_out)
    n_blocks = config.row_blocks(geometry)
    first_row = torch.arange(n_blocks) * kb
    last_row = torch.clamp(first_row + kb, max=k_out) - 1
    if geometry.groups == 1:
        blocks = torch.stack([torch.zeros_like(first_row), torch.full_like(first_row, cg)], 1)
    else:
        g_lo, g_hi = first_row // kg, last_row // kg
        blocks = torch.stack([g_lo * cg, (g_hi - g_lo + 1) * cg], 1)
    max_chunks = int(math.ceil(int(blocks[:, 1].max()) / cc))
    seg_stride = max_chunks + 1

    # Reorder the nonzeros by sorted row; each row keeps its (c, r, s) order.
    sorted_counts = counts[perm]
    new_ptr = torch.zeros(k_out + 1, dtype=torch.int64)
    torch.cumsum(sorted_counts, 0, out=new_ptr[1:])
    pos_of_row = torch.empty(k_out, dtype=torch.int64)
    pos_of_row[perm] = torch.arange(k_out)
    nnz = weight.nnz
    entry_rank = torch.arange(nnz) - weight.rowptr[weight.rows]  # index within its row
    order = torch.empty(nnz, dtype=torch.int64)
    order[new_ptr[pos_of_row[weight.rows]] + entry_rank] = torch.arange(nnz)

    rows = weight.rows[order]
    pos = pos_of_row[rows]
    block_first = blocks[pos // kb, 0]
    chan_abs = (rows // kg) * cg + weight.chans[order]
    rel = chan_abs - block_first
    chunk, local = rel // cc, rel % cc
    offset = (local * tih + weight.taps_r[order] * dh) * tiw + weight.taps_s[order] * dw
    meta = torch.stack([weight.values[order].view(torch.int32).to(torch.int64), offset], 1).to(
        torch.int32
    )

    # segptr[p, j] = first entry of sorted row p whose chunk is >= j.
    seg_rows = pos * seg_stride + chunk + 1
    seg_counts = torch.bincount(seg_rows, minlength=k_out * seg_stride).view(k_out, seg_stride)
    segptr = new_ptr[:-1, None] + torch.cumsum(seg_counts, 1)
    return EscortMeta(
        config=config,
        window=(tih, tiw),
        meta=meta.contiguous(),
        segptr=segptr.to(torch.int32).contiguous(),
        perm=perm.to(torch.int32),
        blocks=blocks.to(torch.int32).contiguous(),
        seg_stride=seg_stride,
    )


def magic_divisor(d: int) -> tuple[int, int]:
    """(multiplier, shift) so that x // d == umulhi(x, multiplier) >> shift for 0 <= x < 2**31.

    A multiplier of 0 means d == 1 (the kernel passes x through)."""
    if d < 1:
        raise ValueError("divisor must be >= 1")
    if d == 1:
        return (0, 0)
    log2 = (d - 1).bit_length()  # ceil(log2(d))
    p = 31 + log2
    multiplier = -(-(1 << p) // d)
    return (multiplier, p - 32)
