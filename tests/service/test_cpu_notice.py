"""On the CPU, serving sparse layers says what it costs: one log line at start-up and a field in
the model card, measured on this machine against dense."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.service.servers import ProcessServer
from tests.service.test_models_anywhere import TEAM_MANIFEST


@pytest.mark.slow
def test_the_cpu_reference_is_announced_with_its_cost(tmp_path: Path) -> None:
    manifest = tmp_path / "team-net.toml"
    manifest.write_text(TEAM_MANIFEST)
    env = {
        "ESCORT_MODELS": str(manifest),
        "ESCORT_BACKEND": "sparse",
        "ESCORT_BACKENDS": "sparse,dense",
        "ESCORT_DEVICE": "cpu",
        "ESCORT_CACHE_DIR": str(tmp_path / "cache"),
    }
    server = ProcessServer("service.app", env, ready_timeout_s=300, cwd=tmp_path)
    with server, server.client() as http:
        card = http.get("/v1/models").json()["models"][0]
        output = server.output()
    cost = card["cpu_reference"]
    sparse = cost["backends"]["sparse"]
    assert "dense" not in cost["backends"]  # dense runs no sparse layer
    assert sparse["sparse_layers"] == 20  # every conv of resnet18
    assert sparse["batch1_ms"] > 0 and cost["dense_batch1_ms"] > 0
    assert sparse["vs_dense"] == pytest.approx(sparse["batch1_ms"] / cost["dense_batch1_ms"], 0.02)
    notices = [line for line in output.splitlines() if "CPU reference" in line]
    assert len(notices) == 1, output
    assert "team-net/sparse" in notices[0] and "ms dense" in notices[0]


def test_dense_alone_on_the_cpu_says_nothing(tmp_path: Path) -> None:
    import torch

    from service.engine.assemble import build_backend
    from service.engine.build import prepare_model
    from service.engine.cpu_cost import cpu_reference_cost
    from service.engine.engine import load_source

    manifest = tmp_path / "team-net.toml"
    manifest.write_text(TEAM_MANIFEST)
    source = load_source(str(manifest), "")
    prepared = prepare_model(source.module, (3, 64, 64))
    dense = build_backend(prepared, "dense", torch.device("cpu"), "fp32")
    assert cpu_reference_cost("team-net", prepared, {"dense": dense}) is None
