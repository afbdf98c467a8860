"""Which kernel runs a layer: the tiled escort_conv (tiling.py) or escort_direct (direct.py).

`default_config` chooses from the shape alone; `candidate_configs` lists what
SparseConvPlan.tune times. The tiled kernel stages each tile's input window in shared memory
and reuses it across a block of rows, which wins once there are enough tiles to fill the GPU.
When there are not (batch 1 on small maps, where the tiled kernel must split its channel
loop over blocks and meet in a workspace), the direct kernel's single pass over each row's
nonzeros has the shorter latency.
"""

from __future__ import annotations

from service.kernels.direct import DirectConfig, supports
from service.kernels.direct_cuda import DIRECT_SPLITS
from service.kernels.stretched_csr import ConvGeometry
from service.kernels.tiling import TileConfig
from service.kernels.tiling import candidate_configs as tiled_candidates
from service.kernels.tiling import default_config as tiled_default

KernelConfig = TileConfig | DirectConfig


def direct_default(geometry: ConvGeometry, batch: int, density: float = 1.0) -> DirectConfig:
    """Two pixels per lane, eight warps per block, and enough warps per output channel that
    each walks at most about 64 of its nonzeros (the row's latency is one walk). From H100
    runs of the layer suite at batch 1."""
    r, s = geometry.kernel_size
    per_row = density * geometry.channels_per_group * r * s
    splits = next((n for n in DIRECT_SPLITS if per_row / n <= 64), DIRECT_SPLITS[-1])
    return DirectConfig(2, 8, splits)


def default_config(geometry: ConvGeometry, batch: int, density: float = 1.0) -> KernelConfig:
    """The tiled kernel's default, unless it has to split its channel loop to fill the GPU:
    then the direct kernel."""
    tiled = tiled_default(geometry, batch, density)
    if tiled.splits > 1 and supports(geometry):
        return direct_default(geometry, batch, density)
    return tiled


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


def candidate_configs(
    geometry: ConvGeometry, batch: int, density: float = 1.0, limit: int | None = None
) -> list[KernelConfig]:
    """The configs worth timing for this shape: the default first, then the best-guess
    config of the other kernel, then both kernels' variants (direct ones first); `limit`
    keeps the first few."""
    tiled = tiled_candidates(geometry, batch, density)
    direct = direct_candidates(geometry, batch, density)
    default = default_config(geometry, batch, density)
    if isinstance(default, DirectConfig):
        ordered = [default, tiled[0], *direct[1:], *tiled[1:]]
    elif not direct:
        ordered = tiled
    else:
        ordered = [default, *direct, *tiled[1:]]
    return ordered if limit is None else ordered[:limit]
