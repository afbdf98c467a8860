"""PinnedRanges and the copy runs: which rows lie in registered memory, and which go as one
copy (pure arithmetic, no GPU)."""

from __future__ import annotations

import numpy as np
import pytest

from service.engine.hostcopy import PinnedRanges, runs


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


def test_rows_adjacent_in_memory_and_in_the_batch_go_as_one_copy() -> None:
    arena = np.zeros((8, 3, 4, 4), dtype=np.float32)
    size = arena[0].nbytes
    base = arena.ctypes.data
    # Batch positions 0-2 hold slots 2, 3, 4 (one run); 3 holds slot 0; 4-5 hold slots 6, 7.
    rows = [arena[2], arena[3], arena[4], arena[0], arena[6], arena[7]]
    assert runs(rows, range(6), size) == [
        (0, base + 2 * size, 3, False),
        (3, base, 1, False),
        (4, base + 6 * size, 2, False),
    ]
    # Adjacent slots that are not consecutive in the batch stay apart: a skipped index breaks
    # the run, and so does reversed order.
    assert runs(rows, [0, 2], size) == [
        (0, base + 2 * size, 1, False),
        (2, base + 4 * size, 1, False),
    ]
    backwards = [arena[3], arena[2]]
    assert [r[2] for r in runs(backwards, range(2), size)] == [1, 1]
    assert runs(rows, [], size) == []


def test_a_row_of_another_size_is_refused() -> None:
    arena = np.zeros((2, 3, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="row 1 has"):
        runs([arena[0], arena[1, :2]], range(2), arena[0].nbytes)


def test_rows_a_mirror_holds_go_from_the_device_and_runs_never_mix_sides() -> None:
    arena = np.zeros((4, 3, 4, 4), dtype=np.float32)
    size = arena[0].nbytes
    rows = [arena[0], arena[1], arena[2], arena[3]]
    mirror = 1 << 40  # a device buffer's address: the mirror of arena row 0
    # Rows 0-1 fresh on the device (adjacent there too), row 2 only on the host, row 3 fresh.
    on_device = [mirror, mirror + size, 0, mirror + 3 * size]
    assert runs(rows, range(4), size, on_device) == [
        (0, mirror, 2, True),
        (2, arena.ctypes.data + 2 * size, 1, False),
        (3, mirror + 3 * size, 1, True),
    ]
    # Nothing fresh: the host path, coalesced as before.
    assert runs(rows, range(4), size, [0, 0, 0, 0]) == [(0, arena.ctypes.data, 4, False)]
