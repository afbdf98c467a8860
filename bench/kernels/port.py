"""The paper's `sconv_shm`, ported straight, for the layer benchmark's ablation only.

A 16x16 output tile, one output per thread, the row's weights staged in shared memory, the
(explicitly padded) input read through __ldg. Compiled on first use in a module of its own:
the serving process never builds it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from service.kernels import cuda
from service.kernels.stretched_csr import ConvGeometry

PORT_NAME = "sconv_shm_port"
PORT_SOURCE = r"""
// The paper's code shape, for the benchmark only. xpad is the explicitly padded input.
extern "C" __global__ void sconv_shm_port(
    const float* __restrict__ xpad, float* __restrict__ out,
    const int* __restrict__ rowptr, const int* __restrict__ colidx,
    const float* __restrict__ values, const float* __restrict__ bias,
    int C, int Hp, int Wp, int K, int OH, int OW, int sh, int sw,
    int outputs_per_group, int group_floats, int tiles_w)
{
    __shared__ float s_val[256];
    __shared__ int s_col[256];
    const int tid = threadIdx.y * 16 + threadIdx.x;
    const int ow = (blockIdx.x % tiles_w) * 16 + threadIdx.x;
    const int oh = (blockIdx.x / tiles_w) * 16 + threadIdx.y;
    const int k = blockIdx.y;
    const int n = blockIdx.z;
    const bool valid = oh < OH && ow < OW;
    const float* in = xpad + (long long)n * C * Hp * Wp + (long long)(k / outputs_per_group) * group_floats
                      + (valid ? oh * sh * Wp + ow * sw : 0);
    const int beg = rowptr[k];
    const int end = rowptr[k + 1];
    float sum = 0.0f;
    for (int base = beg; base < end; base += 256) {
        const int count = min(256, end - base);
        __syncthreads();
        if (tid < count) {
            s_val[tid] = values[base + tid];
            s_col[tid] = colidx[base + tid];
        }
        __syncthreads();
        if (valid)
            for (int e = 0; e < count; ++e) sum += s_val[e] * __ldg(in + s_col[e]);
    }
    if (valid) out[((long long)n * K + k) * OH * OW + oh * OW + ow] = sum + bias[k];
}
"""


@dataclass(frozen=True)
class _StreamRef:
    """What cupy's Function call reads from a stream argument: its handle."""

    ptr: int


@functools.cache
def _kernel(device_index: int) -> Any:
    cp = cuda._cupy()
    with cp.cuda.Device(device_index):
        module = cp.RawModule(code=PORT_SOURCE, options=("-std=c++17",))
        return module.get_function(PORT_NAME)


def run_port(
    x_padded: torch.Tensor,
    out: torch.Tensor,
    rowptr: torch.Tensor,
    colidx: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    geometry: ConvGeometry,
) -> torch.Tensor:
    """The paper's sconv_shm (benchmark baseline). x_padded: [N, C, Hp, Wp] already padded;
    rowptr/colidx int32 and values fp32 of the stretched CSR, on the device."""
    n = x_padded.shape[0]
    hp, wp = geometry.padded_hw
    oh, ow = geometry.output_hw
    tiles_w, tiles_h = -(-ow // 16), -(-oh // 16)
    i32 = np.int32
    args = (
        x_padded,
        out,
        rowptr,
        colidx,
        values,
        bias,
        i32(geometry.in_channels),
        i32(hp),
        i32(wp),
        i32(geometry.out_channels),
        i32(oh),
        i32(ow),
        i32(geometry.stride[0]),
        i32(geometry.stride[1]),
        i32(geometry.outputs_per_group),
        i32(geometry.channels_per_group * hp * wp),
        i32(tiles_w),
    )
    ptrs = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
    device = x_padded.device.index or 0
    _kernel(device)(
        (tiles_w * tiles_h, geometry.out_channels, n),
        (16, 16, 1),
        ptrs,
        stream=_StreamRef(torch.cuda.current_stream(device).cuda_stream),
    )
    return out
