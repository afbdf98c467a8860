"""A numpy model of escort_conv's indexing, block by block, for CPU tests.

It reads the same metadata and parameter struct as the CUDA kernel and mirrors its steps: the
tile decode, the staging layout, the metadata records
and their headers, the per-lane pixel bases, the split over chunks and the epilogue. Arithmetic is vectorized, so only the indexing is
modelled exactly. Shared-memory reads outside the staged chunk raise instead of reading garbage.
"""

from __future__ import annotations

import numpy as np
import torch

from service.kernels.tiled_meta import EscortMeta


def emulate(
    x: torch.Tensor,
    meta: EscortMeta,
    p: dict[str, int],
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    cfg = meta.config
    xs = x.double().numpy()
    records = meta.meta.numpy()
    values = records[:, 0].copy().view(np.float32).astype(np.float64)
    byte_offsets = records[:, 1].astype(np.int64)
    offsets = byte_offsets // 4
    perm = meta.perm.numpy()
    blocks = meta.blocks.numpy()
    n_img, c_in, h, w = xs.shape
    k_out, oh_n, ow_n = p["K"], p["OH"], p["OW"]
    out = np.full((n_img, k_out, oh_n, ow_n), np.nan)
    lanes = np.arange(32)
    tile_pixels = p["TH"] * p["TW"]
    image_floats = p["CC"] * p["TIH"] * p["pitch"]
    rows_per_block = cfg.warps * cfg.rows_per_warp

    # Pixel j = lane + 32 * i of every lane: shape [P, 32].
    jpx = lanes[None, :] + 32 * np.arange(cfg.pixels_per_lane)[:, None]
    nb = jpx // tile_pixels
    rem = jpx - nb * tile_pixels
    th, tw = rem // p["TW"], rem % p["TW"]
    sbase = np.where(nb < p["NB"], nb * image_floats + th * p["sh"] * p["pitch"] + tw * p["sw"], 0)

    # Staging: window cell (ih, iw) of plane q = nb * CC + cl lives at
    # q * TIH * pitch + ih * pitch + iw; cells with iw >= TIW are row padding, never written.
    e = np.arange(p["chunk_floats"], dtype=np.int64)
    q, cell = e // (p["TIH"] * p["pitch"]), e % (p["TIH"] * p["pitch"])
    ih, iw = cell // p["pitch"], cell % p["pitch"]
    padding_cell = iw >= p["TIW"]
    s_nb, s_cl = q // p["CC"], q % p["CC"]

    for bx, (n0, oh0, ow0, ih0, iw0) in enumerate(tile_origins(p, n_img)):
        for by in range(len(blocks)):
            c_first, c_count = (int(v) for v in blocks[by])
            nchunks = -(-c_count // p["CC"])
            per_split = -(-nchunks // p["splits"])
            acc = np.zeros((rows_per_block, cfg.pixels_per_lane, 32))
            for bz in range(p["splits"]):
                for j in range(bz * per_split, min(nchunks, (bz + 1) * per_split)):
                    c0 = c_first + j * p["CC"]
                    cn = min(p["CC"], c_count - j * p["CC"])
                    n, gh, gw = n0 + s_nb, ih0 + ih, iw0 + iw
                    ok = (s_cl < cn) & (n < n_img) & (gh >= 0) & (gh < h) & (gw >= 0) & (gw < w)
                    buf = np.zeros(p["chunk_floats"])
                    buf[ok] = xs[n[ok], c0 + s_cl[ok], gh[ok], gw[ok]]
                    buf[padding_cell] = np.nan  # never staged: reading one would poison a sum
                    for r, beg, end in row_segments(meta, p, by, j, k_out):
                        idx = sbase[None] + offsets[beg:end, None, None]
                        if idx.min() < 0 or idx.max() >= p["chunk_floats"]:
                            raise IndexError(f"shared read outside the chunk (block {bx},{by})")
                        acc[r] += (values[beg:end, None, None] * buf[idx]).sum(0)
            for r in range(rows_per_block):
                row = by * rows_per_block + r
                if row >= k_out:
                    continue
                k = perm[row]
                n, oh, ow = n0 + nb, oh0 + th, ow0 + tw
                valid = (nb < p["NB"]) & (n < n_img) & (oh < oh_n) & (ow < ow_n)
                if np.isfinite(out[n[valid], k, oh[valid], ow[valid]]).any():
                    raise AssertionError(f"output written twice (block {bx},{by})")
                val = acc[r][valid] + (0.0 if bias is None else float(bias[k]))
                if residual is not None:
                    val = val + residual.double().numpy()[n[valid], k, oh[valid], ow[valid]]
                if p["act"] == 1:
                    val = np.maximum(val, 0.0)
                elif p["act"] == 2:
                    val = np.clip(val, 0.0, 6.0)
                out[n[valid], k, oh[valid], ow[valid]] = val
    return torch.from_numpy(out)


def tile_origins(p: dict[str, int], n_img: int):
    """Per block column (blockIdx.x), as the kernel decodes it: the tile's first image,
    output row and column, and where its input window starts."""
    tiles_n = -(-n_img // p["NB"])
    for bx in range(tiles_n * p["tiles_h"] * p["tiles_w"]):
        tile_w = bx % p["tiles_w"]
        tile_h = (bx // p["tiles_w"]) % p["tiles_h"]
        tile_n = bx // (p["tiles_w"] * p["tiles_h"])
        n0, oh0, ow0 = tile_n * p["NB"], tile_h * p["TH"], tile_w * p["TW"]
        yield n0, oh0, ow0, oh0 * p["sh"] - p["pt"], ow0 * p["sw"] - p["pl"]


def row_segments(meta: EscortMeta, p: dict[str, int], by: int, j: int, k_out: int):
    """(row in block, first, end) of each non-empty row segment in the record of row block
    `by`, chunk `j`, checked as the kernel relies on: the record fits its shared buffer, each
    segment lies inside it, and offsets are whole 4-byte words."""
    records = meta.meta.numpy()
    flat_ints = records.reshape(-1)
    recptr = meta.recptr.numpy().reshape(-1)
    rows_per_block = meta.config.rows_per_block
    rec_beg = recptr[by * p["rec_stride"] + j]
    rec_end = recptr[by * p["rec_stride"] + j + 1]
    if rec_end - rec_beg > p["record_max"]:
        raise IndexError("record longer than the shared buffer")
    header = flat_ints[2 * rec_beg : 2 * rec_beg + rows_per_block + 1]
    for r in range(rows_per_block):
        if by * rows_per_block + r >= k_out:
            continue
        beg = rec_beg + p["header"] + header[r]
        end = rec_beg + p["header"] + header[r + 1]
        if end > rec_end or beg > end:
            raise IndexError("row segment outside its record")
        if end == beg:
            continue
        if np.any(records[beg:end, 1] % 4):
            raise ValueError("offsets must be whole 4-byte words")
        yield r, beg, end


def staged_indices(p: dict[str, int], threads: int) -> list[int]:
    """Shared-memory indices the kernel's staging loops write, thread by thread (with repeats):
    a model of stage_plan + stage_chunk's loops."""
    window = p["TIH"] * p["TIW"]
    planes = p["NB"] * p["CC"]
    pitch = p["pitch"]
    written = []
    for tid in range(threads):
        if window >= threads:
            sp, sp_step, plane0, plane_step = tid, threads, 0, 1
        else:
            g = threads // window
            sp = tid % window if tid < g * window else -1
            sp_step, plane0, plane_step = 1 << 30, tid // window, g
        while 0 <= sp < window:
            nb, cl = plane0 // p["CC"], plane0 % p["CC"]
            q = plane0
            while q < planes:
                assert q == nb * p["CC"] + cl
                ih, iw = sp // p["TIW"], sp % p["TIW"]
                written.append(q * p["TIH"] * pitch + ih * pitch + iw)
                q += plane_step
                cl += plane_step
                while cl >= p["CC"]:
                    cl -= p["CC"]
                    nb += 1
            sp += sp_step
    return written
