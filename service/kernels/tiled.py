"""The tiled variant: `escort_conv<P, KW>` (escort_cuda.py), its parameter struct and launch.

Each block stages a tile's input window in shared memory and reuses it across a block of
output channels (tiling.py chooses the tiles, tiled_meta.py builds the metadata). It wins once a layer
has enough tiles to fill the GPU; when it has to split its channel loop over blocks to do so
(batch 1 on small maps), it ranks behind the direct variant.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np
import torch

from service.kernels.escort_cuda import KERNEL_NAMES, SOURCE, kernel_name
from service.kernels.launch import ACTIVATION_CODES, KernelLaunch, assemble_launch
from service.kernels.stretched_csr import ConvGeometry, SparseWeight
from service.kernels.tiled_meta import EscortMeta, build_meta
from service.kernels.tiling import TileConfig
from service.kernels.tiling import candidate_configs as tiled_candidates
from service.kernels.tiling import default_config as tiled_default

_POINTER_FIELDS = ("meta", "recptr", "perm", "blocks", "bias", "ws", "counters")
_INT_FIELDS = [
    "N",
    "C",
    "H",
    "W",
    "K",
    "OH",
    "OW",
    "sh",
    "sw",
    "pt",
    "pl",
    "TH",
    "TW",
    "NB",
    "TIH",
    "TIW",
    "CC",
    "pitch",
    "tiles_w",
    "tiles_h",
    "rec_stride",
    "header",
    "chunk_floats",
    "record_max",
    "splits",
    "act",
]
# The EscortParams struct of the CUDA source, field for field (aligned as C lays it out).
PARAMS_DTYPE = np.dtype(
    [(name, np.uint64) for name in _POINTER_FIELDS] + [(name, np.int32) for name in _INT_FIELDS],
    align=True,
)


def kernel_params(
    geometry: ConvGeometry,
    meta: EscortMeta,
    batch: int,
    activation: str | None,
    pointers: dict[str, int] | None = None,
) -> dict[str, int]:
    """The EscortParams fields for one launch; device pointers default to 0."""
    config = meta.config
    tih, tiw = meta.window
    oh, ow = geometry.output_hw
    _, h_t, w_t = config.tiles(geometry, batch)
    left, _, top, _ = geometry.padding
    values = dict.fromkeys(_POINTER_FIELDS, 0)
    values.update(pointers or {})
    values.update(
        N=batch,
        C=geometry.in_channels,
        H=geometry.input_hw[0],
        W=geometry.input_hw[1],
        K=geometry.out_channels,
        OH=oh,
        OW=ow,
        sh=geometry.stride[0],
        sw=geometry.stride[1],
        pt=top,
        pl=left,
        TH=config.tile_h,
        TW=config.tile_w,
        NB=config.images,
        TIH=tih,
        TIW=tiw,
        CC=config.chunk_channels,
        pitch=config.row_pitch(geometry),
        tiles_w=w_t,
        tiles_h=h_t,
        rec_stride=meta.rec_stride,
        header=config.header_slots(),
        chunk_floats=config.chunk_floats(geometry),
        record_max=meta.record_max,
        splits=config.splits,
        act=ACTIVATION_CODES[activation],
    )
    return values


def launch_grid(geometry: ConvGeometry, meta: EscortMeta, batch: int) -> tuple[int, int, int]:
    n_t, h_t, w_t = meta.config.tiles(geometry, batch)
    return (n_t * h_t * w_t, meta.config.row_blocks(geometry), meta.config.splits)


def shared_bytes(geometry: ConvGeometry, meta: EscortMeta) -> int:
    return 2 * (4 * meta.config.chunk_floats(geometry) + 8 * meta.record_max)


class TiledVariant:
    """The tiled kernel as the registry (variants.py) sees it."""

    name = "tiled"
    dtype = torch.float32  # of the input, output and residual
    config_type = TileConfig
    sources = (SOURCE,)
    kernel_names = KERNEL_NAMES
    params_dtype = PARAMS_DTYPE

    def supports(self, geometry: ConvGeometry) -> bool:
        return True

    def default_config(
        self, geometry: ConvGeometry, batch: int, density: float
    ) -> tuple[TileConfig, int]:
        config = tiled_default(geometry, batch, density)
        return config, (2 if config.splits > 1 else 0)

    def candidates(self, geometry: ConvGeometry, batch: int, density: float) -> list[TileConfig]:
        return tiled_candidates(geometry, batch, density)

    def kernel_name(self, config: TileConfig) -> str:
        return kernel_name(config.pixels_per_lane, config.rows_per_warp)

    def meta_key(self, config: TileConfig) -> Hashable:
        return config  # each tiling has its own records

    def build_meta(
        self, weight: SparseWeight, geometry: ConvGeometry, config: TileConfig
    ) -> EscortMeta:
        return build_meta(weight, geometry, config)

    def prepare_launch(
        self,
        geometry: ConvGeometry,
        meta: EscortMeta,
        config: TileConfig,
        bias: torch.Tensor | None,
        batch: int,
        activation: str | None,
        device_index: int,
    ) -> KernelLaunch:
        """Everything a launch needs (allocates the split workspace, so not during a capture).
        `meta` and `bias` must already be on the device."""
        config = meta.config  # as built: its chunk may be smaller than the one asked for
        grid = launch_grid(geometry, meta, batch)
        out_shape = (batch, geometry.out_channels, *geometry.output_hw)
        ws = counters = None
        if config.splits > 1:
            device = torch.device("cuda", device_index)
            ws = torch.zeros(out_shape, device=device)
            counters = torch.zeros(grid[0] * grid[1], dtype=torch.int32, device=device)
        pointers = {
            "meta": meta.meta.data_ptr(),
            "recptr": meta.recptr.data_ptr(),
            "perm": meta.perm.data_ptr(),
            "blocks": meta.blocks.data_ptr(),
            "bias": 0 if bias is None else bias.data_ptr(),
            "ws": 0 if ws is None else ws.data_ptr(),
            "counters": 0 if counters is None else counters.data_ptr(),
        }
        return assemble_launch(
            self.kernel_name(config),
            device_index,
            grid,
            config.threads,
            shared_bytes(geometry, meta),
            PARAMS_DTYPE,
            kernel_params(geometry, meta, batch, activation, pointers),
            meta,
            (bias, ws, counters),
            out_shape,
        )


TILED = TiledVariant()
