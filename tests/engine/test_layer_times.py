"""bench/layer_times on the CPU: a tiny conv net, records for every layer, JSON and markdown."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bench import layer_times
from service.engine.engine import ModelSource
from service.engine.protocol import Preprocessing
from tests.engine.conftest import magnitude_prune

PREP = Preprocessing(resize=36, crop=32, mean=(120.0, 115.0, 100.0), std=(60.0, 60.0, 60.0))


def tiny_source() -> ModelSource:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()
    labels = tuple(str(i) for i in range(10))
    return ModelSource("tiny-convnet", "custom", magnitude_prune(model, 0.8), PREP, labels)


def test_records_for_every_layer_and_totals(plan_factory) -> None:
    records = layer_times.run(
        tiny_source(), ("dense", "sparse"), 2, "fp32", torch.device("cpu"),
        plan_factory=plan_factory, calls=3, reps=3,
    )  # fmt: skip
    keys = {"model", "backend", "batch", "precision", "device", "layer", "op", "seconds"}
    assert all(keys <= set(r) and r["seconds"] > 0 for r in records)
    for backend, conv in (("dense", "conv_dense"), ("sparse", "conv_sparse")):
        rows = [r for r in records if r["backend"] == backend]
        layers = {r["layer"]: r["op"] for r in rows if r["layer"] != "(model)"}
        # BN is folded into conv 0 and both ReLUs fused: the convs remain, plus pool/fc.
        assert [name for name, op in layers.items() if op == conv] == ["0", "3"]
        assert layers["7"] == "linear" and layers["5"] == "pool"
        totals = {r["op"]: r["seconds"] for r in rows if r["layer"] == "(model)"}
        assert set(totals) == {"model_graph", "layers_sum"}
        assert all(r["batch"] == 2 and r["device"] == "cpu" for r in rows)


def test_cli_writes_json_and_markdown(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(layer_times, "load_source", lambda name, models_dir: tiny_source())
    out = tmp_path / "r" / "layers.json"
    argv = ["--model", "tiny-convnet", "--backends", "dense", "--batch", "2", "--device", "cpu"]
    assert layer_times.main([*argv, "--out", str(out), "--calls", "2", "--reps", "3"]) == 0
    records = json.loads(out.read_text())
    assert isinstance(records, list)
    convs = [r for r in records if r["op"] == "conv_dense"]
    assert len(convs) == 2 and all(r["seconds"] > 0 and r["model"] == "tiny-convnet" for r in convs)
    md = out.with_suffix(".md").read_text()
    assert "## tiny-convnet / dense, batch 2, fp32" in md and "| 3 | conv_dense |" in md


def test_cli_benches_each_batch_of_a_list(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(layer_times, "load_source", lambda name, models_dir: tiny_source())
    out = tmp_path / "layers.json"
    argv = ["--model", "tiny-convnet", "--backends", "dense", "--batch", "1,3", "--device", "cpu"]
    assert layer_times.main([*argv, "--out", str(out), "--calls", "2", "--reps", "3"]) == 0
    records = json.loads(out.read_text())
    convs = {(r["layer"], r["batch"]) for r in records if r["op"] == "conv_dense"}
    assert convs == {("0", 1), ("3", 1), ("0", 3), ("3", 3)}


@pytest.mark.parametrize("bad", ["", "0", "2,x", "-4"])
def test_cli_refuses_a_bad_batch_list(bad: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        layer_times.main(["--batch", bad, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "batch" in capsys.readouterr().err
