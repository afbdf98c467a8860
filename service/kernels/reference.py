"""The pure-torch reference of the Escort algorithm, on the same stretched-CSR form.

For every nonzero j of row k and every output pixel q it gathers
`x_pad[n, base[q] + colidx[j] + group_offset[k]]`, scales by the weight and sums per row. It is
the CPU "sparse" backend of the service and the oracle the CUDA kernel is tested against, so it
follows the kernel's algorithm rather than calling conv2d. Work is chunked over nonzeros so that
the gathered block stays a few MB whatever the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from service.kernels.stretched_csr import StretchedCSR

ACTIVATIONS = (None, "relu", "relu6")

# Elements of the gathered [N, nonzeros, pixels] block per chunk (float32: 16 MB).
_CHUNK_ELEMENTS = 1 << 22


def check_activation(activation: str | None) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def apply_epilogue(
    y: torch.Tensor, residual: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """In place: y += residual, then the activation."""
    if residual is not None:
        y.add_(residual)
    if activation == "relu":
        y.clamp_(min=0.0)
    elif activation == "relu6":
        y.clamp_(min=0.0, max=6.0)
    return y


def conv2d_reference(
    x: torch.Tensor,
    csr: StretchedCSR,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    activation: str | None = None,
    chunk_elements: int = _CHUNK_ELEMENTS,
) -> torch.Tensor:
    """activation(conv2d(x, W, bias) + residual) computed from the stretched CSR of W.

    x: [N, C, H, W] float32 on any device (the arithmetic is plain torch)."""
    check_activation(activation)
    g = csr.geometry
    if x.dim() != 4 or x.shape[1] != g.in_channels or tuple(x.shape[2:]) != g.input_hw:
        raise ValueError(
            f"input {tuple(x.shape)} does not match the prepared geometry "
            f"[N, {g.in_channels}, {g.input_hw[0]}, {g.input_hw[1]}]"
        )
    n = x.shape[0]
    oh, ow = g.output_hw
    q = oh * ow
    device = x.device
    x_flat = F.pad(x.float(), g.padding).reshape(n, -1)

    out = torch.zeros(n, g.out_channels, q, dtype=torch.float32, device=device)
    nnz = csr.values.numel()
    if nnz:
        base = csr.base_offsets().to(device)
        cols = csr.absolute_colidx().to(device)
        rows = csr.rows.to(device)
        values = csr.values.to(device)
        step = max(1, chunk_elements // max(1, n * q))
        for lo in range(0, nnz, step):
            hi = min(nnz, lo + step)
            index = (cols[lo:hi, None] + base[None, :]).reshape(-1)
            gathered = x_flat.index_select(1, index).view(n, hi - lo, q)
            gathered.mul_(values[lo:hi].view(1, -1, 1))
            out.index_add_(1, rows[lo:hi], gathered)

    out = out.view(n, g.out_channels, oh, ow)
    if bias is not None:
        out.add_(bias.to(device=device, dtype=torch.float32).view(1, -1, 1, 1))
    return apply_epilogue(out, residual, activation)
