"""How the Escort CUDA kernel splits a layer, and the metadata it reads. Pure torch, no CUDA.

The kernel computes a block of `KB` output channels (rows) over a tile of output pixels: `NB`
images x `TH` x `TW`. The input window of the tile (halo and zero padding included) is staged in
shared memory `CC` channels at a time; offsets into that window are the stretched-CSR offsets of
the paper, taken against the window's own padded plane (TIH x TIW) instead of the whole image's.
Each warp owns `KW` rows and each lane `P` pixels (pixel j = lane + 32 * i), so one (value,
offset) pair read by a warp feeds P FMAs per lane, and one staged activation feeds every row of
the block that has a nonzero on it. When a layer has too few (tile, row block) pairs to fill the
GPU (batch 1, small maps), the channel chunks are split over `S` blocks whose partial sums meet
in a workspace.

Rows are sorted by nonzero count (for groups == 1), so the warps of a block finish their chunks
together. The metadata the tiled kernels read is built in tiled_meta.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from service.kernels.stretched_csr import ConvGeometry

# Compiled instantiations of the kernel: pixels per lane x rows per warp.
PIXELS_PER_LANE = (2, 4, 8)
ROWS_PER_WARP = (1, 2, 4, 8)
MAX_ACCUMULATORS = 32
# Dynamic shared memory per block: two (input chunk + metadata record) buffers, under the 48 KB
# a kernel gets without opting in (a little is left for the kernel's static shared memory).
SHARED_BYTES = 48 * 1024 - 256
# Input floats per staging buffer when choosing the chunk size (the rest is for metadata).
STAGE_FLOATS = 4608
MAX_SPLITS = 16
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
    splits: int = 1  # S: blocks sharing one (tile, row block), each with a run of chunks
    pitch: int = 0  # shared-memory row stride of the window; 0 means its width (TIW)

    def __post_init__(self) -> None:
        if self.pixels_per_lane not in PIXELS_PER_LANE or self.rows_per_warp not in ROWS_PER_WARP:
            raise ValueError(f"no compiled kernel for {self}")
        if self.pixels_per_lane * self.rows_per_warp > MAX_ACCUMULATORS:
            raise ValueError(f"too many accumulators per thread in {self}")
        if self.images * self.tile_h * self.tile_w > 32 * self.pixels_per_lane:
            raise ValueError(f"tile larger than a warp's pixels in {self}")
        if not 1 <= self.warps <= 8:
            raise ValueError(f"1..8 warps per block, got {self.warps}")
        if not 1 <= self.splits <= MAX_SPLITS:
            raise ValueError(f"1..{MAX_SPLITS} splits, got {self.splits}")

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

    def row_pitch(self, geometry: ConvGeometry) -> int:
        return self.pitch or self.window(geometry)[1]

    def chunk_floats(self, geometry: ConvGeometry) -> int:
        tih, _ = self.window(geometry)
        return self.images * self.chunk_channels * tih * self.row_pitch(geometry)

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

    def header_slots(self) -> int:
        """int2 slots that hold a record's KB + 1 row offsets."""
        return (self.rows_per_block + 2) // 2

    def blocks(self, geometry: ConvGeometry, batch: int) -> int:
        n_t, h_t, w_t = self.tiles(geometry, batch)
        return n_t * h_t * w_t * self.row_blocks(geometry)

    def column(self, geometry: ConvGeometry, col: torch.Tensor) -> torch.Tensor:
        """The word of a staged window row that holds window column `col`."""
        return col

    def value_bits(self, values: torch.Tensor) -> torch.Tensor:
        """A record's value as the kernel reads it (int32 bits): the fp32 weight."""
        return values.view(torch.int32)


@dataclass(frozen=True)
class TileHalfConfig(TileConfig):
    """The fp16 tiled kernel's config (escort_conv_half, tiled_half_cuda.py): the same
    decomposition, counted in pixels, each lane's pixels taken in horizontal pairs (so tile
    rows are even), a staged word per window cell holding the half2 a pair reads, even and odd
    columns in the two halves of a row, and no split over chunks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile_w % 2:
            raise ValueError(f"fp16 tiles have even rows (pixel pairs): {self}")
        if self.splits != 1:
            raise ValueError(f"the fp16 tiled kernel does not split its chunks: {self}")

    @property
    def pairs_per_lane(self) -> int:
        return self.pixels_per_lane // 2

    def column(self, geometry: ConvGeometry, col: torch.Tensor) -> torch.Tensor:
        half = (self.window(geometry)[1] + 1) // 2
        return (col % 2) * half + col // 2

    def value_bits(self, values: torch.Tensor) -> torch.Tensor:
        """The half2 (v, v) as int32 bits: one HFMA2 multiplies both pixels of a pair."""
        h = values.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
        word = h | (h << 16)
        return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


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


def _record_estimate(kb: int, cc: int, geometry: ConvGeometry, density: float) -> int:
    """Metadata entries expected in the fullest record of a chunk (a margin over the mean)."""
    r, s = geometry.kernel_size
    return int(kb * cc * r * s * min(1.0, 1.25 * density + 0.02)) + kb // 2 + 2


def fits_shared(chunk_floats: int, record_max: int) -> bool:
    return 2 * (4 * chunk_floats + 8 * record_max) <= SHARED_BYTES


def bank_conflicts(
    pixels_per_lane: int, tile: tuple[int, int, int], stride_h: int, stride_w: int, pitch: int
) -> float:
    """Mean over a lane's pixel groups of the worst shared-memory bank multiplicity of one
    load (1.0: conflict-free), for the first image of the tile."""
    _, th_n, tw_n = tile
    worst = []
    for i in range(pixels_per_lane):
        banks: dict[int, int] = {}
        for lane in range(32):
            j = lane + 32 * i
            if j >= th_n * tw_n:
                continue
            address = (j // tw_n) * stride_h * pitch + (j % tw_n) * stride_w
            banks[address % 32] = banks.get(address % 32, 0) + 1
        if banks:
            worst.append(max(banks.values()))
    return sum(worst) / len(worst) if worst else 1.0


def _best_pitch(
    geometry: ConvGeometry, p: int, tile: tuple[int, int, int], pairs: bool = False
) -> int:
    """The narrowest row stride, at most 2.5x the window width, with the fewest bank
    conflicts on the inner loop's loads (a 2-way conflict halves shared-memory throughput).
    With `pairs` (the fp16 kernel) a lane's loads are its p / 2 pairs, one word each, a pair
    of tile columns (2t, 2t + 1) at word t * stride_w of the row's even or odd half."""
    (_, s), (_, dw), (sh, sw) = geometry.kernel_size, geometry.dilation, geometry.stride
    tiw = (tile[2] - 1) * sw + (s - 1) * dw + 1
    if pairs:
        p, tile = p // 2, (tile[0], tile[1], tile[2] // 2)
    best, best_cost = tiw, bank_conflicts(p, tile, sh, sw, tiw)
    for pitch in range(tiw + 1, int(tiw * 2.5) + 1):
        cost = bank_conflicts(p, tile, sh, sw, pitch)
        if cost < best_cost - 1e-9:
            best, best_cost = pitch, cost
    return best


def make_config(
    geometry: ConvGeometry,
    batch: int,
    p: int,
    rows_per_block: int,
    density: float = 1.0,
    splits: int | None = None,
    tile: tuple[int, int, int] | None = None,
    pad_banks: bool = True,
    half: bool = False,
) -> TileConfig | None:
    """The config with P pixels per lane and `rows_per_block` rows, or None if it cannot be
    built (too many accumulators, or a window too large to stage). `density` (nonzeros per
    weight) sizes the metadata buffer; `splits` None picks enough splits to fill the GPU;
    `tile` (NB, TH, TW) overrides the tile; `pad_banks` widens the shared rows when that
    removes bank conflicts. `half` makes the fp16 kernel's TileHalfConfig: the tile's rows
    rounded up to even, no split."""
    nb, th, tw = tile or _tile_for(geometry, batch, p)
    if half:
        tw += tw % 2
        th = min(th, 32 * p // tw)
        nb = max(1, min(nb, 32 * p // (th * tw))) if th else nb
        splits = 1
    if th < 1 or nb * th * tw > 32 * p:
        return None
    warps = max(1, min(8, rows_per_block))
    kw = max(1, rows_per_block // warps)
    if kw not in ROWS_PER_WARP or p * kw > MAX_ACCUMULATORS:
        return None
    (r, s), (dh, dw), (sh, sw) = geometry.kernel_size, geometry.dilation, geometry.stride
    tiw = (tw - 1) * sw + (s - 1) * dw + 1
    pitch = _best_pitch(geometry, p, (nb, th, tw), pairs=half) if pad_banks else tiw
    per_channel = nb * ((th - 1) * sh + (r - 1) * dh + 1) * pitch
    kb = warps * kw
    span = _max_block_span(geometry, kb)
    cc = max(1, min(span, STAGE_FLOATS // per_channel))
    while cc > 1 and not fits_shared(cc * per_channel, _record_estimate(kb, cc, geometry, density)):
        cc = max(1, cc * 3 // 4)
    if not fits_shared(cc * per_channel, _record_estimate(kb, cc, geometry, density)):
        return None
    pitch_field = 0 if pitch == tiw else pitch
    kind = TileHalfConfig if half else TileConfig
    config = kind(p, kw, warps, nb, th, tw, cc, pitch=pitch_field)
    chunks = -(-span // cc)
    if splits is None:
        blocks = config.blocks(geometry, batch)
        splits = 1 if blocks >= TARGET_BLOCKS else -(-TARGET_BLOCKS // blocks)
    splits = max(1, min(splits, MAX_SPLITS, span))
    if splits > chunks:  # smaller chunks, so that every split has one
        cc = -(-span // splits)
        splits = -(-span // cc)
    return kind(p, kw, warps, nb, th, tw, cc, splits, pitch_field)


def _row_tile(geometry: ConvGeometry, p: int) -> tuple[int, int, int] | None:
    """Tiles of whole 32-pixel output rows (pixel group i = row i): conflict-free loads at
    stride 1 without padding. Only for maps at least 24 wide."""
    oh, ow = geometry.output_hw
    if ow < 24 or geometry.stride[1] != 1:
        return None
    return (1, min(p, oh), 32)


def _max_block_span(geometry: ConvGeometry, rows_per_block: int) -> int:
    if geometry.groups == 1:
        return geometry.in_channels
    kg, cg = geometry.outputs_per_group, geometry.channels_per_group
    # A block of consecutive rows touches at most this many groups.
    groups = min(geometry.groups, (rows_per_block + kg - 2) // kg + 1)
    return groups * cg


def default_config(geometry: ConvGeometry, batch: int, density: float = 1.0) -> TileConfig:
    """A config chosen from the shape alone, without timing (`SparseConvPlan.tune` measures).

    From H100 tuning runs of the layer suite: two pixels per lane win on most layers, four on
    112x112 and larger maps, eight on the few-channel stem; as many rows per block as still give
    two blocks per SM; split the chunks only for long reductions (4+ chunks), else use fewer
    rows per block."""
    oh, ow = geometry.output_hw
    if geometry.channels_per_group <= 4 and geometry.groups == 1 and batch > 1:
        p = 8
    elif oh * ow >= 112 * 112:
        p = 4
    else:
        p = 2
    tile = _row_tile(geometry, p)
    for kb in (64, 32):
        config = make_config(geometry, batch, p, kb, density, splits=1, tile=tile)
        if config is not None and config.blocks(geometry, batch) >= TARGET_BLOCKS:
            return config
    config = make_config(geometry, batch, p, 32, density, splits=1, tile=tile)
    if config is not None and -(-_max_block_span(geometry, 32) // config.chunk_channels) >= 4:
        split = make_config(geometry, batch, p, 32, density, tile=tile)
        if split is not None:
            return split
    for kb in (32, 16, 8):
        config = make_config(geometry, batch, p, kb, density, splits=1, tile=tile)
        if config is not None and config.blocks(geometry, batch) >= TARGET_BLOCKS // 2:
            return config
    for kb in (8, 4):
        config = make_config(geometry, batch, p, kb, density, splits=1, tile=tile)
        if config is not None:
            return config
    # Large strided windows (AlexNet's 11x11/4 stem) do not stage at 8 pixels per lane: fall
    # back to fewer pixels per lane before giving up.
    for lane_pixels in sorted({p, *PIXELS_PER_LANE}, key=lambda q: (q != p, -q)):
        for kb in (32, 16, 8, 4):
            config = make_config(geometry, batch, lane_pixels, kb, density)
            if config is not None:
                return config
    raise ValueError(f"no kernel configuration fits {geometry}")  # pragma: no cover


def candidate_configs(
    geometry: ConvGeometry, batch: int, density: float = 1.0, limit: int | None = None
) -> list[TileConfig]:
    """The configs worth timing for this shape, the default first, then its nearest variants
    (same pixels per lane, similar rows per block); `limit` keeps the first few."""
    default = default_config(geometry, batch, density)
    found: list[TileConfig] = []
    for p in PIXELS_PER_LANE:
        for tile in dict.fromkeys([None, _row_tile(geometry, p)]):
            for kb in (8, 16, 32, 64):
                for splits in (1, None):
                    config = make_config(geometry, batch, p, kb, density, splits, tile)
                    if config is not None and config != default and config not in found:
                        found.append(config)

    def distance(c: TileConfig) -> tuple[int, float, int, int]:
        return (
            c.pixels_per_lane != default.pixels_per_lane,
            abs(math.log2(c.rows_per_block / default.rows_per_block)),
            c.splits != default.splits,
            c.tile_w != default.tile_w,
        )

    found.sort(key=distance)
    configs = [default, *found]
    return configs if limit is None else configs[:limit]
