"""CUDA source of the Escort kernels, compiled at run time by NVRTC through cupy.RawModule.

`escort_conv<P, KW>` is the product kernel (see tiling.py for its decomposition).
`sconv_shm_port` is a straight port of the paper's `sconv_shm`, kept for the layer benchmark's
ablation: a 16x16 output tile, one output per thread, the row's weights staged in shared memory,
the (explicitly padded) input read through __ldg.
"""

from __future__ import annotations

from service.kernels.tiling import MAX_ACCUMULATORS, PIXELS_PER_LANE, ROWS_PER_WARP

SOURCE = r"""
struct EscortParams {
    unsigned long long meta;     // int2 [nnz]: (float bits, offset into the staged window)
    unsigned long long segptr;   // int [K * seg_stride]
    unsigned long long perm;     // int [K]
    unsigned long long blocks;   // int2 [row blocks]: (first channel, channel count)
    unsigned long long bias;     // float [K], or 0
    int N, C, H, W, K, OH, OW;
    int sh, sw, pt, pl;
    int TH, TW, NB, TIH, TIW, CC;
    int tiles_w, tiles_h;
    int seg_stride, chunk_floats;
    int act;                     // 0 none, 1 relu, 2 relu6
    unsigned int tiw_mul, tiw_shr, tih_mul, tih_shr, cc_mul, cc_shr;
};

__device__ __forceinline__ unsigned int fast_div(unsigned int x, unsigned int mul, unsigned int shr) {
    return mul ? (__umulhi(x, mul) >> shr) : x;
}

__device__ __forceinline__ void cp_async4(float* dst, const float* src, int src_bytes) {
    unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(d), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

// Copies chunk `j` of the tile's input window into `buf`, zero-filling padding and anything
// outside the image or the block's channels (cp.async with 0 source bytes writes zeros).
__device__ __forceinline__ void stage_chunk(
    const float* __restrict__ x, float* buf, const EscortParams& p,
    int j, int c_first, int c_count, int n0, int ih0, int iw0)
{
    const int c0 = c_first + j * p.CC;
    const int cn = min(p.CC, c_count - j * p.CC);
    for (int e = threadIdx.x; e < p.chunk_floats; e += blockDim.x) {
        const unsigned int q1 = fast_div((unsigned int)e, p.tiw_mul, p.tiw_shr);
        const int iw = e - (int)q1 * p.TIW;
        const unsigned int q2 = fast_div(q1, p.tih_mul, p.tih_shr);
        const int ih = (int)q1 - (int)q2 * p.TIH;
        const int nb = (int)fast_div(q2, p.cc_mul, p.cc_shr);
        const int cl = (int)q2 - nb * p.CC;
        const int n = n0 + nb;
        const int gh = ih0 + ih;
        const int gw = iw0 + iw;
        const bool ok = cl < cn && n < p.N && (unsigned int)gh < (unsigned int)p.H
                        && (unsigned int)gw < (unsigned int)p.W;
        const float* src = ok ? x + ((((long long)n * p.C + c0 + cl) * p.H + gh) * p.W + gw) : x;
        cp_async4(buf + e, src, ok ? 4 : 0);
    }
    cp_async_commit();
}

template <int P, int KW>
__global__ void __launch_bounds__(256) escort_conv(
    const float* __restrict__ x, float* __restrict__ out, const float* __restrict__ res,
    const EscortParams p)
{
    extern __shared__ float smem[];
    const int2* __restrict__ meta = reinterpret_cast<const int2*>(p.meta);
    const int* __restrict__ segptr = reinterpret_cast<const int*>(p.segptr);
    const int* __restrict__ perm = reinterpret_cast<const int*>(p.perm);
    const int2* __restrict__ blocks = reinterpret_cast<const int2*>(p.blocks);
    const float* __restrict__ bias = reinterpret_cast<const float*>(p.bias);

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int rows_per_block = (blockDim.x >> 5) * KW;

    int t = blockIdx.x;
    const int tile_w = t % p.tiles_w;
    t /= p.tiles_w;
    const int tile_h = t % p.tiles_h;
    const int tile_n = t / p.tiles_h;
    const int n0 = tile_n * p.NB;
    const int oh0 = tile_h * p.TH;
    const int ow0 = tile_w * p.TW;
    const int2 blk = blocks[blockIdx.y];
    const int nchunks = (blk.y + p.CC - 1) / p.CC;

    // Where each of this lane's pixels starts in the staged window.
    const int tile_pixels = p.TH * p.TW;
    const int image_floats = p.CC * p.TIH * p.TIW;
    int sbase[P];
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int jpx = lane + 32 * i;
        const int nb = jpx / tile_pixels;
        const int rem = jpx - nb * tile_pixels;
        const int th = rem / p.TW;
        const int tw = rem - th * p.TW;
        sbase[i] = nb < p.NB ? nb * image_floats + th * p.sh * p.TIW + tw * p.sw : 0;
    }

    float acc[KW][P];
#pragma unroll
    for (int kk = 0; kk < KW; ++kk)
#pragma unroll
        for (int i = 0; i < P; ++i) acc[kk][i] = 0.0f;

    const int row0 = blockIdx.y * rows_per_block + warp * KW;
    const int ih0 = oh0 * p.sh - p.pt;
    const int iw0 = ow0 * p.sw - p.pl;

    stage_chunk(x, smem, p, 0, blk.x, blk.y, n0, ih0, iw0);
    for (int j = 0; j < nchunks; ++j) {
        const float* cur = smem + (j & 1) * p.chunk_floats;
        if (j + 1 < nchunks) {
            stage_chunk(x, smem + ((j + 1) & 1) * p.chunk_floats, p, j + 1, blk.x, blk.y, n0, ih0, iw0);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < KW; ++kk) {
            const int row = row0 + kk;
            if (row < p.K) {
                const int* seg = segptr + (long long)row * p.seg_stride + j;
                const int beg = seg[0];
                const int end = seg[1];
#pragma unroll 4
                for (int e = beg; e < end; ++e) {
                    const int2 m = __ldg(meta + e);
                    const float v = __int_as_float(m.x);
#pragma unroll
                    for (int i = 0; i < P; ++i)
                        acc[kk][i] = fmaf(v, cur[sbase[i] + m.y], acc[kk][i]);
                }
            }
        }
        __syncthreads();
    }

    const int plane = p.OH * p.OW;
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
        const int row = row0 + kk;
        if (row >= p.K) continue;
        const int k = perm[row];
        const float b = bias ? bias[k] : 0.0f;
#pragma unroll
        for (int i = 0; i < P; ++i) {
            const int jpx = lane + 32 * i;
            const int nb = jpx / tile_pixels;
            const int rem = jpx - nb * tile_pixels;
            const int th = rem / p.TW;
            const int tw = rem - th * p.TW;
            const int n = n0 + nb;
            const int oh = oh0 + th;
            const int ow = ow0 + tw;
            if (nb < p.NB && n < p.N && oh < p.OH && ow < p.OW) {
                const long long o = ((long long)n * p.K + k) * plane + oh * p.OW + ow;
                float v = acc[kk][i] + b;
                if (res) v += res[o];
                if (p.act == 1) v = fmaxf(v, 0.0f);
                else if (p.act == 2) v = fminf(fmaxf(v, 0.0f), 6.0f);
                out[o] = v;
            }
        }
    }
}

// The paper's code shape, for the benchmark only. xpad is the explicitly padded input.
extern "C" __global__ void __launch_bounds__(256) sconv_shm_port(
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


def kernel_name(pixels_per_lane: int, rows_per_warp: int) -> str:
    return f"escort_conv<{pixels_per_lane}, {rows_per_warp}>"


KERNEL_NAMES = tuple(
    kernel_name(p, kw)
    for p in PIXELS_PER_LANE
    for kw in ROWS_PER_WARP
    if p * kw <= MAX_ACCUMULATORS
)
PORT_NAME = "sconv_shm_port"
