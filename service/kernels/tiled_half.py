"""The tiled kernel on fp16: `escort_conv_half<P, KW>` (tiled_half_cuda.py), its configs and
launch. Two pixels per HFMA2 and per shared load, where the fp32 tiled kernel spends a load
and an FMA on each pixel; the rest (tiles, chunks, records, the parameter struct) is the fp32
tiled kernel's, with the records' values as half2 and the window's columns split by parity
(`TileHalfConfig`). It does not split chunks over blocks, so where the fp32 tiled kernel would
have to (batch 1 on small maps) it ranks behind the fp16 direct kernel.
"""

from __future__ import annotations

import math

import torch

from service.kernels.escort_cuda import SOURCE
from service.kernels.stretched_csr import ConvGeometry
from service.kernels.tiled import TiledVariant
from service.kernels.tiled_half_cuda import (
    TILED_HALF_KERNEL_NAMES,
    TILED_HALF_SOURCE,
    half_kernel_name,
)
from service.kernels.tiling import (
    PIXELS_PER_LANE,
    TARGET_BLOCKS,
    TileConfig,
    TileHalfConfig,
    _row_tile,
    make_config,
)
from service.kernels.tiling import default_config as tiled_default


def half_default(geometry: ConvGeometry, batch: int, density: float = 1.0) -> TileHalfConfig:
    """The fp32 tiled default's pixels per lane and tile, rounded to pairs, with as many rows
    per block as still give half the target blocks (no split to fill the GPU instead)."""
    p = tiled_default(geometry, batch, density).pixels_per_lane
    first = None
    for lane_pixels in dict.fromkeys([p, *PIXELS_PER_LANE]):
        tile = _row_tile(geometry, lane_pixels)
        for kb in (64, 32, 16, 8, 4):
            config = make_config(geometry, batch, lane_pixels, kb, density, tile=tile, half=True)
            if config is None:
                continue
            first = first or config
            if config.blocks(geometry, batch) >= TARGET_BLOCKS // 2:
                return config
    if first is None:
        raise ValueError(f"no fp16 tiled configuration fits {geometry}")
    return first


def half_candidates(
    geometry: ConvGeometry, batch: int, density: float = 1.0
) -> list[TileHalfConfig]:
    """The default, then its nearest variants (pixels per lane, rows per block, tile)."""
    try:
        default = half_default(geometry, batch, density)
    except ValueError:
        return []
    found: list[TileHalfConfig] = []
    for p in PIXELS_PER_LANE:
        for tile in dict.fromkeys([None, _row_tile(geometry, p)]):
            for kb in (8, 16, 32, 64):
                config = make_config(geometry, batch, p, kb, density, tile=tile, half=True)
                if config is not None and config != default and config not in found:
                    found.append(config)

    def distance(c: TileConfig) -> tuple[int, float, int]:
        return (
            c.pixels_per_lane != default.pixels_per_lane,
            abs(math.log2(c.rows_per_block / default.rows_per_block)),
            c.tile_w != default.tile_w,
        )

    return [default, *sorted(found, key=distance)]


class TiledHalfVariant(TiledVariant):
    """The fp16 tiled kernel as the registry sees it."""

    name = "tiled-half"
    dtype = torch.float16
    config_type = TileHalfConfig
    sources = (SOURCE, TILED_HALF_SOURCE)  # it builds on the fp32 kernel's helpers
    kernel_names = TILED_HALF_KERNEL_NAMES

    def supports(self, geometry: ConvGeometry) -> bool:
        try:
            half_default(geometry, 1)
        except ValueError:
            return False
        return True

    def default_config(
        self, geometry: ConvGeometry, batch: int, density: float
    ) -> tuple[TileHalfConfig, int]:
        # Behind the fp16 direct kernel (rank 1) where the fp32 tiled one would split.
        splits = tiled_default(geometry, batch, density).splits
        return half_default(geometry, batch, density), (2 if splits > 1 else 0)

    def candidates(
        self, geometry: ConvGeometry, batch: int, density: float
    ) -> list[TileHalfConfig]:
        return half_candidates(geometry, batch, density)

    def kernel_name(self, config: TileConfig) -> str:
        return half_kernel_name(config.pixels_per_lane, config.rows_per_warp)


TILED_HALF = TiledHalfVariant()
