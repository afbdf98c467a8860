"""The Escort CUDA kernel against float64 ground truth, on a GPU with CuPy (marked gpu).

Every output is poisoned with NaN before the launch, so an element the kernel fails to write
shows up as a failure rather than as stale memory that happens to be right."""

from __future__ import annotations

import random

import pytest
import torch

from service.kernels import SparseConvPlan, sparse_conv2d
from service.kernels.configs import candidate_configs
from service.kernels.direct import DIRECT_WARPS, DirectConfig
from service.kernels.direct_cuda import DIRECT_PIXELS_PER_LANE, DIRECT_SPLITS
from service.kernels.stretched_csr import make_geometry
from service.kernels.tiling import TileConfig
from tests.kernels.conftest import assert_matches, prune, random_case

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _strict_fp32():
    pytest.importorskip("cupy")
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _poisoned(plan: SparseConvPlan, x: torch.Tensor) -> torch.Tensor:
    oh, ow = plan.geometry(tuple(x.shape[2:])).output_hw
    return torch.full((x.shape[0], plan.out_channels, oh, ow), float("nan"), device=x.device)


def _run(plan: SparseConvPlan, case, out: torch.Tensor) -> torch.Tensor:
    y = plan(case.x, residual=case.residual, activation=case.activation, impl="cuda", out=out)
    torch.cuda.synchronize()
    return y


@pytest.mark.parametrize("seed", range(300))
def test_kernel_matches_conv2d(seed: int) -> None:
    case = random_case(seed, device="cuda")
    plan = SparseConvPlan(case.weight, case.bias, **case.kwargs)
    y = _run(plan, case, _poisoned(plan, case.x))
    assert_matches(y, case.expected())


@pytest.mark.parametrize("seed", range(40))
def test_every_candidate_config(seed: int) -> None:
    """Each config the tuner may pick is correct, not only the default."""
    case = random_case(seed + 500, max_hw=30, device="cuda")
    plan = SparseConvPlan(case.weight, case.bias, **case.kwargs)
    hw, n = tuple(case.x.shape[2:]), case.x.shape[0]
    geometry = plan.geometry(hw)
    expected = case.expected()
    for config in candidate_configs(geometry, n, plan.density):
        plan.use_config(hw, n, config)
        y = _run(plan, case, _poisoned(plan, case.x))
        assert_matches(y, expected)


@pytest.mark.parametrize("seed", range(120))
def test_direct_kernel_matches_conv2d(seed: int) -> None:
    """The direct kernel on the whole grid, whatever the default would pick."""
    case = random_case(seed + 2000, device="cuda")
    plan = SparseConvPlan(case.weight, case.bias, **case.kwargs)
    hw, n = tuple(case.x.shape[2:]), case.x.shape[0]
    p = DIRECT_PIXELS_PER_LANE[seed % len(DIRECT_PIXELS_PER_LANE)]
    warps = DIRECT_WARPS[seed // 3 % len(DIRECT_WARPS)]
    splits = [s for s in DIRECT_SPLITS if warps % s == 0][seed // 6 % 3]
    plan.use_config(hw, n, DirectConfig(p, warps, splits))
    y = _run(plan, case, _poisoned(plan, case.x))
    assert_matches(y, case.expected())


def test_split_workspace_is_left_clean() -> None:
    """Split configs share a workspace across calls; every call must start from zeros."""
    gen = torch.Generator().manual_seed(17)
    weight = prune(torch.randn(40, 96, 3, 3, generator=gen), 0.8, gen).cuda()
    plan = SparseConvPlan(weight, torch.randn(40, generator=gen).cuda(), padding=1)
    geometry = plan.geometry((7, 9))
    configs = candidate_configs(geometry, 2, plan.density)
    splits = [c for c in configs if isinstance(c, TileConfig) and c.splits > 1]
    assert splits
    plan.use_config((7, 9), 2, splits[0])
    expected = None
    for _ in range(3):
        x = torch.randn(2, 96, 7, 9, generator=gen).cuda()
        out = torch.full((2, 40, 7, 9), float("nan"), device="cuda")
        y = plan(x, activation="relu", impl="cuda", out=out)
        expected = torch.nn.functional.conv2d(
            x.double(), weight.double(), plan._bias.double(), padding=1
        ).clamp(min=0)
        assert_matches(y, expected)


def test_functional_api_on_cuda() -> None:
    case = random_case(3, device="cuda")
    y = sparse_conv2d(case.x, case.weight, case.bias, **case.kwargs, impl="cuda")
    assert y.is_cuda
    case.residual, case.activation = None, None
    assert_matches(y, case.expected())


@pytest.mark.parametrize(
    "n, c, k, hw, r, stride, pad, sparsity",
    [
        (8, 256, 256, 56, 3, 1, 1, 0.9),
        (3, 64, 64, 224, 3, 1, 1, 0.7),
        (64, 512, 512, 7, 3, 1, 1, 0.95),
        (16, 1024, 256, 14, 1, 1, 0, 0.9),
        (5, 3, 64, 224, 7, 2, 3, 0.5),
        (2, 96, 96, 112, 3, 2, (0, 1, 0, 1), 0.8),
    ],
)
def test_big_shapes(n, c, k, hw, r, stride, pad, sparsity) -> None:
    gen = torch.Generator().manual_seed(n + c + k)
    weight = prune(torch.randn(k, c, r, r, generator=gen) / (c * r * r) ** 0.5, sparsity, gen)
    bias = torch.randn(k, generator=gen)
    x = torch.randn(n, c, hw, hw, generator=gen)
    plan = SparseConvPlan(weight.cuda(), bias.cuda(), stride=stride, padding=pad)
    xc = x.cuda()
    out = _poisoned(plan, xc)
    y = plan(xc, activation="relu", impl="cuda", out=out)
    geometry = make_geometry(weight.shape, (hw, hw), stride, pad)
    expected = torch.nn.functional.conv2d(
        torch.nn.functional.pad(xc.double(), geometry.padding),
        weight.cuda().double(),
        bias.cuda().double(),
        stride,
    ).clamp(min=0)
    assert_matches(y, expected)


def test_graph_capture_and_replay() -> None:
    gen = torch.Generator().manual_seed(9)
    weight = prune(torch.randn(64, 32, 3, 3, generator=gen), 0.9, gen).cuda()
    bias = torch.randn(64, generator=gen).cuda()
    plan = SparseConvPlan(weight, bias, padding=1).prepare((28, 28))
    static_x = torch.randn(4, 32, 28, 28, device="cuda")
    static_res = torch.randn(4, 64, 28, 28, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            plan(static_x, residual=static_res, activation="relu6")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = plan(static_x, residual=static_res, activation="relu6")
    for _ in range(3):
        static_x.copy_(torch.randn_like(static_x))
        static_res.copy_(torch.randn_like(static_res))
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.nn.functional.conv2d(
            static_x.double(), weight.double(), bias.double(), padding=1
        )
        assert_matches(static_y, (expected + static_res.double()).clamp(0, 6))


def test_unprepared_geometry_inside_capture_is_refused() -> None:
    plan = SparseConvPlan(torch.randn(8, 4, 3, 3).cuda(), padding=1)
    x = torch.randn(1, 4, 10, 10, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="prepare"), torch.cuda.graph(graph):
        plan(x)


def test_tune_picks_a_correct_config() -> None:
    case = random_case(21, max_hw=40, device="cuda")
    plan = SparseConvPlan(case.weight, case.bias, **case.kwargs)
    hw, n = tuple(case.x.shape[2:]), case.x.shape[0]
    times = plan.tune(hw, n, reps=3)
    assert times and all(t > 0 for t in times.values())
    assert plan.config_for(hw, n) == min(times, key=times.__getitem__)
    assert_matches(_run(plan, case, _poisoned(plan, case.x)), case.expected())


def test_paper_port_matches_conv2d() -> None:
    from bench.kernels.methods import port_runner

    rng = random.Random(4)
    for seed in range(12):
        case = random_case(seed + 40, device="cuda")
        if case.groups != 1 and rng.random() < 0.5:
            continue
        case.residual, case.activation = None, None
        if case.bias is None:
            case.bias = torch.zeros(case.weight.shape[0], device="cuda")
        run = port_runner(case.weight, case.bias, tuple(case.x.shape[2:]), **case.kwargs)
        y = run(case.x)
        torch.cuda.synchronize()
        assert_matches(y, case.expected())
