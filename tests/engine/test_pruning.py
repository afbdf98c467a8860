"""Magnitude pruning, profile resolution and the `escort prune` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from service.engine import prune_cli
from service.engine.architectures import build_architecture
from service.engine.loader import load_checkpoint
from service.engine.manifest import PruningProfile
from service.engine.pruning import (
    PUBLISHED_PROFILES,
    ProfileError,
    _kth_smallest,
    layer_sparsity,
    magnitude_mask,
    magnitude_prune,
    resolve_sparsities,
    sparsity_report,
)


def small_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 0: conv3x3
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),  # 2: conv1x1
        nn.Conv2d(8, 8, 3, groups=8),  # 3: depthwise 3x3
        nn.Conv2d(8, 4, 5),  # 4: conv5x5
        nn.Flatten(),
        nn.Linear(4, 2),  # 6: linear
    )


def meta_model(name: str) -> nn.Module:
    # Module names and types are all profile resolution needs; no memory, no init time.
    with torch.device("meta"):
        return build_architecture(name)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9, 0.98])
def test_magnitude_mask_removes_exactly_the_smallest(sparsity: float) -> None:
    weight = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(1))
    keep = magnitude_mask(weight, sparsity)
    removed = round(weight.numel() * sparsity)
    assert int((~keep).sum()) == removed
    if 0 < removed < weight.numel():
        assert weight.abs()[~keep].max() <= weight.abs()[keep].min()


def test_ties_are_broken_by_position_and_zeros_go_first() -> None:
    weight = torch.tensor([0.5, 0.0, 0.5, 0.5, 2.0, 0.0, 0.5, 1.0])
    keep = magnitude_mask(weight, 0.5)  # 4 go: the two zeros, then the first two 0.5s
    assert keep.tolist() == [False, False, False, True, True, False, True, True]
    assert torch.equal(magnitude_mask(weight, 0.5), keep)
    # An already sparser weight stays as it is at a lower target.
    assert int((~magnitude_mask(weight, 0.2)).sum()) == 2


def test_the_bracketed_kth_value_is_exact_on_a_large_tensor() -> None:
    values = torch.randn(5_000_000, generator=torch.Generator().manual_seed(2)).abs()
    for q in (0.001, 0.5, 0.96, 0.999):
        k = round(values.numel() * q)
        assert _kth_smallest(values, k) == values.kthvalue(k).values


def test_uniform_profiles_pick_layers_by_kind() -> None:
    net = small_net()

    def picked(include: str) -> list[str]:
        return list(resolve_sparsities(net, PruningProfile("uniform", 0.7, include=include)))

    assert picked("conv") == ["0", "2", "3", "4"]
    assert picked("conv3x3") == ["0", "3"]
    assert picked("conv1x1") == ["2"]
    assert picked("all") == ["0", "2", "3", "4", "6"]
    assert resolve_sparsities(net, PruningProfile("none")) == {}


def test_per_layer_exact_names_win_then_the_first_glob() -> None:
    model = meta_model("resnet18")
    profile = PruningProfile(
        "per_layer",
        layers={"layer1.*": 0.5, "layer*.conv2": 0.8, "layer1.0.conv1": 0.1, "fc": 0.3},
    )
    targets = resolve_sparsities(model, profile)
    assert targets["layer1.0.conv1"] == 0.1  # exact name
    assert targets["layer1.0.conv2"] == 0.5  # first glob that matches
    assert targets["layer3.1.conv2"] == 0.8
    assert targets["fc"] == 0.3
    assert "conv1" not in targets and "layer2.0.conv1" not in targets


def test_a_per_layer_entry_that_matches_nothing_is_an_error() -> None:
    profile = PruningProfile("per_layer", layers={"layer9.*": 0.5})
    with pytest.raises(ProfileError, match="'layer9.\\*' matches no Conv2d or Linear layer"):
        resolve_sparsities(meta_model("resnet18"), profile)


def test_published_profiles_match_the_papers() -> None:
    skim = resolve_sparsities(
        meta_model("resnet50"), PruningProfile("published", name="resnet50-skimcaffe")
    )
    # SkimCaffe's per-block profile (Park et al. 2017): res2 a-c, res3 a-d, res4 a-f, res5 a-c
    percents = [88.0, 84.0, 80.8, 91.8, 91.9, 95.5, 91.1, 96.6, 97.5, 97.1, 96.8, 96.8, 96.8]
    percents += [97.8, 98.0, 97.9]
    assert all(name.endswith(".conv2") for name in skim)
    assert list(skim.values()) == pytest.approx([p / 100 for p in percents])
    assert list(skim)[:4] == [
        "layer1.0.conv2",
        "layer1.1.conv2",
        "layer1.2.conv2",
        "layer2.0.conv2",
    ]

    vgg = meta_model("vgg16")
    table = resolve_sparsities(vgg, PruningProfile("published", name="vgg16-deepcompression"))
    modules = dict(vgg.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    assert list(table)[:13] == convs  # all 13 convs, in order, then fc6-fc8
    percents = [42, 78, 66, 64, 47, 76, 58, 68, 73, 66, 65, 71, 64, 96, 96, 77]
    assert list(table.values()) == pytest.approx([p / 100 for p in percents])
    assert list(table)[13:] == ["classifier.0", "classifier.3", "classifier.6"]

    alex = meta_model("alexnet")
    table = resolve_sparsities(alex, PruningProfile("published", name="alexnet-deepcompression"))
    assert list(table.values()) == pytest.approx([0.16, 0.62, 0.65, 0.63, 0.63, 0.91, 0.91, 0.75])
    assert isinstance(dict(alex.named_modules())["classifier.6"], nn.Linear)


def test_a_published_profile_refuses_another_architecture() -> None:
    profile = PruningProfile("published", name="alexnet-deepcompression")
    with pytest.raises(ProfileError, match="is for alexnet, not resnet18"):
        resolve_sparsities(meta_model("resnet18"), profile, architecture="resnet18")
    with pytest.raises(ProfileError, match="lacks: features.0"):
        resolve_sparsities(meta_model("resnet18"), profile)
    assert set(PUBLISHED_PROFILES) == {
        "alexnet-deepcompression",
        "vgg16-deepcompression",
        "resnet50-skimcaffe",
    }


def test_magnitude_prune_reports_what_it_measured() -> None:
    net = small_net()
    before = net[4].weight.detach().clone()
    measured = magnitude_prune(net, {"0": 0.5, "4": 0.75})
    assert measured == {"0": pytest.approx(108 / 216), "4": pytest.approx(0.75)}
    kept = net[4].weight != 0
    assert torch.equal(net[4].weight[kept], before[kept])
    assert layer_sparsity(net)["2"] == 0.0
    rows = {r["name"]: r for r in sparsity_report(net, {"0": 0.5, "4": 0.75})}
    assert rows["3"]["kind"] == "conv3x3dw" and rows["6"]["kind"] == "linear"
    assert rows["4"]["nnz"] == 800 - 600 and rows["2"]["target"] is None
    with pytest.raises(ProfileError, match="no Conv2d or Linear layer named 9"):
        magnitude_prune(net, {"9": 0.5})


def test_escort_prune_synthetic_round_trip(tmp_path: Path, capsys) -> None:
    out = tmp_path / "r18.pth"
    argv = ["resnet18", "--synthetic", "--seed", "3", "--uniform", "0.8", "--out", str(out)]
    assert prune_cli.main([*argv, "--image-size", "64", "--num-classes", "10"]) == 0
    printed = capsys.readouterr().out
    assert "layer4.1.conv2" in printed and "80.0%" in printed and "wrote" in printed

    model = torchvision.models.resnet18(num_classes=10)
    load_checkpoint(out, model)
    sparsity = layer_sparsity(model)
    convs = [n for n in sparsity if n != "fc"]
    assert all(sparsity[n] == pytest.approx(0.8, abs=1e-3) for n in convs)
    assert sparsity["fc"] == 0.0

    report = json.loads(out.with_name("r18.sparsity.json").read_text())
    assert report["architecture"] == "resnet18"
    assert report["weights"] == {"kind": "synthetic", "seed": 3}
    assert report["profile"]["sparsity"] == 0.8
    assert report["summary"]["pruned_layers"] == len(convs) == 20
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["layer1.0.conv1"]["shape"] == [64, 64, 3, 3]
    assert rows["layer1.0.conv1"]["sparsity"] == pytest.approx(sparsity["layer1.0.conv1"])


def test_escort_prune_a_state_dict_with_a_per_layer_table(tmp_path: Path) -> None:
    torch.manual_seed(5)
    dense = torchvision.models.resnet18(num_classes=10)
    weights = tmp_path / "dense.pth"
    torch.save(dense.state_dict(), weights)
    table = tmp_path / "layers.toml"
    table.write_text('[layers]\n"layer4.*.conv2" = 0.9\n"conv1" = 0.5\n')
    out, report = tmp_path / "out" / "pruned.pth", tmp_path / "report.json"
    argv = ["resnet18", "--weights", str(weights), "--per-layer", str(table)]
    argv += ["--num-classes", "10", "--out", str(out), "--report", str(report), "--quiet"]
    assert prune_cli.main(argv) == 0

    pruned = torch.load(out, weights_only=True)
    original = dense.state_dict()
    for name in ("layer4.0.conv2.weight", "layer4.1.conv2.weight", "conv1.weight"):
        target = 0.5 if name == "conv1.weight" else 0.9
        mask = magnitude_mask(original[name], target)
        assert torch.equal(pruned[name], original[name] * mask)
    for name in ("layer4.0.conv1.weight", "fc.weight", "bn1.running_var"):
        assert torch.equal(pruned[name], original[name])
    assert json.loads(report.read_text())["summary"]["pruned_layers"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["resnet5", "--synthetic", "--uniform", "0.5"], "did you mean resnet50"),
        (["resnet18", "--synthetic", "--uniform", "1.5"], "--uniform: expected a sparsity"),
        (["resnet18", "--weights", "missing.pth", "--uniform", "0.5"], "file not found"),
        (["resnet18", "--package", "--uniform", "0.5"], "EfficientNet-Lite0 weights only"),
        (["resnet18", "--synthetic", "--per-layer", "nope.toml"], "cannot read"),
    ],
)
def test_escort_prune_errors_are_one_clear_line(tmp_path: Path, capsys, argv, message) -> None:
    assert prune_cli.main([*argv, "--out", str(tmp_path / "x.pth"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("escort prune: error:") and message in err
    assert not (tmp_path / "x.pth").exists()


def test_a_bad_per_layer_file_names_the_entry(tmp_path: Path) -> None:
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"conv1": 0.5, "fc": 2}))
    with pytest.raises(ValueError, match="t.json: fc: expected a sparsity in"):
        prune_cli.read_per_layer_table(table)
    table.write_text("{")
    with pytest.raises(ValueError, match="not valid json"):
        prune_cli.read_per_layer_table(table)
