"""Every shipped model: the sparse engine (CPU reference) agrees with dense on real photos.

Also the user path for a torch.nn.utils.prune checkpoint: saved, loaded, built and compared.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torch.nn.utils import prune

from service.engine.assemble import build_backend
from service.engine.build import prepare_model
from service.engine.engine import ModelSource, load_source
from service.engine.protocol import Preprocessing
from tests.engine.conftest import IMAGENET, load_photos

SMALL = Preprocessing(resize=128, crop=112, mean=IMAGENET.mean, std=IMAGENET.std)

CPU = torch.device("cpu")
MODELS_DIR = "models"
SHIPPED = [
    "efficientnet-lite0",
    "resnet50-skimcaffe",
    "resnet50-uniform90",
    "alexnet-deepcompression",
    pytest.param("vgg16-deepcompression", marks=pytest.mark.slow),
]


@functools.cache
def _source(name: str) -> ModelSource:
    return load_source(name, MODELS_DIR)


def _agree(prepared, x: torch.Tensor, plan_factory) -> tuple[torch.Tensor, torch.Tensor]:
    logits = {}
    for backend in ("dense", "sparse"):
        built = build_backend(prepared, backend, CPU, "fp32", plan_factory=plan_factory)
        with torch.inference_mode():
            logits[backend] = built.module(x)
    dense, sparse = logits["dense"], logits["sparse"]
    assert torch.isfinite(dense).all()
    assert (sparse - dense).abs().max().item() <= 1e-3
    assert torch.equal(sparse.topk(5).indices, dense.topk(5).indices)
    return dense, sparse


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_sparse_matches_dense_on_photos(name: str, plan_factory) -> None:
    source = _source(name)
    prep = source.preprocessing
    prepared = prepare_model(source.module, (3, prep.crop, prep.crop))
    assert prepared.traced, "shipped models must trace, so BN folds and epilogues fuse"
    # Real weights get two photos; the synthetic ones one (the CPU reference is the cost).
    photos = ("cat.jpg", "coffee.jpg") if name == "efficientnet-lite0" else ("cat.jpg",)
    x = torch.from_numpy(load_photos(prep, photos))
    dense, _ = _agree(prepared, x, plan_factory)
    with torch.inference_mode():
        original = source.module(x)
    scale = max(1.0, original.abs().max().item())
    torch.testing.assert_close(dense, original, rtol=1e-4, atol=1e-4 * scale)


def test_efficientnet_lite0_fuses_its_padding_and_residuals() -> None:
    prepared = prepare_model(_source("efficientnet-lite0").module, (3, 224, 224))
    geometries = [layer.geometry for layer in prepared.layers.values()]
    assert any(g.padding[0] != g.padding[1] for g in geometries)  # TF SAME folded in
    assert any(g.residual for g in geometries)
    assert any(g.activation == "relu6" for g in geometries)


def _prune_checkpoint(path) -> nn.Module:
    """What a user does: prune with torch.nn.utils.prune and save the state_dict as is."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, "weight", amount=0.8)
    torch.save(model.state_dict(), path)
    return model


def test_torch_prune_checkpoint_runs_sparse(tmp_path, plan_factory) -> None:
    path = tmp_path / "pruned.pt"
    original = _prune_checkpoint(path)
    state = torch.load(path, weights_only=True)
    assert "conv1.weight_orig" in state and "conv1.weight_mask" in state

    from service.engine.loader import load_checkpoint

    loaded = torchvision.models.resnet18().eval()
    load_checkpoint(path, loaded)
    prepared = prepare_model(loaded, (3, 112, 112))
    assert prepared.layers["layer1.0.conv1"].sparsity == pytest.approx(0.8, abs=0.01)
    x = torch.from_numpy(load_photos(SMALL, ("rocket.jpg",)))
    dense, _ = _agree(prepared, x, plan_factory)
    with torch.inference_mode():
        np.testing.assert_allclose(dense.numpy(), original(x).numpy(), rtol=1e-4, atol=1e-3)
