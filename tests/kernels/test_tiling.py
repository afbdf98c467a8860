"""The CUDA kernel's decomposition and metadata, checked on the CPU through a numpy model of
its indexing (tests/kernels/escort_emulator.py)."""

from __future__ import annotations

import random

import pytest
import torch

from service.kernels.stretched_csr import SparseWeight, make_geometry
from service.kernels.tiled import kernel_params
from service.kernels.tiled_meta import build_meta
from service.kernels.tiling import (
    MAX_ACCUMULATORS,
    STAGE_FLOATS,
    candidate_configs,
    default_config,
)
from tests.kernels.conftest import assert_matches, prune, random_case
from tests.kernels.escort_emulator import emulate, staged_indices

# The layer suite's shapes (docs/kernels.md): (C, K, H, kernel, stride, pad).
SUITE = [
    (64, 192, 27, 5, 1, 2),
    (192, 384, 13, 3, 1, 1),
    (64, 64, 224, 3, 1, 1),
    (512, 512, 14, 3, 1, 1),
    (64, 256, 56, 1, 1, 0),
    (128, 128, 56, 3, 2, 1),
    (512, 512, 7, 3, 1, 1),
    (512, 2048, 7, 1, 1, 0),
    (3, 64, 224, 7, 2, 3),
]


def _geometry_of(case):
    return make_geometry(tuple(case.weight.shape), tuple(case.x.shape[2:]), **case.kwargs)


@pytest.mark.parametrize("seed", range(60))
def test_emulated_kernel_matches_conv2d(seed: int) -> None:
    case = random_case(seed + 1000, max_hw=14)
    geometry = _geometry_of(case)
    sparse = SparseWeight.from_dense(case.weight)
    n = case.x.shape[0]
    configs = candidate_configs(geometry, n)
    picks = [configs[0], random.Random(seed).choice(configs)]
    for config in picks:
        meta = build_meta(sparse, geometry, config)
        params = kernel_params(geometry, meta, n, case.activation)
        y = emulate(case.x, meta, params, case.bias, case.residual)
        assert_matches(y, case.expected(), rel=1e-9)


def test_emulated_kernel_with_many_channel_chunks() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = prune(torch.randn(20, 150, 3, 3, generator=gen), 0.8, gen)
    x = torch.randn(2, 150, 19, 37, generator=gen)
    geometry = make_geometry(weight.shape, (19, 37), stride=1, padding=1)
    sparse = SparseWeight.from_dense(weight)
    expected = torch.nn.functional.conv2d(x.double(), weight.double(), padding=1)
    for config in candidate_configs(geometry, 2)[:5]:
        meta = build_meta(sparse, geometry, config)
        assert meta.rec_stride > 2  # several chunks really happen
        y = emulate(x, meta, kernel_params(geometry, meta, 2, None), None, None)
        assert_matches(y, expected, rel=1e-9)


@pytest.mark.parametrize("shape", SUITE)
@pytest.mark.parametrize("batch", [1, 16, 64])
def test_configs_fit_the_kernel(shape, batch) -> None:
    c, k, h, r, stride, pad = shape
    geometry = make_geometry((k, c, r, r), (h, h), stride, pad)
    for config in candidate_configs(geometry, batch):
        assert config.pixels_per_lane * config.rows_per_warp <= MAX_ACCUMULATORS
        assert config.chunk_floats(geometry) <= STAGE_FLOATS or config.chunk_channels == 1
        assert config.images * config.tile_h * config.tile_w <= 32 * config.pixels_per_lane
        assert 1 <= config.chunk_channels <= c
    default = default_config(geometry, batch)
    assert default == candidate_configs(geometry, batch)[0]


def test_rows_are_sorted_by_nonzeros_and_metadata_is_consistent() -> None:
    gen = torch.Generator().manual_seed(2)
    weight = prune(torch.randn(40, 70, 3, 3, generator=gen), 0.9, gen)
    weight[3] = 0
    geometry = make_geometry(weight.shape, (14, 14), padding=1)
    sparse = SparseWeight.from_dense(weight)
    meta = build_meta(sparse, geometry, default_config(geometry, 1))
    counts = sparse.row_nnz[meta.perm.long()]
    assert torch.all(counts[:-1] >= counts[1:])
    rec = meta.recptr.long()
    assert torch.all(rec[:, 1:] >= rec[:, :-1])
    assert int(rec[-1, -1]) == meta.meta.shape[0] and int(rec[0, 0]) == 0
    header = meta.config.header_slots()
    is_entry = torch.ones(meta.meta.shape[0], dtype=torch.bool)
    for start in rec[:, :-1].reshape(-1).tolist():
        is_entry[start : start + header] = False
    values = meta.meta[is_entry, 0].view(torch.float32)
    assert torch.equal(torch.sort(values).values, torch.sort(sparse.values).values)


@pytest.mark.parametrize("shape", SUITE)
@pytest.mark.parametrize("batch", [1, 16])
def test_staging_writes_every_element_once(shape, batch) -> None:
    c, k, h, r, stride, pad = shape
    geometry = make_geometry((k, c, r, r), (h, h), stride, pad)
    sparse = SparseWeight.from_dense(prune(torch.randn(k, c, r, r), 0.99, torch.Generator()))
    for config in candidate_configs(geometry, batch, 0.1)[:4]:
        meta = build_meta(sparse, geometry, config)
        params = kernel_params(geometry, meta, batch, None)
        written = staged_indices(params, meta.config.threads)
        pitch, tiw = params["pitch"], params["TIW"]
        cells = [i for i in range(params["chunk_floats"]) if i % pitch < tiw]
        assert sorted(written) == cells


def test_parameter_struct_matches_the_cuda_source() -> None:
    """The numpy struct passed by value must be EscortParams field for field, with C's layout;
    every field kernel_params fills must exist in it."""
    import re

    from service.kernels.escort_cuda import SOURCE
    from service.kernels.tiled import PARAMS_DTYPE

    body = re.search(r"struct EscortParams \{(.*?)\};", SOURCE, re.S).group(1)
    fields: list[tuple[str, str]] = []
    for line in body.splitlines():
        line = line.split("//")[0].strip().rstrip(";")
        if not line:
            continue
        ctype, names = re.match(r"(unsigned long long|unsigned int|int)\s+(.*)", line).groups()
        fields += [(ctype, name.strip()) for name in names.split(",")]
    assert list(PARAMS_DTYPE.names) == [name for _, name in fields]
    sizes = {"unsigned long long": 8, "unsigned int": 4, "int": 4}
    offset = 0
    for ctype, name in fields:
        size = sizes[ctype]
        offset = -(-offset // size) * size
        assert PARAMS_DTYPE.fields[name][1] == offset, name
        assert PARAMS_DTYPE.fields[name][0].itemsize == size, name
        offset += size
    assert PARAMS_DTYPE.itemsize == -(-offset // 8) * 8

    gen = torch.Generator().manual_seed(1)
    weight = prune(torch.randn(8, 4, 3, 3, generator=gen), 0.5, gen)
    geometry = make_geometry(weight.shape, (9, 9), padding=1)
    meta = build_meta(SparseWeight.from_dense(weight), geometry, default_config(geometry, 2))
    assert set(kernel_params(geometry, meta, 2, "relu")) == set(PARAMS_DTYPE.names)


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_large_strided_stems_get_a_config(batch: int) -> None:
    """AlexNet's conv1 (3->64, 11x11, stride 4) stages only at fewer pixels per lane."""
    from service.kernels.tiling import ConvGeometry, default_config

    geometry = ConvGeometry(
        in_channels=3,
        out_channels=64,
        groups=1,
        kernel_size=(11, 11),
        stride=(4, 4),
        dilation=(1, 1),
        padding=(2, 2, 2, 2),
        input_hw=(224, 224),
    )
    config = default_config(geometry, batch, density=0.84)
    assert config.blocks(geometry, batch) >= 1
