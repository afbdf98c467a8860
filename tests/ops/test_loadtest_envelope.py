"""loadtest.envelope: p99 of think-time steps against 2 x (batch delay + full batch)."""

from __future__ import annotations

from loadtest.envelope import batch_delay_ms, envelope_markdown, envelope_section
from tests.service.fakes import FAKE_MODEL, FakeEngine
from tests.service.servers import ThreadServer, free_port


def _step(phase, users, rate, p99, compute_ms, think=0):
    return {"phase": phase, "users": users, "think_ms": think, "ok": 100, "images_per_s": rate,
            "latency_ms": {"p99": p99}, "server": {"mean_compute_ms": {phase: compute_ms}}}  # fmt: skip


STEPS = [
    _step("sparse", 64, 2500.0, 36.0, 8.4),
    _step("sparse", 128, 3500.0, 44.0, 9.0),  # the best back-to-back step: full batches
    _step("sparse", 300, 2450.0, 25.0, 4.5, think=100),
    _step("dense", 128, 3000.0, 47.0, 10.5),
    _step("dense", 300, 2100.0, 40.0, 6.0, think=100),
]


def test_each_think_step_is_read_against_its_backends_best_step() -> None:
    section = envelope_section(STEPS, 5.0)
    sparse, dense = section["rows"]
    assert (sparse["phase"], sparse["users"]) == ("sparse", 300)
    assert sparse["share"] == 2450.0 / 3500.0 and sparse["full_batch_ms"] == 9.0
    assert sparse["bound_ms"] == 2 * (5.0 + 9.0) and sparse["within"] is True
    assert dense["bound_ms"] == 2 * (5.0 + 10.5) and dense["within"] is False
    text = "\n".join(envelope_markdown({"latency_envelope": section}))
    assert "| sparse | 300 (think 100) | 70% | 25.0 | 28.0 | yes | 4.50 | 9.00 |" in text
    assert "| dense | 300 (think 100) | 70% | 40.0 | 31.0 | no |" in text


def test_without_the_delay_there_is_no_verdict() -> None:
    rows = envelope_section(STEPS, None)["rows"]
    assert [r["within"] for r in rows] == [None, None] and rows[0]["bound_ms"] is None
    assert "delay unknown" in "\n".join(envelope_markdown({"latency_envelope": {
        "delay_ms": None, "target_share": 0.7, "rows": rows}}))  # fmt: skip


def test_no_think_steps_no_section() -> None:
    assert envelope_section(STEPS[:2], 5.0)["rows"] == []
    assert envelope_markdown({"latency_envelope": envelope_section(STEPS[:2], 5.0)}) == []


def test_the_delay_is_read_from_a_real_servers_model_config() -> None:
    with ThreadServer(FakeEngine(), max_batch_delay_ms=7.5) as server:
        assert batch_delay_ms(server.url, FAKE_MODEL) == 7.5
        assert batch_delay_ms(server.url, "no-such-model") is None
    assert batch_delay_ms(f"http://127.0.0.1:{free_port()}", FAKE_MODEL, timeout_s=2) is None
