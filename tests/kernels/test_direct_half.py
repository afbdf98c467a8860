"""The fp16 direct kernel: its registration and configs (CPU), and on a GPU its answers
against F.conv2d in fp32 within 1e-2 relative error, on NaN-poisoned outputs, across the
random grid of shapes, every config the tuner may pick, skewed masks and model-sized layers."""

from __future__ import annotations

import pytest
import torch

from service.kernels import SparseConvPlan
from service.kernels.configs import candidate_configs, default_config
from service.kernels.direct import DirectConfig, direct_candidates
from service.kernels.direct_cuda import DIRECT_PIXELS_PER_LANE, DIRECT_SPLITS
from service.kernels.direct_half import DIRECT_HALF, DirectHalfConfig
from service.kernels.stretched_csr import make_geometry
from service.kernels.tiled_half import TILED_HALF
from service.kernels.tiling import TileHalfConfig
from service.kernels.variants import variant_for
from tests.kernels.conftest import prune, random_case

HALF = torch.float16


def _geometry(hw: int, channels: int = 256, kernel: int = 3):
    return make_geometry((channels, channels, kernel, kernel), (hw, hw), 1, kernel // 2, 1, 1)


# -- CPU: the registry and the configs ---------------------------------------------------------


def test_half_configs_are_their_own_and_find_the_half_variant() -> None:
    assert DirectHalfConfig(2, 8, 2) != DirectConfig(2, 8, 2)
    assert variant_for(DirectHalfConfig(2, 8, 2)) is DIRECT_HALF
    assert variant_for(DirectConfig(2, 8, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="no compiled direct kernel"):
        DirectHalfConfig(3, 8, 1)
    assert "unsigned short" in DIRECT_HALF.kernel_name(DirectHalfConfig(4, 8, 1))


@pytest.mark.parametrize(("hw", "batch"), [(7, 1), (14, 1), (56, 16), (28, 64)])
def test_an_fp16_layer_is_offered_only_fp16_configs(hw: int, batch: int) -> None:
    geometry = _geometry(hw)
    half = candidate_configs(geometry, batch, 0.1, dtype=HALF)
    assert half and all(variant_for(c).dtype == HALF for c in half)
    direct = [DirectHalfConfig(c.pixels_per_lane, c.warps, c.splits)
              for c in direct_candidates(geometry, batch, 0.1)]  # fmt: skip
    assert set(direct) <= set(half)  # no limit: every fp16 direct candidate is offered
    assert default_config(geometry, batch, 0.1, HALF) == half[0]
    assert all(variant_for(c).dtype == torch.float32 for c in candidate_configs(geometry, batch))


def test_a_shape_no_fp16_variant_takes_is_refused_clearly(monkeypatch) -> None:
    stem = make_geometry((64, 3, 11, 11), (64, 64), 4, 2, 1, 1)  # 121 taps: past the mask
    kinds = {type(c) for c in candidate_configs(stem, 1, 0.5, dtype=HALF)}
    assert kinds == {TileHalfConfig}  # the direct kernel cannot take it, the tiled one can
    monkeypatch.setattr(TILED_HALF, "supports", lambda geometry: False)
    assert candidate_configs(stem, 1, 0.5, dtype=HALF) == []
    with pytest.raises(ValueError, match="no torch.float16 kernel variant"):
        default_config(stem, 1, 0.5, HALF)


def test_a_plan_on_the_cpu_runs_fp32_only() -> None:
    plan = SparseConvPlan(torch.randn(4, 3, 3, 3), padding=1)
    assert plan.dtypes == (torch.float32,)
    plan.prepare((8, 8), dtypes=(HALF,))
    assert plan.prepared_dtypes((8, 8)) == ()


# -- GPU ---------------------------------------------------------------------------------------


def _needs_gpu():
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def assert_close_half(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-2) -> None:
    """fp16 output against fp32 F.conv2d: relative L2 error <= rel, every element within rel
    of the output's scale, and nothing left unwritten (NaN)."""
    assert actual.dtype == HALF
    actual, expected = actual.float().cpu(), expected.float().cpu()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite output (an element was never written?)"
    scale = max(1.0, float(expected.abs().max()))
    assert float((actual - expected).abs().max()) <= rel * scale
    norm = float(expected.norm())
    if norm > 0:
        assert float((actual - expected).norm()) / norm <= rel


def _half_run(plan: SparseConvPlan, case) -> torch.Tensor:
    x = case.x.half()
    oh, ow = plan.geometry(tuple(x.shape[2:])).output_hw
    out = torch.full((x.shape[0], plan.out_channels, oh, ow), float("nan"), device="cuda",
                     dtype=HALF)  # fmt: skip
    residual = None if case.residual is None else case.residual.half()
    y = plan(x, residual=residual, activation=case.activation, impl="cuda", out=out)
    torch.cuda.synchronize()
    return y


def _fp32_expected(case) -> torch.Tensor:
    """F.conv2d in fp32 on the inputs the kernel saw (rounded to fp16)."""
    saw = type(case)(**{**case.__dict__, "x": case.x.half().float()})
    if case.residual is not None:
        saw.residual = case.residual.half().float()
    return saw.expected().float()


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(160))
def test_half_kernel_matches_conv2d(seed: int) -> None:
    _needs_gpu()
    case = random_case(seed + 7000, device="cuda")
    plan = SparseConvPlan(case.weight, case.bias, **case.kwargs)
    hw, n = tuple(case.x.shape[2:]), case.x.shape[0]
    if not DIRECT_HALF.supports(plan.geometry(hw)):
        pytest.skip("a kernel past the direct kernel's 64 taps")
    p = DIRECT_PIXELS_PER_LANE[seed % len(DIRECT_PIXELS_PER_LANE)]
    splits = DIRECT_SPLITS[seed // 3 % len(DIRECT_SPLITS)]
    plan.prepare(hw, batch_sizes=(n,), dtypes=(HALF,))
    plan.use_config(hw, n, DirectHalfConfig(p, 8, splits))
    assert_close_half(_half_run(plan, case), _fp32_expected(case))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("n", "c", "k", "hw", "r", "stride", "sparsity"),
    [
        (1, 512, 512, 7, 3, 1, 0.9),
        (1, 256, 256, 14, 3, 1, 0.95),
        (16, 256, 1024, 14, 1, 1, 0.9),
        (8, 128, 128, 28, 3, 1, 0.8),
        (2, 64, 64, 56, 3, 2, 0.7),
    ],
)
def test_half_kernel_on_model_sized_layers_with_a_skewed_mask(
    n, c, k, hw, r, stride, sparsity
) -> None:
    """Per-channel nonzero counts from 0 to dense (magnitudes scaled by channel), the tuned
    choice among every fp16 candidate (direct and tiled), and the residual and relu epilogue."""
    _needs_gpu()
    gen = torch.Generator().manual_seed(n + c + k)
    skew = torch.linspace(0.05, 4.0, k).view(k, 1, 1, 1)
    weight = prune(torch.randn(k, c, r, r, generator=gen) * skew / (c * r * r) ** 0.5,
                   sparsity, gen)  # fmt: skip
    weight[0] = 0.0  # an empty row
    bias = torch.randn(k, generator=gen)
    x = torch.randn(n, c, hw, hw, generator=gen).cuda().half()
    plan = SparseConvPlan(weight.cuda(), bias.cuda(), stride=stride, padding=r // 2)
    plan.prepare((hw, hw), batch_sizes=(n,), dtypes=(HALF,))
    times = plan.tune((hw, hw), n, dtype=HALF)
    assert any(isinstance(c, DirectHalfConfig) for c in times)
    assert plan.config_for((hw, hw), n, HALF) == min(times, key=times.get)
    oh, ow = plan.geometry((hw, hw)).output_hw
    residual = torch.randn(n, k, oh, ow, generator=gen).cuda().half()
    y = plan(x, residual=residual, activation="relu")
    assert y.dtype == HALF
    expected = (
        torch.nn.functional.conv2d(x.float(), weight.cuda(), bias.cuda(), stride, r // 2)
        .add(residual.float())
        .clamp(min=0)
    )
    assert_close_half(y, expected)


@pytest.mark.gpu
def test_an_fp16_call_outside_a_capture_prepares_its_kernel() -> None:
    _needs_gpu()
    gen = torch.Generator().manual_seed(5)
    weight = prune(torch.randn(32, 16, 3, 3, generator=gen), 0.8, gen).cuda()
    plan = SparseConvPlan(weight, padding=1)
    plan.prepare((10, 10), batch_sizes=(2,))  # fp32 only
    x = torch.randn(2, 16, 10, 10, generator=gen).cuda().half()
    y = plan(x)
    assert HALF in plan.prepared_dtypes((10, 10)) and y.dtype == HALF
    assert_close_half(y, torch.nn.functional.conv2d(x.float(), weight, padding=1))


@pytest.mark.gpu
def test_an_unprepared_fp16_call_inside_a_capture_runs_fp32() -> None:
    """In a CUDA graph no metadata can be built: an fp16 call the plan was not prepared for
    runs the fp32 kernel between two casts, captured and replayed, and answers right."""
    _needs_gpu()
    gen = torch.Generator().manual_seed(6)
    weight = prune(torch.randn(32, 16, 3, 3, generator=gen), 0.8, gen).cuda()
    plan = SparseConvPlan(weight, padding=1)
    plan.prepare((10, 10), batch_sizes=(2,))  # fp32 only
    x = torch.randn(2, 16, 10, 10, generator=gen).cuda().half()
    plan(x.float())  # the fp32 launch exists before the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph):
        y = plan(x)
    graph.replay()
    torch.cuda.synchronize()
    assert HALF not in plan.prepared_dtypes((10, 10)) and y.dtype == HALF
    assert_close_half(y, torch.nn.functional.conv2d(x.float(), weight, padding=1))
