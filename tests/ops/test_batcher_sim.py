"""bench/batcher_sim: the batcher's policy over measured batch times, simulated."""

from __future__ import annotations

import pytest

from bench import batcher_sim


def test_a_lone_request_waits_the_delay_then_its_batch() -> None:
    r = batcher_sim.simulate(0.001, 1.6, 0.234, requests=2000, handoff_ms=5.0)
    assert r["mean_batch"] == pytest.approx(1.0, abs=0.05)
    # 5 ms delay + a batch of 1 (1.6 + 0.234) + 5 ms of hand-offs.
    assert r["p50_ms"] == pytest.approx(5.0 + 1.834 + 5.0, abs=0.05)
    assert r["busy"] < 0.05


def test_more_load_fills_batches_and_the_device() -> None:
    light = batcher_sim.simulate(0.5, 1.6, 0.234, requests=20_000)
    heavy = batcher_sim.simulate(2.5, 1.6, 0.234, requests=20_000)
    assert heavy["mean_batch"] > 2 * light["mean_batch"]
    assert heavy["busy"] > 0.9 > light["busy"]
    assert heavy["p99_ms"] > heavy["p50_ms"] > light["p50_ms"] - 5.0


def test_device_pauses_lengthen_the_tail() -> None:
    calm = batcher_sim.simulate(2.5, 1.6, 0.234, requests=20_000)
    paused = batcher_sim.simulate(2.5, 1.6, 0.234, requests=20_000, pause_ms=30.0, every=50)
    assert paused["p99_ms"] > calm["p99_ms"] + 5.0


def test_the_table_prints(capsys) -> None:
    assert batcher_sim.main(["--share", "0.5", "--requests", "2000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| backend | share |") and len(lines) == 2 + 2 * 2
