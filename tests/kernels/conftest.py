"""Random pruned convolutions and their float64 ground truth (F.conv2d)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from service.kernels.stretched_csr import make_geometry

SPARSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)
PADDINGS: tuple[Any, ...] = (0, 1, 2, 3, (1, 2), (0, 1, 0, 1), (1, 2, 0, 3), (3, 0, 2, 1))


@dataclass
class ConvCase:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    residual: torch.Tensor | None
    activation: str | None
    stride: tuple[int, int]
    padding: Any
    dilation: tuple[int, int]
    groups: int

    @property
    def kwargs(self) -> dict[str, Any]:
        return {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "groups": self.groups,
        }

    def expected(self) -> torch.Tensor:
        """activation(conv2d(x, w, b) + residual), computed by torch in float64."""
        geometry = make_geometry(tuple(self.weight.shape), tuple(self.x.shape[2:]), **self.kwargs)
        bias = None if self.bias is None else self.bias.double()
        y = F.conv2d(
            F.pad(self.x.double(), geometry.padding),
            self.weight.double(),
            bias,
            self.stride,
            0,
            self.dilation,
            self.groups,
        )
        if self.residual is not None:
            y = y + self.residual.double()
        if self.activation == "relu":
            y = y.clamp(min=0)
        elif self.activation == "relu6":
            y = y.clamp(0, 6)
        return y

    def __repr__(self) -> str:
        return (
            f"ConvCase(x={tuple(self.x.shape)}, w={tuple(self.weight.shape)}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}, "
            f"residual={self.residual is not None}, act={self.activation})"
        )


def prune(weight: torch.Tensor, sparsity: float, generator: torch.Generator) -> torch.Tensor:
    """Zeroes a random `sparsity` fraction of the weights (exactly that many, rounded)."""
    flat = weight.clone().reshape(-1)
    count = round(sparsity * flat.numel())
    order = torch.randperm(flat.numel(), generator=generator)
    flat[order[:count]] = 0.0
    return flat.view_as(weight)


def random_case(seed: int, max_hw: int = 16, device: str = "cpu") -> ConvCase:
    """A small random convolution from the acceptance grid (stride 1-3, padding 0-3 incl.
    asymmetric, dilation 1-2, groups 1/2/3/depthwise with multipliers, kernels 1-7 incl.
    non-square, batch 1/3/8, the sparsity grid, empty rows and channels, epilogues)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    kind = rng.choice(["dense", "dense", "grouped", "depthwise"])
    if kind == "depthwise":
        groups = rng.choice([3, 4, 6])
        cin, cout = groups, groups * rng.choice([1, 2, 3])
    elif kind == "grouped":
        groups = rng.choice([2, 3])
        cin, cout = groups * rng.choice([1, 2, 3]), groups * rng.choice([1, 2, 4])
    else:
        groups = 1
        cin, cout = rng.choice([1, 3, 4, 7, 16]), rng.choice([1, 2, 5, 8, 16])
    r = rng.choice([1, 3, 5, 7])
    s = rng.choice([r, r, 1, 3, 5])
    stride = (rng.choice([1, 2, 3]), rng.choice([1, 2, 3]))
    dilation = (rng.choice([1, 1, 2]), rng.choice([1, 1, 2]))
    padding = rng.choice(PADDINGS)
    n = rng.choice([1, 3, 8])
    h = rng.randint(max(1, dilation[0] * (r - 1) + 1), max_hw)
    w = rng.randint(max(1, dilation[1] * (s - 1) + 1), max_hw)
    weight = prune(
        torch.randn(cout, cin // groups, r, s, generator=gen), rng.choice(SPARSITIES), gen
    )
    if rng.random() < 0.3 and cout > 1:
        weight[rng.randrange(cout)] = 0.0  # an output channel with no nonzeros
    if rng.random() < 0.3 and cin // groups > 1:
        weight[:, rng.randrange(cin // groups)] = 0.0  # an input channel nobody reads
    x = torch.randn(n, cin, h, w, generator=gen)
    bias = torch.randn(cout, generator=gen) if rng.random() < 0.7 else None
    geometry = make_geometry(tuple(weight.shape), (h, w), stride, padding, dilation, groups)
    oh, ow = geometry.output_hw
    residual = torch.randn(n, cout, oh, ow, generator=gen) if rng.random() < 0.4 else None
    activation = rng.choice([None, "relu", "relu6"])
    case = ConvCase(x, weight, bias, residual, activation, stride, padding, dilation, groups)
    if device != "cpu":
        case.x, case.weight = case.x.to(device), case.weight.to(device)
        case.bias = None if bias is None else bias.to(device)
        case.residual = None if residual is None else residual.to(device)
    return case


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    """fp32 against float64 ground truth: relative L2 error <= rel, and elementwise closeness
    scaled to the output's magnitude (sums of many products cancel element by element)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite output (an element was never written?)"
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)
    norm = float(expected.norm())
    if norm > 0:
        assert float((actual - expected).norm()) / norm <= rel


@pytest.fixture
def make_case():
    return random_case
