"""SlotArena: shared memory cut into fixed-size slots, one preprocessed image (and, after the
batch, its probabilities) per slot.

An HTTP worker creates its arena and owns its free list; the engine core process attaches to
it by name, reads the input rows in place (page-locked, so they go to the GPU by DMA) and
writes the outputs back in place. A slot goes back on the free list only when the engine
process has answered for it, so a row is never overwritten while a copy may still read it.
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
from collections import deque
from collections.abc import Sequence
from multiprocessing import shared_memory

import numpy as np

PAGE = mmap.PAGESIZE
SHM_FOLDER = "/dev/shm"


def _round_up(size: int, to: int = PAGE) -> int:
    return -(-size // to) * to


class ArenaSpaceError(OSError):
    """Not enough room in /dev/shm for an arena; the message says which setting to lower."""


class SlotArena:
    def __init__(
        self, shm: shared_memory.SharedMemory, slots: int, in_bytes: int, out_bytes: int
    ) -> None:
        self.shm = shm
        self.slots = slots
        # Page-aligned rows: each DMA copy starts on a page, and rows never share one.
        self.in_bytes = _round_up(in_bytes)
        self.out_bytes = _round_up(out_bytes, 64)
        self._bytes = np.frombuffer(shm.buf, dtype=np.uint8)
        self._out_base = slots * self.in_bytes
        self._free: deque[int] = deque(range(slots))

    @staticmethod
    def size_for(slots: int, in_bytes: int, out_bytes: int) -> int:
        return slots * (_round_up(in_bytes) + _round_up(out_bytes, 64))

    @classmethod
    def create(cls, slots: int, in_bytes: int, out_bytes: int) -> SlotArena:
        size = cls.size_for(slots, in_bytes, out_bytes)
        if os.path.isdir(SHM_FOLDER):
            stat = os.statvfs(SHM_FOLDER)
            free = stat.f_bavail * stat.f_frsize
            if free < size:
                # Touching pages past a full tmpfs is a SIGBUS, not an error: refuse up front.
                raise ArenaSpaceError(
                    f"{SHM_FOLDER} has {free >> 20} MiB free, and an HTTP worker needs "
                    f"{size >> 20} MiB for {slots} image slots: lower ESCORT_WORKER_SLOTS or "
                    "ESCORT_WORKERS, or give the container more shared memory (docker "
                    "--shm-size, a Kubernetes emptyDir of medium Memory on /dev/shm)"
                )
        return cls(shared_memory.SharedMemory(create=True, size=size), slots, in_bytes, out_bytes)

    @classmethod
    def attach(cls, name: str, slots: int, in_bytes: int, out_bytes: int) -> SlotArena:
        # The processes of one service share the supervisor's resource tracker, where the
        # creating worker registered the name; attaching registers it again (a no-op), and
        # the worker's unlink unregisters it once. Nothing to undo here.
        shm = shared_memory.SharedMemory(name=name)
        return cls(shm, slots, in_bytes, out_bytes)

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def address(self) -> int:
        return int(self._bytes.ctypes.data)

    @property
    def size(self) -> int:
        return int(self._bytes.size)

    @property
    def free(self) -> int:
        return len(self._free)

    def reserve(self, count: int) -> list[int] | None:
        """`count` free slots, or None when fewer are free (nothing is taken then)."""
        if count > len(self._free):
            return None
        return [self._free.popleft() for _ in range(count)]

    def release(self, slots: Sequence[int]) -> None:
        self._free.extend(slots)

    def row(self, slot: int, dtype: np.dtype | str, shape: Sequence[int]) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        if count * dtype.itemsize > self.in_bytes or not 0 <= slot < self.slots:
            raise ValueError(f"a {list(shape)} {dtype} row does not fit slot {slot}")
        start = slot * self.in_bytes
        return self._bytes[start : start + count * dtype.itemsize].view(dtype).reshape(shape)

    def output(self, slot: int, classes: int) -> np.ndarray:
        if classes * 4 > self.out_bytes or not 0 <= slot < self.slots:
            raise ValueError(f"{classes} outputs do not fit slot {slot}")
        start = self._out_base + slot * self.out_bytes
        return self._bytes[start : start + classes * 4].view(np.float32)

    def write_rows(self, slots: Sequence[int], rows: Sequence[np.ndarray]) -> None:
        for slot, row in zip(slots, rows, strict=True):
            self.row(slot, row.dtype, row.shape)[...] = row

    def read_outputs(self, slots: Sequence[int], classes: int) -> np.ndarray:
        out = np.empty((len(slots), classes), dtype=np.float32)
        for i, slot in enumerate(slots):
            out[i] = self.output(slot, classes)
        return out

    def close(self, unlink: bool = False) -> None:
        self._bytes = np.empty(0, dtype=np.uint8)
        try:
            self.shm.close()
        except BufferError:
            # A row view is still alive, most often in the frame of a cancelled request
            # (a reference cycle through its exception): collect those, then try again.
            gc.collect()
            try:
                self.shm.close()
            except BufferError:
                # Still held: the mapping goes with the process. Keep SharedMemory.__del__
                # from trying again at exit, where it would only print the same error.
                self.shm.close = lambda: None  # type: ignore[method-assign]
        if unlink:
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
