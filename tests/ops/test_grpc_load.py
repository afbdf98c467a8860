"""loadtest/grpc_load against a real server with the fake engine: counts, latencies, errors."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import grpc_load
from tests.service.fakes import FAKE_MODEL
from tests.service.servers import ProcessServer


def test_grpc_load_drives_a_server_and_reports(tmp_path: Path) -> None:
    env = {"ESCORT_MODELS": FAKE_MODEL, "ESCORT_WORKERS": "2", "ESCORT_BACKENDS": "sparse,dense"}
    with ProcessServer("tests.service.fake_server", env) as server:
        out = tmp_path / "grpc.json"
        argv = ["--target", server.grpc_url, "--model", FAKE_MODEL, "--users", "4",
                "--processes", "2", "--duration", "1.5", "--settle", "0.3",
                "--backend", "dense", "--out", str(out)]  # fmt: skip
        assert grpc_load.main(argv) == 0
        result = json.loads(out.read_text())
        assert result["ok"] > 10 and result["errors"] == {}
        assert result["images_per_s"] == result["ok"] / 1.5
        lat = result["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
        assert result["generator_cores"] > 0
        # A backend the server does not run: every call an error, and the exit code says so.
        bad = grpc_load.run(server.grpc_url, FAKE_MODEL, 2, 0.5, 1, 0.1, backend="auto")
        assert bad["ok"] == 0 and set(bad["errors"]) == {"INVALID_ARGUMENT"}


def test_the_comparison_tables_both_protocols_by_users(tmp_path: Path) -> None:
    def grpc(users: int, rate: float) -> dict:
        return {"users": users, "images_per_s": rate, "errors": {}, "generator_cores": 1.5,
                "latency_ms": {"p50": 10.0, "p95": 12.0, "p99": 14.0}}  # fmt: skip

    (tmp_path / "grpc-64.json").write_text(json.dumps(grpc(64, 3000.0)))
    (tmp_path / "grpc-128.json").write_text(json.dumps(grpc(128, 3400.0)))
    (tmp_path / "grpc-ceiling.json").write_text(json.dumps(grpc(128, 6800.0)))
    (tmp_path / "rest").mkdir()
    step = {"users": 64, "images_per_s": 3100.0, "errors": {"503": 2},
            "latency_ms": {"p50": 20.0, "p99": 30.0}}  # fmt: skip
    (tmp_path / "rest" / "report.json").write_text(json.dumps({"steps": [step]}))
    assert grpc_load.main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "grpc_vs_rest.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("| 64") or
             line.startswith("| 128")]  # fmt: skip
    assert lines == [
        "| 64 | REST (V2 binary) | 3,100 | 20.0 | 30.0 | {'503': 2} |",
        "| 64 | gRPC | 3,000 | 10.0 | 14.0 | - |",
        "| 128 | gRPC | 3,400 | 10.0 | 14.0 | - |",
    ]
    assert "6,800 req/s at 128 users (1.50 cores), 2.0x the busiest gRPC step" in text
