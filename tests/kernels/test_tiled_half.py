"""The fp16 tiled kernel: its configs and metadata on the CPU, its indexing through a numpy
model of the kernel (tiled_half_emulator.py), and on a GPU its answers against F.conv2d in
fp32 within 1e-2 relative error, NaN-poisoned, at every candidate config."""

from __future__ import annotations

import random

import pytest
import torch

from service.kernels import SparseConvPlan
from service.kernels.configs import candidate_configs, default_config
from service.kernels.direct_half import DirectHalfConfig
from service.kernels.stretched_csr import SparseWeight, make_geometry
from service.kernels.tiled import kernel_params
from service.kernels.tiled_half import TILED_HALF, half_candidates, half_default
from service.kernels.tiled_meta import build_meta
from service.kernels.tiling import (
    MAX_ACCUMULATORS,
    TileConfig,
    TileHalfConfig,
    fits_shared,
)
from service.kernels.variants import variant_for
from tests.kernels.conftest import prune, random_case
from tests.kernels.test_direct_half import assert_close_half
from tests.kernels.test_tiling import SUITE
from tests.kernels.tiled_half_emulator import emulate_half

HALF = torch.float16


def _geometry_of(case):
    return make_geometry(tuple(case.weight.shape), tuple(case.x.shape[2:]), **case.kwargs)


def _rounded_expected(case) -> torch.Tensor:
    """float64 conv of what the fp16 kernel sees: x, weights and residual rounded to fp16."""
    rounded = type(case)(**case.__dict__)
    rounded.x, rounded.weight = case.x.half().float(), case.weight.half().float()
    if case.residual is not None:
        rounded.residual = case.residual.half().float()
    return rounded.expected()


# -- CPU: configs and metadata -----------------------------------------------------------------


def test_half_configs_have_even_rows_no_split_and_their_own_type() -> None:
    with pytest.raises(ValueError, match="even rows"):
        TileHalfConfig(2, 1, 8, 1, 4, 7, 16)
    with pytest.raises(ValueError, match="does not split"):
        TileHalfConfig(2, 1, 8, 1, 4, 8, 16, splits=2)
    half = TileHalfConfig(4, 2, 8, 1, 4, 8, 16)
    assert half.pairs_per_lane == 2 and half != TileConfig(4, 2, 8, 1, 4, 8, 16)
    assert variant_for(half) is TILED_HALF
    assert TILED_HALF.kernel_name(half) == "escort_conv_half<2, 2>"


def test_records_hold_half2_values_and_parity_split_columns() -> None:
    config = TileHalfConfig(2, 1, 8, 1, 4, 8, 16)
    geometry = make_geometry((8, 16, 3, 3), (14, 14), 1, 1)
    values = torch.tensor([1.0, -2.5, 0.1], dtype=torch.float32)
    bits = config.value_bits(values).to(torch.int64) & 0xFFFFFFFF
    lo = (bits & 0xFFFF).to(torch.int16).view(torch.float16)
    assert torch.equal(bits >> 16, bits & 0xFFFF) and torch.equal(lo, values.half())
    tiw = config.window(geometry)[1]  # 10: columns 0..9 -> even half 0..4, odd half 5..9
    cols = config.column(geometry, torch.arange(tiw))
    assert tiw == 10 and cols.tolist() == [0, 5, 1, 6, 2, 7, 3, 8, 4, 9]


@pytest.mark.parametrize("shape", SUITE)
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_half_configs_fit_the_kernel(shape, batch) -> None:
    c, k, h, r, stride, pad = shape
    geometry = make_geometry((k, c, r, r), (h, h), stride, pad)
    configs = half_candidates(geometry, batch)
    assert configs and configs[0] == half_default(geometry, batch)
    for config in configs:
        assert isinstance(config, TileHalfConfig) and config.splits == 1
        assert config.pixels_per_lane * config.rows_per_warp <= MAX_ACCUMULATORS
        assert config.images * config.tile_h * config.tile_w <= 32 * config.pixels_per_lane
        assert config.row_pitch(geometry) >= config.window(geometry)[1]
    meta = build_meta(SparseWeight.from_dense(prune(torch.randn(k, c, r, r),
                                                   0.9, torch.Generator())), geometry, configs[0])  # fmt: skip
    assert fits_shared(meta.config.chunk_floats(geometry), meta.record_max)


def test_an_fp16_layer_ranks_tiled_first_unless_the_fp32_tiled_kernel_would_split() -> None:
    big = make_geometry((256, 256, 3, 3), (56, 56), 1, 1)
    small = make_geometry((512, 512, 3, 3), (7, 7), 1, 1)
    assert isinstance(default_config(big, 16, 0.1, HALF), TileHalfConfig)
    assert isinstance(default_config(small, 1, 0.1, HALF), DirectHalfConfig)
    kinds = {type(c) for c in candidate_configs(small, 1, 0.1, limit=12, dtype=HALF)}
    assert kinds == {TileHalfConfig, DirectHalfConfig}


@pytest.mark.parametrize("seed", range(50))
def test_emulated_half_kernel_matches_conv2d(seed: int) -> None:
    case = random_case(seed + 9000, max_hw=14)
    geometry = _geometry_of(case)
    n = case.x.shape[0]
    configs = half_candidates(geometry, n)
    if not configs:
        pytest.skip("no fp16 tiled config stages this window")
    sparse = SparseWeight.from_dense(case.weight)
    expected = _rounded_expected(case)
    for config in {configs[0], random.Random(seed).choice(configs)}:
        meta = build_meta(sparse, geometry, config)
        params = kernel_params(geometry, meta, n, case.activation)
        y = emulate_half(case.x, meta, params, case.bias, case.residual)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


def test_emulated_half_kernel_across_chunks_and_strides() -> None:
    gen = torch.Generator().manual_seed(11)
    for stride, dilation, hw in ((1, 1, (19, 37)), (2, 1, (21, 30)), (1, 2, (16, 17))):
        weight = prune(torch.randn(20, 150, 3, 3, generator=gen), 0.8, gen)
        x = torch.randn(2, 150, *hw, generator=gen)
        geometry = make_geometry(weight.shape, hw, stride=stride, padding=1, dilation=dilation)
        sparse = SparseWeight.from_dense(weight)
        expected = torch.nn.functional.conv2d(
            x.half().double(), weight.half().double(), stride=stride, padding=1, dilation=dilation
        )
        for config in half_candidates(geometry, 2)[:4]:
            meta = build_meta(sparse, geometry, config)
            assert meta.rec_stride > 2  # several chunks really happen
            y = emulate_half(x, meta, kernel_params(geometry, meta, 2, None), None, None)
            torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)


# -- GPU ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(120))
def test_half_tiled_kernel_matches_conv2d(seed: int) -> None:
    pytest.importorskip("cupy")
    case = random_case(seed + 11000, device="cuda")
    plan = SparseConvPlan(case.weight, case.bias, **case.kwargs)
    hw, n = tuple(case.x.shape[2:]), case.x.shape[0]
    configs = half_candidates(plan.geometry(hw), n, plan.density)
    if not configs:
        pytest.skip("no fp16 tiled config stages this window")
    plan.prepare(hw, batch_sizes=(n,), dtypes=(HALF,))
    expected = _rounded_expected(case).float()
    for config in {configs[0], random.Random(seed).choice(configs)}:
        plan.use_config(hw, n, config)
        oh, ow = plan.geometry(hw).output_hw
        out = torch.full((n, plan.out_channels, oh, ow), float("nan"), device="cuda", dtype=HALF)
        residual = None if case.residual is None else case.residual.half()
        y = plan(case.x.half(), residual=residual, activation=case.activation, impl="cuda",
                 out=out)  # fmt: skip
        torch.cuda.synchronize()
        assert_close_half(y, expected)


@pytest.mark.gpu
@pytest.mark.parametrize(("n", "c", "k", "hw", "r", "stride"),
                         [(16, 256, 256, 14, 3, 1), (64, 128, 128, 28, 3, 1),
                          (16, 64, 256, 56, 1, 1), (8, 128, 128, 56, 3, 2)])  # fmt: skip
def test_half_tiled_kernel_on_model_sized_layers(n, c, k, hw, r, stride) -> None:
    pytest.importorskip("cupy")
    gen = torch.Generator().manual_seed(n * c + k)
    skew = torch.linspace(0.05, 4.0, k).view(k, 1, 1, 1)
    weight = prune(torch.randn(k, c, r, r, generator=gen) * skew / (c * r * r) ** 0.5, 0.9, gen)
    weight[3] = 0.0  # an empty row
    plan = SparseConvPlan(weight.cuda(), torch.randn(k, generator=gen).cuda(), stride=stride,
                          padding=r // 2)  # fmt: skip
    x = torch.randn(n, c, hw, hw, generator=gen).cuda().half()
    plan.prepare((hw, hw), batch_sizes=(n,), dtypes=(HALF,))
    times = plan.tune((hw, hw), n, dtype=HALF)
    assert any(isinstance(config, TileHalfConfig) for config in times)
    expected = torch.nn.functional.conv2d(
        x.float(), weight.cuda().half().float(), plan._bias, stride, r // 2
    ).clamp(min=0)
    for config in times:
        plan.use_config((hw, hw), n, config)
        assert_close_half(plan(x, activation="relu"), expected)
