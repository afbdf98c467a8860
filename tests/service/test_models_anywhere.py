"""A team's own manifest, outside the repository, served beside a shipped model by a server
started from another folder: the shipped manifests come with the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.service.servers import ProcessServer
from tests.v2_bodies import tensor_body

TEAM_MANIFEST = """\
architecture = "resnet18"
description = "a team's model, kept outside the repository"
labels = "imagenet"
[weights]
kind = "synthetic"
seed = 3
[pruning]
kind = "uniform"
sparsity = 0.8
include = "conv"
[preprocessing]
resize = 72
crop = 64
mean = [123.675, 116.28, 103.53]
std = [58.395, 57.12, 57.375]
"""


@pytest.mark.slow
def test_a_manifest_path_beside_a_shipped_name_from_any_folder(tmp_path: Path) -> None:
    team = tmp_path / "team-models"
    team.mkdir()
    (team / "team-net.toml").write_text(TEAM_MANIFEST)
    elsewhere = tmp_path / "somewhere-else"
    elsewhere.mkdir()
    env = {
        "ESCORT_MODELS": f"efficientnet-lite0,{team / 'team-net.toml'}",
        "ESCORT_BACKEND": "dense",
        "ESCORT_DEVICE": "cpu",
        "ESCORT_CACHE_DIR": str(tmp_path / "cache"),
    }
    server = ProcessServer("service.app", env, ready_timeout_s=300, cwd=elsewhere)
    with server, server.client() as http:
        served = {m["name"] for m in http.get("/v1/models").json()["models"]}
        assert served == {"efficientnet-lite0", "team-net"}
        assert http.get("/v2/models/team-net/ready").status_code == 200
        x = np.zeros((1, 3, 64, 64), dtype=np.float32)
        answer = http.post("/v2/models/team-net/infer", json=tensor_body(x))
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["shape"] == [1, 1000]
        assert http.get("/v2/models/efficientnet-lite0/ready").status_code == 200


@pytest.mark.slow
def test_a_models_folder_adds_models_and_names_them_in_errors(tmp_path: Path) -> None:
    team = tmp_path / "team-models"
    team.mkdir()
    (team / "team-net.toml").write_text(TEAM_MANIFEST)
    env = {
        "ESCORT_MODELS": "team-net",
        "ESCORT_MODELS_DIR": str(team),
        "ESCORT_BACKEND": "dense",
        "ESCORT_DEVICE": "cpu",
        "ESCORT_CACHE_DIR": str(tmp_path / "cache"),
    }
    server = ProcessServer("service.app", env, ready_timeout_s=300, cwd=tmp_path)
    with server, server.client() as http:
        assert http.get("/v2/models/team-net/ready").status_code == 200
    env["ESCORT_MODELS"] = "no-such-net"
    missing = ProcessServer("service.app", env, cwd=tmp_path).start()
    try:
        assert missing.wait(120) == 1
        output = missing.output()
        assert "no-such-net" in output and str(team) in output and "team-net" in output
    finally:
        missing.__exit__()
