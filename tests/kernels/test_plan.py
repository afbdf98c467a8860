"""SparseConvPlan and sparse_conv2d: the interface the engine codes against."""

from __future__ import annotations

import pytest
import torch

import service.kernels as kernels
from service.kernels import CudaUnavailableError, SparseConvPlan, sparse_conv2d
from service.kernels import cuda as cuda_backend
from tests.kernels.conftest import prune


@pytest.fixture
def plan() -> SparseConvPlan:
    gen = torch.Generator().manual_seed(0)
    weight = prune(torch.randn(12, 4, 3, 5, generator=gen), 0.75, gen)
    return SparseConvPlan(
        weight, torch.randn(12, generator=gen), stride=2, padding=(1, 2), groups=2
    )


def test_facts(plan: SparseConvPlan) -> None:
    assert plan.nnz == 12 * 4 * 15 - round(0.75 * 12 * 4 * 15)
    assert plan.sparsity == pytest.approx(0.75)
    assert (plan.out_channels, plan.in_channels, plan.kernel_size) == (12, 8, (3, 5))
    assert plan.groups == 2 and plan.stride == (2, 2) and plan.padding == (2, 2, 1, 1)
    assert plan.dtypes == (torch.float32,)


def test_prepare_caches_per_geometry(plan: SparseConvPlan) -> None:
    assert plan.prepare((9, 11)) is plan
    first = plan.stretched((9, 11))
    assert plan.stretched((9, 11)) is first
    other = plan.stretched((10, 11))
    assert other is not first and other.geometry.padded_hw == (12, 15)


def test_to_returns_the_plan_and_keeps_results(plan: SparseConvPlan) -> None:
    x = torch.randn(3, 8, 9, 11)
    before = plan(x)
    assert plan.to("cpu") is plan
    torch.testing.assert_close(plan(x), before, rtol=0, atol=0)


def test_out_argument_is_filled(plan: SparseConvPlan) -> None:
    x = torch.randn(2, 8, 9, 11)
    out = torch.full((2, 12, 5, 6), float("nan"))
    assert plan(x, out=out) is out
    torch.testing.assert_close(out, plan(x), rtol=0, atol=0)


def test_dtype_follows_the_input(plan: SparseConvPlan) -> None:
    x = torch.randn(1, 8, 9, 11, dtype=torch.float64)
    assert plan(x).dtype == torch.float64


def test_bad_calls_are_explained(plan: SparseConvPlan) -> None:
    x = torch.randn(1, 8, 9, 11)
    with pytest.raises(ValueError, match="activation"):
        plan(x, activation="gelu")
    with pytest.raises(ValueError, match="impl"):
        plan(x, impl="fast")
    with pytest.raises(ValueError, match=r"\[N, 8, H, W\]"):
        plan(torch.randn(1, 3, 9, 11))
    with pytest.raises(ValueError, match="bias"):
        SparseConvPlan(torch.randn(4, 2, 3, 3), torch.randn(5))
    with pytest.raises(ValueError):
        SparseConvPlan(torch.randn(4, 2, 3))


def test_impl_cuda_names_what_is_missing(plan: SparseConvPlan, monkeypatch) -> None:
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda: "CuPy is not installed")
    with pytest.raises(CudaUnavailableError, match="CuPy is not installed"):
        plan(torch.randn(1, 8, 9, 11), impl="cuda")
    with pytest.raises(CudaUnavailableError, match="CuPy"):
        sparse_conv2d(torch.randn(1, 8, 9, 11), torch.randn(4, 8, 3, 3), impl="cuda")
    assert isinstance(CudaUnavailableError("x"), RuntimeError)


def test_auto_without_gpu_uses_the_reference(plan: SparseConvPlan) -> None:
    x = torch.randn(1, 8, 9, 11)
    torch.testing.assert_close(plan(x, impl="auto"), plan(x, impl="reference"))
    if not torch.cuda.is_available():
        assert not kernels.cuda_available()
        assert "CUDA" in (kernels.unavailable_reason() or "")


def test_import_needs_no_cupy() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['cupy'] = None; import service.kernels as k; "
        "import torch; w = torch.ones(2, 1, 1, 1); "
        "print(k.sparse_conv2d(torch.ones(1, 1, 2, 2), w).sum().item())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "8.0"
