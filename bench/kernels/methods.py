"""The convolution methods the layer benchmark times, each as a zero-argument callable.

Every runner computes conv2d + bias for one layer into an NCHW fp32 output (fp16 for cuDNN
fp16, NHWC, and for Escort's fp16 kernel); inputs and weights are converted beforehand so only the method itself is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from bench.kernels.port import run_port
from service.kernels.plan import SparseConvPlan
from service.kernels.stretched_csr import SparseWeight, make_geometry, stretch

Runner = Callable[[], torch.Tensor]

DENSE_METHODS = ("cudnn_fp32", "cudnn_tf32", "cudnn_fp16", "im2col_cublas")
SPARSE_METHODS = ("escort", "escort_fp16", "escort_port", "im2col_cusparse")
METHODS = ("escort", "escort_fp16", "escort_port", *DENSE_METHODS, "im2col_cusparse")
# Ours, each summarized against every baseline.
OURS = ("escort", "escort_fp16")
BASELINES = ("escort_port", *DENSE_METHODS, "im2col_cusparse")
LABELS = {
    "escort": "Escort (ours)",
    "escort_fp16": "Escort fp16 (ours)",
    "escort_port": "sconv_shm port",
    "cudnn_fp32": "cuDNN fp32",
    "cudnn_tf32": "cuDNN TF32",
    "cudnn_fp16": "cuDNN fp16 NHWC",
    "im2col_cublas": "im2col+cuBLAS",
    "im2col_cusparse": "im2col+cuSPARSE",
}


def set_tf32(enabled: bool) -> None:
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def magnitude_prune(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zeroes the `sparsity` fraction of weights with the smallest magnitude."""
    count = int(round(sparsity * weight.numel()))
    if count <= 0:
        return weight.clone()
    flat = weight.reshape(-1)
    drop = torch.topk(flat.abs(), count, largest=False).indices
    pruned = flat.clone()
    pruned[drop] = 0.0
    return pruned.view_as(weight)


def escort_runner(plan: SparseConvPlan, x: torch.Tensor) -> Runner:
    return lambda: plan(x, impl="cuda")


def port_runner(
    weight: torch.Tensor,
    bias: torch.Tensor,
    input_hw: tuple[int, int],
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The paper's sconv_shm: pads the input explicitly, then one output per thread."""
    geometry = make_geometry(tuple(weight.shape), input_hw, stride, padding, dilation, groups)
    csr = stretch(SparseWeight.from_dense(weight), geometry)
    device = weight.device
    rowptr = csr.rowptr.to(device=device, dtype=torch.int32)
    colidx = csr.colidx.to(device)
    values = csr.values.to(device)
    bias = bias.to(device=device, dtype=torch.float32).contiguous()
    oh, ow = geometry.output_hw

    def run(x: torch.Tensor) -> torch.Tensor:
        x_padded = F.pad(x, geometry.padding)
        out = torch.empty(x.shape[0], geometry.out_channels, oh, ow, device=x.device)
        return run_port(x_padded, out, rowptr, colidx, values, bias, geometry)

    return run


def cudnn_runner(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, stride: int, pad: int, mode: str
) -> Runner:
    if mode == "fp16":
        xh = x.half().contiguous(memory_format=torch.channels_last)
        wh = weight.half().contiguous(memory_format=torch.channels_last)
        bh = bias.half()
        return lambda: F.conv2d(xh, wh, bh, stride, pad)
    return lambda: F.conv2d(x, weight, bias, stride, pad)


def im2col_cublas_runner(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, stride: int, pad: int
) -> Runner:
    k, _, r, s = weight.shape
    w2d = weight.reshape(k, -1).contiguous()
    n, _, h, w = x.shape
    oh, ow = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    b3 = bias.view(1, k, 1)

    def run() -> torch.Tensor:
        cols = F.unfold(x, (r, s), padding=pad, stride=stride)  # [N, C*R*S, L]
        return torch.matmul(w2d, cols).add_(b3).view(n, k, oh, ow)

    return run


def im2col_cusparse_runner(
    weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, stride: int, pad: int
) -> Runner:
    k, _, r, s = weight.shape
    w_csr = weight.reshape(k, -1).to_sparse_csr()
    n, _, h, w = x.shape
    oh, ow = (h + 2 * pad - r) // stride + 1, (w + 2 * pad - s) // stride + 1
    b2 = bias.view(k, 1)
    try:  # addmm fuses the bias where torch supports a CSR operand; else mm, then add
        torch.addmm(b2, w_csr, torch.zeros(w_csr.shape[1], 2, device=x.device))
        fused = True
    except (RuntimeError, NotImplementedError):
        fused = False

    def run() -> torch.Tensor:
        cols = F.unfold(x, (r, s), padding=pad, stride=stride)  # [N, C*R*S, L]
        dense = cols[0] if n == 1 else cols.transpose(0, 1).reshape(cols.shape[1], -1)
        y = torch.addmm(b2, w_csr, dense) if fused else torch.sparse.mm(w_csr, dense).add_(b2)
        if n == 1:
            return y.view(1, k, oh, ow)
        return y.view(k, n, oh, ow).transpose(0, 1).contiguous()

    return run


def unfold_bytes(c: int, r: int, n: int, oh: int, ow: int) -> int:
    return 4 * c * r * r * n * oh * ow
