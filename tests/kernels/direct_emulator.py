"""A numpy model of escort_direct's indexing, warp by warp, for CPU tests.

It reads the same metadata and parameter struct fields as the CUDA kernel and mirrors its
steps: the pixel decode of each lane, the interior test that skips bounds checks, the
per-tap checks at the borders, the sorted rows and the epilogue. Arithmetic is vectorized
over a warp's pixels; a load the kernel would make outside the input raises.
"""

from __future__ import annotations

import numpy as np
import torch

from service.kernels.direct import DirectConfig, DirectMeta


def in_range_bits(start: int, count: int, step: int, limit: int) -> int:
    """The kernel's in_range_bits: bit j set when 0 <= start + j * step < limit."""
    if step == 1 and count < 64:
        lo, hi = max(0, -start), min(count, limit - start)
        return ((1 << hi) - 1) & ~((1 << lo) - 1) if hi > lo else 0
    return sum(1 << j for j in range(count) if 0 <= start + j * step < limit)


def emulate_direct(
    x: torch.Tensor,
    meta: DirectMeta,
    config: DirectConfig,
    p: dict[str, int],
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    xs = x.double().numpy().reshape(-1)
    records = meta.meta.numpy()
    values = records[:, 0].copy().view(np.float32).astype(np.float64)
    offsets, taps = records[:, 1].astype(np.int64), records[:, 2].astype(np.int64)
    rowptr, perm = meta.rowptr.numpy(), meta.perm.numpy()
    plane = p["OH"] * p["OW"]
    n_images = p["pixels"] // plane
    out = np.full((n_images, p["K"], plane), np.nan)
    res = None if residual is None else residual.double().numpy().reshape(n_images, p["K"], -1)
    lanes = 32 * config.pixels_per_lane
    grid_x = -(-p["pixels"] // lanes)
    for bx in range(grid_x):
        q = bx * lanes + np.arange(lanes)  # pixel j = lane + 32 * i, all i at once
        valid = q < p["pixels"]
        n = np.where(valid, q // plane, 0)
        rem = np.where(valid, q - n * plane, 0)
        oh, ow = rem // p["OW"], rem % p["OW"]
        ih0 = np.where(valid, oh * p["sh"] - p["pt"], -(1 << 28))
        iw0 = np.where(valid, ow * p["sw"] - p["pl"], -(1 << 28))
        base = np.where(valid, n * p["image_floats"] + ih0 * p["W"] + iw0, 0)
        # Bit r * S + s: tap (r, s) inside the image, for every lane's pixel, built as the
        # kernel builds it (in_range_bits for rows and columns, then spread over the rows).
        taps_inside = np.zeros(lanes, dtype=np.uint64)
        for j in range(lanes):
            rows = in_range_bits(int(ih0[j]), p["R"], p["dh"], p["H"])
            cols = in_range_bits(int(iw0[j]), p["S"], p["dw"], p["W"])
            mask = 0
            for r in range(p["R"]):
                if (rows >> r) & 1:
                    mask |= cols << (r * p["S"])
            taps_inside[j] = np.uint64(mask)
        interior = (
            valid
            & (ih0 >= 0)
            & (ih0 + p["reach_h"] < p["H"])
            & (iw0 >= 0)
            & (iw0 + p["reach_w"] < p["W"])
        )
        for row in range(p["K"]):
            k = perm[row]
            # The warp's lanes (32 of them, each with P pixels) vote on the fast path together.
            warp_interior = interior.all()
            acc = np.zeros(lanes)
            # Warp `part` of the row takes records in batches of 32, every splits-th batch.
            beg, end = rowptr[row], rowptr[row + 1]
            shares = [
                e
                for part in range(p["splits"])
                for b0 in range(beg + 32 * part, end, 32 * p["splits"])
                for e in range(b0, min(b0 + 32, end))
            ]
            assert sorted(shares) == list(range(beg, end))  # each record exactly once
            for e in shares:
                address = base + offsets[e]
                if warp_interior:
                    inside = np.ones(lanes, dtype=bool)
                else:
                    inside = ((taps_inside >> np.uint64(taps[e])) & np.uint64(1)).astype(bool)
                loaded = address[inside]
                if loaded.size and (loaded.min() < 0 or loaded.max() >= xs.size):
                    raise IndexError(f"row {row}: load outside the input")
                xv = np.zeros(lanes)
                xv[inside] = xs[loaded]
                acc += values[e] * xv
            v = acc + (0.0 if bias is None else float(bias[k]))
            idx = np.nonzero(valid)[0]
            if res is not None:
                v[idx] += res[n[idx], k, rem[idx]]
            if p["act"] == 1:
                v = np.maximum(v, 0.0)
            elif p["act"] == 2:
                v = np.clip(v, 0.0, 6.0)
            out[n[idx], k, rem[idx]] = v[idx]
    return torch.from_numpy(out.reshape(n_images, p["K"], p["OH"], p["OW"]))
