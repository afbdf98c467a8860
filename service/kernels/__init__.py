"""Escort direct sparse convolution: stretched CSR, the CUDA kernels, the CPU reference.

Public API:
- `sparse_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, impl=...)`
  matches torch.nn.functional.conv2d for any (pruned) weight.
- `SparseConvPlan`: a layer prepared once (the engine's cached form).
- `cuda_available()`, `CudaUnavailableError`.

Importing this package needs neither CuPy nor a GPU; CuPy is imported on first CUDA use.
"""

from __future__ import annotations

from typing import Any

import torch

from service.kernels.cuda import CudaUnavailableError, cuda_available, unavailable_reason
from service.kernels.plan import SparseConvPlan
from service.kernels.stretched_csr import ConvGeometry, SparseWeight, StretchedCSR, stretch

__all__ = [
    "ConvGeometry",
    "CudaUnavailableError",
    "SparseConvPlan",
    "SparseWeight",
    "StretchedCSR",
    "cuda_available",
    "sparse_conv2d",
    "stretch",
    "unavailable_reason",
]


def sparse_conv2d(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    impl: str = "auto",
) -> torch.Tensor:
    """torch.nn.functional.conv2d computed by the Escort algorithm on the nonzeros of `weight`.

    stride, dilation: int or (h, w). padding: int, (pad_h, pad_w), "valid", "same", or a
    4-tuple (left, right, top, bottom) for TF "SAME" (asymmetric) padding. impl: "auto" (the
    CUDA kernel for CUDA tensors when CuPy is present, else the reference), "cuda" (raises
    CudaUnavailableError naming what is missing) or "reference" (pure torch, any device).
    Arithmetic is fp32; the result has the input's dtype. Each call builds the stretched form
    again; keep a SparseConvPlan to run a layer repeatedly."""
    plan = SparseConvPlan(weight, bias, stride, padding, dilation, groups)
    if impl != "reference" and input.is_cuda:
        plan.to(input.device)
    return plan(input, impl=impl)
