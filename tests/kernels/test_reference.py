"""The CPU reference against F.conv2d (float64) on the randomized acceptance grid."""

from __future__ import annotations

import time

import pytest
import torch

from service.kernels import SparseConvPlan, sparse_conv2d
from tests.kernels.conftest import assert_matches, prune, random_case

GRID_SEEDS = range(300)


@pytest.mark.parametrize("seed", GRID_SEEDS)
def test_reference_matches_conv2d(seed: int) -> None:
    case = random_case(seed)
    plan = SparseConvPlan(case.weight, case.bias, **case.kwargs)
    y = plan(case.x, residual=case.residual, activation=case.activation, impl="reference")
    assert_matches(y, case.expected())


@pytest.mark.parametrize("seed", range(0, 300, 10))
def test_functional_api_matches_conv2d(seed: int) -> None:
    case = random_case(seed)
    case.residual, case.activation = None, None
    y = sparse_conv2d(case.x, case.weight, case.bias, **case.kwargs)
    assert_matches(y, case.expected())


def test_small_chunks_give_the_same_answer() -> None:
    from service.kernels.reference import conv2d_reference

    case = random_case(7)
    plan = SparseConvPlan(case.weight, case.bias, **case.kwargs)
    csr = plan.stretched(tuple(case.x.shape[2:]))
    whole = conv2d_reference(case.x, csr, plan._bias)
    chunked = conv2d_reference(case.x, csr, plan._bias, chunk_elements=7)
    torch.testing.assert_close(whole, chunked, rtol=1e-6, atol=1e-6)


def test_odd_batch_keeps_every_image() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = prune(torch.randn(8, 4, 3, 3, generator=gen), 0.9, gen)
    x = torch.randn(3, 4, 9, 9, generator=gen)
    plan = SparseConvPlan(weight, padding=1)
    batched = plan(x)
    for i in range(3):
        torch.testing.assert_close(batched[i : i + 1], plan(x[i : i + 1]), rtol=0, atol=0)
    assert torch.count_nonzero(batched[-1]) > 0


@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_epilogue_variants(activation: str | None) -> None:
    gen = torch.Generator().manual_seed(11)
    weight = prune(torch.randn(6, 5, 3, 3, generator=gen) * 3, 0.5, gen)
    bias = torch.randn(6, generator=gen)
    x = torch.randn(2, 5, 8, 8, generator=gen)
    residual = torch.randn(2, 6, 8, 8, generator=gen) * 4
    plan = SparseConvPlan(weight, bias, padding=1)
    y = plan(x, residual=residual, activation=activation)
    expected = torch.nn.functional.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    expected = expected + residual.double()
    if activation == "relu":
        expected = expected.clamp(min=0)
    elif activation == "relu6":
        expected = expected.clamp(0, 6)
    assert_matches(y, expected)
    if activation == "relu6":
        assert float(y.max()) == 6.0  # the clamp is really applied


@pytest.mark.slow
def test_resnet50_at_90_percent_takes_seconds() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet50()
    shapes: list[tuple[torch.nn.Conv2d, tuple[int, ...]]] = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: shapes.append((mod, tuple(inp[0].shape))))
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for hook in hooks:
        hook.remove()
    gen = torch.Generator().manual_seed(0)
    plans = []
    for conv, shape in shapes:
        weight = prune(conv.weight.detach(), 0.9, gen)
        plan = SparseConvPlan(weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
        plans.append((plan.prepare(shape[2:]), shape))
    start = time.perf_counter()
    for plan, shape in plans:
        plan(torch.randn(shape, generator=gen))
    elapsed = time.perf_counter() - start
    assert len(plans) == 53
    assert elapsed < 20.0, f"ResNet-50 convs at 90% took {elapsed:.1f} s on the reference"
