"""The stage breakdown: the routes time receive/parse/encode, and the report's table reads
them (and the engine's device stages when there are any) from the server's metrics."""

from __future__ import annotations

from loadtest.promtext import parse_metrics
from loadtest.stages import (
    STAGES,
    TAIL_STAGES,
    cores_busy,
    cores_markdown,
    stage_means,
    stage_quantiles,
    stages_markdown,
    tails_markdown,
    worker_spread,
)
from tests.service.fakes import FAKE_MODEL, FakeEngine, marked_tensor
from tests.service.servers import app_client
from tests.v2_bodies import tensor_body


def test_the_routes_time_their_stages_and_the_report_tables_them() -> None:
    with app_client(FakeEngine(delay_s=0.02)) as client:
        for i in range(3):
            body = tensor_body(marked_tensor(i / 10), parameters={"backend": "dense"})
            assert client.post(f"/v2/models/{FAKE_MODEL}/infer", json=body).status_code == 200
        scrape = parse_metrics(client.get("/metrics").text)
    means = stage_means(scrape, FAKE_MODEL)
    assert set(means) == {"dense"}
    assert {"receive", "parse", "dispatch", "encode"} <= set(means["dense"])
    assert all(0 < ms < 1000 for ms in means["dense"].values())
    # The round trip holds the batch (20 ms in this engine); the worker's own stages do not.
    assert means["dense"]["dispatch"] >= 20 > means["dense"]["parse"]
    step = {
        "phase": "dense",
        "users": 4,
        "server": {"mean_stage_ms": means, "mean_queue_ms": 1.5, "mean_compute_ms": {"dense": 2.0}},
    }
    lines = stages_markdown({"steps": [step]})
    assert lines[0] == "## Where the time goes"
    row = next(line for line in lines if line.startswith("| dense | 4 | dense |"))
    cells = [c.strip() for c in row.strip("|").split("|")][3:]
    assert len(cells) == len(STAGES)
    assert cells[STAGES.index("queue")] == "1.5" and cells[STAGES.index("compute")] == "2"
    assert cells[STAGES.index("replay")] == "-"  # no device stages on the CPU
    assert stages_markdown({"steps": [{**step, "server": {"mean_stage_ms": {}}}]}) == []


def test_cores_busy_per_role_and_its_table() -> None:
    scrape = parse_metrics(
        "# TYPE escort_process_cpu_seconds counter\n"
        'escort_process_cpu_seconds_total{role="engine"} 9.0\n'
        'escort_process_cpu_seconds_total{role="worker"} 30.0\n'
    )
    cores = cores_busy(scrape, 10.0)
    assert cores == {"engine": 0.9, "worker": 3.0}
    step = {"phase": "sparse", "users": 64, "server": {"cores_busy": cores},
            "driver": {"cores_busy": 1.25}}  # fmt: skip
    lines = cores_markdown({"steps": [step, {**step, "users": 1, "server": {}, "driver": {}}]})
    assert lines[0] == "## CPU by process"
    assert "| sparse | 64 | 0.9 | 3 | 1.25 | - | - |" in lines  # no per-worker series
    assert not any(line.startswith("| sparse | 1 |") for line in lines)  # nothing measured


def test_stage_p99_from_the_buckets_and_the_tail_table() -> None:
    # 100 round trips: 98 under 10 ms, 2 between 30 and 40 ms; to_engine all under 1 ms.
    lines = ["# TYPE escort_stage_duration_seconds histogram"]
    for stage, counts in {"dispatch": {"0.01": 98, "0.03": 98, "0.04": 100, "+Inf": 100},
                          "to_engine": {"0.001": 100, "+Inf": 100}}.items():  # fmt: skip
        for le, n in counts.items():
            lines.append(f'escort_stage_duration_seconds_bucket{{model="m",backend="sparse",'
                         f'stage="{stage}",le="{le}"}} {n}')  # fmt: skip
        lines.append(
            f'escort_stage_duration_seconds_count{{model="m",backend="sparse",stage="{stage}"}} 100'
        )
        lines.append(
            f'escort_stage_duration_seconds_sum{{model="m",backend="sparse",stage="{stage}"}} 1'
        )
    tails = stage_quantiles(parse_metrics("\n".join(lines) + "\n"), "m")
    # rank 99 of 100 sits halfway through the 30-40 ms bucket's two samples
    assert abs(tails["sparse"]["dispatch"] - 35.0) < 1e-6
    assert tails["sparse"]["to_engine"] <= 1.0
    step = {"phase": "sparse", "users": 250, "think_ms": 100, "latency_ms": {"p99": 41.0},
            "server": {"p99_stage_ms": tails, "request_p99_ms": {"sparse": 38.0},
                       "queue_p99_ms": 4.0, "compute_p99_ms": {"sparse": 9.5}}}  # fmt: skip
    table = tails_markdown({"steps": [step]})
    assert table[0] == "## Where the tail goes"
    row = next(line for line in table if line.startswith("| sparse | 250 (think 100) | sparse |"))
    cells = [c.strip() for c in row.strip("|").split("|")][3:]
    assert cells[:2] == ["41", "38"]
    parts = dict(zip(TAIL_STAGES, cells[2:], strict=True))
    assert parts["dispatch"] == "35" and parts["queue"] == "4" and parts["compute"] == "9.5"
    assert parts["wait"] == "-"
    assert tails_markdown({"steps": [{**step, "server": {}}]}) == []


def test_each_workers_share_and_connections_and_their_table() -> None:
    scrape = parse_metrics(
        "# TYPE escort_worker_cpu_seconds counter\n"
        'escort_worker_cpu_seconds_total{worker="11"} 2.0\n'
        'escort_worker_cpu_seconds_total{worker="12"} 8.0\n'
        'escort_worker_cpu_seconds_total{worker="13"} 4.0\n'
        "# TYPE escort_worker_connections gauge\n"
        'escort_worker_connections{worker="11"} 3\n'
        'escort_worker_connections{worker="12"} 140\n'
        'escort_worker_connections{worker="13"} 25\n'
    )
    spread = worker_spread(scrape, 10.0)
    assert spread == {"cores": [0.2, 0.4, 0.8], "connections": [3.0, 25.0, 140.0]}
    step = {"phase": "dense", "users": 275, "server": {"cores_busy": {"worker": 1.4},
            "workers": spread}, "driver": {"cores_busy": 0.5}}  # fmt: skip
    lines = cores_markdown({"steps": [step]})
    assert "| dense | 275 | - | 1.4 | 0.5 | 0.20 / 0.40 / 0.80 | 3 / 25 / 140 |" in lines
