"""Which kernel runs a layer: the tiled escort_conv (tiling.py) or escort_direct (direct.py).

`default_config` chooses from the shape alone; `candidate_configs` lists what
SparseConvPlan.tune times. The tiled kernel stages each tile's input window in shared memory
and reuses it across a block of rows, which wins once there are enough tiles to fill the GPU.
When there are not (batch 1 on small maps, where the tiled kernel must split its channel
loop over blocks and meet in a workspace), the direct kernel's single pass over each row's
nonzeros has the shorter latency.
"""

from __future__ import annotations

import math

from service.kernels.direct import DIRECT_WARPS, DirectConfig
from service.kernels.direct_cuda import DIRECT_PIXELS_PER_LANE
from service.kernels.stretched_csr import ConvGeometry
from service.kernels.tiling import TileConfig
from service.kernels.tiling import candidate_configs as tiled_candidates
from service.kernels.tiling import default_config as tiled_default

KernelConfig = TileConfig | DirectConfig


def direct_default(geometry: ConvGeometry, batch: int) -> DirectConfig:
    """Two pixels per lane, eight channels per block; one pixel per lane on maps so small
    that two would leave most lanes idle."""
    oh, ow = geometry.output_hw
    return DirectConfig(1 if batch * oh * ow <= 32 else 2, 8)


def default_config(geometry: ConvGeometry, batch: int, density: float = 1.0) -> KernelConfig:
    """The tiled kernel's default, unless it has to split its channel loop to fill the GPU:
    then the direct kernel."""
    tiled = tiled_default(geometry, batch, density)
    if tiled.splits > 1:
        return direct_default(geometry, batch)
    return tiled


def direct_candidates(geometry: ConvGeometry, batch: int) -> list[DirectConfig]:
    first = direct_default(geometry, batch)
    others = [
        DirectConfig(p, w)
        for p in DIRECT_PIXELS_PER_LANE
        for w in DIRECT_WARPS
        if DirectConfig(p, w) != first
    ]
    others.sort(key=lambda c: (abs(math.log2(c.pixels_per_lane / first.pixels_per_lane)), -c.warps))
    return [first, *others]


def candidate_configs(
    geometry: ConvGeometry, batch: int, density: float = 1.0, limit: int | None = None
) -> list[KernelConfig]:
    """The configs worth timing for this shape: the default first, then the best-guess
    config of the other kernel, then both kernels' variants (direct ones first); `limit`
    keeps the first few."""
    tiled = tiled_candidates(geometry, batch, density)
    direct = direct_candidates(geometry, batch)[:4]
    default = default_config(geometry, batch, density)
    if isinstance(default, DirectConfig):
        ordered = [default, tiled[0], *direct[1:], *tiled[1:]]
    else:
        ordered = [default, *direct, *tiled[1:]]
    return ordered if limit is None else ordered[:limit]
