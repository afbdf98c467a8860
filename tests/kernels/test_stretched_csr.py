"""The stretched-CSR format: offsets, rows, groups, geometry and padding forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from service.kernels.stretched_csr import (
    SparseWeight,
    make_geometry,
    normalize_padding,
    stretch,
)


def test_offsets_follow_the_paper_formula() -> None:
    weight = torch.zeros(2, 3, 3, 2)
    weight[0, 2, 1, 1] = 1.5  # (c, r, s) = (2, 1, 1)
    weight[1, 0, 2, 0] = -2.0  # (0, 2, 0)
    weight[1, 1, 0, 1] = 0.5  # (1, 0, 1)
    geometry = make_geometry(weight.shape, (5, 7), stride=2, padding=(1, 2), dilation=(2, 3))
    hp, wp = geometry.padded_hw
    assert (hp, wp) == (7, 11)
    csr = stretch(SparseWeight.from_dense(weight), geometry)
    assert csr.rowptr.tolist() == [0, 1, 3]
    expected = [
        (2 * hp + 1 * 2) * wp + 1 * 3,
        (0 * hp + 2 * 2) * wp + 0 * 3,
        (1 * hp + 0 * 2) * wp + 1 * 3,
    ]
    assert csr.colidx.tolist() == expected
    assert csr.values.tolist() == [1.5, -2.0, 0.5]
    assert csr.colidx.dtype == torch.int32


def test_groups_have_their_own_csr_and_absolute_offsets() -> None:
    weight = torch.randn(6, 2, 3, 3)
    weight[1] = 0.0  # an empty row
    geometry = make_geometry(weight.shape, (8, 8), padding=1, groups=3)
    csr = stretch(SparseWeight.from_dense(weight), geometry)
    plane = 2 * 10 * 10
    for g in range(3):
        rowptr, colidx, values = csr.group(g)
        assert rowptr[0] == 0 and len(rowptr) == 3
        assert int(colidx.max()) < plane
        assert torch.equal(values, weight[2 * g : 2 * g + 2][weight[2 * g : 2 * g + 2] != 0])
    absolute = csr.absolute_colidx()
    assert torch.equal(absolute - csr.colidx.long(), (csr.rows // 2) * plane)
    assert csr.rowptr[2] - csr.rowptr[1] == 0


@pytest.mark.parametrize(
    "shape, hw, kwargs",
    [
        ((4, 3, 3, 3), (9, 11), {"stride": 2, "padding": 1}),
        ((4, 3, 1, 5), (6, 13), {"stride": (1, 3), "padding": (0, 2), "dilation": (1, 2)}),
        ((6, 1, 3, 3), (10, 7), {"stride": 3, "padding": 3, "groups": 3, "dilation": 2}),
        ((2, 2, 7, 7), (15, 15), {"stride": 2, "padding": 3}),
    ],
)
def test_output_geometry_matches_conv2d(shape, hw, kwargs) -> None:
    geometry = make_geometry(shape, hw, **kwargs)
    groups = kwargs.get("groups", 1)
    x = torch.zeros(1, shape[1] * groups, *hw)
    y = F.conv2d(
        x,
        torch.zeros(shape),
        stride=kwargs.get("stride", 1),
        padding=kwargs.get("padding", 0),
        dilation=kwargs.get("dilation", 1),
        groups=groups,
    )
    assert geometry.output_hw == tuple(y.shape[2:])


def test_padding_forms() -> None:
    one = (1, 1)
    assert normalize_padding(2, (3, 3), one, one) == (2, 2, 2, 2)
    assert normalize_padding((1, 3), (3, 3), one, one) == (3, 3, 1, 1)
    assert normalize_padding((0, 1, 2, 3), (3, 3), one, one) == (0, 1, 2, 3)
    assert normalize_padding("valid", (3, 3), one, one) == (0, 0, 0, 0)
    assert normalize_padding("same", (4, 3), (1, 2), one) == (2, 2, 1, 2)
    with pytest.raises(ValueError):
        normalize_padding("same", (3, 3), one, (2, 2))
    with pytest.raises(ValueError):
        normalize_padding((1, 2, 3), (3, 3), one, one)
    with pytest.raises(ValueError):
        normalize_padding(-1, (3, 3), one, one)


def test_bad_geometry_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        make_geometry((2, 2, 5, 5), (3, 3))
    with pytest.raises(ValueError, match="divisible"):
        make_geometry((3, 2, 3, 3), (8, 8), groups=2)


def test_empty_weight() -> None:
    sparse = SparseWeight.from_dense(torch.zeros(4, 2, 3, 3))
    assert sparse.nnz == 0 and sparse.rowptr.tolist() == [0] * 5
    csr = stretch(sparse, make_geometry((4, 2, 3, 3), (5, 5), padding=1))
    assert csr.colidx.numel() == 0
