"""EfficientNet-Lite0: the architecture the package's weights were trained for, and the default
model's predictions on real photos, unpruned and with the shipped profile."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from service.engine.architectures import build_architecture
from service.engine.architectures.efficientnet_lite import (
    MBConv,
    convert_efficientnet_pytorch_state_dict,
    efficientnet_lite0,
    same_padding,
)
from service.engine.loader import load_package_weights, load_pruned_model, package_weights_path
from service.engine.manifest import load_manifest
from service.engine.protocol import Preprocessing
from service.engine.pruning import layer_sparsity

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
# Each photo's acceptable top-1 classes.
EXPECTED = {
    "cat.jpg": {"tabby", "tiger cat", "Egyptian cat"},
    "coffee.jpg": {"espresso", "cup"},
    "rocket.jpg": {"missile", "projectile", "space shuttle"},
}


def photo_batch(prep: Preprocessing) -> torch.Tensor:
    """Short side to prep.resize, center crop, (x - mean) / std: what the service feeds."""
    batch = []
    for name in EXPECTED:
        img = Image.open(DATA / name).convert("RGB")
        scale = prep.resize / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
        left, top = (img.width - prep.crop) // 2, (img.height - prep.crop) // 2
        img = img.crop((left, top, left + prep.crop, top + prep.crop))
        pixels = np.asarray(img, dtype=np.float32)
        pixels = (pixels - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
        batch.append(torch.from_numpy(pixels.transpose(2, 0, 1).copy()))
    return torch.stack(batch)


@pytest.fixture(scope="module")
def manifest():
    return load_manifest("efficientnet-lite0", REPO / "models")


@pytest.fixture(scope="module")
def unpruned() -> nn.Module:
    model = build_architecture("efficientnet_lite0")
    load_package_weights(model)
    return model.eval()


def top1(model: nn.Module, batch: torch.Tensor, labels: tuple[str, ...]) -> list[str]:
    with torch.no_grad():
        return [labels[int(i)] for i in model(batch).argmax(dim=1)]


def test_the_layout_is_lite0() -> None:
    model = efficientnet_lite0()
    blocks = [m for m in model.modules() if isinstance(m, MBConv)]
    assert len(blocks) == 16
    assert [len(stage) for stage in model.features[1:8]] == [1, 2, 2, 3, 3, 4, 1]
    depthwise = [b.block.depthwise.conv for b in blocks]
    first = [stage[0].block.depthwise.conv for stage in model.features[1:8]]
    assert [c.kernel_size[0] for c in first] == [3, 3, 5, 3, 5, 5, 3]
    assert [c.stride[0] for c in first] == [1, 2, 2, 2, 1, 2, 1]
    assert [stage[-1].block.project.conv.out_channels for stage in model.features[1:8]] == [
        16,
        24,
        40,
        80,
        112,
        192,
        320,
    ]
    assert all(c.groups == c.in_channels == c.out_channels for c in depthwise)
    assert model.features[0].conv.out_channels == 32  # Lite: the stem does not scale
    assert model.features[8].conv.out_channels == 1280  # nor does the head
    assert sum(b.use_residual for b in blocks) == 9
    # Lite: ReLU6, no squeeze-excite (no sigmoid, no swish), TF's BatchNorm eps.
    kinds = {type(m) for m in model.modules()}
    assert nn.ReLU6 in kinds and not kinds & {nn.SiLU, nn.Sigmoid, nn.Hardsigmoid, nn.ReLU}
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 49 and all(m.eps == 1e-3 for m in norms)
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        # SAME: k // 2 on every side at stride 1; at stride 2 a ZeroPad2d does it, not the conv.
        k = conv.kernel_size[0]
        assert conv.padding == ((k // 2, k // 2) if conv.stride == (1, 1) else (0, 0))


@pytest.mark.parametrize("size", [8, 14, 28, 112, 224])
@pytest.mark.parametrize(("kernel", "stride"), [(3, 1), (5, 1), (3, 2), (5, 2), (1, 1)])
def test_same_padding_is_tensorflows(size: int, kernel: int, stride: int) -> None:
    # TF: out = ceil(in / s); pad = max((out - 1) * s + k - in, 0); the odd pixel goes after.
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    assert same_padding(kernel, stride) == (total // 2, total - total // 2) * 2


def test_stride_two_convs_pad_asymmetrically_in_front_of_the_conv() -> None:
    model = efficientnet_lite0()
    x = torch.randn(1, 3, 224, 224)
    pads = {name: m for name, m in model.named_modules() if isinstance(m, nn.ZeroPad2d)}
    assert sorted(pads) == [
        "features.0.pad",
        "features.2.0.block.depthwise.pad",
        "features.3.0.block.depthwise.pad",
        "features.4.0.block.depthwise.pad",
        "features.6.0.block.depthwise.pad",
    ]
    assert pads["features.0.pad"].padding == (0, 1, 0, 1)
    assert pads["features.3.0.block.depthwise.pad"].padding == (1, 2, 1, 2)
    # Against a conv padded the TF way from the actual map size.
    stem = model.features[0]
    conv = stem.conv
    reference = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2)
    torch.testing.assert_close(conv(stem.pad(x)), reference)
    assert reference.shape[-1] == 112


def test_torch_fx_traces_it_with_adds_and_pads_as_nodes(unpruned) -> None:
    traced = torch.fx.symbolic_trace(unpruned)
    ops = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert sum(op.__name__ == "add" for op in ops) == 9
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), unpruned(x))


def test_every_package_key_maps_to_a_module() -> None:
    state = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    converted = convert_efficientnet_pytorch_state_dict(state)
    expected = efficientnet_lite0().state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    assert torch.equal(
        converted["features.2.1.block.depthwise.conv.weight"],
        state["_blocks.2._depthwise_conv.weight"],
    )
    with pytest.raises(KeyError, match="_blocks.16._expand_conv.weight"):
        convert_efficientnet_pytorch_state_dict({"_blocks.16._expand_conv.weight": torch.ones(1)})
    with pytest.raises(KeyError, match="_se_reduce"):
        convert_efficientnet_pytorch_state_dict({"_blocks.1._se_reduce.weight": torch.ones(1)})


def test_unpruned_it_recognizes_the_photos(unpruned, manifest) -> None:
    predictions = top1(unpruned, photo_batch(manifest.preprocessing), manifest.labels)
    for (name, allowed), predicted in zip(EXPECTED.items(), predictions, strict=True):
        assert predicted in allowed, f"{name}: {predicted}"


def test_the_default_profile_keeps_the_predictions(unpruned, manifest) -> None:
    model = load_pruned_model(manifest)
    batch = photo_batch(manifest.preprocessing)
    with torch.no_grad():
        dense_logits, pruned_logits = unpruned(batch), model(batch)
    predictions = [manifest.labels[int(i)] for i in pruned_logits.argmax(dim=1)]
    for (name, allowed), predicted in zip(EXPECTED.items(), predictions, strict=True):
        assert predicted in allowed, f"{name}: {predicted}"
    dense_top5, pruned_top5 = dense_logits.topk(5).indices, pruned_logits.topk(5).indices
    for dense, pruned in zip(dense_top5.tolist(), pruned_top5.tolist(), strict=True):
        assert len(set(dense) & set(pruned)) >= 4

    # The trained weights hold a few exact zeros already; layers the profile skips keep them.
    before, after = layer_sparsity(unpruned), layer_sparsity(model)
    for name, value in after.items():
        if name.endswith("expand.conv"):
            assert value == pytest.approx(0.3, abs=1e-3), name
        elif name.endswith("project.conv"):
            assert value == pytest.approx(0.1, abs=1e-3), name
        elif name == "features.8.conv":
            assert value == pytest.approx(0.5, abs=1e-6)
        else:  # stem, depthwise, classifier
            assert value == before[name] < 0.1, name


def test_magnitude_pruning_without_fine_tuning_breaks_it_at_half(unpruned, manifest) -> None:
    # The reason the default profile is light: 50% on the 1x1 convs loses the photos.
    from service.engine.manifest import PruningProfile
    from service.engine.pruning import magnitude_prune, resolve_sparsities

    model = efficientnet_lite0()
    model.load_state_dict(unpruned.state_dict())
    profile = PruningProfile("uniform", 0.5, include="conv1x1")
    magnitude_prune(model, resolve_sparsities(model, profile))
    predictions = top1(model.eval(), photo_batch(manifest.preprocessing), manifest.labels)
    wrong = [p for (_, ok), p in zip(EXPECTED.items(), predictions, strict=True) if p not in ok]
    assert len(wrong) >= 2
