"""PinnedRanges: which rows lie in memory the engine registered (pure arithmetic, no GPU)."""

from __future__ import annotations

import numpy as np

from service.engine.hostcopy import PinnedRanges


def test_a_row_is_held_only_inside_one_registered_range() -> None:
    arena = np.zeros((4, 3, 8, 8), dtype=np.float32)
    other = np.zeros((2, 3, 8, 8), dtype=np.float32)
    ranges = PinnedRanges()
    assert not ranges.holds(arena[0])
    ranges.add(arena.ctypes.data, arena.nbytes)
    assert all(ranges.holds(arena[i]) for i in range(4))
    assert not ranges.holds(other[0])
    # A row that runs past the range's end, a strided view and a read-only view are refused.
    big = np.zeros(100, dtype=np.float32)
    ranges.add(big.ctypes.data, 40 * 4)
    assert ranges.holds(big[:40]) and ranges.holds(big[10:20]) and not ranges.holds(big[30:50])
    assert not ranges.holds(arena[:, :, ::2])
    frozen = arena[1]
    frozen.flags.writeable = False
    assert not ranges.holds(frozen)
    ranges.add(other.ctypes.data, other.nbytes)
    assert ranges.holds(other[1]) and ranges.holds(arena[3])
    ranges.remove(arena.ctypes.data)
    assert not ranges.holds(arena[3]) and ranges.holds(other[1])
    ranges.remove(12345)  # not registered: nothing happens
