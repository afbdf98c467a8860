"""CUDA source of `escort_conv_half<P, KW>`: the tiled kernel on fp16, two pixels per HFMA2.

It builds on the fp32 tiled kernel's source (escort_cuda.py: EscortParams, the staging plan,
the cp.async helpers), which the module compiles before it. Differences:

- **Pixel pairs.** Each lane owns `P` pairs of horizontally adjacent output pixels (pair j =
  lane + 32 * i covers tile pixels 2j and 2j + 1; tile rows are even). For a tap at window
  column c, the pair reads columns c and c + stride_w.
- **Pair-expanded staging.** Window cell (plane, ih, iw) is one 32-bit word holding the half2
  (x[gw], x[gw + stride_w]), so one shared load feeds both pixels of a pair. Even and odd
  columns are stored in the two halves of the row (`half` = ceil(TIW / 2) words apart): a
  pair's first column is `tw * sw + s * dw` with `tw * sw` even, so the lanes of a warp read
  consecutive words (no bank conflict at stride 1), and a record's parity is fixed by its tap.
  The cells are loaded with plain loads (a half is too small for cp.async) and stored as words;
  the metadata records still go by cp.async, double-buffered as in the fp32 kernel.
- **Arithmetic.** A record's value is the half2 (v, v); each record is one `fma.rn.f16x2` per
  pair. The half2 sums of one chunk (at most CC * R * S products per row) are added into fp32
  accumulators when the chunk ends, and the epilogue (bias, residual, activation) is fp32,
  rounded to half once at the store.
- No split over chunks (splits == 1): layers too small to fill the GPU run the direct kernel.
"""

from __future__ import annotations

from service.kernels.tiling import MAX_ACCUMULATORS, PIXELS_PER_LANE, ROWS_PER_WARP

TILED_HALF_SOURCE = r"""
// The tile and row block this block computes (blockIdx.x: tile, blockIdx.y: row block).
// (The fp32 kernel decodes the same inline, as it was measured.)
struct TileTask {
    int n0, oh0, ow0;  // the tile's first image, output row and output column
    int ih0, iw0;      // where its input window starts (may be in the padding)
    int2 blk;          // first input channel and channel count the row block stages
    const int* rec;    // the row block's record starts, one per chunk and the end
};

__device__ __forceinline__ TileTask tile_task(const EscortParams& p) {
    int t = blockIdx.x;
    const int tile_w = t % p.tiles_w;
    t /= p.tiles_w;
    const int tile_h = t % p.tiles_h;
    TileTask task;
    task.n0 = (t / p.tiles_h) * p.NB;
    task.oh0 = tile_h * p.TH;
    task.ow0 = tile_w * p.TW;
    task.ih0 = task.oh0 * p.sh - p.pt;
    task.iw0 = task.ow0 * p.sw - p.pl;
    task.blk = reinterpret_cast<const int2*>(p.blocks)[blockIdx.y];
    task.rec = reinterpret_cast<const int*>(p.recptr) + blockIdx.y * p.rec_stride;
    return task;
}

// Pixel jpx of the tile (image-major, then rows): where it is in the tile and the output.
struct TilePixel {
    int nb, th, tw;  // image, row and column within the tile
    long long o;     // offset of its channel-0 output, when `valid`
    bool valid;      // inside the tile and the output
};

__device__ __forceinline__ TilePixel tile_pixel(const EscortParams& p, const TileTask& task,
                                                int jpx) {
    const int tile_pixels = p.TH * p.TW;
    TilePixel px;
    px.nb = jpx / tile_pixels;
    const int rem = jpx - px.nb * tile_pixels;
    px.th = rem / p.TW;
    px.tw = rem - px.th * p.TW;
    const int n = task.n0 + px.nb;
    const int oh = task.oh0 + px.th;
    const int ow = task.ow0 + px.tw;
    px.valid = px.nb < p.NB && n < p.N && oh < p.OH && ow < p.OW;
    px.o = (long long)n * p.K * p.OH * p.OW + oh * p.OW + ow;
    return px;
}

// The fused activation: 0 none, 1 ReLU, 2 ReLU6.
__device__ __forceinline__ float activate(float v, int act) {
    if (act == 1) return fmaxf(v, 0.0f);
    if (act == 2) return fminf(fmaxf(v, 0.0f), 6.0f);
    return v;
}

__device__ __forceinline__ unsigned int th_hfma2(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

__device__ __forceinline__ float2 th_unpack(unsigned int h) {
    float lo, hi;
    asm("{ .reg .b16 l, h;\n mov.b32 {l, h}, %2;\n cvt.f32.f16 %0, l;\n cvt.f32.f16 %1, h; }"
        : "=f"(lo), "=f"(hi) : "r"(h));
    return make_float2(lo, hi);
}

__device__ __forceinline__ float th_load(const unsigned short* p) {
    const unsigned short h = *p;
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ void th_store(unsigned short* p, float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    *p = h;
}

__device__ __forceinline__ unsigned int th_ld_shared(unsigned int address) {
    unsigned int v;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(address));
    return v;
}

// Stages chunk j of the pair-expanded window into `buf` (plain loads, zeros outside the image
// and for channels or images outside the block) and its metadata record into `mbuf`.
__device__ __forceinline__ void stage_chunk_half(
    const unsigned short* __restrict__ x, const int2* __restrict__ meta, unsigned int* buf,
    int2* mbuf, const EscortParams& p, const StagePlan& sp_plan, int j, int c_first,
    int c_count, int n0, int ih0, int iw0, int rec_beg, int rec_end)
{
    const int c0 = c_first + j * p.CC;
    const int cn = min(p.CC, c_count - j * p.CC);
    const int ws = p.TIH * p.TIW;
    const int plane_stride = p.TIH * p.pitch;
    const int planes = p.NB * p.CC;
    const int half = (p.TIW + 1) >> 1;
    const long long plane_elems = (long long)p.H * p.W;
    for (int sp = sp_plan.sp; sp >= 0 && sp < ws; sp += sp_plan.sp_step) {
        const int ih = sp / p.TIW;
        const int iw = sp - ih * p.TIW;
        const int gh = ih0 + ih;
        const int gw = iw0 + iw;
        const bool row_in = (unsigned int)gh < (unsigned int)p.H;
        const bool in0 = row_in && (unsigned int)gw < (unsigned int)p.W;
        const bool in1 = row_in && (unsigned int)(gw + p.sw) < (unsigned int)p.W;
        int nb = sp_plan.plane0 / p.CC;
        int cl = sp_plan.plane0 - nb * p.CC;
        // Offset of plane q's element and its cell, stepped with q (as in stage_chunk).
        long long at = ((long long)(n0 + nb) * p.C + c0 + cl) * plane_elems
                       + (long long)gh * p.W + gw;
        const long long step = (long long)sp_plan.plane_step * plane_elems;
        const long long next_image = (long long)(p.C - p.CC) * plane_elems;
        unsigned int* dst = buf + sp_plan.plane0 * plane_stride + ih * p.pitch
                            + (iw & 1) * half + (iw >> 1);
        const int dst_step = sp_plan.plane_step * plane_stride;
        for (int q = sp_plan.plane0; q < planes; q += sp_plan.plane_step) {
            const bool ok = cl < cn && n0 + nb < p.N;
            const unsigned int a = ok && in0 ? (unsigned int)__ldg(x + at) : 0u;
            const unsigned int b = ok && in1 ? (unsigned int)__ldg(x + at + p.sw) : 0u;
            *dst = a | (b << 16);
            dst += dst_step;
            at += step;
            cl += sp_plan.plane_step;
            while (cl >= p.CC) {
                cl -= p.CC;
                ++nb;
                at += next_image;
            }
        }
    }
    for (int e = rec_beg + threadIdx.x; e < rec_end; e += blockDim.x)
        cp_async8(mbuf + (e - rec_beg), meta + e);
    cp_async_commit();
}

template <int P, int KW>
__global__ void __launch_bounds__(256) escort_conv_half(
    const unsigned short* __restrict__ x, unsigned short* __restrict__ out,
    const unsigned short* __restrict__ res, const EscortParams p)
{
    extern __shared__ float smem[];
    unsigned int* const words = reinterpret_cast<unsigned int*>(smem);
    const int2* __restrict__ meta = reinterpret_cast<const int2*>(p.meta);
    const int* __restrict__ perm = reinterpret_cast<const int*>(p.perm);
    const float* __restrict__ bias = reinterpret_cast<const float*>(p.bias);
    int2* const mbase = reinterpret_cast<int2*>(smem + 2 * p.chunk_floats);

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int rows_per_block = (blockDim.x >> 5) * KW;

    const TileTask task = tile_task(p);
    const int n0 = task.n0, ih0 = task.ih0, iw0 = task.iw0;
    const int2 blk = task.blk;
    const int* rec = task.rec;
    const int nchunks = (blk.y + p.CC - 1) / p.CC;

    // Where each of this lane's pairs starts in the staged window (its even pixel's column).
    const int image_words = p.CC * p.TIH * p.pitch;
    int sbase[P];
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const TilePixel px = tile_pixel(p, task, 2 * (lane + 32 * i));
        sbase[i] = px.nb < p.NB
            ? px.nb * image_words + px.th * p.sh * p.pitch + ((px.tw * p.sw) >> 1) : 0;
    }

    float acc[KW][2 * P];
#pragma unroll
    for (int kk = 0; kk < KW; ++kk)
#pragma unroll
        for (int i = 0; i < 2 * P; ++i) acc[kk][i] = 0.0f;

    const int row0 = blockIdx.y * rows_per_block + warp * KW;

    if (nchunks > 0) {
        const StagePlan sp_plan = stage_plan(p);
        int next_beg = rec[0];
        int next_end = rec[1];
        stage_chunk_half(x, meta, words, mbase, p, sp_plan, 0, blk.x, blk.y, n0, ih0, iw0,
                         next_beg, next_end);
        next_beg = next_end;
        next_end = 1 < nchunks ? rec[2] : next_end;
        for (int j = 0; j < nchunks; ++j) {
            const int buf = j & 1;
            const unsigned int* cur = words + buf * p.chunk_floats;
            const int2* mcur = mbase + buf * p.record_max;
            if (j + 1 < nchunks) {
                stage_chunk_half(x, meta, words + (buf ^ 1) * p.chunk_floats,
                                 mbase + (buf ^ 1) * p.record_max, p, sp_plan, j + 1, blk.x,
                                 blk.y, n0, ih0, iw0, next_beg, next_end);
                next_beg = next_end;
                next_end = j + 2 < nchunks ? rec[j + 3] : next_end;
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const int* header = reinterpret_cast<const int*>(mcur);
            const unsigned int records =
                (unsigned int)__cvta_generic_to_shared(mcur + p.header);
            unsigned int px[P];
#pragma unroll
            for (int i = 0; i < P; ++i)
                px[i] = (unsigned int)__cvta_generic_to_shared(cur + sbase[i]);
#pragma unroll
            for (int kk = 0; kk < KW; ++kk) {
                const int r = warp * KW + kk;
                if (row0 + kk < p.K) {
                    unsigned int e = records + 8u * (unsigned int)header[r];
                    const unsigned int end = records + 8u * (unsigned int)header[r + 1];
                    unsigned int sums[P];
#pragma unroll
                    for (int i = 0; i < P; ++i) sums[i] = 0u;
#pragma unroll 4
                    for (; e < end; e += 8u) {
                        const int2 m = ld_shared_record(e);
#pragma unroll
                        for (int i = 0; i < P; ++i)
                            sums[i] = th_hfma2((unsigned int)m.x,
                                               th_ld_shared(px[i] + (unsigned int)m.y), sums[i]);
                    }
#pragma unroll
                    for (int i = 0; i < P; ++i) {
                        const float2 s = th_unpack(sums[i]);
                        acc[kk][2 * i] += s.x;
                        acc[kk][2 * i + 1] += s.y;
                    }
                }
            }
            __syncthreads();
        }
    }

    const long long plane = (long long)p.OH * p.OW;
#pragma unroll
    for (int kk = 0; kk < KW; ++kk) {
        const int row = row0 + kk;
        if (row >= p.K) continue;
        const int k = perm[row];
        const float b = bias ? bias[k] : 0.0f;
#pragma unroll
        for (int i = 0; i < 2 * P; ++i) {
            const TilePixel px = tile_pixel(p, task, 2 * (lane + 32 * (i >> 1)) + (i & 1));
            if (px.valid) {
                const long long o = px.o + k * plane;
                float v = acc[kk][i] + b;
                if (res) v += th_load(res + o);
                th_store(out + o, activate(v, p.act));
            }
        }
    }
}
"""


def half_kernel_name(pixels_per_lane: int, rows_per_warp: int) -> str:
    """The instantiation for `pixels_per_lane` pixels (pixels_per_lane / 2 pairs) per lane."""
    return f"escort_conv_half<{pixels_per_lane // 2}, {rows_per_warp}>"


TILED_HALF_KERNEL_NAMES = tuple(
    half_kernel_name(p, kw)
    for p in PIXELS_PER_LANE
    for kw in ROWS_PER_WARP
    if p * kw <= MAX_ACCUMULATORS
)
