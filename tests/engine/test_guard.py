"""auto's whole-model check: a per-layer mix that loses as a whole gives way to a uniform choice
at that bucket, and one that wins (or ties within the margin) is kept."""

from __future__ import annotations

import torch

from service.engine.assemble import build_backend
from service.engine.backends import AutoConv
from service.engine.guard import MARGIN, check_whole_model
from tests.engine.test_autotune import _prepared

CPU = torch.device("cpu")


class WholeModelTimer:
    """Seconds of a whole forward from the choices in force: `costs[bucket][kind]`, where kind
    is "dense" or "sparse" when every switchable layer agrees, else "mix". Also checks that
    the module really runs."""

    def __init__(self, costs: dict[int, dict[str, float]]) -> None:
        self.costs = costs
        self.calls: list[tuple[int, str]] = []

    def __call__(self, module, batch: int) -> float:
        autos = [m for m in module.modules() if isinstance(m, AutoConv)]
        kinds = {op.pick(batch) for op in autos}
        kind = kinds.pop() if len(kinds) == 1 else "mix"
        self.calls.append((batch, kind))
        with torch.inference_mode():
            assert module(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
        return self.costs[batch][kind]


# Per-layer winners: features.3 sparse at 1 and 2; features.8 sparse at 2 only. Every layer is
# switchable (the ones dense at every bucket too), so buckets 1 and 2 are real mixes and
# bucket 4 is every layer dense.
SPARSE_WINS = {("features.3", 1), ("features.3", 2), ("features.8", 2)}


def _layer_timer(op, layer, batch: int) -> float:
    if op.op_kind == "conv_sparse":
        return 1e-4 if (layer.name, batch) in SPARSE_WINS else 3e-4
    return 2e-4


def _build(model_timer, stand_in_plan):
    return build_backend(
        _prepared(),
        "auto",
        CPU,
        "fp32",
        buckets=(1, 2, 4),
        timer=_layer_timer,
        plan_factory=stand_in_plan,
        model_timer=model_timer,
    )


def test_a_mix_that_loses_as_a_whole_gives_way_to_the_faster_uniform_choice(
    stand_in_plan,
) -> None:
    costs = {
        1: {"mix": 1.0, "dense": 2.0, "sparse": 3.0},  # the mix wins: kept
        2: {"mix": 1.0, "dense": 0.5, "sparse": 0.8},  # all dense wins by far
        4: {"dense": 1.0, "sparse": 1.0},  # its "mix" is all dense; a tie keeps it
    }
    timer = WholeModelTimer(costs)
    built = _build(timer, stand_in_plan)
    assert built.choices["features.3"] == {1: "sparse", 2: "dense", 4: "dense"}
    assert built.choices["features.8"] == {1: "dense", 2: "dense", 4: "dense"}
    op = built.module.get_submodule("features.3")
    assert op.pick(1) == "sparse" and op.pick(2) == "dense"
    assert [row["kept"] for _, row in sorted(built.whole_model.items())] == ["mix", "dense", "mix"]
    assert built.whole_model[2]["dense"] == 0.5
    expected_calls = [(1, "mix"), (1, "dense"), (1, "sparse")]
    expected_calls += [(2, "mix"), (2, "dense"), (2, "sparse")]
    expected_calls += [(4, "dense"), (4, "dense"), (4, "sparse")]
    assert sorted(timer.calls) == sorted(expected_calls)
    assert any("auto at batch 2: every layer dense" in note for note in built.notes)
    assert not any("batch 1:" in note or "batch 4:" in note for note in built.notes)


def test_a_uniform_choice_within_the_margin_keeps_the_measured_mix(stand_in_plan) -> None:
    close = 1.0 - MARGIN / 2
    costs = {b: {"mix": 1.0, "dense": close, "sparse": 2.0} for b in (1, 2, 4)}
    built = _build(WholeModelTimer(costs), stand_in_plan)
    assert built.choices["features.3"] == {1: "sparse", 2: "sparse", 4: "dense"}
    assert built.choices["features.8"] == {1: "dense", 2: "sparse", 4: "dense"}
    assert all(row["kept"] == "mix" for row in built.whole_model.values())


def test_every_layer_sparse_means_every_layer(stand_in_plan) -> None:
    """A layer dense at every bucket on its own still turns sparse when the whole model runs
    faster all sparse (the fp16 case: one layout for the whole forward)."""
    costs = {b: {"mix": 1.0, "dense": 2.0, "sparse": 2.0} for b in (2, 4)}
    costs[1] = {"mix": 1.0, "dense": 2.0, "sparse": 0.5}
    built = _build(WholeModelTimer(costs), stand_in_plan)
    assert built.choices["features.0"] == {1: "sparse", 2: "dense", 4: "dense"}
    assert built.module.get_submodule("features.0").pick(1) == "sparse"
    assert built.whole_model[1]["kept"] == "sparse"


def test_without_switchable_layers_nothing_is_timed() -> None:
    calls = []
    assert check_whole_model(torch.nn.Conv2d(3, 4, 3), (1, 8), lambda m, b: calls.append(b)) == {}
    assert calls == []
