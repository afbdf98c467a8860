"""Rows from page-locked host memory to the device, with as little host work per row as can be.

A batch's rows are separate views into the HTTP workers' arenas, which the engine page-locks
(`Engine.pin_host_memory`). Measured on the H200 (2026-12-01, 32 rows of 602 KB), the torch path
per row (`torch.from_numpy`, `is_pinned`, a view of the staging buffer, `copy_`) cost about
80 us of host time under load, so a batch's copies took 2.5 ms to queue although the bus moves
them in well under 1 ms. Here a row is checked against the registered ranges (arithmetic) and
queued with one `cudaMemcpyAsync` through CuPy's runtime binding when CuPy is there; torch's
path stays the fallback.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence

import numpy as np
import torch

try:  # CuPy is there wherever the sparse kernels run; dense-only hosts may lack it.
    from cupy.cuda import runtime as _cudart
except ImportError:  # pragma: no cover - depends on the host
    _cudart = None


class PinnedRanges:
    """Host memory ranges page-locked by the engine (cudaHostRegister), by start address."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._lock = threading.Lock()

    def add(self, address: int, size: int) -> None:
        with self._lock:
            at = bisect.bisect(self._starts, address)
            self._starts.insert(at, address)
            self._ends.insert(at, address + size)

    def remove(self, address: int) -> None:
        with self._lock:
            at = bisect.bisect_left(self._starts, address)
            if at < len(self._starts) and self._starts[at] == address:
                del self._starts[at], self._ends[at]

    def holds(self, row: np.ndarray) -> bool:
        """Whether all of `row` lies in one registered range (and can be copied as it is)."""
        if not (row.flags.c_contiguous and row.flags.writeable):
            return False
        start = row.ctypes.data
        at = bisect.bisect(self._starts, start) - 1
        return at >= 0 and start + row.nbytes <= self._ends[at]


def copy_rows(
    stage: torch.Tensor, rows: Sequence[np.ndarray], indices: Sequence[int], stream
) -> None:
    """Queue rows[i] -> stage[i] for each i on `stream` (the current stream): every such row
    is page-locked, C-contiguous and of stage's dtype and row shape."""
    if not indices:
        return
    row_bytes = stage[0].numel() * stage.element_size()
    if _cudart is None:
        for i in indices:
            stage[i].copy_(torch.from_numpy(rows[i]), non_blocking=True)
        return
    base, handle = stage.data_ptr(), stream.cuda_stream
    kind = _cudart.memcpyHostToDevice
    for i in indices:
        row = rows[i]
        if row.nbytes != row_bytes:
            raise ValueError(f"row {i} has {row.nbytes} bytes, the batch's rows {row_bytes}")
        _cudart.memcpyAsync(base + i * row_bytes, row.ctypes.data, row_bytes, kind, handle)
