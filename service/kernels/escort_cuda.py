"""CUDA source of the Escort kernels, compiled at run time by NVRTC through cupy.RawModule.

`escort_conv<P, KW>` is the tiled kernel (see tiling.py for its decomposition; tiled.py
registers it). The paper's `sconv_shm`, ported straight for the layer benchmark's ablation,
lives with the benchmark (bench/kernels/port.py): the serving process never compiles it.
"""

from __future__ import annotations

from service.kernels.tiling import MAX_ACCUMULATORS, PIXELS_PER_LANE, ROWS_PER_WARP

SOURCE = r"""
struct EscortParams {
    unsigned long long meta;     // int2 records, one per (row block, chunk); see tiling.py
    unsigned long long recptr;   // int [row blocks * rec_stride]: record starts (int2 units)
    unsigned long long perm;     // int [K]
    unsigned long long blocks;   // int2 [row blocks]: (first channel, channel count)
    unsigned long long bias;     // float [K], or 0
    unsigned long long ws;       // float [N*K*OH*OW] zeros, for split > 1
    unsigned long long counters; // int [grid.x * grid.y] zeros, for split > 1
    int N, C, H, W, K, OH, OW;
    int sh, sw, pt, pl;
    int TH, TW, NB, TIH, TIW, CC, pitch;  // pitch: shared-memory row stride (>= TIW)
    int tiles_w, tiles_h;
    int rec_stride, header, chunk_floats, record_max;
    int splits, act;
};

__device__ __forceinline__ void cp_async4(void* dst, const void* src, int src_bytes) {
    unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" :: "r"(d), "l"(src), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async8(void* dst, const void* src) {
    unsigned int d = (unsigned int)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" :: "r"(d), "l"(src));
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::);
}

__device__ __forceinline__ float ld_shared(unsigned int address) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(address));
    return v;
}

// One metadata record (value bits, byte offset) at a shared-memory byte address: the records'
// loops run on 32-bit shared addresses, not 64-bit generic pointers.
__device__ __forceinline__ int2 ld_shared_record(unsigned int address) {
    int2 m;
    asm volatile("ld.shared.v2.s32 {%0, %1}, [%2];\n" : "=r"(m.x), "=r"(m.y) : "r"(address));
    return m;
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" :: "n"(N));
}

// What one thread stages of every chunk: a position of the input window (or, when the window
// is larger than the block, a list of them) in a run of channel planes. The position is decoded
// once per kernel; per chunk only the channel base changes.
struct StagePlan {
    int sp;          // window position (ih * TIW + iw), or -1 when this thread stages nothing
    int sp_step;     // next position for windows larger than the block, else a large value
    int plane0;      // first (image, channel) plane
    int plane_step;  // planes between this thread's elements
};

__device__ __forceinline__ StagePlan stage_plan(const EscortParams& p) {
    const int ws = p.TIH * p.TIW;
    StagePlan s;
    if (ws >= (int)blockDim.x) {
        s.sp = threadIdx.x;
        s.sp_step = blockDim.x;
        s.plane0 = 0;
        s.plane_step = 1;
    } else {
        const int g = blockDim.x / ws;
        s.sp = (int)threadIdx.x < g * ws ? threadIdx.x % ws : -1;
        s.sp_step = 1 << 30;
        s.plane0 = threadIdx.x / ws;
        s.plane_step = g;
    }
    return s;
}

// Copies chunk j of the tile's input window into `buf` (zero-filling padding, pixels outside
// the image and channels outside the block: cp.async with 0 source bytes writes zeros) and the
// chunk's metadata record [rec_beg, rec_end) into `mbuf`.
__device__ __forceinline__ void stage_chunk(
    const float* __restrict__ x, const int2* __restrict__ meta, float* buf, int2* mbuf,
    const EscortParams& p, const StagePlan& sp_plan, int j, int c_first, int c_count, int n0,
    int ih0, int iw0, int rec_beg, int rec_end)
{
    const int c0 = c_first + j * p.CC;
    const int cn = min(p.CC, c_count - j * p.CC);
    const int ws = p.TIH * p.TIW;
    const int plane_stride = p.TIH * p.pitch;
    const int planes = p.NB * p.CC;
    const long long plane_floats = (long long)p.H * p.W;
    for (int sp = sp_plan.sp; sp >= 0 && sp < ws; sp += sp_plan.sp_step) {
        const int ih = sp / p.TIW;
        const int iw = sp - ih * p.TIW;
        const int gh = ih0 + ih;
        const int gw = iw0 + iw;
        const bool inside = (unsigned int)gh < (unsigned int)p.H && (unsigned int)gw < (unsigned int)p.W;
        int nb = sp_plan.plane0 / p.CC;
        int cl = sp_plan.plane0 - nb * p.CC;
        // Offset of plane q's element (image n0 + nb, channel c0 + cl) and where it goes, both
        // stepped with q: no 64-bit multiply per element (the SASS had ~56 instructions each).
        long long at = ((long long)(n0 + nb) * p.C + c0 + cl) * plane_floats
                       + (inside ? gh * p.W + gw : 0);
        const long long step = (long long)sp_plan.plane_step * plane_floats;
        const long long next_image = (long long)(p.C - p.CC) * plane_floats;
        float* dst = buf + sp_plan.plane0 * plane_stride + ih * p.pitch + iw;
        const int dst_step = sp_plan.plane_step * plane_stride;
        for (int q = sp_plan.plane0; q < planes; q += sp_plan.plane_step) {
            const bool ok = inside && cl < cn && n0 + nb < p.N;
            cp_async4(dst, ok ? x + at : x, ok ? 4 : 0);
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
__global__ void __launch_bounds__(256) escort_conv(
    const float* __restrict__ x, float* __restrict__ out, const float* __restrict__ res,
    const EscortParams p)
{
    extern __shared__ float smem[];
    const int2* __restrict__ meta = reinterpret_cast<const int2*>(p.meta);
    const int* __restrict__ recptr = reinterpret_cast<const int*>(p.recptr);
    const int* __restrict__ perm = reinterpret_cast<const int*>(p.perm);
    const int2* __restrict__ blocks = reinterpret_cast<const int2*>(p.blocks);
    const float* __restrict__ bias = reinterpret_cast<const float*>(p.bias);
    int2* const mbase = reinterpret_cast<int2*>(smem + 2 * p.chunk_floats);

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
    const int per_split = (nchunks + p.splits - 1) / p.splits;
    const int j_first = blockIdx.z * per_split;
    const int j_last = min(nchunks, j_first + per_split);
    const int* rec = recptr + blockIdx.y * p.rec_stride;

    // Where each of this lane's pixels starts in the staged window.
    const int tile_pixels = p.TH * p.TW;
    const int image_floats = p.CC * p.TIH * p.pitch;
    int sbase[P];
#pragma unroll
    for (int i = 0; i < P; ++i) {
        const int jpx = lane + 32 * i;
        const int nb = jpx / tile_pixels;
        const int rem = jpx - nb * tile_pixels;
        const int th = rem / p.TW;
        const int tw = rem - th * p.TW;
        sbase[i] = nb < p.NB ? nb * image_floats + th * p.sh * p.pitch + tw * p.sw : 0;
    }

    float acc[KW][P];
#pragma unroll
    for (int kk = 0; kk < KW; ++kk)
#pragma unroll
        for (int i = 0; i < P; ++i) acc[kk][i] = 0.0f;

    const int row0 = blockIdx.y * rows_per_block + warp * KW;
    const int ih0 = oh0 * p.sh - p.pt;
    const int iw0 = ow0 * p.sw - p.pl;

    if (j_first < j_last) {
        const StagePlan sp_plan = stage_plan(p);
        int next_beg = rec[j_first];
        int next_end = rec[j_first + 1];
        stage_chunk(x, meta, smem, mbase, p, sp_plan, j_first, blk.x, blk.y, n0, ih0, iw0,
                    next_beg, next_end);
        next_beg = next_end;
        next_end = j_first + 1 < j_last ? rec[j_first + 2] : next_end;
        for (int j = j_first; j < j_last; ++j) {
            const int buf = (j - j_first) & 1;
            const float* cur = smem + buf * p.chunk_floats;
            const int2* mcur = mbase + buf * p.record_max;
            if (j + 1 < j_last) {
                stage_chunk(x, meta, smem + (buf ^ 1) * p.chunk_floats,
                            mbase + (buf ^ 1) * p.record_max, p, sp_plan, j + 1, blk.x, blk.y,
                            n0, ih0, iw0, next_beg, next_end);
                // Record bounds two chunks ahead, loaded now so the latency hides behind compute.
                next_beg = next_end;
                next_end = j + 2 < j_last ? rec[j + 3] : next_end;
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const int* header = reinterpret_cast<const int*>(mcur);
            const unsigned int records =
                (unsigned int)__cvta_generic_to_shared(mcur + p.header);
            // Shared-memory byte address of each pixel in this chunk's window; offsets in the
            // metadata are bytes too, so the inner loop is one add, one load, one FMA per pixel.
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
#pragma unroll 4
                    for (; e < end; e += 8u) {
                        const int2 m = ld_shared_record(e);
                        const float v = __int_as_float(m.x);
#pragma unroll
                        for (int i = 0; i < P; ++i)
                            acc[kk][i] = fmaf(v, ld_shared(px[i] + (unsigned int)m.y), acc[kk][i]);
                    }
                }
            }
            __syncthreads();
        }
    }

    const int plane = p.OH * p.OW;
    float* const ws = reinterpret_cast<float*>(p.ws);
    if (p.splits > 1) {
        // Split over channel chunks: add partial sums in the workspace; the block that arrives
        // last for this (tile, row block) applies the epilogue and leaves the workspace zeroed.
#pragma unroll
        for (int kk = 0; kk < KW; ++kk) {
            const int row = row0 + kk;
            if (row >= p.K) continue;
            const int k = perm[row];
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
                if (nb < p.NB && n < p.N && oh < p.OH && ow < p.OW)
                    atomicAdd(ws + ((long long)n * p.K + k) * plane + oh * p.OW + ow, acc[kk][i]);
            }
        }
        __threadfence();
        __syncthreads();
        __shared__ int last_arrival;
        if (threadIdx.x == 0) {
            int* counter = reinterpret_cast<int*>(p.counters) + blockIdx.y * gridDim.x + blockIdx.x;
            last_arrival = atomicAdd(counter, 1) == p.splits - 1;
            if (last_arrival) *counter = 0;
        }
        __syncthreads();
        if (!last_arrival) return;
        __threadfence();
    }

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
                float v = acc[kk][i];
                if (p.splits > 1) {
                    v = __ldcg(ws + o);
                    ws[o] = 0.0f;
                }
                v += b;
                if (res) v += res[o];
                if (p.act == 1) v = fmaxf(v, 0.0f);
                else if (p.act == 2) v = fminf(fmaxf(v, 0.0f), 6.0f);
                out[o] = v;
            }
        }
    }
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
