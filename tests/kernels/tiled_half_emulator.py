"""A numpy model of escort_conv_half's indexing (tiled_half_cuda.py), block by block.

It reads the same metadata and parameter struct as the CUDA kernel and mirrors its steps: the
tile decode, the pair-expanded staging (window cell (plane, ih, iw) at word
plane * TIH * pitch + ih * pitch + (iw % 2) * half + iw // 2, holding x at columns gw and
gw + stride_w), the half2 records, the per-lane pair bases and the epilogue of both pixels
of a pair. Arithmetic is float64 on the fp16-rounded values, so only the indexing is modelled
exactly. A read of a word no thread staged is NaN and poisons the sum; a read outside the
chunk raises.
"""

from __future__ import annotations

import numpy as np
import torch

from service.kernels.tiled_meta import EscortMeta
from tests.kernels.escort_emulator import row_segments, tile_origins


def _half_values(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each slot's word as the half2 (low, high) in float64 (header slots decode to junk)."""
    bits = records[:, 0].astype(np.int64) & 0xFFFFFFFF
    halves = [(b & 0xFFFF).astype(np.uint16).view(np.float16) for b in (bits, bits >> 16)]
    return halves[0].astype(np.float64), halves[1].astype(np.float64)


def staged_cells(p: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(word, plane, ih, iw) of every cell the staging loops write in one chunk."""
    q, ih, iw = np.meshgrid(
        np.arange(p["NB"] * p["CC"]), np.arange(p["TIH"]), np.arange(p["TIW"]), indexing="ij"
    )
    q, ih, iw = q.ravel(), ih.ravel(), iw.ravel()
    half = (p["TIW"] + 1) // 2
    word = q * p["TIH"] * p["pitch"] + ih * p["pitch"] + (iw % 2) * half + iw // 2
    return word, q, ih, iw


def emulate_half(
    x: torch.Tensor,
    meta: EscortMeta,
    p: dict[str, int],
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    cfg = meta.config
    assert p["splits"] == 1
    xs = x.half().double().numpy()
    records = meta.meta.numpy()
    values, values_hi = _half_values(records)
    byte_offsets = records[:, 1].astype(np.int64)
    perm = meta.perm.numpy()
    blocks = meta.blocks.numpy()
    n_img, c_in, h, w = xs.shape
    k_out, oh_n, ow_n = p["K"], p["OH"], p["OW"]
    out = np.full((n_img, k_out, oh_n, ow_n), np.nan)
    tile_pixels = p["TH"] * p["TW"]
    image_words = p["CC"] * p["TIH"] * p["pitch"]
    rows_per_block = cfg.warps * cfg.rows_per_warp
    pairs = cfg.pixels_per_lane // 2

    # Pair j = lane + 32 * i covers tile pixels 2j and 2j + 1: shape [pairs, 32].
    jpx = 2 * (np.arange(32)[None, :] + 32 * np.arange(pairs)[:, None])
    nb = jpx // tile_pixels
    rem = jpx - nb * tile_pixels
    th, tw = rem // p["TW"], rem % p["TW"]
    if np.any(tw % 2):
        raise AssertionError("a pair straddles a tile row")
    sbase = np.where(nb < p["NB"], nb * image_words + th * p["sh"] * p["pitch"]
                     + (tw * p["sw"]) // 2, 0)  # fmt: skip

    word, s_q, s_ih, s_iw = staged_cells(p)
    if len(np.unique(word)) != len(word) or word.max() >= p["chunk_floats"]:
        raise IndexError("staged cells collide or leave the chunk")
    s_nb, s_cl = s_q // p["CC"], s_q % p["CC"]

    for bx, (n0, oh0, ow0, ih0, iw0) in enumerate(tile_origins(p, n_img)):
        for by in range(len(blocks)):
            c_first, c_count = (int(v) for v in blocks[by])
            acc = np.zeros((rows_per_block, 2, pairs, 32))
            for j in range(-(-c_count // p["CC"])):
                c0 = c_first + j * p["CC"]
                cn = min(p["CC"], c_count - j * p["CC"])
                lo = np.full(p["chunk_floats"], np.nan)
                hi = np.full(p["chunk_floats"], np.nan)
                n, gh, gw = n0 + s_nb, ih0 + s_ih, iw0 + s_iw
                ok = (s_cl < cn) & (n < n_img)
                row_in = (gh >= 0) & (gh < h)
                for part, col in ((lo, gw), (hi, gw + p["sw"])):
                    inside = ok & row_in & (col >= 0) & (col < w)
                    part[word] = 0.0
                    part[word[inside]] = xs[n[inside], c0 + s_cl[inside], gh[inside],
                                            col[inside]]  # fmt: skip
                for r, beg, end in row_segments(meta, p, by, j, k_out):
                    idx = sbase[None] + (byte_offsets[beg:end] // 4)[:, None, None]
                    if idx.min() < 0 or idx.max() >= p["chunk_floats"]:
                        raise IndexError(f"shared read outside the chunk (block {bx},{by})")
                    if not np.array_equal(values[beg:end], values_hi[beg:end], equal_nan=True):
                        raise ValueError("a record's half2 must hold (v, v)")
                    v = values[beg:end, None, None]
                    acc[r, 0] += (v * lo[idx]).sum(0)
                    acc[r, 1] += (v * hi[idx]).sum(0)
            for r in range(rows_per_block):
                row = by * rows_per_block + r
                if row >= k_out:
                    continue
                k = perm[row]
                for odd in (0, 1):
                    n, oh, ow = n0 + nb, oh0 + th, ow0 + tw + odd
                    valid = (nb < p["NB"]) & (n < n_img) & (oh < oh_n) & (ow < ow_n)
                    if np.isfinite(out[n[valid], k, oh[valid], ow[valid]]).any():
                        raise AssertionError(f"output written twice (block {bx},{by})")
                    val = acc[r, odd][valid] + (0.0 if bias is None else float(bias[k]))
                    if residual is not None:
                        res = residual.half().double().numpy()  # the kernel reads fp16
                        val = val + res[n[valid], k, oh[valid], ow[valid]]
                    if p["act"] == 1:
                        val = np.maximum(val, 0.0)
                    elif p["act"] == 2:
                        val = np.clip(val, 0.0, 6.0)
                    out[n[valid], k, oh[valid], ow[valid]] = val
    return torch.from_numpy(out)
