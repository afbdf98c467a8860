"""Rows from page-locked host memory to the device, with as little host work per row as can be.

A batch's rows are separate views into the HTTP workers' arenas, which the engine page-locks
(`Engine.pin_host_memory`). On the H200 (2026-12-01, 128 clients, 32 rows of 602 KB) the torch
path per row (`torch.from_numpy`, `is_pinned`, a view of the staging buffer, `copy_`) left the
`h2d` stage at 2.52 ms a batch, about 80 us a row. Here a row is checked against the registered
ranges (arithmetic) and queued with one `cudaMemcpyAsync` through CuPy's runtime binding when
CuPy is there, which brought the stage to 1.29 ms in the same setting; torch's path stays the
fallback.
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
