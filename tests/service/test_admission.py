"""Backlog arithmetic: when queued rows would be computed, and which requests admission keeps."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, Counter

from service.admission import Backlog, admit
from service.errors import DeadlineExceededError, OverloadedError

NOW = 1000.0
BATCH_S = 0.04


def test_finish_at_counts_whole_batches_behind_the_backlog() -> None:
    backlog = Backlog(clear_at=NOW + 1.0, batch_s=BATCH_S, max_batch=4)
    assert backlog.finish_at(1, NOW) == pytest.approx(NOW + 1.0 + BATCH_S)
    assert backlog.finish_at(4, NOW) == pytest.approx(NOW + 1.0 + BATCH_S)
    assert backlog.finish_at(5, NOW) == pytest.approx(NOW + 1.0 + 2 * BATCH_S)
    # A backlog that cleared in the past starts from now.
    assert Backlog(NOW - 5, BATCH_S, 4).finish_at(4, NOW) == pytest.approx(NOW + BATCH_S)


def test_a_busy_queue_keeps_a_quarter_of_the_time_left_in_reserve() -> None:
    deadline = NOW + 2.0
    reserve = 0.25 * 2.0  # a quarter of the 2 s left
    edge = deadline - reserve - BATCH_S  # clear_at at which one more batch just fits
    assert Backlog(edge - 0.01, BATCH_S, 4).admits(4, deadline, NOW)
    assert not Backlog(edge + 0.01, BATCH_S, 4).admits(4, deadline, NOW)


def test_a_short_deadline_keeps_whole_batches_in_reserve() -> None:
    deadline = NOW + 0.2  # a quarter of it (50 ms) is less than two batches (80 ms)
    edge = deadline - 2 * BATCH_S - BATCH_S  # two batches in reserve
    assert Backlog(edge - 0.001, BATCH_S, 4).admits(1, deadline, NOW)
    assert not Backlog(edge + 0.001, BATCH_S, 4).admits(1, deadline, NOW)


def test_an_idle_queue_only_asks_whether_the_rows_own_batches_fit() -> None:
    idle = Backlog(NOW - 1.0, BATCH_S, 4)
    assert idle.admits(8, NOW + 2 * BATCH_S + 1e-6, NOW)  # no reserve: nobody ahead
    assert not idle.admits(9, NOW + 2 * BATCH_S + 1e-6, NOW)


def test_admit_refuses_with_429_behind_a_queue_and_504_when_idle() -> None:
    registry = CollectorRegistry()
    rejected = Counter("rejected", "test", ["model", "reason"], registry=registry)

    def refused() -> float | None:
        return registry.get_sample_value("rejected_total", {"model": "m", "reason": "overloaded"})

    now = time.monotonic()  # admit reads the clock itself
    with pytest.raises(OverloadedError, match="overloaded") as error:
        admit(Backlog(now + 10.0, BATCH_S, 4), "m", "sparse", 1, now + 1.0, 3, rejected)
    assert error.value.headers == {"Retry-After": "3"}
    assert refused() == 1
    # A deadline already in the past on an idle server: a retry would fail the same way.
    with pytest.raises(DeadlineExceededError, match="shorter than"):
        admit(Backlog(0.0, BATCH_S, 4), "m", "sparse", 4, 0.0, 3, rejected)
    assert refused() == 2
