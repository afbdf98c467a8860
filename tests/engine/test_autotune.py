"""auto's choices follow the timings, per layer and bucket, and survive on disk."""

from __future__ import annotations

import json

import torch
import torchvision

from service.engine.assemble import build_backend
from service.engine.autotune import TuningCache, choose, make_timer, tuning_key
from service.engine.backends import AutoConv, DenseConv
from service.engine.build import prepare_model
from service.engine.card import model_card
from tests.engine.conftest import magnitude_prune

CPU = torch.device("cpu")


def _prepared():
    model = magnitude_prune(torchvision.models.alexnet().eval(), 0.8)
    return prepare_model(model, (3, 64, 64))


class FakeTimer:
    """Sparse wins on layers named in `sparse_wins` at small batches; dense elsewhere."""

    def __init__(self, sparse_wins: set[str]) -> None:
        self.sparse_wins = sparse_wins
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, op, layer, batch: int) -> float:
        kind = op.op_kind
        self.calls.append((layer.name, kind, batch))
        fast = layer.name in self.sparse_wins and batch <= 2
        if kind == "conv_sparse":
            return 1e-4 if fast else 3e-4
        return 2e-4


def test_choose_prefers_dense_on_ties() -> None:
    assert choose(2.0, 1.0) == "sparse"
    assert choose(1.0, 2.0) == "dense"
    assert choose(1.0, 1.0) == "dense"


def test_auto_follows_injected_timings(tmp_path, stand_in_plan) -> None:
    prepared = _prepared()
    timer = FakeTimer({"features.3", "features.8"})
    cache = TuningCache(tmp_path / "autotune.json")
    built = build_backend(
        prepared,
        "auto",
        CPU,
        "fp32",
        buckets=(1, 2, 4),
        cache=cache,
        timer=timer,
        plan_factory=stand_in_plan,
    )
    assert built.choices["features.3"] == {1: "sparse", 2: "sparse", 4: "dense"}
    assert built.choices["features.0"] == {1: "dense", 2: "dense", 4: "dense"}
    mod = built.module
    assert isinstance(mod.get_submodule("features.3"), AutoConv)
    # Never sparse alone, but switchable: the whole-model check may still run it sparse.
    never = mod.get_submodule("features.0")
    assert isinstance(never, AutoConv) and set(never.choice.values()) == {"dense"}
    assert len(timer.calls) == 5 * 3 * 2  # layers x buckets x backends
    # The card carries the measured times and the resulting speedups.
    card = model_card("a", "alexnet", prepared, {"auto": built}, device="cpu", precision="fp32")
    json.dumps(card)
    by_name = {layer["name"]: layer for layer in card["layers"]}
    assert by_name["features.3"]["time_s"]["sparse"]["1"] == 1e-4
    assert by_name["features.3"]["speedup"]["1"] == 2.0
    assert by_name["features.3"]["backend"]["auto"] == "mixed"
    assert by_name["features.0"]["backend"]["auto"] == "dense"


def test_auto_is_exact_whatever_it_picks(stand_in_plan) -> None:
    prepared = _prepared()
    built = build_backend(
        prepared,
        "auto",
        CPU,
        "fp32",
        buckets=(1, 2),
        timer=FakeTimer({"features.0"}),
        plan_factory=stand_in_plan,
    )
    dense = build_backend(prepared, "dense", CPU, "fp32")
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        for n in (1, 3):
            torch.testing.assert_close(built.module(x[:n]), dense.module(x[:n]))


def test_cache_is_reused_and_keyed_by_pattern(tmp_path, stand_in_plan) -> None:
    path = tmp_path / "cache" / "autotune.json"
    prepared = _prepared()
    first = FakeTimer({"features.6"})
    build_backend(
        prepared,
        "auto",
        CPU,
        "fp32",
        buckets=(1,),
        cache=TuningCache(path),
        timer=first,
        plan_factory=stand_in_plan,
    )
    assert path.exists() and first.calls
    data = json.loads(path.read_text())
    assert len(data["entries"]) == 5

    # A fresh process reads the decisions back and times nothing.
    second = FakeTimer(set())
    built = build_backend(
        prepared,
        "auto",
        CPU,
        "fp32",
        buckets=(1,),
        cache=TuningCache(path),
        timer=second,
        plan_factory=stand_in_plan,
    )
    assert second.calls == []
    assert built.choices["features.6"] == {1: "sparse"}

    # A different sparsity pattern is a different key; so is another precision or batch.
    layer = prepared.layers["features.6"]
    key = tuning_key("dev", "fp32", layer, 1)
    assert key != tuning_key("dev", "fp16", layer, 1) != tuning_key("dev", "fp32", layer, 2)
    layer.weight.view(-1)[torch.nonzero(layer.weight.view(-1))[0]] = 0
    assert tuning_key("dev", "fp32", layer, 1) != key


def test_corrupt_cache_is_ignored(tmp_path) -> None:
    path = tmp_path / "autotune.json"
    path.write_text("{not json")
    cache = TuningCache(path)
    assert cache.entries == {}
    cache.put("k", {"dense": 1.0, "sparse": 2.0, "choice": "dense"})
    cache.save()
    assert TuningCache(path).get("k")["choice"] == "dense"


def test_real_cpu_timer_measures_something(stand_in_plan) -> None:
    prepared = _prepared()
    layer = prepared.layers["features.3"]
    timer = make_timer(CPU, "fp32", torch.float32)
    seconds = timer(DenseConv(layer), layer, 1)
    assert 0 < seconds < 1
