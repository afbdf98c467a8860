"""The report's conclusion line, the points the plots draw, their titles, and the per-layer plot
(slowest first; omitted without layer data), on reports built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.config import load_config
from loadtest.report import to_markdown
from loadtest.summary import conclusion, empty_step_reason, plotted_series, title_suffix
from tests.ops.conftest import assert_png


def _step(phase: str, users: int, img_s: float, p99: float | None, ok: int = 100, **extra):
    stats = {"requests": ok, "ok": ok, "throughput_rps": img_s, "images_per_s": img_s,
             "latency_ms": {"p50": p99 and p99 / 2, "p95": p99, "p99": p99, "mean": p99,
                            "max": p99}, "errors": {}}  # fmt: skip
    server = {"mean_batch_size": {}, "mean_queue_ms": None, "mean_compute_ms": {}}
    return {"step": 0, "phase": phase, "users": users, "window_s": 2.0, **stats,
            "by_backend": {phase: stats}, "by_protocol": {}, "server": server, **extra}  # fmt: skip


def _report(mode: str, steps: list[dict], layers: list[dict] | None = None) -> dict:
    backends = sorted({s["phase"] for s in steps} - {"mixed"}) or ["sparse", "dense"]
    return {"model": "resnet50", "mode": mode, "backends": backends, "steps": steps,
            "server": {"device": "cuda:0", "backends": backends}, "layers": layers or [],
            "layer_totals_ms": {}, "plots": [], "totals": {"requests": 1, "ok": 1,
            "errors_by_status": {}}, "started_at": "t", "wall_s": 1.0,
            "config": load_config({}).public()}  # fmt: skip


COMPARE = [_step("sparse", 4, 377, 12.0), _step("sparse", 64, 2178.4, 49.2),
           _step("dense", 4, 321, 14.0), _step("dense", 64, 1550.2, 148.4)]  # fmt: skip


def test_compare_conclusion_names_the_ratio_rates_and_p99() -> None:
    assert conclusion(_report("compare", COMPARE)) == (
        "sparse 1.4x dense at 64 users (2,178 vs 1,550 img/s), p99 49 vs 148 ms"
    )
    close = [_step("dense", 8, 1000, 20.0), _step("sparse", 8, 1040, 19.0)]
    assert conclusion(_report("compare", close)).startswith("sparse 1.04x dense at 8 users")


def test_conclusion_of_mixed_runs_and_of_runs_without_answers() -> None:
    mixed = [_step("mixed", 1, 90, 11.0), _step("mixed", 16, 1234.5, 48.0), _step("mixed", 64, 1200, 90)]  # fmt: skip
    assert conclusion(_report("mixed", mixed)) == (
        "Best step: 1,234 img/s at 16 users (mixed over sparse, dense), p99 48 ms."
    )
    empty = _step("mixed", 4, 0.0, None, ok=0, empty_reason="all 9 requests failed (status 503: 9)")  # fmt: skip
    report = _report("mixed", [empty])
    assert (
        conclusion(report) == "No step got a correct answer: all 9 requests failed (status 503: 9)."
    )
    assert to_markdown(report).splitlines()[2] == f"**{conclusion(report)}**"
    # One backend answered nothing at the best step's concurrency: said, not divided by zero.
    lopsided = [_step("sparse", 4, 500, 10.0), _step("dense", 4, 0.0, None, ok=0)]
    assert conclusion(_report("compare", lopsided)) == (
        "sparse 500 img/s at 4 users, dense no correct answer"
    )


def test_empty_steps_are_not_plotted() -> None:
    steps = COMPARE + [_step("dense", 128, 0.0, None, ok=0)]
    lines = plotted_series(_report("compare", steps))
    assert [u for u, _ in lines["dense"]] == [4, 64] and [u for u, _ in lines["sparse"]] == [4, 64]
    assert plotted_series(_report("compare", [_step("dense", 1, 0.0, None, ok=0)])) == {}


def test_empty_step_reasons() -> None:
    failed = {"ok": 0, "requests": 7, "errors": {"0": 2, "503": 5}, "window_s": 3.0}
    assert empty_step_reason(failed, None, None) == (
        "all 7 requests failed (status 0: 2, 503: 5; 0 means no answer)"
    )
    nothing = {**failed, "requests": 0, "errors": {}}
    assert "2 still in flight" in empty_step_reason(nothing, 2, None)
    assert empty_step_reason(nothing, 0, None) == "no request was sent in the 3.0 s window"
    assert "not ready (x answered 503)" in empty_step_reason(nothing, 0, "x answered 503")
    assert empty_step_reason({**failed, "ok": 1}, 0, None) == ""


def test_titles_carry_the_device_and_the_backends() -> None:
    assert title_suffix(_report("compare", COMPARE)) == "on cuda:0, dense vs sparse"
    mixed = _report("mixed", [_step("mixed", 1, 90, 11.0)])
    assert title_suffix(mixed) == "on cuda:0, sparse vs dense (mixed)"
    assert (
        title_suffix({**mixed, "server": {}, "backends": []})
        == "on unknown device, default backend"
    )


def _layers(count: int) -> list[dict]:
    # In model order; layer i takes (i * 7) % count ms on dense and half that on sparse.
    return [{"layer": f"l{i}", "mean_ms": {"dense": (i * 7) % count + 1.0, "sparse": ((i * 7) % count + 1) / 2}}
            for i in range(count)]  # fmt: skip


def test_layer_plot_slowest_first_and_the_default_shows_some(tmp_path: Path) -> None:
    from loadtest.plots import LAYERS_PNG, slowest_layers, write_plots

    report = _report("compare", COMPARE, _layers(40))
    default = load_config({}).plot_layers
    shown = slowest_layers(report, default)
    assert 8 <= len(shown) == min(default, 40)
    times = [row["mean_ms"]["dense"] for row in shown]
    assert times == sorted(times, reverse=True) and times[0] == 40.0
    assert [r["layer"] for r in slowest_layers(report, 3)] == [r["layer"] for r in shown[:3]]
    assert LAYERS_PNG in write_plots(report, tmp_path, default)
    assert_png(tmp_path / LAYERS_PNG)
    # Layers seen on one backend only rank by that backend's time.
    lone = _report("compare", COMPARE, [{"layer": "a", "mean_ms": {"dense": 1.0}},
                                        {"layer": "b", "mean_ms": {"sparse": 2.0}}])  # fmt: skip
    assert [r["layer"] for r in slowest_layers(lone, 5)] == ["b", "a"]


@pytest.mark.parametrize(
    "layers", [[], [{"layer": "a", "op": {}, "mean_ms": {}, "dense_over_sparse": None}]]
)
def test_layer_plot_omitted_without_layer_data(tmp_path: Path, layers: list) -> None:
    from loadtest.plots import LAYERS_PNG, main, write_plots

    report = _report("compare", COMPARE, layers)
    (tmp_path / LAYERS_PNG).write_bytes(b"a stale figure")
    assert write_plots(report, tmp_path) == ["latency_vs_concurrency.png",
                                             "throughput_vs_concurrency.png"]  # fmt: skip
    assert not (tmp_path / LAYERS_PNG).exists()
    assert "no per-layer samples" in report["plots_omitted"][LAYERS_PNG]
    # Drawn again later from the JSON (a host without matplotlib): the same omission, in words.
    (tmp_path / "report.json").write_text(json.dumps(report))
    assert main([str(tmp_path)]) == 0
    markdown = (tmp_path / "report.md").read_text()
    assert f"- `{LAYERS_PNG}` not drawn: no per-layer samples" in markdown
    assert f"![{LAYERS_PNG}]" not in markdown
