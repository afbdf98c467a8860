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

Even so, at 64 clients `h2d` (0.71 ms for 18 rows) lay on the path of every batch launched to
an idle device: 11% of the sparse replay (run 14). `DeviceMirror` takes the bus off that path:
the engine keeps a device copy of each arena, a row is copied into it when its request arrives
(`Engine.prefetch_rows`, on the mirror's stream, while earlier batches replay and the batch
fills), and the batch gathers its rows device to device.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import math
import threading
from collections.abc import Sequence

import numpy as np
import torch

try:  # CuPy is there wherever the sparse kernels run; dense-only hosts may lack it.
    from cupy.cuda import runtime as _cudart
except ImportError:  # pragma: no cover - depends on the host
    _cudart = None


def _driver_copy(name: str, source: type):
    """A cuMemcpy*Async_v2 of the CUDA driver, called with the GIL held; None without it."""
    try:
        driver = ctypes.PyDLL("libcuda.so.1")
    except OSError:
        return None
    fn = getattr(driver, name)
    fn.argtypes = (ctypes.c_uint64, source, ctypes.c_size_t, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


log = logging.getLogger("escort.hostcopy")
_memcpy_htod = _driver_copy("cuMemcpyHtoDAsync_v2", ctypes.c_void_p)
_memcpy_dtod = _driver_copy("cuMemcpyDtoDAsync_v2", ctypes.c_uint64)


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


class DeviceMirror:
    """A device copy of each registered host range (an arena), filled row by row as requests
    arrive: `push` queues a row's copy on the mirror's stream and marks it fresh; `sources`
    hands a batch the device addresses of its fresh rows (and forgets them). A row counts as
    fresh from its push until it is taken: a worker rewrites a slot only after the engine
    answered for it, and the next request in that slot is pushed again.

    Pushed on the engine process's event loop, taken on an engine thread: one dict holds the
    fresh rows (single dict operations under the GIL), and the ranges change as a whole."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # Start addresses, and per start (end, device buffer) in the same order.
        self._ranges: tuple[tuple[int, ...], tuple[tuple[int, torch.Tensor], ...]] = ((), ())
        self._fresh: dict[int, tuple[int, int]] = {}  # host address -> (bytes, device address)
        self._lock = threading.Lock()  # between writers only
        self._failed = False  # a push failed (said once in the log)

    @staticmethod
    def available() -> bool:
        return _memcpy_htod is not None and _memcpy_dtod is not None

    def add(self, address: int, size: int) -> None:
        buffer = torch.empty(size, dtype=torch.uint8, device=self.device)
        with self._lock:
            starts, spans = self._ranges
            at = bisect.bisect(starts, address)
            self._ranges = (starts[:at] + (address,) + starts[at:],
                            spans[:at] + ((address + size, buffer),) + spans[at:])  # fmt: skip

    def remove(self, address: int) -> None:
        torch.cuda.synchronize(self.device)  # no gather may still read the buffer
        with self._lock:
            starts, spans = self._ranges
            at = bisect.bisect_left(starts, address)
            if at < len(starts) and starts[at] == address:
                end = spans[at][0]
                self._ranges = (starts[:at] + starts[at + 1 :], spans[:at] + spans[at + 1 :])
                for host in [a for a in self._fresh if address <= a < end]:
                    self._fresh.pop(host, None)

    def push(self, rows: Sequence[np.ndarray]) -> None:
        """Queue each float row that lies in a mirrored range to its place on the device."""
        starts, spans = self._ranges
        handle = self.stream.cuda_stream
        for row in rows:
            address = row.ctypes.data
            at = bisect.bisect(starts, address) - 1
            inside = at >= 0 and address + row.nbytes <= spans[at][0]
            if not inside or row.dtype.kind != "f" or not row.flags.c_contiguous:
                self._fresh.pop(address, None)  # whatever was pushed there is stale now
                continue
            device = spans[at][1].data_ptr() + (address - starts[at])
            err = _memcpy_htod(device, address, row.nbytes, handle)
            if err:  # the row crosses at launch instead; say so once
                self._fresh.pop(address, None)
                if not self._failed:
                    self._failed = True
                    log.warning("cuMemcpyHtoDAsync to the device mirror failed (CUresult "
                                "%d): rows are copied when their batch launches", err)  # fmt: skip
                continue
            self._fresh[address] = (row.nbytes, device)

    def sources(self, rows: Sequence[np.ndarray], indices: Sequence[int]) -> list[int]:
        """Per index, the device address of its row's pushed copy, or 0 where there is none;
        every row named counts as taken."""
        out = []
        for i in indices:
            row = rows[i]
            fresh = self._fresh.pop(row.ctypes.data, None)
            out.append(fresh[1] if fresh is not None and fresh[0] == row.nbytes else 0)
        return out


def runs(
    rows: Sequence[np.ndarray],
    indices: Sequence[int],
    row_bytes: int,
    on_device: Sequence[int] | None = None,
) -> list[tuple[int, int, int, bool]]:
    """(first index, source address, rows, from the device) for each stretch of `indices`
    that is consecutive in the batch, adjacent at its source and from the same side: one copy
    each. A row's source is `on_device[k]` (a mirror's copy) where that is not 0, else the
    row itself."""
    out: list[list] = []
    for k, i in enumerate(indices):
        row = rows[i]
        if row.nbytes != row_bytes:
            raise ValueError(f"row {i} has {row.nbytes} bytes, the batch's rows {row_bytes}")
        device = on_device[k] if on_device is not None else 0
        address = device or row.ctypes.data
        last = out[-1] if out else None
        if (
            last is not None
            and last[3] == bool(device)
            and last[0] + last[2] == i
            and last[1] + last[2] * row_bytes == address
        ):
            last[2] += 1
        else:
            out.append([i, address, 1, bool(device)])
    return [tuple(r) for r in out]


def copy_rows(
    stage: torch.Tensor,
    rows: Sequence[np.ndarray],
    indices: Sequence[int],
    stream,
    mirror: DeviceMirror | None = None,
) -> None:
    """Queue rows[i] -> stage[i] for each i on `stream` (the current stream): every such row
    is page-locked, C-contiguous and of stage's dtype and row shape. Rows a mirror holds fresh
    copies of are gathered from it on the device, after the copies pushed so far."""
    if not indices:
        return
    # Shape arithmetic, not `stage[0]`: a torch op gives the GIL up (and waits to get it back).
    row_bytes = math.prod(stage.shape[1:]) * stage.element_size()
    if _memcpy_htod is None and _cudart is None:
        for i in indices:
            stage[i].copy_(torch.from_numpy(rows[i]), non_blocking=True)
        return
    on_device = mirror.sources(rows, indices) if mirror is not None else None
    if on_device is not None and any(on_device):
        stream.wait_stream(mirror.stream)
    base, handle = stage.data_ptr(), stream.cuda_stream
    for first, address, count, from_device in runs(rows, indices, row_bytes, on_device):
        dst, size = base + first * row_bytes, count * row_bytes
        if from_device:
            err = _memcpy_dtod(dst, address, size, handle)
        elif _memcpy_htod is not None:
            err = _memcpy_htod(dst, address, size, handle)
        else:
            _cudart.memcpyAsync(dst, address, size, _cudart.memcpyHostToDevice, handle)
            err = 0
        if err:
            raise RuntimeError(f"cuMemcpy{'DtoD' if from_device else 'HtoD'}Async: CUresult {err}")
