"""The load test's pieces without a server: settings, /metrics arithmetic, report and plots."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from loadtest.config import LoadtestConfigError, check_loopback, load_config
from loadtest.images import make_variants
from loadtest.layerbench import fuller
from loadtest.promtext import (
    bucket_counts,
    counter_by,
    delta,
    delta_all,
    histogram_by,
    histogram_quantile,
    parse_metrics,
)
from loadtest.report import build_report, step_summary, to_markdown, write_report
from tests.ops.conftest import assert_png


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000", "http://127.9.8.7:1/", "http://localhost:8000", "http://[::1]:8000",
     "https://LOCALHOST"],
)  # fmt: skip
def test_loopback_targets_are_accepted(url: str) -> None:
    assert check_loopback(url) == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    ["http://10.0.0.1:8000", "http://192.168.1.5", "http://example.com", "http://0.0.0.0:8000",
     "http://127.0.0.1.nip.io", "http://localhost.example.com", "ftp://127.0.0.1",
     "http://user:pw@127.0.0.1", "http://[::2]:8000", "127.0.0.1:8000"],
)  # fmt: skip
def test_other_targets_are_refused(url: str) -> None:
    with pytest.raises(LoadtestConfigError):
        check_loopback(url)


def test_config_reads_the_contract_variables() -> None:
    config = load_config(
        {
            "LOADTEST_URL": "http://127.0.0.1:9001,http://127.0.0.1:9002",
            "LOADTEST_DURATION_S": "12.5",
            "LOADTEST_OUT": "/tmp/x",
            "LOADTEST_USERS": "1, 3,9",
            "LOADTEST_COMPARE": "1",
            "LOADTEST_BACKENDS": "Sparse,dense",
            "LOADTEST_PROTOCOLS": "v2",
        }
    )
    assert config.urls == ("http://127.0.0.1:9001", "http://127.0.0.1:9002")
    assert config.scrape_urls == ("http://127.0.0.1:9001/metrics", "http://127.0.0.1:9002/metrics")
    assert (config.duration_s, config.out, config.users) == (12.5, "/tmp/x", (1, 3, 9))
    assert config.compare and config.backends == ("sparse", "dense")
    assert config.protocols == ("v2",)
    defaults = load_config({})
    assert defaults.urls == ("http://127.0.0.1:8000",) and defaults.out == "loadtest-report"


@pytest.mark.parametrize(
    "env",
    [{"LOADTEST_USERS": "1,x"}, {"LOADTEST_USERS": "0"}, {"LOADTEST_DURATION_S": "soon"},
     {"LOADTEST_DURATION_S": "0"}, {"LOADTEST_PROTOCOLS": "grpc"}, {"LOADTEST_COMPARE": "maybe"},
     {"LOADTEST_METRICS_URLS": "http://10.1.1.1/metrics"}, {"LOADTEST_V2_INPUT": "png"},
     {"LOADTEST_IMAGE_SIDES": "640,2"}, {"LOADTEST_PROCESSES": "0"}],
)  # fmt: skip
def test_bad_settings_name_the_variable(env: dict[str, str]) -> None:
    with pytest.raises(LoadtestConfigError, match=next(iter(env))):
        load_config(env)


def test_image_variants_are_real_images_of_several_sizes() -> None:
    from io import BytesIO

    from PIL import Image

    variants = make_variants()
    assert len({(v.width, v.height) for v in variants}) >= 8
    assert {v.content_type for v in variants} == {"image/jpeg", "image/png"}
    for variant in variants:
        with Image.open(BytesIO(variant.data)) as image:
            assert image.size == (variant.width, variant.height)


def test_preprocessed_tensors_match_the_service_preprocessing() -> None:
    """LOADTEST_V2_INPUT=tensor sends what the server would have computed from the photo."""
    from loadtest.images import preprocessed_tensor

    prep = {"resize": 256, "crop": 224, "mean": [123.675, 116.28, 103.53],
            "std": [58.395, 57.12, 57.375]}  # fmt: skip
    preprocess = pytest.importorskip("service.preprocess")
    from service.engine.protocol import Preprocessing

    spec = Preprocessing(256, 224, tuple(prep["mean"]), tuple(prep["std"]))
    for variant in make_variants(long_sides=(640, 160)):
        ours = np.frombuffer(preprocessed_tensor(variant, prep), dtype="<f4").reshape(3, 224, 224)
        theirs = preprocess.preprocess_image(variant.data, spec, 10**8)
        # Crop offsets round differently by a pixel at most: close, not identical.
        assert np.abs(ours - theirs).mean() < 0.1, variant.name
        assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.98, variant.name


BEFORE = """\
# TYPE escort_requests_total counter
escort_requests_total{model="m",backend="sparse",protocol="v1",code="200"} 10
escort_requests_total{model="m",backend="dense",protocol="v2",code="503"} 1
# TYPE escort_batch_size histogram
escort_batch_size_bucket{model="m",backend="sparse",le="1.0"} 4
escort_batch_size_bucket{model="m",backend="sparse",le="2.0"} 4
escort_batch_size_bucket{model="m",backend="sparse",le="4.0"} 5
escort_batch_size_bucket{model="m",backend="sparse",le="+Inf"} 5
escort_batch_size_count{model="m",backend="sparse"} 5
escort_batch_size_sum{model="m",backend="sparse"} 8
# TYPE escort_queue_depth gauge
escort_queue_depth{model="m"} 7
"""
AFTER = """\
# TYPE escort_requests_total counter
escort_requests_total{model="m",backend="sparse",protocol="v1",code="200"} 25
escort_requests_total{model="m",backend="dense",protocol="v2",code="503"} 4
escort_requests_total{model="other",backend="dense",protocol="v2",code="200"} 100
# TYPE escort_batch_size histogram
escort_batch_size_bucket{model="m",backend="sparse",le="1.0"} 5
escort_batch_size_bucket{model="m",backend="sparse",le="2.0"} 7
escort_batch_size_bucket{model="m",backend="sparse",le="4.0"} 11
escort_batch_size_bucket{model="m",backend="sparse",le="+Inf"} 11
escort_batch_size_count{model="m",backend="sparse"} 11
escort_batch_size_sum{model="m",backend="sparse"} 28
# TYPE escort_queue_depth gauge
escort_queue_depth{model="m"} 2
"""


def test_deltas_of_counters_histograms_and_gauges() -> None:
    change = delta(parse_metrics(BEFORE), parse_metrics(AFTER))
    codes = counter_by(change, "escort_requests_total", ("code",), {"model": "m"})
    assert codes == {("200",): 15.0, ("503",): 3.0}
    batches = histogram_by(change, "escort_batch_size", ("backend",), {"model": "m"})
    sparse = batches[("sparse",)]
    # 6 batches holding 20 images: 1 of size 1, 2 of size 2, 3 of sizes 3-4.
    assert sparse["count"] == 6 and sparse["sum"] == 20
    assert sparse["mean"] == pytest.approx(20 / 6)
    assert bucket_counts(sparse["buckets"]) == {"1.0": 1, "2.0": 2, "4.0": 3, "+Inf": 0}
    assert change[("escort_queue_depth", (("model", "m"),))] == 2  # a gauge is read as is


def test_a_restarted_server_counts_from_zero_and_replicas_add_up() -> None:
    before = parse_metrics(AFTER)
    after = parse_metrics(BEFORE)  # every counter went down: the server restarted
    change = delta(before, after)
    assert counter_by(change, "escort_requests_total", ("code",), {"model": "m"}) == {
        ("200",): 10.0,
        ("503",): 1.0,
    }
    both = delta_all([parse_metrics(BEFORE)] * 2, [parse_metrics(AFTER)] * 2)
    assert counter_by(both, "escort_requests_total", ("code",), {"model": "m"})[("200",)] == 30


def test_histogram_quantile_matches_prometheus_interpolation() -> None:
    buckets = {"0.1": 50.0, "0.2": 90.0, "0.4": 100.0, "+Inf": 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.3)
    assert histogram_quantile(0.5, {"+Inf": 0.0}) is None


@dataclass
class FakeSample:
    latency_ms: float
    status: int
    ok: bool
    protocol: str
    backend: str
    images: int = 1


LAYERS = """\
# TYPE escort_layer_duration_seconds histogram
escort_layer_duration_seconds_bucket{model="m",backend="sparse",layer="conv1",op="sparse",le="+Inf"} 4
escort_layer_duration_seconds_count{model="m",backend="sparse",layer="conv1",op="sparse"} 4
escort_layer_duration_seconds_sum{model="m",backend="sparse",layer="conv1",op="sparse"} 0.004
escort_layer_duration_seconds_bucket{model="m",backend="dense",layer="conv1",op="dense",le="+Inf"} 2
escort_layer_duration_seconds_count{model="m",backend="dense",layer="conv1",op="dense"} 2
escort_layer_duration_seconds_sum{model="m",backend="dense",layer="conv1",op="dense"} 0.006
escort_layer_duration_seconds_bucket{model="m",backend="dense",layer="fc",op="linear",le="+Inf"} 2
escort_layer_duration_seconds_count{model="m",backend="dense",layer="fc",op="linear"} 2
escort_layer_duration_seconds_sum{model="m",backend="dense",layer="fc",op="linear"} 0.001
"""


def _report(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    latencies = rng.gamma(2.0, 10.0, size=400)
    samples = (
        [
            FakeSample(float(x), 200, True, "v1" if i % 2 else "v2", "sparse" if i % 3 else "dense")
            for i, x in enumerate(latencies)
        ]
        + [FakeSample(1.0, 503, False, "v2", "dense")] * 7
        + [FakeSample(30000, 0, False, "v1", "sparse")]
    )
    step = step_summary(0, "mixed", 4, 2.0, samples, parse_metrics(AFTER), "m")
    config = load_config({"LOADTEST_OUT": str(tmp_path)}).public()
    return build_report(config, "m", {"device": "cpu"}, "mixed", ["sparse", "dense"], [step],
                        parse_metrics(LAYERS), "2026-01-01T00:00:00+00:00", 3.0)  # fmt: skip


def test_step_summary_is_exact(tmp_path: Path) -> None:
    report = _report(tmp_path)
    step = report["steps"][0]
    latencies = np.random.default_rng(0).gamma(2.0, 10.0, size=400)
    assert step["requests"] == 408 and step["ok"] == 400
    assert step["throughput_rps"] == pytest.approx(200.0)
    for q in (50, 95, 99):
        assert step["latency_ms"][f"p{q}"] == pytest.approx(np.percentile(latencies, q))
    assert step["errors"] == {"0": 1, "503": 7}
    assert report["totals"]["errors_by_status"] == {"0": 1, "503": 7}
    assert step["by_backend"]["dense"]["errors"] == {"503": 7}
    assert step["by_protocol"]["v1"]["ok"] + step["by_protocol"]["v2"]["ok"] == 400
    assert step["server"]["mean_batch_size"] == {"sparse": pytest.approx(28 / 11)}
    assert step["server"]["requests_by_code"] == {"200": 25, "503": 4}


def test_layer_table_compares_backends(tmp_path: Path) -> None:
    report = _report(tmp_path)
    conv1, fc = report["layers"]
    assert conv1["layer"] == "conv1" and fc["layer"] == "fc"
    assert conv1["mean_ms"] == {"sparse": pytest.approx(1.0), "dense": pytest.approx(3.0)}
    assert conv1["dense_over_sparse"] == pytest.approx(3.0)
    assert fc["dense_over_sparse"] is None and fc["op"] == {"dense": "linear"}
    assert report["layer_totals_ms"] == {"sparse": pytest.approx(1.0), "dense": pytest.approx(3.5)}


def test_report_files_and_plots(tmp_path: Path) -> None:
    from loadtest.plots import write_plots

    report = _report(tmp_path)
    report["plots"] = write_plots(report, tmp_path)
    json_path, md_path = write_report(report, tmp_path)
    assert json.loads(json_path.read_text())["steps"][0]["ok"] == 400
    markdown = md_path.read_text()
    for heading in ("## Steps", "## Backends side by side", "## Per-layer latency", "## Plots"):
        assert heading in markdown
    assert "| conv1 |" in markdown and "3.00" in markdown
    for name in report["plots"]:
        assert_png(tmp_path / name)
    empty = {**report, "layers": [], "layer_totals_ms": {}}
    assert "No layer samples" in to_markdown(empty)
    # No layer data: no layer plot (not an empty frame), and the report says why.
    assert write_plots(empty, tmp_path / "empty") == ["latency_vs_concurrency.png",
                                                      "throughput_vs_concurrency.png"]  # fmt: skip
    assert not (tmp_path / "empty" / "layers_sparse_vs_dense.png").exists()
    assert "ESCORT_LAYER_PROFILE_EVERY" in empty["plots_omitted"]["layers_sparse_vs_dense.png"]
    assert "`layers_sparse_vs_dense.png` not drawn: no per-layer samples" in to_markdown(empty)


def test_plots_can_be_drawn_later_from_the_json(tmp_path: Path) -> None:
    from loadtest import plots

    report = _report(tmp_path)
    write_report(report, tmp_path)  # as a run on a host without matplotlib leaves it
    assert "## Plots" not in (tmp_path / "report.md").read_text()
    assert plots.main([str(tmp_path)]) == 0
    assert "![latency_vs_concurrency.png]" in (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "report.json").read_text())["plots"] == [
        plots.LATENCY_PNG, plots.THROUGHPUT_PNG, plots.LAYERS_PNG
    ]  # fmt: skip
    for name in (plots.LATENCY_PNG, plots.THROUGHPUT_PNG, plots.LAYERS_PNG):
        assert_png(tmp_path / name)


def test_the_layer_comparison_takes_the_step_with_the_fullest_batches() -> None:
    def step(users: int, batch: float) -> dict:
        return {"users": users, "server": {"mean_batch_size": {"sparse": batch}}}

    closed, thinking = step(128, 31.9), step(280, 15.0)  # more users, emptier batches
    assert fuller(closed, None)
    assert not fuller(thinking, (closed, {}))
    assert fuller(closed, (thinking, {}))
    assert fuller(step(256, 31.9), (closed, {}))  # a tie goes to more users
    assert not fuller(step(64, 0.0) | {"server": {"mean_batch_size": {}}}, (closed, {}))
