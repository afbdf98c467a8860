"""SlotArena: slots, rows and outputs in shared memory, seen from two attachments."""

from __future__ import annotations

import os

import numpy as np
import pytest

from service.core import arena as arena_module
from service.core.arena import ArenaSpaceError, SlotArena

SHAPE = (3, 8, 8)
IN_BYTES = int(np.prod(SHAPE)) * 4


@pytest.fixture
def arena():
    created = SlotArena.create(4, IN_BYTES, 10 * 4)
    yield created
    created.close(unlink=True)


def test_rows_written_by_one_side_are_read_in_place_by_the_other(arena: SlotArena) -> None:
    other = SlotArena.attach(arena.name, arena.slots, IN_BYTES, 40)
    try:
        slots = arena.reserve(2)
        assert slots is not None and len(set(slots)) == 2
        rows = np.random.default_rng(0).normal(size=(2, *SHAPE)).astype(np.float32)
        arena.write_rows(slots, rows)
        seen = [other.row(s, np.float32, SHAPE) for s in slots]
        np.testing.assert_array_equal(np.stack(seen), rows)
        for s, value in zip(slots, (0.25, 0.75), strict=True):
            other.output(s, 10)[:] = value
        out = arena.read_outputs(slots, 10)
        np.testing.assert_array_equal(out, np.array([[0.25] * 10, [0.75] * 10], np.float32))
        half = rows.astype(np.float16)
        arena.write_rows(slots, half)
        np.testing.assert_array_equal(other.row(slots[1], "<f2", SHAPE), half[1])
        del seen
    finally:
        other.close()


def test_reserve_takes_all_or_nothing_and_release_gives_back(arena: SlotArena) -> None:
    first = arena.reserve(3)
    assert first is not None and arena.free == 1
    assert arena.reserve(2) is None and arena.free == 1  # nothing taken on refusal
    arena.release(first)
    assert arena.free == 4 and arena.reserve(4) is not None


def test_rows_and_outputs_that_do_not_fit_are_refused(arena: SlotArena) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        arena.row(0, np.float32, (3, 64, 64))
    with pytest.raises(ValueError, match="does not fit"):
        arena.row(4, np.float32, SHAPE)
    with pytest.raises(ValueError, match="do not fit"):
        arena.output(0, 1000)


def test_rows_are_page_aligned(arena: SlotArena) -> None:
    for slot in range(arena.slots):
        assert arena.row(slot, np.float32, SHAPE).ctypes.data % arena_module.PAGE == 0


def test_too_little_shared_memory_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class Tiny:
        f_bavail, f_frsize = 10, 4096

    monkeypatch.setattr(
        arena_module.os, "statvfs", lambda p: Tiny() if p == arena_module.SHM_FOLDER else real(p)
    )
    with pytest.raises(ArenaSpaceError, match="ESCORT_WORKER_SLOTS"):
        SlotArena.create(1024, 602_112, 4000)
