"""CUDA source of `escort_direct<P>`: the direct kernel for layers too small to fill the GPU
with tiles (batch 1, 7x7 to 28x28 maps). See direct.py for its decomposition.

`splits` warps compute one output channel over 32 * P output pixels of the flattened (image,
row, column) space, each warp a share of the row's nonzeros, and add their sums in shared
memory. A warp reads 32 (value, offset, taps) records at a time, one per lane, into shared
memory, and then walks them with broadcast reads; every lane loads P input values through the
read-only cache. There
is no staging of the input and no workspace: the latency is one pass over a share of the
row's nonzeros. Padding is implicit: a warp whose pixels all see their whole receptive field
inside the image skips the bounds checks; the others test each record's tap against a per-pixel mask of the taps that
fall inside the image (one shift and one test per input value).

The storage type is a template parameter: `escort_direct<P>` reads and writes fp32,
`escort_direct<P, unsigned short>` fp16 (IEEE half bits; direct_half.py registers it). Both
accumulate in fp32: a half value is widened as it is loaded and rounded once, at the store.
The half conversions are inline PTX (cvt), so the source needs no CUDA header and compiles
the same under CuPy and under bare NVRTC (bench/kernels/resources.py).
"""

from __future__ import annotations

DIRECT_PIXELS_PER_LANE = (1, 2, 4)
DIRECT_SPLITS = (1, 2, 4, 8)

DIRECT_SOURCE = r"""
struct DirectParams {
    unsigned long long meta;    // int4 per nonzero, rows in sorted order: (value bits, offset, tap r * S + s, 0)
    unsigned long long rowptr;  // int [K + 1]: each sorted row's nonzeros in meta
    unsigned long long perm;    // int [K]: the output channel of sorted row p
    unsigned long long bias;    // float [K], or 0
    long long image_floats;     // C * H * W (elements of the storage type)
    int H, W, K, OH, OW;
    int sh, sw, pt, pl;
    int R, S, dh, dw;           // kernel size and dilation (R * S <= 64)
    int reach_h, reach_w;       // (R - 1) * dh, (S - 1) * dw
    int pixels;                 // N * OH * OW
    int splits;                 // warps sharing one row's nonzeros (divides the block's warps)
    int act;
};

// Loads and stores in the storage type, as fp32.
__device__ __forceinline__ float load_in(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_in(const unsigned short* p) {
    const unsigned short h = __ldg(p);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ float load_plain(const float* p) { return *p; }
__device__ __forceinline__ float load_plain(const unsigned short* p) {
    const unsigned short h = *p;
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_out(unsigned short* p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    *p = h;
}

// Bit j (j < count) set when 0 <= start + j * step < limit.
__device__ __forceinline__ unsigned long long in_range_bits(int start, int count, int step,
                                                            int limit) {
    if (step == 1 && count < 64) {
        const int lo = max(0, -start);
        const int hi = min(count, limit - start);
        return hi > lo ? ((1ull << hi) - 1ull) & ~((1ull << lo) - 1ull) : 0ull;
    }
    unsigned long long bits = 0;
    for (int j = 0; j < count; ++j)
        bits |= (unsigned long long)((unsigned int)(start + j * step) < (unsigned int)limit) << j;
    return bits;
}

template <int P, typename T = float>
__global__ void __launch_bounds__(256) escort_direct(
    const T* __restrict__ x, T* __restrict__ out, const T* __restrict__ res,
    const DirectParams p)
{
    __shared__ float partial[8][32 * 4];  // [warp][i * 32 + lane], for splits > 1
    __shared__ int4 records[8][32];       // each warp's current batch of records
    const unsigned int full = 0xffffffffu;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int part = warp % p.splits;  // which share of the row's nonzeros this warp takes
    const int row = blockIdx.y * ((blockDim.x >> 5) / p.splits) + warp / p.splits;
    const bool active = row < p.K;  // warp-uniform
    const int plane = p.OH * p.OW;

    const T* xp[P];  // this lane's pixel's window origin in the input (maybe outside it)
    int ih0[P], iw0[P], q[P], nq[P], remq[P];
    bool interior = true;
#pragma unroll
    for (int i = 0; i < P; ++i) {
        q[i] = blockIdx.x * (32 * P) + lane + 32 * i;
        const bool valid = q[i] < p.pixels;
        nq[i] = valid ? q[i] / plane : 0;
        remq[i] = valid ? q[i] - nq[i] * plane : 0;
        const int oh = remq[i] / p.OW;
        const int ow = remq[i] - oh * p.OW;
        // A pixel past the end gets a window far outside the image: every check fails.
        ih0[i] = valid ? oh * p.sh - p.pt : -(1 << 28);
        iw0[i] = valid ? ow * p.sw - p.pl : -(1 << 28);
        xp[i] = valid ? x + (nq[i] * p.image_floats + (long long)ih0[i] * p.W + iw0[i]) : x;
        interior = interior && valid && ih0[i] >= 0 && ih0[i] + p.reach_h < p.H
                   && iw0[i] >= 0 && iw0[i] + p.reach_w < p.W;
    }
    const bool fast = __all_sync(full, interior);
    // Bit r * S + s of taps[i]: tap (r, s) of pixel i falls inside the image. Only warps with
    // pixels near the border need it.
    unsigned long long taps[P];
#pragma unroll
    for (int i = 0; i < P; ++i) {
        taps[i] = 0;
        if (!fast) {
            const unsigned long long rows = in_range_bits(ih0[i], p.R, p.dh, p.H);
            const unsigned long long cols = in_range_bits(iw0[i], p.S, p.dw, p.W);
            for (int r = 0; r < p.R; ++r)
                if ((rows >> r) & 1ull) taps[i] |= cols << (r * p.S);
        }
    }

    float acc[P];
#pragma unroll
    for (int i = 0; i < P; ++i) acc[i] = 0.0f;

    // The epilogue's channel and bias, loaded now so their latency hides behind the sums.
    const int k = active ? __ldg(reinterpret_cast<const int*>(p.perm) + row) : 0;
    const float b = p.bias && active ? __ldg(reinterpret_cast<const float*>(p.bias) + k) : 0.0f;

    if (active) {
        const int* __restrict__ rowptr = reinterpret_cast<const int*>(p.rowptr);
        const int4* __restrict__ meta = reinterpret_cast<const int4*>(p.meta);
        const int end = __ldg(rowptr + row + 1);
        // 32 records at a time: one coalesced load (one record per lane, the next batch's
        // issued before this one is used), then each record is read by the whole warp from
        // shared memory (one broadcast load), so the input loads depend on nothing in flight.
        int b0 = __ldg(rowptr + row) + part * 32;
        const int step = 32 * p.splits;
        int4 next = b0 + lane < end ? __ldg(meta + b0 + lane) : make_int4(0, 0, 0, 0);
        for (; b0 < end; b0 += step) {
            const int count = min(32, end - b0);
            records[warp][lane] = next;
            __syncwarp();
            if (b0 + step + lane < end) next = __ldg(meta + b0 + step + lane);
            if (fast) {
#pragma unroll 8
                for (int t = 0; t < count; ++t) {
                    const int4 m = records[warp][t];
                    const float v = __int_as_float(m.x);
#pragma unroll
                    for (int i = 0; i < P; ++i) acc[i] = fmaf(v, load_in(xp[i] + m.y), acc[i]);
                }
            } else {
#pragma unroll 8
                for (int t = 0; t < count; ++t) {
                    const int4 m = records[warp][t];
                    const float v = __int_as_float(m.x);
#pragma unroll
                    for (int i = 0; i < P; ++i) {
                        const float xv = (taps[i] >> m.z) & 1ull ? load_in(xp[i] + m.y) : 0.0f;
                        acc[i] = fmaf(v, xv, acc[i]);
                    }
                }
            }
            __syncwarp();
        }
    }

    if (p.splits > 1) {
        // The row's warps meet in shared memory; its first warp adds the shares and stores.
#pragma unroll
        for (int i = 0; i < P; ++i) partial[warp][i * 32 + lane] = acc[i];
        __syncthreads();
        if (part != 0 || !active) return;
        for (int s = 1; s < p.splits; ++s)
#pragma unroll
            for (int i = 0; i < P; ++i) acc[i] += partial[warp + s][i * 32 + lane];
    } else if (!active) {
        return;
    }

#pragma unroll
    for (int i = 0; i < P; ++i) {
        if (q[i] >= p.pixels) continue;
        const long long o = ((long long)nq[i] * p.K + k) * plane + remq[i];
        float v = acc[i] + b;
        if (res) v += load_plain(res + o);
        if (p.act == 1) v = fmaxf(v, 0.0f);
        else if (p.act == 2) v = fminf(fmaxf(v, 0.0f), 6.0f);
        store_out(out + o, v);
    }
}
"""


def direct_kernel_name(pixels_per_lane: int, half: bool = False) -> str:
    return (
        f"escort_direct<{pixels_per_lane}, unsigned short>"
        if half
        else (f"escort_direct<{pixels_per_lane}>")
    )


DIRECT_KERNEL_NAMES = tuple(direct_kernel_name(p) for p in DIRECT_PIXELS_PER_LANE)
DIRECT_HALF_KERNEL_NAMES = tuple(direct_kernel_name(p, half=True) for p in DIRECT_PIXELS_PER_LANE)
