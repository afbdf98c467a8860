"""Each backend's op computes activation(conv2d(x) + bias + residual), checked against F.conv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from service.engine.assemble import build_backend
from service.engine.backends import (
    AutoConv,
    ConvGeometry,
    ConvLayer,
    DenseConv,
    SparseConv,
    precision_scope,
)
from service.engine.build import prepare_model
from service.engine.lowering import LOWERINGS, lowered_op
from tests.engine.conftest import magnitude_prune, randomize_batchnorm

CPU = torch.device("cpu")

CASES = [
    # cin, cout, k, stride, pad4 (l, r, t, b), dilation, groups, hw, activation, residual
    (8, 16, 3, 1, (1, 1, 1, 1), 1, 1, (9, 9), "relu", False),
    (8, 16, 3, 2, (0, 1, 0, 1), 1, 1, (10, 10), "relu6", False),  # TF SAME, stride 2
    (16, 16, 5, 1, (2, 2, 2, 2), 1, 16, (7, 7), None, False),  # depthwise
    (8, 8, 1, 1, (0, 0, 0, 0), 1, 1, (6, 5), None, True),  # projection + residual
    (6, 8, 3, 1, (2, 2, 2, 2), 2, 2, (8, 8), "relu", True),  # dilated, grouped
]


def _layer(case, sparsity: float = 0.8, seed: int = 0) -> ConvLayer:
    cin, cout, k, stride, pad, dil, groups, hw, act, res = case
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(cout, cin // groups, k, k, generator=gen)
    w[torch.rand(w.shape, generator=gen) < sparsity] = 0
    b = torch.randn(cout, generator=gen)
    oh = (hw[0] + pad[2] + pad[3] - dil * (k - 1) - 1) // stride + 1
    ow = (hw[1] + pad[0] + pad[1] - dil * (k - 1) - 1) // stride + 1
    geometry = ConvGeometry(
        cin, cout, (k, k), (stride, stride), pad, (dil, dil), groups, hw, (oh, ow), act, res
    )
    return ConvLayer("layer", geometry, w, b)


def _expected(layer: ConvLayer, x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    g = layer.geometry
    y = F.conv2d(F.pad(x, g.padding), layer.weight, layer.bias, g.stride, 0, g.dilation, g.groups)
    if residual is not None:
        y = y + residual
    if g.activation == "relu":
        y = F.relu(y)
    elif g.activation == "relu6":
        y = F.relu6(y)
    return y


def _inputs(layer: ConvLayer, batch: int = 3):
    g = layer.geometry
    x = torch.randn(batch, g.in_channels, *g.in_hw)
    res = torch.randn(batch, g.out_channels, *g.out_hw) if g.residual else None
    return x, res


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[2]}s{c[3]}g{c[6]}{c[8]}{c[9]}")
@pytest.mark.parametrize("kind", ["dense", "sparse", *LOWERINGS])
def test_op_matches_conv2d(case, kind: str, plan_factory) -> None:
    layer = _layer(case)
    if kind == "dense":
        op = DenseConv(layer)
    elif kind == "sparse":
        op = SparseConv(layer, CPU, plan_factory)
    else:
        op = lowered_op(kind, layer, CPU)
    x, res = _inputs(layer)
    with torch.inference_mode():
        out = op(x, None if res is None else res.clone())
    torch.testing.assert_close(out, _expected(layer, x, res), rtol=1e-5, atol=1e-4)


def test_sparse_op_prepares_its_geometry_and_casts_half(stand_in_plan) -> None:
    layer = _layer(CASES[0])
    op = SparseConv(layer, CPU, stand_in_plan)
    assert op.plan.prepared == [(9, 9)]
    x, _ = _inputs(layer)
    with torch.inference_mode():
        out = op(x.half())  # the stand-in asserts it only ever sees fp32
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), _expected(layer, x.half().float(), None), **_HALF)


_HALF = {"rtol": 1e-2, "atol": 1e-2}


def test_auto_conv_picks_per_bucket(stand_in_plan) -> None:
    layer = _layer(CASES[0])
    op = AutoConv(
        layer, DenseConv(layer), SparseConv(layer, CPU, stand_in_plan), {1: "sparse", 4: "dense"}
    )
    assert [op.pick(n) for n in (1, 2, 4, 9)] == ["sparse", "dense", "dense", "dense"]
    x, _ = _inputs(layer, batch=1)
    with torch.inference_mode():
        op(x)
        assert op.op_kind == "conv_sparse"
        op(torch.cat([x, x]))
        assert op.op_kind == "conv_dense"


def test_precision_scope_sets_and_restores_tf32() -> None:
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with precision_scope("fp32"):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    with precision_scope("tf32"):
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_sparse_model_agrees_with_dense_on_photos(arch: str, photos, plan_factory) -> None:
    model = magnitude_prune(randomize_batchnorm(getattr(torchvision.models, arch)().eval()), 0.9)
    prepared = prepare_model(model, (3, 224, 224))
    x = torch.from_numpy(photos[:2])
    outs = {}
    for backend in ("dense", "sparse"):
        built = build_backend(prepared, backend, CPU, "fp32", plan_factory=plan_factory)
        with torch.inference_mode():
            outs[backend] = built.module(x)
    with torch.inference_mode():
        ref = model(x)
    torch.testing.assert_close(outs["dense"], ref, rtol=1e-4, atol=1e-4)
    assert (outs["sparse"] - outs["dense"]).abs().max().item() <= 1e-3
    assert torch.equal(outs["sparse"].topk(5).indices, outs["dense"].topk(5).indices)


def test_fp16_on_cpu_stays_fp32_and_says_so(plan_factory) -> None:
    prepared = prepare_model(torchvision.models.alexnet().eval(), (3, 64, 64))
    built = build_backend(prepared, "sparse", CPU, "fp16", plan_factory=plan_factory)
    assert built.dtype == torch.float32
    assert any("fp16 needs CUDA" in n for n in built.notes)


def test_lowerings_refuse_other_precisions() -> None:
    prepared = prepare_model(torchvision.models.alexnet().eval(), (3, 64, 64))
    with pytest.raises(ValueError, match="fp32 baseline"):
        build_backend(prepared, "im2col-cublas", CPU, "tf32")
    with pytest.raises(ValueError, match="unknown backend"):
        build_backend(prepared, "cudnn", CPU, "fp32")
