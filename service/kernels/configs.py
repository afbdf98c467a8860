"""Which kernel variant runs a layer, and with which config, over the registry (variants.py).

`default_config` chooses from the shape alone: every variant that supports the geometry offers
its best guess with a rank, and the lowest rank wins (ties: registry order). The tiled kernel
ranks first unless it has to split its channel loop over blocks to fill the GPU (batch 1 on
small maps, where its blocks meet in a workspace); then the direct kernel's single pass over
each row's nonzeros has the shorter latency. `candidate_configs` lists what
SparseConvPlan.tune times: the default, the other variants' guesses, then the variants' other
candidates taken in turn. Both look only at the variants of one storage type (`dtype`: fp32,
or fp16 for an fp16 model's layers).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from service.kernels.direct import DirectConfig
from service.kernels.direct_half import DirectHalfConfig
from service.kernels.stretched_csr import ConvGeometry
from service.kernels.tiling import TileConfig, TileHalfConfig
from service.kernels.variants import VARIANTS

KernelConfig = TileConfig | TileHalfConfig | DirectConfig | DirectHalfConfig


def _ranked(
    geometry: ConvGeometry, batch: int, density: float, dtype: torch.dtype
) -> list[tuple[int, Any, Any]]:
    """(rank, variant, its default) for each variant of `dtype` that supports the geometry,
    best first."""
    offers = []
    for order, variant in enumerate(VARIANTS):
        if variant.dtype == dtype and variant.supports(geometry):
            config, rank = variant.default_config(geometry, batch, density)
            offers.append((rank, order, variant, config))
    offers.sort(key=lambda offer: offer[:2])
    return [(rank, variant, config) for rank, _, variant, config in offers]


def default_config(
    geometry: ConvGeometry, batch: int, density: float = 1.0, dtype: torch.dtype = torch.float32
) -> KernelConfig:
    ranked = _ranked(geometry, batch, density, dtype)
    if not ranked:
        raise ValueError(f"no {dtype} kernel variant runs {geometry}")
    return ranked[0][2]


def candidate_configs(
    geometry: ConvGeometry,
    batch: int,
    density: float = 1.0,
    limit: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[KernelConfig]:
    """The configs worth timing for this shape; `limit` keeps the first few."""
    ranked = _ranked(geometry, batch, density, dtype)
    guesses = [config for _, _, config in ranked]
    others = [
        [c for c in variant.candidates(geometry, batch, density) if c != guess]
        for _, variant, guess in ranked
    ]
    # Taken in turn, so that a limit leaves every variant its nearest neighbours.
    rest = [c for turn in itertools.zip_longest(*others) for c in turn if c is not None]
    ordered = list(dict.fromkeys([*guesses, *rest]))
    return ordered if limit is None else ordered[:limit]
