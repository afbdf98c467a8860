"""The tiled kernels' metadata per (geometry, config), built on the CPU (pure torch) and
staged with each chunk by cp.async (tiling.py has the decomposition):
  meta    int32 [M, 2]  one record per (row block, chunk): a header of KB + 1 row offsets
                        (packed two per slot), then (value bits, byte offset in the window);
                        the config says how a value is stored (fp32, or half2 for fp16) and
                        which word of a staged row holds a window column
  recptr  int32 [KBLK, R]  start of each record in `meta` (R = max chunks + 1)
  perm    int32 [K]     the output channel of sorted row p
  blocks  int32 [KBLK, 2]  first input channel and channel count staged by each row block
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from service.kernels.stretched_csr import ConvGeometry, SparseWeight
from service.kernels.tiling import TileConfig, fits_shared


@dataclass(frozen=True)
class EscortMeta:
    config: TileConfig  # as built: the chunk size may be smaller than the one asked for
    window: tuple[int, int]  # (TIH, TIW)
    meta: torch.Tensor  # int32 [M, 2]
    recptr: torch.Tensor  # int32 [KBLK, rec_stride]
    perm: torch.Tensor  # int32 [K]
    blocks: torch.Tensor  # int32 [KBLK, 2]
    rec_stride: int
    record_max: int  # int2 slots of the longest record

    def to(self, device: torch.device | str) -> EscortMeta:
        return EscortMeta(
            config=self.config,
            window=self.window,
            meta=self.meta.to(device),
            recptr=self.recptr.to(device),
            perm=self.perm.to(device),
            blocks=self.blocks.to(device),
            rec_stride=self.rec_stride,
            record_max=self.record_max,
        )


def build_meta(weight: SparseWeight, geometry: ConvGeometry, config: TileConfig) -> EscortMeta:
    """The kernel's metadata for one (geometry, config); CPU tensors. Shrinks the chunk when a
    record would not fit in shared memory."""
    while True:
        meta = _build_meta(weight, geometry, config)
        if fits_shared(config.chunk_floats(geometry), meta.record_max):
            return meta
        if config.chunk_channels == 1:
            raise ValueError(f"{config} cannot stage one channel of {geometry}")
        config = replace(config, chunk_channels=max(1, config.chunk_channels * 3 // 4))


def _build_meta(weight: SparseWeight, geometry: ConvGeometry, config: TileConfig) -> EscortMeta:
    k_out, kg, cg = geometry.out_channels, geometry.outputs_per_group, geometry.channels_per_group
    kb = config.rows_per_block
    tih, tiw = config.window(geometry)
    cc = config.chunk_channels
    dh, dw = geometry.dilation
    header = config.header_slots()

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

    pos_of_row = torch.empty(k_out, dtype=torch.int64)
    pos_of_row[perm] = torch.arange(k_out)
    pos = pos_of_row[weight.rows]  # sorted row of every nonzero
    block = pos // kb
    chan_abs = (weight.rows // kg) * cg + weight.chans
    rel = chan_abs - blocks[block, 0]
    chunk, local = rel // cc, rel % cc
    pitch = config.row_pitch(geometry)
    offset = (local * tih + weight.taps_r * dh) * pitch + config.column(
        geometry, weight.taps_s * dw
    )
    record = block * max_chunks + chunk
    row_in_block = pos % kb
    # Group by record, then row; stable, so each row keeps its (c, r, s) order.
    order = torch.sort(record * kb + row_in_block, stable=True).indices

    n_records = n_blocks * max_chunks
    per_row = torch.bincount(record * kb + row_in_block, minlength=n_records * kb)
    per_row = per_row.view(n_records, kb)
    lengths = header + per_row.sum(1)
    starts = torch.zeros(n_records + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=starts[1:])

    meta = torch.zeros(int(starts[-1]), 2, dtype=torch.int32)
    row_offsets = torch.zeros(n_records, 2 * header, dtype=torch.int64)
    torch.cumsum(per_row, 1, out=row_offsets[:, 1 : kb + 1])
    slots = torch.arange(header)
    meta[(starts[:-1, None] + slots[None, :]).reshape(-1)] = row_offsets.view(-1, 2).to(torch.int32)

    sorted_record = record[order]
    first_in_record = torch.zeros(n_records + 1, dtype=torch.int64)
    torch.cumsum(lengths - header, 0, out=first_in_record[1:])
    rank = torch.arange(weight.nnz) - first_in_record[sorted_record]
    where = starts[sorted_record] + header + rank
    meta[where, 0] = config.value_bits(weight.values[order])
    meta[where, 1] = (4 * offset[order]).to(torch.int32)  # bytes: the kernel adds addresses

    recptr = torch.cat(
        [starts[:-1].view(n_blocks, max_chunks), starts[1:].view(n_blocks, max_chunks)[:, -1:]], 1
    )
    return EscortMeta(
        config=config,
        window=(tih, tiw),
        meta=meta,
        recptr=recptr.to(torch.int32).contiguous(),
        perm=perm.to(torch.int32),
        blocks=blocks.to(torch.int32).contiguous(),
        rec_stride=max_chunks + 1,
        record_max=int(lengths.max()),
    )
