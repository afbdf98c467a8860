"""The direct kernel's metadata and launch parameters, checked on the CPU through a numpy
model of its indexing (tests/kernels/direct_emulator.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from service.kernels.configs import candidate_configs, default_config
from service.kernels.direct import (
    DIRECT_PARAMS_DTYPE,
    DirectConfig,
    build_direct_meta,
    direct_params,
)
from service.kernels.direct_cuda import DIRECT_PIXELS_PER_LANE, DIRECT_SOURCE, DIRECT_SPLITS
from service.kernels.stretched_csr import SparseWeight, make_geometry
from service.kernels.tiling import TileConfig
from tests.kernels.conftest import assert_matches, prune, random_case
from tests.kernels.direct_emulator import emulate_direct


def _geometry_of(case):
    return make_geometry(tuple(case.weight.shape), tuple(case.x.shape[2:]), **case.kwargs)


@pytest.mark.parametrize("seed", range(60))
def test_emulated_direct_kernel_matches_conv2d(seed: int) -> None:
    case = random_case(seed + 3000, max_hw=14)
    geometry = _geometry_of(case)
    meta = build_direct_meta(SparseWeight.from_dense(case.weight), geometry)
    n = case.x.shape[0]
    splits = DIRECT_SPLITS[seed // 3 % len(DIRECT_SPLITS)]
    config = DirectConfig(DIRECT_PIXELS_PER_LANE[seed % len(DIRECT_PIXELS_PER_LANE)], 8, splits)
    params = direct_params(geometry, config, n, case.activation)
    y = emulate_direct(case.x, meta, config, params, case.bias, case.residual)
    assert_matches(y, case.expected(), rel=1e-9)


def test_interior_warps_and_border_warps_both_happen() -> None:
    """On a 70x70 map with a 3x3 kernel some warps lie wholly inside (no bounds checks) and
    others touch the padding; both paths must agree with conv2d."""
    gen = torch.Generator().manual_seed(3)
    weight = prune(torch.randn(6, 5, 3, 3, generator=gen), 0.5, gen)
    x = torch.randn(1, 5, 70, 70, generator=gen)
    geometry = make_geometry(weight.shape, (70, 70), padding=1)
    params = direct_params(geometry, DirectConfig(1, 8), 1, None)
    expected = torch.nn.functional.conv2d(x.double(), weight.double(), padding=1)
    meta = build_direct_meta(SparseWeight.from_dense(weight), geometry)
    y = emulate_direct(x, meta, DirectConfig(1, 8), params, None, None)
    assert_matches(y, expected, rel=1e-9)
    q = np.arange(70 * 70 // 32 * 32).reshape(-1, 32)  # whole warps of one pixel per lane
    oh, ow = q // 70, q % 70
    inside = ((oh >= 1) & (oh <= 68) & (ow >= 1) & (ow <= 68)).all(axis=1)
    assert inside.any() and not inside.all()


def test_metadata_rows_are_sorted_and_offsets_address_the_unpadded_input() -> None:
    gen = torch.Generator().manual_seed(8)
    weight = prune(torch.randn(12, 4, 3, 5, generator=gen), 0.6, gen)
    weight[5] = 0.0  # an empty row
    geometry = make_geometry(weight.shape, (11, 13), padding=(1, 2), dilation=(2, 1))
    sparse = SparseWeight.from_dense(weight)
    meta = build_direct_meta(sparse, geometry)
    counts = torch.diff(meta.rowptr.long())
    assert torch.all(counts[:-1] >= counts[1:])
    assert counts.sum() == sparse.nnz and counts[-1] == 0
    assert sorted(meta.perm.tolist()) == list(range(12))
    for row in range(12):
        k = int(meta.perm[row])
        records = meta.meta[meta.rowptr[row] : meta.rowptr[row + 1]]
        taps = records[:, 2].tolist()
        assert taps == sorted(taps)  # grouped by tap
        for value_bits, offset, tap, pad in records.tolist():
            r, s = divmod(tap, 5)
            c, rem = divmod(offset, 11 * 13)
            assert pad == 0
            assert rem == (2 * r) * 13 + s
            value = np.array([value_bits], dtype=np.int32).view(np.float32)[0]
            assert weight[k, c, r, s] == value


def test_default_is_direct_where_the_tiled_kernel_would_split() -> None:
    small = make_geometry((256, 1024, 1, 1), (14, 14))
    assert isinstance(default_config(small, 1, 0.1), DirectConfig)
    large = make_geometry((64, 64, 3, 3), (224, 224), padding=1)
    assert isinstance(default_config(large, 16, 0.1), TileConfig)


@pytest.mark.parametrize("batch", [1, 16])
def test_candidates_offer_both_kernels_within_the_tuning_limit(batch: int) -> None:
    geometry = make_geometry((512, 512, 3, 3), (14, 14), padding=1)
    configs = candidate_configs(geometry, batch, 0.1, limit=12)
    assert len(configs) == 12 and len(set(configs)) == 12
    kinds = {type(c) for c in configs}
    assert kinds == {DirectConfig, TileConfig}
    assert configs[0] == default_config(geometry, batch, 0.1)


def test_direct_parameter_struct_matches_the_cuda_source() -> None:
    body = re.search(r"struct DirectParams \{(.*?)\};", DIRECT_SOURCE, re.S).group(1)
    fields: list[tuple[str, str]] = []
    for line in body.splitlines():
        line = line.split("//")[0].strip().rstrip(";")
        if line:
            ctype, names = re.match(r"(unsigned long long|long long|int)\s+(.*)", line).groups()
            fields += [(ctype, name.strip()) for name in names.split(",")]
    assert list(DIRECT_PARAMS_DTYPE.names) == [name for _, name in fields]
    sizes = {"unsigned long long": 8, "long long": 8, "int": 4}
    offset = 0
    for ctype, name in fields:
        offset = -(-offset // sizes[ctype]) * sizes[ctype]
        assert DIRECT_PARAMS_DTYPE.fields[name][1] == offset, name
        offset += sizes[ctype]
    assert DIRECT_PARAMS_DTYPE.itemsize == -(-offset // 8) * 8
    geometry = make_geometry((8, 4, 3, 3), (9, 9), padding=1)
    params = direct_params(geometry, DirectConfig(2, 8, 4), 2, "relu")
    assert set(params) == set(DIRECT_PARAMS_DTYPE.names) and params["splits"] == 4


def test_kernels_over_64_taps_stay_on_the_tiled_kernel() -> None:
    """A pixel's in-image taps are a 64-bit mask, so AlexNet's 11x11 stem is tiled only."""
    geometry = make_geometry((64, 3, 11, 11), (224, 224), stride=4, padding=2)
    assert not any(isinstance(c, DirectConfig) for c in candidate_configs(geometry, 1, 0.3))
    assert isinstance(default_config(geometry, 1, 0.3), TileConfig)
    weight = prune(torch.randn(64, 3, 11, 11), 0.7, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="at most 64 taps"):
        build_direct_meta(SparseWeight.from_dense(weight), geometry)
