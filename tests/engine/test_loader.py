"""Loading: shipped manifests give their profile's sparsity and sane synthetic weights; users'
checkpoints load, and broken ones fail naming the file, the key and what was expected."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

from service.engine.loader import (
    CheckpointError,
    check_weights,
    load_checkpoint,
    load_pruned_model,
)
from service.engine.manifest import load_manifest
from service.engine.pruning import PUBLISHED_PROFILES, layer_sparsity, prunable_layers

MODELS = Path(__file__).resolve().parents[2] / "models"
FP16_MAX = 65504.0


def rounding(module: nn.Module) -> float:
    return 1.0 / module.weight.numel()


def expected_sparsity(name: str, model: nn.Module) -> dict[str, float]:
    """What each layer of a shipped synthetic model must measure, from the papers' tables."""
    layers = prunable_layers(model)
    if name == "resnet50-uniform90":
        return {n: 0.9 if isinstance(m, nn.Conv2d) else 0.0 for n, m in layers.items()}
    table = PUBLISHED_PROFILES[name].sparsities()
    return {n: table.get(n, 0.0) for n in layers}


def activation_peaks(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits, and the largest magnitude any leaf module outputs on the way."""
    peak = 0.0

    def record(_module, _inputs, output) -> None:
        nonlocal peak
        peak = max(peak, float(output.detach().abs().max()))

    hooks = [m.register_forward_hook(record) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, peak


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize(
    "name",
    [
        "resnet50-uniform90",
        "resnet50-skimcaffe",
        "alexnet-deepcompression",
        "vgg16-deepcompression",
    ],
)
def test_shipped_synthetic_models(name: str, images: torch.Tensor) -> None:
    model = load_pruned_model(load_manifest(name, MODELS))
    assert not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())

    measured = layer_sparsity(model)
    layers = prunable_layers(model)
    for layer, target in expected_sparsity(name, model).items():
        assert measured[layer] == pytest.approx(target, abs=rounding(layers[layer])), layer

    # fp16 range: every activation of the fp32 model is far inside it, and fp16 itself agrees.
    logits, peak = activation_peaks(model, images)
    assert torch.isfinite(logits).all() and peak < FP16_MAX / 100
    assert 0.3 < float(logits.std()) < 3.0
    half_logits, half_peak = activation_peaks(model.half(), images[:1].half())
    assert torch.isfinite(half_logits).all() and half_peak < FP16_MAX
    assert torch.corrcoef(torch.stack([half_logits[0].float(), logits[0]]))[0, 1] > 0.99


def test_synthetic_weights_are_deterministic_and_seeded(tmp_path: Path) -> None:
    manifest = load_manifest("alexnet-deepcompression", MODELS)
    first = load_pruned_model(manifest).state_dict()
    again = load_pruned_model(manifest).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)

    reseeded = (MODELS / "alexnet-deepcompression.toml").read_text().replace("seed = 0", "seed = 1")
    (tmp_path / "alexnet-seed1.toml").write_text(reseeded)
    other = load_pruned_model(load_manifest("alexnet-seed1", tmp_path)).state_dict()
    assert not torch.equal(first["features.3.weight"], other["features.3.weight"])


def tiny_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


@pytest.fixture
def trained() -> nn.Sequential:
    torch.manual_seed(0)
    net = tiny_net()
    net[1].running_mean.uniform_(-1, 1)
    return net.eval()


def test_a_dense_state_dict_with_zeros_loads_exactly(tmp_path: Path, trained) -> None:
    with torch.no_grad():
        trained[3].weight[trained[3].weight.abs() < 0.1] = 0
    path = tmp_path / "dense.pth"
    torch.save(trained.state_dict(), path)
    fresh = tiny_net()
    load_checkpoint(path, fresh)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert layer_sparsity(fresh)["3"] == layer_sparsity(trained)["3"] > 0.2


def test_a_torch_prune_checkpoint_becomes_orig_times_mask(tmp_path: Path, trained) -> None:
    prune.l1_unstructured(trained[0], "weight", amount=0.6)
    prune.random_unstructured(trained[3], "weight", amount=0.3)
    state = trained.state_dict()
    assert {"0.weight_orig", "0.weight_mask", "3.weight_orig"} <= set(state)
    path = tmp_path / "pruned.pth"
    torch.save(state, path)

    fresh = tiny_net()
    load_checkpoint(path, fresh)
    assert torch.equal(fresh[0].weight, state["0.weight_orig"] * state["0.weight_mask"])
    assert torch.equal(fresh[3].weight, trained[3].weight)
    assert layer_sparsity(fresh)["0"] == pytest.approx(0.6, abs=1 / 216)
    with torch.no_grad():
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(fresh.eval()(x), trained(x))


def test_wrapped_and_data_parallel_checkpoints_load(tmp_path: Path, trained) -> None:
    state = trained.state_dict()
    wrapped = {"epoch": torch.tensor(3), "state_dict": {f"module.{k}": v for k, v in state.items()}}
    path = tmp_path / "wrapped.pth"
    torch.save(wrapped, path)
    fresh = tiny_net()
    load_checkpoint(path, fresh)
    assert torch.equal(fresh[6].bias, trained[6].bias)


def test_a_fp16_checkpoint_loads_as_fp32(tmp_path: Path, trained) -> None:
    path = tmp_path / "half.pth"
    torch.save(trained.half().state_dict(), path)
    fresh = tiny_net()
    load_checkpoint(path, fresh)
    assert fresh[0].weight.dtype == torch.float32
    assert torch.equal(fresh[0].weight, trained[0].weight.float())


class NotATensor:
    pass


def _corrupt(path: Path, trained: nn.Module) -> None:
    path.write_bytes(b"\x00garbage, not a checkpoint" * 10)


def _truncated(path: Path, trained: nn.Module) -> None:
    torch.save(trained.state_dict(), path)
    path.write_bytes(path.read_bytes()[:300])


def _pickled_object(path: Path, trained: nn.Module) -> None:
    torch.save({"0.weight": NotATensor()}, path)


def _a_list(path: Path, trained: nn.Module) -> None:
    torch.save([trained[0].weight.detach()], path)


def _a_string_value(path: Path, trained: nn.Module) -> None:
    state = dict(trained.state_dict())
    state["0.weight"] = "weights"
    torch.save(state, path)


def _unexpected_key(path: Path, trained: nn.Module) -> None:
    torch.save({**trained.state_dict(), "9.weight": torch.ones(2)}, path)


def _missing_key(path: Path, trained: nn.Module) -> None:
    state = dict(trained.state_dict())
    del state["3.weight"]
    torch.save(state, path)


def _wrong_shape(path: Path, trained: nn.Module) -> None:
    torch.save({**trained.state_dict(), "3.weight": torch.ones(4, 8, 5, 5)}, path)


def _mask_without_orig(path: Path, trained: nn.Module) -> None:
    torch.save({**trained.state_dict(), "3.weight_mask": torch.ones(4, 8, 3, 3)}, path)


def _orig_without_mask(path: Path, trained: nn.Module) -> None:
    state = dict(trained.state_dict())
    state["3.weight_orig"] = state.pop("3.weight")
    torch.save(state, path)


def _mask_of_another_shape(path: Path, trained: nn.Module) -> None:
    state = dict(trained.state_dict())
    state["3.weight_orig"] = state.pop("3.weight")
    state["3.weight_mask"] = torch.ones(4, 8, 1, 1)
    torch.save(state, path)


def _nan(path: Path, trained: nn.Module) -> None:
    state = dict(trained.state_dict())
    state["1.running_var"] = torch.full((8,), float("nan"))
    torch.save(state, path)


# writer -> (the key the error must name, a piece of what it must say was expected)
BROKEN = {
    _corrupt: (None, "not a readable torch checkpoint"),
    _truncated: (None, "not a readable torch checkpoint"),
    _pickled_object: (None, "weights_only=True"),
    _a_list: (None, "expected a non-empty state_dict"),
    _a_string_value: ("0.weight", "expected a tensor"),
    _unexpected_key: ("9.weight", "unexpected key; Sequential has no such parameter"),
    _missing_key: ("3.weight", "missing; Sequential also needs '3.weight'"),
    _wrong_shape: ("3.weight", "shape (4, 8, 5, 5); Sequential expects (4, 8, 3, 3)"),
    _mask_without_orig: ("3.weight_mask", "without '3.weight_orig'"),
    _orig_without_mask: ("3.weight_orig", "without '3.weight_mask'"),
    _mask_of_another_shape: ("3.weight_mask", "expected (4, 8, 3, 3)"),
    _nan: ("1.running_var", "NaN or infinite"),
}


@pytest.mark.parametrize("writer", list(BROKEN), ids=lambda f: f.__name__.strip("_"))
def test_broken_checkpoints_name_file_key_and_expectation(tmp_path: Path, trained, writer) -> None:
    key, expected = BROKEN[writer]
    path = tmp_path / "model.pth"
    writer(path, trained)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, tiny_net())
    message = str(info.value)
    assert message.startswith(str(path))
    assert expected in message
    assert info.value.key == key
    if key is not None:
        assert repr(key) in message


def test_a_missing_checkpoint_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="file not found"):
        load_checkpoint(tmp_path / "nope.pth", tiny_net())


def test_the_truncated_case_really_is_a_damaged_zip(tmp_path: Path, trained) -> None:
    path = tmp_path / "t.pth"
    _truncated(path, trained)
    assert not zipfile.is_zipfile(path)


def test_a_file_manifest_serves_a_users_prune_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(4)
    user = torchvision.models.resnet18(num_classes=3).eval()
    for name, module in user.named_modules():
        if isinstance(module, nn.Conv2d) and name.startswith("layer"):
            prune.l1_unstructured(module, "weight", amount=0.8)
    torch.save(user.state_dict(), tmp_path / "mine.pth")
    (tmp_path / "labels.txt").write_text("ant\nbee\ncat\n")
    (tmp_path / "mine.toml").write_text(
        'architecture = "resnet18"\nlabels = "labels.txt"\n'
        '[weights]\nkind = "file"\npath = "mine.pth"\n[pruning]\nkind = "none"\n'
        "[preprocessing]\nresize = 64\ncrop = 64\nmean = [0, 0, 0]\nstd = [255, 255, 255]\n"
    )
    model = load_pruned_model(load_manifest("mine", tmp_path))
    assert layer_sparsity(model)["layer3.1.conv2"] == pytest.approx(0.8, abs=1e-4)
    assert layer_sparsity(model)["conv1"] == 0.0
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), user(x))


def test_the_quick_weights_check_refuses_what_is_no_checkpoint(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(3)}, tmp_path / "w.pth")
    (tmp_path / "m.toml").write_text(
        'architecture = "resnet18"\nlabels = "imagenet"\n'
        '[weights]\nkind = "file"\npath = "w.pth"\n[pruning]\nkind = "none"\n'
        "[preprocessing]\nresize = 64\ncrop = 64\nmean = [0, 0, 0]\nstd = [255, 255, 255]\n"
    )
    manifest = load_manifest("m", tmp_path)
    check_weights(manifest)  # a real checkpoint passes (its keys are load_checkpoint's job)
    whole = (tmp_path / "w.pth").read_bytes()
    for bad in (whole[: len(whole) // 2], b"plain text"):  # truncated; not a checkpoint at all
        (tmp_path / "w.pth").write_bytes(bad)
        with pytest.raises(CheckpointError, match="not a torch checkpoint"):
            check_weights(manifest)


def test_package_weights_are_only_for_efficientnet(tmp_path: Path) -> None:
    text = (MODELS / "resnet50-uniform90.toml").read_text()
    text = text.replace('kind = "synthetic"\nseed = 0', 'kind = "package"')
    (tmp_path / "odd.toml").write_text(text)
    with pytest.raises(ValueError, match="EfficientNet-Lite0 weights only"):
        load_pruned_model(load_manifest("odd", tmp_path))
