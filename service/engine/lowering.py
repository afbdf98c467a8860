"""Whole-network lowering baselines: im2col, then one matrix product per conv.

These are the comparisons the Escort paper makes: the input is unfolded into a
[C*kh*kw, H_out*W_out] matrix per image and multiplied by the weight matrix, either dense
(cuBLAS through torch.matmul) or as a CSR matrix (cuSPARSE SpMM through torch.sparse).
They exist for `escort bench model` only and run in fp32.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from service.engine.backends import ConvLayer, ConvOp, apply_epilogue

LOWERINGS = ("im2col-cublas", "im2col-cusparse")


def _unfold(x: torch.Tensor, op: ConvOp) -> torch.Tensor:
    g = op.geometry
    if any(g.padding):
        x = F.pad(x, g.padding)
    return F.unfold(x, g.kernel, dilation=g.dilation, stride=g.stride)  # [N, C*kh*kw, L]


def _fold_output(y: torch.Tensor, op: ConvOp) -> torch.Tensor:
    oh, ow = op.geometry.out_hw
    return y.reshape(y.shape[0], op.geometry.out_channels, oh, ow)


class Im2colGemmConv(ConvOp):
    """im2col + dense GEMM (cuBLAS); grouped convs as a batched GEMM over groups."""

    op_kind = "conv_im2col_cublas"

    def __init__(self, layer: ConvLayer, device: torch.device) -> None:
        super().__init__(layer)
        g = layer.geometry
        w = layer.weight.detach().float().to(device)
        self.weight = nn.Parameter(
            w.reshape(g.groups, g.out_channels // g.groups, -1), requires_grad=False
        )
        bias = layer.bias if layer.bias is not None else torch.zeros(g.out_channels)
        self.bias = nn.Parameter(bias.detach().float().to(device).reshape(1, -1, 1, 1), False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        g = self.geometry
        cols = _unfold(x, self)
        n, k, length = cols.shape
        cols = cols.reshape(n, g.groups, k // g.groups, length)
        y = torch.matmul(self.weight, cols)  # [N, G, O/G, L]
        y = _fold_output(y, self) + self.bias
        return apply_epilogue(y, residual, g.activation)


class Im2colSpmmConv(ConvOp):
    """im2col + CSR weight times dense columns (cuSPARSE SpMM on GPU).

    A grouped conv becomes one block-diagonal CSR matrix: its off-block zeros are never stored,
    so the product costs what the groups cost. The batch is folded into the columns, as the
    paper's baseline does, so one SpMM serves the whole batch."""

    op_kind = "conv_im2col_cusparse"

    def __init__(self, layer: ConvLayer, device: torch.device) -> None:
        super().__init__(layer)
        g = layer.geometry
        w = layer.weight.detach().float()
        og, cg = g.out_channels // g.groups, g.in_channels // g.groups
        k = cg * g.kernel[0] * g.kernel[1]
        full = torch.zeros(g.out_channels, g.in_channels * g.kernel[0] * g.kernel[1])
        for group in range(g.groups):
            rows = slice(group * og, (group + 1) * og)
            full[rows, group * k : (group + 1) * k] = w[rows].reshape(og, k)
        # Outside the module tree: module-wide .to()/.half() would not keep the CSR layout.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.__dict__["weight_csr"] = full.to_sparse_csr().to(device)
        bias = layer.bias if layer.bias is not None else torch.zeros(g.out_channels)
        self.bias = nn.Parameter(bias.detach().float().to(device).reshape(1, -1, 1, 1), False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        g = self.geometry
        cols = _unfold(x, self)
        n, k, length = cols.shape
        dense = cols.permute(1, 0, 2).reshape(k, n * length)
        y = torch.sparse.mm(self.weight_csr, dense)  # [O, N*L]
        y = y.reshape(g.out_channels, n, length).permute(1, 0, 2)
        y = _fold_output(y, self) + self.bias
        return apply_epilogue(y, residual, g.activation)


def lowered_op(kind: str, layer: ConvLayer, device: torch.device) -> ConvOp:
    if kind == "im2col-cublas":
        return Im2colGemmConv(layer, device)
    if kind == "im2col-cusparse":
        return Im2colSpmmConv(layer, device)
    raise ValueError(f"unknown lowering {kind!r}; choose from {', '.join(LOWERINGS)}")
