"""Shared fixtures for engine tests: pruned small models, real photos, the sparse plan factory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from service.engine.protocol import Preprocessing

DATA = Path(__file__).resolve().parents[1] / "data"
PHOTOS = ("cat.jpg", "coffee.jpg", "rocket.jpg", "astronaut.png")
IMAGENET = Preprocessing(
    resize=256, crop=224, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)
)


def load_photos(prep: Preprocessing, names: tuple[str, ...] = PHOTOS) -> np.ndarray:
    """Real photos as the service would feed them: short side to `resize`, center crop,
    (x - mean) / std; float32 [N, 3, crop, crop]."""
    out = []
    for name in names:
        img = Image.open(DATA / name).convert("RGB")
        scale = prep.resize / min(img.size)
        size = (max(prep.crop, round(img.width * scale)), max(prep.crop, round(img.height * scale)))
        img = img.resize(size, Image.BILINEAR)
        left, top = (img.width - prep.crop) // 2, (img.height - prep.crop) // 2
        img = img.crop((left, top, left + prep.crop, top + prep.crop))
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        mean = np.asarray(prep.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.asarray(prep.std, dtype=np.float32).reshape(3, 1, 1)
        out.append((arr - mean) / std)
    return np.stack(out)


def magnitude_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """Zero the smallest weights of every conv, per layer, in place."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                w = module.weight
                k = int(w.numel() * sparsity)
                if k:
                    threshold = w.abs().flatten().kthvalue(k).values
                    w.mul_((w.abs() > threshold).to(w.dtype))
    return model


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, so folding is actually exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(c, generator=gen) * 0.4 - 0.2)
    return model


class StandInPlan:
    """F.conv2d with the SparseConvPlan interface, for when service.kernels has no plan."""

    dtypes = (torch.float32,)

    def __init__(self, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
        self.weight, self.bias = weight, bias
        self.stride, self.dilation, self.groups = stride, dilation, groups
        pad = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.pad4 = (pad[1], pad[1], pad[0], pad[0]) if len(pad) == 2 else pad
        self.prepared: list[tuple[int, int]] = []
        self.nnz = int(torch.count_nonzero(weight))

    def to(self, device):
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self

    def prepare(self, hw, batch_sizes=None, dtypes=(torch.float32,)):
        self.prepared.append(tuple(hw))
        return self

    def __call__(self, x, residual=None, activation=None, impl="auto"):
        assert x.dtype == torch.float32
        y = F.conv2d(
            F.pad(x, self.pad4), self.weight, self.bias, self.stride, 0, self.dilation, self.groups
        )
        if residual is not None:
            y = y + residual
        if activation == "relu":
            y = y.relu()
        elif activation == "relu6":
            y = y.clamp(0, 6)
        return y


def real_plan_factory():
    try:
        from service.kernels import SparseConvPlan
    except ImportError:
        return None
    return SparseConvPlan


@pytest.fixture
def plan_factory():
    """The kernel's SparseConvPlan when it exists, else the F.conv2d stand-in."""
    return real_plan_factory() or StandInPlan


@pytest.fixture
def stand_in_plan():
    return StandInPlan


@pytest.fixture(scope="session")
def photos() -> np.ndarray:
    return load_photos(IMAGENET)
