"""Folding and fusion are exact: the built dense graph computes what the original model does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import prune

from service.engine import fold
from service.engine.backends import ConvOp, DenseConv
from service.engine.build import materialize, prepare_model
from tests.engine.conftest import magnitude_prune, randomize_batchnorm

torch.manual_seed(0)


class TinyBlock(nn.Module):
    """Every pattern the builder fuses, plus ones it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))  # TF SAME at stride 2: right/bottom only
        self.stem = nn.Conv2d(3, 8, 3, stride=2, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU6(inplace=True)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 8, 1)
        self.branch = nn.Conv2d(8, 8, 1)
        self.after = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem(self.pad(x))))
        y = F.relu(self.dw_bn(self.dw(x)))
        y = self.project(y) + x  # residual, no activation (EfficientNet's project conv)
        z = torch.relu(self.branch(y) + y)  # residual then functional relu
        z = F.relu(self.after(z)) * 0.5  # relu fuses; the scale stays in torch
        return self.head(z.mean((2, 3)))


def _tiny() -> nn.Module:
    return randomize_batchnorm(TinyBlock().eval())


def test_fold_batchnorm_is_exact() -> None:
    model = randomize_batchnorm(torchvision.models.resnet18().eval())
    gm = fold.trace(copy.deepcopy(model))
    folded = fold.fold_batchnorm(gm)
    assert len(folded) == 20  # every conv of resnet18 has its BN
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gm.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-4)


def test_folding_keeps_pruned_zeros() -> None:
    model = magnitude_prune(randomize_batchnorm(torchvision.models.resnet18().eval()), 0.8)
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    prepared = prepare_model(model, (3, 64, 64))
    for name, layer in prepared.layers.items():
        assert torch.equal(layer.weight == 0, zeros[name]), name


def test_fusion_patterns_on_tiny_block() -> None:
    prepared = prepare_model(_tiny(), (3, 17, 17))
    g = {n: layer.geometry for n, layer in prepared.layers.items()}
    assert g["stem"].padding == (0, 1, 0, 1) and g["stem"].activation == "relu6"
    assert g["stem"].in_hw == (17, 17) and g["stem"].out_hw == (8, 8)
    assert g["dw"].activation == "relu" and g["dw"].groups == 8
    assert g["project"].residual and g["project"].activation is None
    assert g["branch"].residual and g["branch"].activation == "relu"
    assert g["after"].activation == "relu" and not g["after"].residual
    kinds = {type(m) for m in prepared.template.modules()}
    assert nn.ZeroPad2d not in kinds and nn.BatchNorm2d not in kinds and nn.ReLU6 not in kinds


@pytest.mark.parametrize("arch", ["tiny", "resnet50", "mobilenet_v2", "alexnet"])
def test_dense_build_matches_original(arch: str) -> None:
    if arch == "tiny":
        model, size = _tiny(), 17
    else:
        model, size = randomize_batchnorm(getattr(torchvision.models, arch)().eval()), 96
    model = magnitude_prune(model, 0.7)
    prepared = prepare_model(model, (3, size, size))
    built = materialize(prepared, DenseConv)
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        ref, out = model(x), built(x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    # every conv replaced, under its original name
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    ops = {n for n, m in built.named_modules() if isinstance(m, ConvOp)}
    assert ops == convs == set(prepared.layers)


def test_resnet_bottleneck_fuses_add_and_relu() -> None:
    prepared = prepare_model(torchvision.models.resnet50().eval(), (3, 64, 64))
    conv3 = prepared.layers["layer1.0.conv3"].geometry
    assert conv3.residual and conv3.activation == "relu"
    assert prepared.layers["layer1.0.conv2"].geometry.activation == "relu"
    assert prepared.layers["layer1.0.downsample.0"].geometry.epilogue == "bias"
    assert sum(layer.geometry.residual for layer in prepared.layers.values()) == 16
    code = prepared.template.code
    assert " + " not in code and "relu" not in code  # every add and relu went into a conv


def test_torch_prune_reparametrization_is_made_permanent() -> None:
    model = torchvision.models.resnet18().eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            prune.l1_unstructured(m, "weight", amount=0.6)
    assert hasattr(model.conv1, "weight_orig")
    prepared = prepare_model(model, (3, 64, 64))
    assert prepared.layers["conv1"].sparsity == pytest.approx(0.6, abs=0.01)
    assert hasattr(model.conv1, "weight_orig")  # the caller's model is untouched
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(materialize(prepared, DenseConv)(x), model(x))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: fx cannot trace this
            y = y.relu()
        return self.fc(y.mean((2, 3)))


def test_untraceable_model_falls_back_to_swapping_convs() -> None:
    model = randomize_batchnorm(Untraceable().eval())
    prepared = prepare_model(model, (3, 8, 8))
    assert not prepared.traced and prepared.notes
    built = materialize(prepared, DenseConv)
    assert isinstance(built.conv, DenseConv) and isinstance(built.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(built(x), model(x))
