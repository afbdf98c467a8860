"""Rows from page-locked host memory to the device, with as little host work per row as can be.

A batch's rows are separate views into the HTTP workers' arenas, which the engine page-locks
(`Engine.pin_host_memory`). On the H200 (2026-12-01, 128 clients, 32 rows of 602 KB) the torch
path per row (`torch.from_numpy`, `is_pinned`, a view of the staging buffer, `copy_`) left the
`h2d` stage at 2.52 ms a batch, about 80 us a row. Here a row is checked against the registered
ranges (arithmetic) and queued with one `cudaMemcpyAsync` through CuPy's runtime binding when
CuPy is there, which brought the stage to 1.29 ms in the same setting; torch's path stays the
fallback.

Each of those calls releases the GIL, and taking it back waits for whichever thread holds it,
up to the interpreter's switch interval (5 ms): with another Python thread busy, 19 rows took
103 ms to enqueue against 0.07 ms alone (`bench/h2d_probe.py`, H200, 2026-12-01), and in the
engine process the event loop is that thread. So the copies go through the CUDA driver
(`cuMemcpyHtoDAsync`) by `ctypes.PyDLL`, whose calls keep the GIL: a batch's rows are enqueued
in one stretch. Rows adjacent in an arena and in the batch go as one copy.
"""

from __future__ import annotations

import bisect
import ctypes
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

try:  # CuPy is there wherever the sparse kernels run; dense-only hosts may lack it.
    from cupy.cuda import runtime as _cudart
except ImportError:  # pragma: no cover - depends on the host
    _cudart = None


def _driver_copy():
    """cuMemcpyHtoDAsync_v2 from the CUDA driver, called with the GIL held; None without it."""
    try:
        driver = ctypes.PyDLL("libcuda.so.1")
    except OSError:
        return None
    fn = driver.cuMemcpyHtoDAsync_v2
    fn.argtypes = (ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


_memcpy_htod = _driver_copy()


class PinnedRanges:
    """Host memory ranges page-locked by the engine (cudaHostRegister), by start address.

    Registered and released on the engine process's event loop while the engine thread reads
    them: each change swaps in a new pair of tuples, so a reader always sees one whole state."""

    def __init__(self) -> None:
        self._ranges: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # starts, ends
        self._lock = threading.Lock()  # between writers only

    def add(self, address: int, size: int) -> None:
        with self._lock:
            starts, ends = self._ranges
            at = bisect.bisect(starts, address)
            self._ranges = (starts[:at] + (address,) + starts[at:],
                            ends[:at] + (address + size,) + ends[at:])  # fmt: skip

    def remove(self, address: int) -> None:
        with self._lock:
            starts, ends = self._ranges
            at = bisect.bisect_left(starts, address)
            if at < len(starts) and starts[at] == address:
                self._ranges = (starts[:at] + starts[at + 1 :], ends[:at] + ends[at + 1 :])

    def holds(self, row: np.ndarray) -> bool:
        """Whether all of `row` lies in one registered range (and can be copied as it is)."""
        if not (row.flags.c_contiguous and row.flags.writeable):
            return False
        starts, ends = self._ranges
        start = row.ctypes.data
        at = bisect.bisect(starts, start) - 1
        return at >= 0 and start + row.nbytes <= ends[at]


def runs(rows: Sequence[np.ndarray], indices: Sequence[int], row_bytes: int):
    """(first index, source address, rows) for each stretch of `indices` that is consecutive
    in the batch and adjacent in host memory: one copy each."""
    out: list[list[int]] = []
    for i in indices:
        row = rows[i]
        if row.nbytes != row_bytes:
            raise ValueError(f"row {i} has {row.nbytes} bytes, the batch's rows {row_bytes}")
        address = row.ctypes.data
        last = out[-1] if out else None
        if last is not None and last[0] + last[2] == i and last[1] + last[2] * row_bytes == address:
            last[2] += 1
        else:
            out.append([i, address, 1])
    return [tuple(r) for r in out]


def copy_rows(
    stage: torch.Tensor, rows: Sequence[np.ndarray], indices: Sequence[int], stream
) -> None:
    """Queue rows[i] -> stage[i] for each i on `stream` (the current stream): every such row
    is page-locked, C-contiguous and of stage's dtype and row shape."""
    if not indices:
        return
    # Shape arithmetic, not `stage[0]`: a torch op gives the GIL up (and waits to get it back).
    row_bytes = math.prod(stage.shape[1:]) * stage.element_size()
    if _memcpy_htod is None and _cudart is None:
        for i in indices:
            stage[i].copy_(torch.from_numpy(rows[i]), non_blocking=True)
        return
    base, handle = stage.data_ptr(), stream.cuda_stream
    for first, address, count in runs(rows, indices, row_bytes):
        dst, size = base + first * row_bytes, count * row_bytes
        if _memcpy_htod is not None:
            err = _memcpy_htod(dst, address, size, handle)
            if err:
                raise RuntimeError(f"cuMemcpyHtoDAsync failed with CUresult {err}")
        else:
            _cudart.memcpyAsync(dst, address, size, _cudart.memcpyHostToDevice, handle)
