"""The wrk driver, the sink and the report's ceilings and per-layer comparison: the parser and the
Lua script without processes, then real wrk runs against loadtest.sink, the stand-in service and
the service with its fake engine. The wrk runs skip when no wrk binary is found."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.ceilings import Sink, ceilings_section
from loadtest.layerbench import (
    compare,
    layer_bench_markdown,
    layer_bench_section,
    live_layers,
    sample_mix,
)
from loadtest.promtext import parse_metrics
from loadtest.wrk import (
    MARKER,
    RequestSpec,
    WrkMissing,
    find_wrk,
    lua_script,
    parse_output,
    run_wrk,
)
from loadtest.wrksteps import wrk_step_summary
from tests.ops.conftest import ROOT, free_port, run_loadtest, serve, wait_ready

try:
    WRK = find_wrk(os.environ.get("LOADTEST_WRK", ""))
except WrkMissing:
    WRK = None
needs_wrk = pytest.mark.skipif(WRK is None, reason="no wrk binary (apt-get install wrk)")
TENSOR_BYTES = 3 * 224 * 224 * 4  # 602112: one [1, 3, 224, 224] FP32 image

CAPTURED = (MARKER + '{"requests":120,"duration_s":2.000451,"budget_reached":false,"bytes":9000,'
            '"errors":{"connect":0,"read":1,"write":0,"timeout":2,"status":7,"bad_answer":3},'
            '"statuses":{"200":110,"404":4,"503":3},"latency_s":{"p50":0.004,"p90":0.006,'
            '"p95":0.007,"p99":0.0125,"mean":0.0045,"max":0.02}}')  # fmt: skip


def test_parser_reads_the_done_line() -> None:
    result = parse_output("Running 2s test @ http://127.0.0.1:1\n" + CAPTURED + "\n")
    assert result["requests"] == 120 and result["duration_s"] == pytest.approx(2.000451)
    # 2xx less the answers without a classification; non-2xx by status, socket errors by kind.
    assert result["ok"] == 107
    assert result["errors"] == {"404": 4, "503": 3, "bad_answer": 3, "read": 1, "timeout": 2}
    assert result["latency_s"]["p99"] == pytest.approx(0.0125)
    with pytest.raises(ValueError, match="ESCORT_WRK_JSON"):
        parse_output("a Lua error, no result line")


def test_lua_script_static_and_rotating() -> None:
    spec = RequestSpec("/v2/models/m/infer", {"Inference-Header-Content-Length": "181"}, b"")
    one = lua_script(["/tmp/a b.bin"], [spec], thread_budget=7)
    assert 'path = "/v2/models/m/infer", file = "/tmp/a b.bin"' in one
    assert '["Inference-Header-Content-Length"] = "181"' in one
    assert "local budget = 7" in one and MARKER in one and "@" not in one
    two = lua_script(["/a", "/b"], [spec, spec])
    assert "local budget = 0" in two and two.count("file = ") == 2
    with pytest.raises(ValueError):
        lua_script(["/a"], [spec, spec])


def test_find_wrk_setting_and_unpacked_layout(tmp_path: Path) -> None:
    with pytest.raises(WrkMissing, match="LOADTEST_WRK"):
        find_wrk(str(tmp_path / "nowhere"))
    binary = tmp_path / "root" / "usr" / "bin" / "wrk"
    libs = tmp_path / "root" / "usr" / "lib" / "x86_64-linux-gnu"
    binary.parent.mkdir(parents=True)
    libs.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    found = find_wrk(str(binary))
    # The unpacked libraries go to wrk alone, first on its LD_LIBRARY_PATH.
    assert found.path == str(binary)
    assert found.env["LD_LIBRARY_PATH"].split(":")[0] == str(libs)


def test_ceilings_verdict_needs_twice_the_busiest_step() -> None:
    steps = [{"step": 0, "phase": "sparse", "users": 4, "requests": 1000, "window_s": 1.0},
             {"step": 1, "phase": "sparse", "users": 8, "requests": 3000, "window_s": 1.0}]  # fmt: skip
    generator, http = {"rps": 5000.0}, {"rps": 4000.0}
    low = ceilings_section(generator, http, steps)
    assert [r["generator_ratio"] for r in low["steps"]] == pytest.approx([5.0, 5000 / 3000])
    assert low["steps"][1]["http_fraction"] == pytest.approx(0.75)
    assert low["generator_not_bottleneck"] is False and "MAY BE" in low["verdict"]
    high = ceilings_section({"rps": 6000.0}, None, steps)
    assert high["generator_not_bottleneck"] is True and "not the bottleneck" in high["verdict"]
    assert ceilings_section(None, http, steps)["generator_not_bottleneck"] is None


def test_layer_comparison_uses_the_closest_batch() -> None:
    text = "\n".join(
        f'escort_layer_duration_seconds_{kind}{{model="m",backend="sparse",layer="{layer}",'
        f'op="conv"}} {value}'
        for layer, count, total in (("a", 10, 0.010), ("b", 4, 0.008))
        for kind, value in (("count", count), ("sum", total))
    )
    live = live_layers(
        parse_metrics("# TYPE escort_layer_duration_seconds histogram\n" + text), "m"
    )
    records = [{"model": "m", "backend": "sparse", "batch": b, "layer": layer, "op": "conv",
                "seconds": s} for b, layer, s in ((1, "a", 0.5), (8, "a", 0.0011),
                                                  (8, "b", 0.001), (8, "c", 0.1))]  # fmt: skip
    table = compare(live, records, "m", {"sparse": 6.5})["sparse"]
    rows = {row["layer"]: row for row in table["rows"]}
    assert table["offline_batch"] == 8
    assert rows["a"]["ratio"] == pytest.approx(0.001 / 0.0011) and rows["a"]["within"]
    assert rows["b"]["ratio"] == pytest.approx(2.0) and not rows["b"]["within"]
    assert (table["compared"], table["within"]) == (2, 1)


def _layer_scrape(layers, timings) -> dict:
    text = "# TYPE escort_layer_duration_seconds histogram\n" + "\n".join(
        f'escort_layer_duration_seconds_{kind}{{model="m",backend="sparse",layer="{layer}",'
        f'op="{op}"}} {value}'
        for layer, op, count, total in layers
        for kind, value in (("count", count), ("sum", total))
    )
    text += "\n# TYPE escort_layer_timings counter\n" + "\n".join(
        f'escort_layer_timings_total{{model="m",backend="sparse",batch="{b}"}} {n}'
        for b, n in timings
    )
    return parse_metrics(text + "\n")


def test_layer_comparison_weights_the_sampled_batch_sizes() -> None:
    # Three samples at batch 8 and one at 32: conv "a" took 1 ms and 4 ms offline, so its live
    # mean should be (3 * 1 + 4) / 4 = 1.75 ms.
    delta = _layer_scrape(
        [("a", "conv_sparse", 4, 0.0070), ("b", "conv_sparse", 4, 0.0040), ("fc", "linear", 4, 1)],
        [(8, 6), (32, 2)],  # layer timings: two layers of three samples, and of one
    )
    assert sample_mix(delta, "m") == {"sparse": {8: 6.0, 32: 2.0}}
    records = [{"model": "m", "backend": "sparse", "batch": b, "layer": layer, "op": op,
                "seconds": s} for b, layer, op, s in (
                    (8, "a", "conv_sparse", 0.001), (32, "a", "conv_sparse", 0.004),
                    (8, "b", "conv_sparse", 0.001), (32, "b", "conv_sparse", 0.0001),
                    (8, "fc", "linear", 1e-5))]  # fmt: skip
    table = compare(live_layers(delta, "m"), records, "m", {"sparse": 14.0}, sample_mix(delta, "m"))
    sparse = table["sparse"]
    rows = {row["layer"]: row for row in sparse["rows"]}
    assert sparse["offline_mix"] == {"8": 6.0, "32": 2.0} and sparse["offline_batch"] is None
    assert rows["a"]["offline_s"] == pytest.approx(0.00175) and rows["a"]["within"]
    assert rows["b"]["offline_s"] == pytest.approx(0.000775) and not rows["b"]["within"]
    assert rows["fc"]["ratio"] is None  # no record at 32: not compared against half a mix
    # A sampled size the file lacks: back to the batch closest to the mean.
    fallback = compare(live_layers(delta, "m"), records, "m", {"sparse": 14.0}, {"sparse": {16: 1}})
    assert fallback["sparse"]["offline_batch"] == 8 and fallback["sparse"]["offline_mix"] is None


def test_the_layer_section_summarises_every_step() -> None:
    full = _layer_scrape([("a", "conv_sparse", 2, 0.008)], [(32, 2)])
    mixed = _layer_scrape([("a", "conv_sparse", 2, 0.006)], [(8, 1), (32, 1)])
    records = [{"model": "m", "backend": "sparse", "batch": b, "layer": "a", "op": "conv_sparse",
                "seconds": s} for b, s in ((8, 0.001), (32, 0.004))]  # fmt: skip

    def step(users: int, batch: float) -> dict:
        return {"step": 0, "phase": "sparse", "users": users, "think_ms": 0,
                "server": {"mean_batch_size": {"sparse": batch}}}  # fmt: skip

    steps = [(step(64, 20.0), mixed), (step(128, 32.0), full)]
    section = layer_bench_section("bench.json", records, [steps[1]], "m", steps)
    low, high = (entry["backends"]["sparse"] for entry in section["steps"])
    assert low["mix"] == {"8": 1.0, "32": 1.0} and low["convs_within"] == 1  # 3 ms vs 2.5
    assert low["conv_ratio_min"] == pytest.approx(1.2) and low["outside"] == []
    assert (high["convs"], high["convs_within"], high["conv_ratio_max"]) == (1, 1, 1.0)
    markdown = "\n".join(layer_bench_markdown({"layer_bench": section}))
    assert "| 64 | sparse | 8×1, 32×1 | 1 of 1 | 1.20-1.20 | - |" in markdown
    assert "weighted by the sampled batch sizes 32×2" in markdown


@needs_wrk
def test_wrk_against_the_sink_with_602_kb_bodies() -> None:
    spec = RequestSpec("/v2/models/m/infer", {"Content-Type": "application/octet-stream"},
                       os.urandom(TENSOR_BYTES))  # fmt: skip
    with Sink(processes=1) as sink:
        result = run_wrk(WRK, (sink.url,), [spec], 4, 2, 2, 5)
        assert result["requests"] > 200 and result["ok"] == result["requests"]
        assert result["errors"] == {} and result["duration_s"] == pytest.approx(2.0, abs=0.3)
        assert 0 < result["latency_s"]["p50"] <= result["latency_s"]["p99"]
        assert result["cpu_s"] > 0  # what the wrk processes themselves used
        # Users that think 50 ms between requests send about 4 / 0.05 = 80 a second each.
        paced = run_wrk(WRK, (sink.url,), [spec], 4, 2, 2, 5, think_ms=50)
        assert 60 <= paced["requests"] <= 300 < result["requests"]
        # A budget stops each thread early; the duration is then the time it took.
        spent = run_wrk(WRK, (sink.url,), [spec, spec], 4, 2, 3, 5, budget=100)
        assert 100 <= spent["requests"] <= 104 and spent["budget_reached"]
        assert spent["duration_s"] < 2.5


@needs_wrk
@pytest.mark.parametrize("standin", [{"STANDIN_FAIL_EVERY": "10"}], indirect=True)
def test_wrk_run_against_the_standin(standin, tmp_path: Path) -> None:
    bench = tmp_path / "layers.json"
    # The stand-in observes layer i at 1 ms * (i + 1) on sparse: fc is off by 2x on purpose.
    records = [{"model": "standin-net", "backend": "sparse", "batch": 1, "layer": layer,
                "op": "sparse", "seconds": (i + 1) / 1e3 * (2 if layer == "fc" else 1)}
               for i, layer in enumerate(("conv1", "block1.conv", "block2.conv", "fc"))]  # fmt: skip
    bench.write_text(json.dumps(records))
    out = tmp_path / "report"
    env = {"LOADTEST_URL": standin.url, "LOADTEST_DRIVER": "wrk", "LOADTEST_SINK": "1",
           "LOADTEST_USERS": "2,4", "LOADTEST_DURATION_S": "4", "LOADTEST_SETTLE_S": "0",
           "LOADTEST_PROTOCOLS": "v2", "LOADTEST_V2_INPUT": "tensor", "LOADTEST_COMPARE": "1",
           "LOADTEST_BACKENDS": "sparse", "LOADTEST_LAYER_BENCH": str(bench),
           "LOADTEST_OUT": str(out)}  # fmt: skip
    result = run_loadtest(env)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["load_generator"]["driver"] == "wrk"
    for step in report["steps"]:
        assert step["ok"] > 50 and set(step["by_backend"]) == {"sparse"}
        # Every 10th request is refused with 503, and wrk counts what the server counted.
        assert step["errors"]["503"] == pytest.approx(step["requests"] / 10, abs=2)
        served = step["server"]["requests_by_code"]
        assert served.get("200", 0) == pytest.approx(step["ok"], abs=2 * step["users"])
        assert 0 < step["latency_ms"]["p50"] <= step["latency_ms"]["p99"]
    ceilings = report["ceilings"]
    assert ceilings["load_generator_rps"] > 2 * max(s["throughput_rps"] for s in report["steps"])
    assert ceilings["generator_not_bottleneck"] is True
    table = report["layer_bench"]["backends"]["sparse"]
    within = {row["layer"]: row["within"] for row in table["rows"]}
    assert within == {"conv1": True, "block1.conv": True, "block2.conv": True, "fc": False}
    markdown = (out / "report.md").read_text()
    assert "## Ceilings" in markdown and "3 of 4 layers within 25%" in markdown


@needs_wrk
def test_wrk_counts_4xx_from_the_service_and_measures_the_http_ceiling(tmp_path: Path) -> None:
    def fake(port: int, name: str, **extra: str):
        env = {"ESCORT_HOST": "127.0.0.1", "ESCORT_PORT": str(port), "ESCORT_GRPC": "false",
               "ESCORT_MODELS": "fake-net",
               "ESCORT_BACKENDS": "sparse", "ESCORT_BACKEND": "sparse", "ESCORT_LOG_LEVEL": "warning",
               "PYTHONPATH": str(ROOT), **extra}  # fmt: skip
        command = [sys.executable, "-m", "tests.service.fake_server"]
        return serve(command, env, port, tmp_path / f"{name}.log")

    small, null_port = free_port(), free_port()
    # Bodies over ESCORT_MAX_REQUEST_BYTES get 413: every request is an error, none is ok.
    with (
        fake(small, "small", ESCORT_MAX_REQUEST_BYTES="2000") as refusing,
        fake(null_port, "null") as null,
    ):
        wait_ready(refusing, 60)
        wait_ready(null, 60)
        env = {"LOADTEST_URL": refusing.url, "LOADTEST_DRIVER": "wrk", "LOADTEST_USERS": "2",
               "LOADTEST_DURATION_S": "2", "LOADTEST_SETTLE_S": "0", "LOADTEST_PROTOCOLS": "v2",
               "LOADTEST_V2_INPUT": "tensor", "LOADTEST_CEILING_URL": null.url,
               "LOADTEST_OUT": str(tmp_path / "report")}  # fmt: skip
        result = run_loadtest(env)
    assert result.returncode == 1, result.stderr  # nothing was answered correctly
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    (step,) = report["steps"]
    assert step["requests"] > 20 and step["ok"] == 0
    assert step["errors"] == {"413": step["requests"]}
    http = report["ceilings"]["http_layer"]
    assert http["rps"] > 20 and http["ok"] == http["requests"] and http["errors"] == {}
    # The processes of the layout report by role; the generator's own CPU is beside them.
    assert set(http["server_cores"]) == {"engine", "worker"}
    assert http["server_cores"]["worker"] > 0
    assert http["generator_cores"] > 0
    assert "cores busy: engine" in (tmp_path / "report" / "report.md").read_text()


def test_sink_answers_keep_alive_requests() -> None:
    port = free_port()
    code = (
        "import http.client; c = http.client.HTTPConnection('127.0.0.1', PORT, timeout=5)\n"
        "for n in (0, 10, 700000):\n"
        "    c.request('POST', '/x', body=b'z' * n); r = c.getresponse(); b = r.read()\n"
        "    assert r.status == 200 and b'probabilities' in b, (r.status, b)\n"
        "print('ok')"
    ).replace("PORT", str(port))
    sink = [sys.executable, "-m", "loadtest.sink", "--port", str(port), "--processes", "2"]
    with subprocess.Popen(sink, cwd=ROOT, stderr=subprocess.PIPE) as process:
        try:
            assert b"sink:" in process.stderr.readline()
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                  timeout=30)  # fmt: skip
            assert done.stdout.strip() == "ok", done.stderr
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_a_wrk_step_reports_each_worker_s_share() -> None:
    scrape = parse_metrics(
        "# TYPE escort_worker_cpu_seconds counter\n"
        'escort_worker_cpu_seconds_total{worker="11"} 4\n'
        'escort_worker_cpu_seconds_total{worker="12"} 2\n'
        "# TYPE escort_worker_connections gauge\n"
        'escort_worker_connections{worker="11"} 30\n'
        'escort_worker_connections{worker="12"} 20\n'
    )
    result = {"duration_s": 10.0, "cpu_s": 1.0, "requests": 100, "ok": 100, "errors": {},
              "latency_s": {"p50": 0.01, "p95": 0.02, "p99": 0.03}, "bytes": 1}  # fmt: skip
    spec = RequestSpec("/v2/models/m/infer", {}, b"x", backend="sparse")
    summary = wrk_step_summary(0, "sparse", 50, result, scrape, "m", [spec])
    assert summary["server"]["workers"] == {"cores": [0.2, 0.4], "connections": [20.0, 30.0]}
    # The connections come from the scrape taken while wrk ran, when one is given: by the
    # closing scrape wrk has left, and the worker that answers it holds only that scrape.
    during = parse_metrics(
        "# TYPE escort_worker_connections gauge\n"
        'escort_worker_connections{worker="11"} 26\n'
        'escort_worker_connections{worker="12"} 24\n'
    )
    summary = wrk_step_summary(0, "sparse", 50, result, scrape, "m", [spec], during)
    assert summary["server"]["workers"] == {"cores": [0.2, 0.4], "connections": [24.0, 26.0]}
