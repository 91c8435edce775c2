// mmvq_q8.cu — matrix-vector products y = W x with x quantized to 8 bits: the decode path.
//
// Why: the f32-activation kernels in mmvq.cu convert every weight to float and multiply in
// f32; here the activations are quantized once per product group (quantize_q8a_f32, 32-element
// blocks with an f32 scale, as the CPU's fast path does), and each weight block is dotted with
// 4-way int8 dot products (dp4a): a quarter of the activation bytes, a fraction of the
// instructions per weight byte, so the kernel is bound by the weight reads.
//
// Activation layout ("q8a", `n` vectors of `ncols`): int8 quants [n][ncols] (rows 4-byte
// aligned since ncols % 32 == 0), then per 32-element block (d, sum of its quants) as float2
// [n][ncols / 32]. `d * q` approximates x; the sums serve the weight formats' offsets and mins.
//
// Products: blocks of RF_MMVQ8_WARPS warps, WPR warps per row; a row's weight blocks are split
// into per-lane items (T::LPB lanes per weight block, consecutive lanes on consecutive bytes),
// each thread takes every NT-th item, and the partial sums meet by warp shuffles (and shared
// memory across the row's warps).
#include "quant_blocks.cuh"
#include "q8a.cuh"

#define RF_MMVQ8_WARPS 8
#define RF_MMVQ8_MAXN 8

// 4-way signed int8 dot product with accumulate: c + sum_i a[i] * b[i].
__device__ __forceinline__ int rf_dp4a(int a, int b, int c) {
#if defined(RF_CUDA)
    int r;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
    return r;
#else
    // Portable form (no target-specific builtin, so the same source builds for every gfx).
    const i8* x = (const i8*)&a;
    const i8* y = (const i8*)&b;
    return c + x[0] * y[0] + x[1] * y[1] + x[2] * y[2] + x[3] * y[3];
#endif
}

#define RF_LO4 0x0F0F0F0F

// Bits 0..3 of `x` to bit 4 of bytes 0..3 (the fifth bit of four consecutive Q5 weights).
__device__ __forceinline__ int rf_spread4(u32 x) {
    return (int)(((x & 1u) << 4) | ((x & 2u) << 11) | ((x & 4u) << 18) | ((x & 8u) << 25));
}

// Bytes 0..63 minus 32 as signed bytes: bit 5 set -> clear it; clear -> set bits 5..7.
__device__ __forceinline__ int rf_sub32x4(u32 v) {
    const u32 neg = ~v & 0x20202020u;
    return (int)((v & 0x1F1F1F1Fu) | (neg * 7u));
}

// Q4_0: 2 lanes per block; lane p owns qs[8p..8p+8): elements 8p..8p+7 (low nibbles) and
// 16+8p..16+8p+7 (high nibbles). Offset -8 folded through the block's quant sum (half each).
struct Q8Q4_0 {
    typedef block_q4_0 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 2;
    static __device__ __forceinline__ float dot(const block* b, int p, const int* xq, const float2* xm) {
        const u32 v0 = rf_load_u32_a2(b->qs + 8 * p);
        const u32 v1 = rf_load_u32_a2(b->qs + 8 * p + 4);
        const int2 ul = *(const int2*)(xq + 2 * p), uh = *(const int2*)(xq + 4 + 2 * p);
        int s = rf_dp4a(v0 & RF_LO4, ul.x, 0);
        s = rf_dp4a(v1 & RF_LO4, ul.y, s);
        s = rf_dp4a((v0 >> 4) & RF_LO4, uh.x, s);
        s = rf_dp4a((v1 >> 4) & RF_LO4, uh.y, s);
        const float2 a = xm[0];
        return rf_h2f(b->d) * a.x * ((float)s - 4.f * a.y);
    }
    static constexpr bool SPLIT = false;
    static __device__ __forceinline__ void frag(const block* b, int, int t, int& lo, int& hi) {
        const u32 v = rf_load_u32_a2(b->qs + 4 * t);
        lo = (int)(v & RF_LO4);
        hi = (int)((v >> 4) & RF_LO4);
    }
    static __device__ __forceinline__ float2 coef(const block* b, int) {
        const float d = rf_h2f(b->d);
        return make_float2(d, 8.f * d);
    }
};

struct Q8Q4_1 {
    typedef block_q4_1 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 2;
    static __device__ __forceinline__ float dot(const block* b, int p, const int* xq, const float2* xm) {
        const u32 v0 = rf_load_u32_a4(b->qs + 8 * p);
        const u32 v1 = rf_load_u32_a4(b->qs + 8 * p + 4);
        const int2 ul = *(const int2*)(xq + 2 * p), uh = *(const int2*)(xq + 4 + 2 * p);
        int s = rf_dp4a(v0 & RF_LO4, ul.x, 0);
        s = rf_dp4a(v1 & RF_LO4, ul.y, s);
        s = rf_dp4a((v0 >> 4) & RF_LO4, uh.x, s);
        s = rf_dp4a((v1 >> 4) & RF_LO4, uh.y, s);
        const float2 a = xm[0];
        return a.x * (rf_h2f(b->d) * (float)s + rf_h2f(b->m) * 0.5f * a.y);
    }
    static constexpr bool SPLIT = false;
    static __device__ __forceinline__ void frag(const block* b, int, int t, int& lo, int& hi) {
        const u32 v = rf_load_u32_a4(b->qs + 4 * t);
        lo = (int)(v & RF_LO4);
        hi = (int)((v >> 4) & RF_LO4);
    }
    static __device__ __forceinline__ float2 coef(const block* b, int) {
        return make_float2(rf_h2f(b->d), -rf_h2f(b->m));
    }
};

// Q5_0 / Q5_1: as Q4 with the fifth bits of the lane's 16 elements spread into bit 4.
#define RF_Q5_PARTS(qh, p, v0, v1)                                        \
    const int l0 = (int)(v0 & RF_LO4) | rf_spread4(qh >> (8 * p));        \
    const int l1 = (int)(v1 & RF_LO4) | rf_spread4(qh >> (8 * p + 4));    \
    const int h0 = (int)((v0 >> 4) & RF_LO4) | rf_spread4(qh >> (16 + 8 * p)); \
    const int h1 = (int)((v1 >> 4) & RF_LO4) | rf_spread4(qh >> (20 + 8 * p));

struct Q8Q5_0 {
    typedef block_q5_0 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 2;
    static __device__ __forceinline__ float dot(const block* b, int p, const int* xq, const float2* xm) {
        const u32 qh = rf_load_u32_a2(b->qh);
        const u32 v0 = rf_load_u32_a2(b->qs + 8 * p);
        const u32 v1 = rf_load_u32_a2(b->qs + 8 * p + 4);
        RF_Q5_PARTS(qh, p, v0, v1)
        const int2 ul = *(const int2*)(xq + 2 * p), uh = *(const int2*)(xq + 4 + 2 * p);
        int s = rf_dp4a(l0, ul.x, 0);
        s = rf_dp4a(l1, ul.y, s);
        s = rf_dp4a(h0, uh.x, s);
        s = rf_dp4a(h1, uh.y, s);
        const float2 a = xm[0];
        return rf_h2f(b->d) * a.x * ((float)s - 8.f * a.y);
    }
    static constexpr bool SPLIT = false;
    static __device__ __forceinline__ void frag(const block* b, int, int t, int& lo, int& hi) {
        const u32 qh = rf_load_u32_a2(b->qh);
        const u32 v = rf_load_u32_a2(b->qs + 4 * t);
        lo = (int)(v & RF_LO4) | rf_spread4(qh >> (4 * t));
        hi = (int)((v >> 4) & RF_LO4) | rf_spread4(qh >> (16 + 4 * t));
    }
    static __device__ __forceinline__ float2 coef(const block* b, int) {
        const float d = rf_h2f(b->d);
        return make_float2(d, 16.f * d);
    }
};

struct Q8Q5_1 {
    typedef block_q5_1 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 2;
    static __device__ __forceinline__ float dot(const block* b, int p, const int* xq, const float2* xm) {
        const u32 qh = rf_load_u32_a4(b->qh);
        const u32 v0 = rf_load_u32_a4(b->qs + 8 * p);
        const u32 v1 = rf_load_u32_a4(b->qs + 8 * p + 4);
        RF_Q5_PARTS(qh, p, v0, v1)
        const int2 ul = *(const int2*)(xq + 2 * p), uh = *(const int2*)(xq + 4 + 2 * p);
        int s = rf_dp4a(l0, ul.x, 0);
        s = rf_dp4a(l1, ul.y, s);
        s = rf_dp4a(h0, uh.x, s);
        s = rf_dp4a(h1, uh.y, s);
        const float2 a = xm[0];
        return a.x * (rf_h2f(b->d) * (float)s + rf_h2f(b->m) * 0.5f * a.y);
    }
    static constexpr bool SPLIT = false;
    static __device__ __forceinline__ void frag(const block* b, int, int t, int& lo, int& hi) {
        const u32 qh = rf_load_u32_a4(b->qh);
        const u32 v = rf_load_u32_a4(b->qs + 4 * t);
        lo = (int)(v & RF_LO4) | rf_spread4(qh >> (4 * t));
        hi = (int)((v >> 4) & RF_LO4) | rf_spread4(qh >> (16 + 4 * t));
    }
    static __device__ __forceinline__ float2 coef(const block* b, int) {
        return make_float2(rf_h2f(b->d), -rf_h2f(b->m));
    }
};
#undef RF_Q5_PARTS

// Q8_0: 4 lanes per block, lane p owns elements 8p..8p+7.
struct Q8Q8_0 {
    typedef block_q8_0 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 4;
    static __device__ __forceinline__ float dot(const block* b, int p, const int* xq, const float2* xm) {
        const u8* qs = (const u8*)b->qs + 8 * p;
        const int2 u = *(const int2*)(xq + 2 * p);
        int s = rf_dp4a((int)rf_load_u32_a2(qs), u.x, 0);
        s = rf_dp4a((int)rf_load_u32_a2(qs + 4), u.y, s);
        return rf_h2f(b->d) * xm[0].x * (float)s;
    }
    static constexpr bool SPLIT = false;
    static __device__ __forceinline__ void frag(const block* b, int, int t, int& lo, int& hi) {
        lo = (int)rf_load_u32_a2((const u8*)b->qs + 4 * t);
        hi = (int)rf_load_u32_a2((const u8*)b->qs + 16 + 4 * t);
    }
    static __device__ __forceinline__ float2 coef(const block* b, int) {
        return make_float2(rf_h2f(b->d), 0.f);
    }
};

// Q4_K / Q5_K: 16 lanes per super-block; lane p covers group g = p / 4 (64 elements: sub-blocks
// 2g and 2g+1, activation blocks 2g and 2g+1) and bytes l = 8k..8k+8 of it, k = p % 4.
// The mins are folded through the activation blocks' quant sums (a quarter per lane).
#define RF_K_RESULT(b, g, sl, sh, xm)                                                      \
    float sc1, m1, sc2, m2;                                                                \
    rf_scale_min_k4(2 * g, b->scales, &sc1, &m1);                                          \
    rf_scale_min_k4(2 * g + 1, b->scales, &sc2, &m2);                                      \
    const float2 a1 = xm[2 * g], a2 = xm[2 * g + 1];                                       \
    return rf_h2f(b->d) * (sc1 * a1.x * (float)sl + sc2 * a2.x * (float)sh) -              \
           rf_h2f(b->dmin) * 0.25f * (m1 * a1.x * a1.y + m2 * a2.x * a2.y);

struct Q8Q4_K {
    typedef block_q4_K block;
    static constexpr int QK = QK_K;
    static constexpr int LPB = 16;
    static __device__ __forceinline__ float dot(const block* b, int p, const int* xq, const float2* xm) {
        const int g = p / 4, k = p % 4;
        const u32 v0 = rf_load_u32_a4(b->qs + 32 * g + 8 * k);
        const u32 v1 = rf_load_u32_a4(b->qs + 32 * g + 8 * k + 4);
        // Activation block 2g, ints 2k, 2k+1, and block 2g+1, the same ints.
        const int2 ul = *(const int2*)(xq + 16 * g + 2 * k), uh = *(const int2*)(xq + 16 * g + 8 + 2 * k);
        int sl = rf_dp4a(v0 & RF_LO4, ul.x, 0);
        sl = rf_dp4a(v1 & RF_LO4, ul.y, sl);
        int sh = rf_dp4a((v0 >> 4) & RF_LO4, uh.x, 0);
        sh = rf_dp4a((v1 >> 4) & RF_LO4, uh.y, sh);
        RF_K_RESULT(b, g, sl, sh, xm)
    }
    static constexpr bool SPLIT = false;
    // Sub-block s (32 elements): group s / 2's bytes, low nibbles for even s, high for odd.
    static __device__ __forceinline__ void frag(const block* b, int s, int t, int& lo, int& hi) {
        const int sh = 4 * (s & 1);
        const u8* q = b->qs + 32 * (s >> 1) + 4 * t;
        lo = (int)((rf_load_u32_a4(q) >> sh) & RF_LO4);
        hi = (int)((rf_load_u32_a4(q + 16) >> sh) & RF_LO4);
    }
    static __device__ __forceinline__ float2 coef(const block* b, int s) {
        float sc, m;
        rf_scale_min_k4(s, b->scales, &sc, &m);
        return make_float2(rf_h2f(b->d) * sc, rf_h2f(b->dmin) * m);
    }
};

struct Q8Q5_K {
    typedef block_q5_K block;
    static constexpr int QK = QK_K;
    static constexpr int LPB = 16;
    static __device__ __forceinline__ float dot(const block* b, int p, const int* xq, const float2* xm) {
        const int g = p / 4, k = p % 4;
        const u32 v0 = rf_load_u32_a4(b->qs + 32 * g + 8 * k);
        const u32 v1 = rf_load_u32_a4(b->qs + 32 * g + 8 * k + 4);
        const u32 q0 = rf_load_u32_a4(b->qh + 8 * k);
        const u32 q1 = rf_load_u32_a4(b->qh + 8 * k + 4);
        const int2 ul = *(const int2*)(xq + 16 * g + 2 * k), uh = *(const int2*)(xq + 16 * g + 8 + 2 * k);
        const int bl = 2 * g, bh = 2 * g + 1;
        int sl = rf_dp4a((int)((v0 & RF_LO4) | (((q0 >> bl) & 0x01010101u) << 4)), ul.x, 0);
        sl = rf_dp4a((int)((v1 & RF_LO4) | (((q1 >> bl) & 0x01010101u) << 4)), ul.y, sl);
        int sh = rf_dp4a((int)(((v0 >> 4) & RF_LO4) | (((q0 >> bh) & 0x01010101u) << 4)), uh.x, 0);
        sh = rf_dp4a((int)(((v1 >> 4) & RF_LO4) | (((q1 >> bh) & 0x01010101u) << 4)), uh.y, sh);
        RF_K_RESULT(b, g, sl, sh, xm)
    }
    static constexpr bool SPLIT = false;
    // As Q4_K, the fifth bit of element e of sub-block s is bit s of qh[e].
    static __device__ __forceinline__ void frag(const block* b, int s, int t, int& lo, int& hi) {
        const int sh = 4 * (s & 1);
        const u8* q = b->qs + 32 * (s >> 1) + 4 * t;
        const u32 h0 = rf_load_u32_a4(b->qh + 4 * t), h1 = rf_load_u32_a4(b->qh + 16 + 4 * t);
        lo = (int)(((rf_load_u32_a4(q) >> sh) & RF_LO4) | (((h0 >> s) & 0x01010101u) << 4));
        hi = (int)(((rf_load_u32_a4(q + 16) >> sh) & RF_LO4) | (((h1 >> s) & 0x01010101u) << 4));
    }
    static __device__ __forceinline__ float2 coef(const block* b, int s) {
        float sc, m;
        rf_scale_min_k4(s, b->scales, &sc, &m);
        return make_float2(rf_h2f(b->d) * sc, rf_h2f(b->dmin) * m);
    }
};
#undef RF_K_RESULT

// Q6_K: 16 lanes per super-block; lane p covers half h = p / 8 and l = 4k..4k+4, k = p % 8:
// for t < 4 the elements 128h + 32t + l (activation block 4h + t, int k), scale 8h + 2t + k/4.
struct Q8Q6_K {
    typedef block_q6_K block;
    static constexpr int QK = QK_K;
    static constexpr int LPB = 16;
    static __device__ __forceinline__ float dot(const block* b, int p, const int* xq, const float2* xm) {
        const int h = p / 8, k = p % 8;
        const u32 a = rf_load_u32_a2(b->ql + 64 * h + 4 * k);
        const u32 c = rf_load_u32_a2(b->ql + 64 * h + 32 + 4 * k);
        const u32 q = rf_load_u32_a2(b->qh + 32 * h + 4 * k);
        const i8* sc = b->scales + 8 * h + k / 4;
        const int* xa = xq + 32 * h + k;
        const float2* ma = xm + 4 * h;
        const int t0 = rf_dp4a(rf_sub32x4((a & RF_LO4) | ((q & 0x03030303u) << 4)), xa[0], 0);
        const int t1 = rf_dp4a(rf_sub32x4((c & RF_LO4) | (((q >> 2) & 0x03030303u) << 4)), xa[8], 0);
        const int t2 = rf_dp4a(rf_sub32x4(((a >> 4) & RF_LO4) | (((q >> 4) & 0x03030303u) << 4)), xa[16], 0);
        const int t3 = rf_dp4a(rf_sub32x4(((c >> 4) & RF_LO4) | (((q >> 6) & 0x03030303u) << 4)), xa[24], 0);
        const float s = ma[0].x * (float)sc[0] * (float)t0 + ma[1].x * (float)sc[2] * (float)t1 +
                        ma[2].x * (float)sc[4] * (float)t2 + ma[3].x * (float)sc[6] * (float)t3;
        return rf_h2f(b->d) * s;
    }
    // Sub-block s = 4h + u (32 elements l): ql[64h + 32(u & 1) + l] nibble u / 2, qh[32h + l]
    // bits 2u..2u+1, scale 8h + 2u for l < 16 and 8h + 2u + 1 above: two scales, so the low
    // and high halves take separate products (SPLIT) and coef gives their two multipliers.
    static constexpr bool SPLIT = true;
    static __device__ __forceinline__ void frag(const block* b, int s, int t, int& lo, int& hi) {
        const int h = s >> 2, u = s & 3;
        const u8* q = b->ql + 64 * h + 32 * (u & 1) + 4 * t;
        const u8* qh = b->qh + 32 * h + 4 * t;
        const int sl = 4 * (u >> 1), sh = 2 * u;
        lo = rf_sub32x4(((rf_load_u32_a2(q) >> sl) & RF_LO4) | (((rf_load_u32_a2(qh) >> sh) & 0x03030303u) << 4));
        hi = rf_sub32x4(((rf_load_u32_a2(q + 16) >> sl) & RF_LO4) |
                        (((rf_load_u32_a2(qh + 16) >> sh) & 0x03030303u) << 4));
    }
    static __device__ __forceinline__ float2 coef(const block* b, int s) {
        const float d = rf_h2f(b->d);
        const i8* sc = b->scales + 8 * (s >> 2) + 2 * (s & 3);
        return make_float2(d * (float)sc[0], d * (float)sc[1]);
    }
};

// x [nblk * 32] f32 -> q8a (quants `qs`, per block (d, quant sum) `meta`). 32 threads per
// block of 32; launch RF_Q8A_THREADS threads per block.
#define RF_Q8A_THREADS 256
extern "C" __global__ void quantize_q8a_f32(const float* __restrict__ x, i8* __restrict__ qs,
                                            float2* __restrict__ meta, int nblk) {
    rf_grid_launch_dependents();  // a product follows (vendor.cuh)
    const int blk = (blockIdx.x * RF_Q8A_THREADS + threadIdx.x) / 32;
    const int i = threadIdx.x % 32;
    const bool live = blk < nblk;
    rf_q8a_store(live ? x[(i64)blk * 32 + i] : 0.f, live, blk, i, qs, meta);
}

// The row a warp works on: up to three matrices of the same type and width over one input
// (Q/K/V, gate/up) share a launch; rows [0, r1) are matrix 0's, [r1, r2) matrix 1's,
// [r2, ntotal) matrix 2's. `live`: the row exists (the same for a whole warp).
struct RfRow {
    bool live;
    const void* w;
    float* y;
    int row, nrows;
};

// Global row `grow` of the (up to) three matrices.
__device__ __forceinline__ RfRow rf_row_at(int grow, const void* w0, const void* w1, const void* w2,
                                           float* y0, float* y1, float* y2, int r1, int r2,
                                           int ntotal) {
    RfRow r;
    r.live = grow < ntotal;
    r.w = grow < r1 ? w0 : grow < r2 ? w1 : w2;
    r.y = grow < r1 ? y0 : grow < r2 ? y1 : y2;
    r.row = grow < r1 ? grow : grow < r2 ? grow - r1 : grow - r2;
    r.nrows = grow < r1 ? r1 : grow < r2 ? r2 - r1 : ntotal - r2;
    return r;
}

template <int WPR>
__device__ __forceinline__ RfRow rf_mmvq8_row(const void* w0, const void* w1, const void* w2,
                                              float* y0, float* y1, float* y2, int r1, int r2,
                                              int ntotal) {
    constexpr int RPB = RF_MMVQ8_WARPS / WPR;
    const int grow = blockIdx.x * RPB + (int)(threadIdx.x / RF_WARP) / WPR;
    return rf_row_at(grow, w0, w1, w2, y0, y1, y2, r1, r2, ntotal);
}

// The epilogue: each lane's partial sums meet across the warp (and across the row's WPR warps
// in shared memory); lane j of the row's first warp writes y[j][row] (or adds to it: `acc`).
template <int NV, int WPR>
__device__ __forceinline__ void rf_mmvq8_store(float (&sum)[NV], const RfRow& r, int n, int acc) {
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
#pragma unroll
    for (int j = 0; j < NV; ++j) sum[j] = rf_warp_sum(sum[j]);
    if (WPR == 1) {
        if (r.live && lane < NV && (NV == 1 || lane < n)) {
            float s = sum[0];
#pragma unroll
            for (int j = 1; j < NV; ++j) if (lane == j) s = sum[j];
            float* o = r.y + (i64)lane * r.nrows + r.row;
            *o = acc ? *o + s : s;
        }
        return;
    }
    __shared__ float part[RF_MMVQ8_WARPS][NV];
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < NV; ++j) part[warp][j] = sum[j];
    }
    __syncthreads();
    if (r.live && warp % WPR == 0 && lane < NV && (NV == 1 || lane < n)) {
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < WPR; ++k) s += part[warp + k][lane];
        float* o = r.y + (i64)lane * r.nrows + r.row;
        *o = acc ? *o + s : s;
    }
}

// y[j][row] = W[row] . x[j] for j < NV (NV == RF_MMVQ8_MAXN: j < n, n <= NV, the same for
// the whole block) for each of up to three matrices W (outputs y [n][its rows]); `acc`:
// y[j][row] += instead (a residual add in the epilogue). Block: RF_MMVQ8_WARPS warps; WPR warps
// share a row (RF_MMVQ8_WARPS / WPR rows per block), meeting in shared memory when WPR > 1.
// Grid: ceil(rows of all matrices / rows per block).
template <typename T, int NV, int WPR>
__device__ __forceinline__ void rf_mmvq8(const void* __restrict__ w0, const void* __restrict__ w1,
                                         const void* __restrict__ w2, const int* __restrict__ xq,
                                         const float2* __restrict__ xm, float* y0, float* y1,
                                         float* y2, int ncols, int r1, int r2, int ntotal, int n,
                                         int acc) {
    constexpr int NT = WPR * RF_WARP;  // threads of one row
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int tid = (warp % WPR) * RF_WARP + lane;
    const RfRow r = rf_mmvq8_row<WPR>(w0, w1, w2, y0, y1, y2, r1, r2, ntotal);
    const int nb = ncols / T::QK;
    const typename T::block* br = (const typename T::block*)r.w + (i64)(r.live ? r.row : 0) * nb;
    const int items = r.live ? nb * T::LPB : 0;
    const int xstride = ncols / 4;   // ints of quants per vector
    const int mstride = ncols / 32;  // activation blocks per vector
    float sum[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) sum[j] = 0.f;
    rf_grid_wait();  // the activations (and `acc`'s y) come from the kernels before
#pragma unroll 4
    for (int i = tid; i < items; i += NT) {
        const int ib = i / T::LPB, p = i % T::LPB;
        const int* xb = xq + ib * (T::QK / 4);
        const float2* mb = xm + ib * (T::QK / 32);
#pragma unroll
        for (int j = 0; j < NV; ++j) {
            if (NV == 1 || j < n) sum[j] += T::dot(br + ib, p, xb + (i64)j * xstride, mb + (i64)j * mstride);
        }
    }
    rf_mmvq8_store<NV, WPR>(sum, r, n, acc);
}

// The same products with each warp's share of its row staged through shared memory: the warp
// copies a chunk of 2,048 weights (64 blocks of 32, or 8 super-blocks of 256) with 16-byte,
// fully coalesced loads into its own slot, then computes the chunk's blocks from there exactly
// as rf_mmvq8 does from global memory. Why: the GGUF blocks keep only 2-byte alignment (18-,
// 22-, 34-, 210-byte blocks), so rf_mmvq8 reads each lane's bytes with several 2- or 4-byte
// loads, and each warp-wide load touches the same cache lines again; here every weight byte is
// requested once, in 16-byte pieces. The next chunk's loads are issued before the current
// chunk is computed, so they are in flight during the arithmetic.
// Precondition (checked by the launcher): every row starts 16-byte aligned, i.e. the matrix is
// 16-byte aligned and its row size a multiple of 16 (for the 8B shapes' 4,096 and 14,336
// columns it is; SmolLM2's 576 are not, and take rf_mmvq8).
// Order: a warp's items are visited in ascending order, lane-strided within each chunk; with one
// warp per row (and 32 lanes) that is rf_mmvq8's order item for item, so the sums are the same
// bits.
template <typename T>
struct RfStage {
    static constexpr int CB = T::QK == 32 ? 64 : 8;            // blocks per chunk
    static constexpr int BYTES = CB * (int)sizeof(typename T::block);
    static constexpr int V16 = BYTES / 16;                       // 16-byte pieces per chunk
    static constexpr int U = (V16 + RF_WARP - 1) / RF_WARP;      // pieces per lane
};

template <typename T, int NV, int WPR>
__device__ __forceinline__ void rf_mmvq8s(const void* __restrict__ w0, const void* __restrict__ w1,
                                          const void* __restrict__ w2, const int* __restrict__ xq,
                                          const float2* __restrict__ xm, float* y0, float* y1,
                                          float* y2, int ncols, int r1, int r2, int ntotal, int n,
                                          int acc) {
    typedef RfStage<T> S;
    static_assert(S::BYTES % 16 == 0, "a chunk must be whole 16-byte pieces");
    __shared__ uint4 stage[RF_MMVQ8_WARPS][S::V16];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int wsub = warp % WPR;  // this warp's share of the row: chunks wsub, wsub + WPR, ...
    const RfRow r = rf_mmvq8_row<WPR>(w0, w1, w2, y0, y1, y2, r1, r2, ntotal);
    const int nb = ncols / T::QK;
    const uint4* src = (const uint4*)((const typename T::block*)r.w + (i64)(r.live ? r.row : 0) * nb);
    const int nchunk = r.live ? (nb + S::CB - 1) / S::CB : 0;
    const int xstride = ncols / 4;
    const int mstride = ncols / 32;
    float sum[NV];
#pragma unroll
    for (int j = 0; j < NV; ++j) sum[j] = 0.f;
    uint4 piece[S::U];
    // Pieces of chunk c this lane loads (a short last chunk has fewer).
#define RF_STAGE_LOAD(c)                                                                     \
    {                                                                                        \
        const int cb_ = min(S::CB, nb - (c) * S::CB);                                        \
        const int v16_ = cb_ * (int)sizeof(typename T::block) / 16;                          \
        const uint4* s_ = src + (i64)(c) * S::V16;                                           \
        _Pragma("unroll") for (int u = 0; u < S::U; ++u) {                                   \
            const int k = lane + u * RF_WARP;                                                \
            if (k < v16_) piece[u] = s_[k];                                                  \
        }                                                                                    \
    }
    if (wsub < nchunk) RF_STAGE_LOAD(wsub)
    // The first chunk's weights are in flight; the activations (and `acc`'s y) come from the
    // kernels before: with an early launch, wait for them here (vendor.cuh).
    rf_grid_wait();
    for (int c = wsub; c < nchunk; c += WPR) {
        const int cb = min(S::CB, nb - c * S::CB);
        const int v16 = cb * (int)sizeof(typename T::block) / 16;
#pragma unroll
        for (int u = 0; u < S::U; ++u) {
            const int k = lane + u * RF_WARP;
            if (k < v16) stage[warp][k] = piece[u];
        }
        rf_syncwarp();
        if (c + WPR < nchunk) RF_STAGE_LOAD(c + WPR)
        const typename T::block* sb = (const typename T::block*)stage[warp];
        const int b0 = c * S::CB;
        const int items = cb * T::LPB;
#pragma unroll 4
        for (int i = lane; i < items; i += RF_WARP) {
            const int ib = i / T::LPB, p = i % T::LPB;
            const int* xb = xq + (b0 + ib) * (T::QK / 4);
            const float2* mb = xm + (b0 + ib) * (T::QK / 32);
#pragma unroll
            for (int j = 0; j < NV; ++j) {
                if (NV == 1 || j < n) sum[j] += T::dot(sb + ib, p, xb + (i64)j * xstride, mb + (i64)j * mstride);
            }
        }
        rf_syncwarp();  // the slot is rewritten by the next chunk
    }
#undef RF_STAGE_LOAD
    rf_mmvq8_store<NV, WPR>(sum, r, n, acc);
}

// The batched products on tensor cores (sm_80+: int8 `mma.sync` m16n8k32): a warp computes a
// tile of 16 rows x 8 vectors, one 32-element block of the rows per instruction. Why: the
// dp4a forms above reload each vector's activations for every 16 weights they decode, so 8
// vectors move ~16x more activation bytes through L1 than weight bytes and the batch runs at a
// third of the one-vector bandwidth; here a 32-weight block of 16 rows is decoded once into the
// A fragment and the 8 vectors' activations come in as the B fragment (one 16-byte row of each).
//
// Fragments (PTX ISA, m16n8k32 .s8; lane = 4 * gid + t): A a0 = row gid, k 4t..4t+3; a1 = row
// gid + 8, the same k; a2, a3 = k 16 + 4t.. of the two rows; B b0 = vector gid, k 4t..4t+3, b1
// = k 16 + 4t..; C c0, c1 = row gid, vectors 2t, 2t + 1; c2, c3 = row gid + 8.
// Each weight type gives `frag` (the int8 values of a 32-element sub-block's k 4t.. and
// 16 + 4t.., unsigned nibbles or signed bytes) and `coef` (mul, off) with sum_e w_e x_e =
// dx (mul sum_e q_e xq_e - off sum_e xq_e); Q6_K's halves have their own scales (SPLIT: two
// products, coef = the two multipliers).
// Block: RF_MMVQ8_WARPS warps; KS warps share a tile, each over a contiguous range of the row's
// blocks, meeting in shared memory. Targets without int8 MMA (HIP, sm < 80) compute the same
// tile with dp4a from the same fragments (lanes 32.. of a 64-wide wavefront idle); the launcher
// takes these kernels only where the device has the instruction.
#define RF_MMA_ROWS 16
#define RF_MMA_MAXN 16         // vectors of the in-place forms (two groups of 8)
#define RF_MMA_PACKED_MAXN 32  // of the packed ones (`_mq*p`: four groups)
#if defined(RF_CUDA) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define RF_MMA_S8 1
#endif

__device__ __forceinline__ void rf_mma_s8(int (&c)[4], int a0, int a1, int a2, int a3, int b0, int b1) {
#if defined(RF_MMA_S8)
    asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=r"(c[0]), "=r"(c[1]), "=r"(c[2]), "=r"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "r"(0));
#else
    (void)a0, (void)a1, (void)a2, (void)a3, (void)b0, (void)b1;
    c[0] = c[1] = c[2] = c[3] = 0;
#endif
}

// The tiles' activations, two layouts behind one interface: `ints(g, kb, v, tt)` = ints tt and
// 4 + tt of 32-element block kb of vector 8 g + v (an absent vector reads as zero), `meta(g, kb,
// t)` = the (d, quant sum) pairs of vectors 8 g + 2 t and 8 g + 2 t + 1 (d, sum, d, sum).
// RfActRows reads the q8a layout in place: each B fragment load touches 8 vectors' rows (8
// cache lines) and each meta pair 2 more, per 16-row tile and block: the L1 traffic that bound
// the batched tiles (ncu, H100: L1/TEX 78% busy, 44% of cycles waiting on it).
struct RfActRows {
    const int* __restrict__ xq;
    const float2* __restrict__ xm;
    int xstride, mstride, n;
    __device__ __forceinline__ int2 ints(int g, int kb, int v, int tt) const {
        const int vv = 8 * g + v;
        if (vv >= n) return make_int2(0, 0);
        const int* p = xq + (i64)vv * xstride + kb * 8;
        return make_int2(p[tt], p[4 + tt]);
    }
    __device__ __forceinline__ float4 meta(int g, int kb, int t) const {
        const int v = 8 * g + 2 * t;
        const float2 a = v < n ? xm[(i64)v * mstride + kb] : make_float2(0.f, 0.f);
        const float2 b = v + 1 < n ? xm[(i64)(v + 1) * mstride + kb] : make_float2(0.f, 0.f);
        return make_float4(a.x, a.y, b.x, b.y);
    }
};
// RfActPacked reads the layout q8a_pack_mma writes: per group g of 8 vectors and block kb, 32
// int2 (lane 4 v + tt: ints tt and 4 + tt of vector v: a B fragment is one 8-byte load of 256
// contiguous bytes) and 4 float4 (the meta pairs: one 16-byte load of 64 bytes); absent vectors
// are zeros. Quants [groups][nkb][32] int2, then meta [groups][nkb][4] float4.
struct RfActPacked {
    const int2* __restrict__ xp;
    const float4* __restrict__ xm;
    int nkb;
    __device__ __forceinline__ int2 ints(int g, int kb, int v, int tt) const {
        return xp[((i64)g * nkb + kb) * 32 + 4 * v + tt];
    }
    __device__ __forceinline__ float4 meta(int g, int kb, int t) const {
        return xm[((i64)g * nkb + kb) * 4 + t];
    }
};

// q8a (n vectors of ncols, n <= RF_MMA_PACKED_MAXN) -> RfActPacked's layout: one thread per int2 (and
// lanes 0..3 of each 32 the float4s), ceil(n / 8) groups, absent vectors zero. Launched early
// before the product it feeds: waits for the q8a's producer before reading.
#define RF_PACK_THREADS 256
extern "C" __global__ void q8a_pack_mma(const int* __restrict__ xq, const float2* __restrict__ xm,
                                        int2* __restrict__ xp, float4* __restrict__ xpm, int n,
                                        int ncols) {
    rf_grid_launch_dependents();  // the product follows
    rf_grid_wait();
    const int nkb = ncols / 32;
    const i64 i = (i64)blockIdx.x * RF_PACK_THREADS + threadIdx.x;
    if (i >= (i64)((n + 7) / 8) * nkb * 32) return;
    const int lane = (int)(i % 32);
    const i64 gk = i / 32;
    const int g = (int)(gk / nkb), kb = (int)(gk % nkb);
    const RfActRows rows = {xq, xm, ncols / 4, nkb, n};
    xp[i] = rows.ints(g, kb, lane / 4, lane % 4);
    if (lane < 4) xpm[gk * 4 + lane] = rows.meta(g, kb, lane);
}

// The int32 tile of sub-block `sub` of blocks b0 (row gid) and b1 (row gid + 8) with the B
// fragment `xv` (x.ints(g, kb, gid, t) of vectors 8 g .. 8 g + 7 of block kb): cl = the low
// halves' products (k < 16) and ch the high ones' for SPLIT types; otherwise cl the whole
// block's and ch zero. Layout as C above. Tensor-core targets only (RF_MMA_S8).
template <typename T>
__device__ __forceinline__ void rf_mma_tile_b(const typename T::block* b0, const typename T::block* b1,
                                              int sub, int t, int2 xv, int (&cl)[4], int (&ch)[4]) {
#if defined(RF_MMA_S8)
    int l0, h0, l1, h1;
    T::frag(b0, sub, t, l0, h0);
    T::frag(b1, sub, t, l1, h1);
    if (T::SPLIT) {
        rf_mma_s8(cl, l0, l1, 0, 0, xv.x, xv.y);
        rf_mma_s8(ch, 0, 0, h0, h1, xv.x, xv.y);
    } else {
        rf_mma_s8(cl, l0, l1, h0, h1, xv.x, xv.y);
        ch[0] = ch[1] = ch[2] = ch[3] = 0;
    }
#else
    (void)b0, (void)b1, (void)sub, (void)t, (void)xv;
#pragma unroll
    for (int i = 0; i < 4; ++i) cl[i] = ch[i] = 0;
#endif
}

// rf_mma_tile_b with vectors 8 g .. 8 g + 7 of block kb of the activations `x`; targets
// without int8 MMA compute the same tile with dp4a from the same fragments.
template <typename T, typename A>
__device__ __forceinline__ void rf_mma_tile(const typename T::block* b0, const typename T::block* b1,
                                            int sub, int gid, int t, const A& x, int g, int kb,
                                            int (&cl)[4], int (&ch)[4]) {
#if defined(RF_MMA_S8)
    rf_mma_tile_b<T>(b0, b1, sub, t, x.ints(g, kb, gid, t), cl, ch);
#else
#pragma unroll
    for (int i = 0; i < 4; ++i) cl[i] = ch[i] = 0;
#pragma unroll
    for (int tt = 0; tt < 4; ++tt) {
        int l0, h0, l1, h1;
        T::frag(b0, sub, tt, l0, h0);
        T::frag(b1, sub, tt, l1, h1);
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int2 xv = x.ints(g, kb, 2 * t + j, tt);  // absent vectors: zeros, unused sums
            cl[j] = rf_dp4a(l0, xv.x, cl[j]);
            ch[j] = rf_dp4a(h0, xv.y, ch[j]);
            cl[2 + j] = rf_dp4a(l1, xv.x, cl[2 + j]);
            ch[2 + j] = rf_dp4a(h1, xv.y, ch[2 + j]);
        }
    }
    if (!T::SPLIT) {
#pragma unroll
        for (int i = 0; i < 4; ++i) cl[i] += ch[i], ch[i] = 0;
    }
#endif
}

// One 32-element block `kb` (sub-block `sub` of weight blocks ba[r] / bb[r], global or shared
// memory) of RT 16-row tiles against NT groups of 8 vectors of `x`, accumulated in f[r][g]
// (layout of C). The tiles share each group's activations: loaded once (B fragment and
// pairs), used RT times.
template <typename T, int NT, int RT, typename A>
__device__ __forceinline__ void rf_mma_step(const typename T::block* const (&ba)[RT],
                                            const typename T::block* const (&bb)[RT], int sub,
                                            int kb, int gid, int t, const A& x,
                                            float (&f)[RT][NT][4]) {
    float2 ca[RT], cb[RT];
#pragma unroll
    for (int r = 0; r < RT; ++r) ca[r] = T::coef(ba[r], sub), cb[r] = T::coef(bb[r], sub);
#pragma unroll
    for (int g = 0; g < NT; ++g) {
#if defined(RF_MMA_S8)
        const int2 xv = x.ints(g, kb, gid, t);
#endif
        const float4 m = x.meta(g, kb, t);
#pragma unroll
        for (int r = 0; r < RT; ++r) {
            int cl[4], ch[4];
#if defined(RF_MMA_S8)
            rf_mma_tile_b<T>(ba[r], bb[r], sub, t, xv, cl, ch);
#else
            rf_mma_tile<T>(ba[r], bb[r], sub, gid, t, x, g, kb, cl, ch);
#endif
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const float2 a = j ? make_float2(m.z, m.w) : make_float2(m.x, m.y);
                if (T::SPLIT) {
                    f[r][g][j] += a.x * (ca[r].x * (float)cl[j] + ca[r].y * (float)ch[j]);
                    f[r][g][2 + j] += a.x * (cb[r].x * (float)cl[2 + j] + cb[r].y * (float)ch[2 + j]);
                } else {
                    f[r][g][j] += a.x * (ca[r].x * (float)cl[j] - ca[r].y * a.y);
                    f[r][g][2 + j] += a.x * (cb[r].x * (float)cl[2 + j] - cb[r].y * a.y);
                }
            }
        }
    }
}

// Shared floats rf_mma_finish needs for NT groups.
#define RF_MMA_PART(NT) (RF_MMVQ8_WARPS * 32 * (NT) * 4)

// The tile's KS warps (consecutive in the block) add their partial sums in shared memory
// (`part`: RF_MMA_PART(NT) floats, free for it) and the first writes y[v][row] (or adds to it:
// `acc`) for rows ra / rb.
template <int KS, int NT>
__device__ __forceinline__ void rf_mma_finish(float (&f)[NT][4], const RfRow& ra, const RfRow& rb,
                                              int n, int acc, float* part) {
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const bool on = lane < 32;  // a 64-wide wavefront's upper half idles
    const int t = lane & 3;
    if (KS > 1) {
        if (on) {
#pragma unroll
            for (int i = 0; i < NT * 4; ++i) part[(warp * 32 + lane) * NT * 4 + i] = f[i / 4][i % 4];
        }
        __syncthreads();
        if (warp % KS != 0) return;
#pragma unroll
        for (int k = 1; k < KS; ++k) {
#pragma unroll
            for (int i = 0; i < NT * 4; ++i)
                f[i / 4][i % 4] += part[((warp + k) * 32 + (lane & 31)) * NT * 4 + i];
        }
    }
    if (!on) return;
#pragma unroll
    for (int g = 0; g < NT; ++g) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int v = 8 * g + 2 * t + j;
            if (v >= n) continue;
            if (ra.live) {
                float* o = ra.y + (i64)v * ra.nrows + ra.row;
                *o = acc ? *o + f[g][j] : f[g][j];
            }
            if (rb.live) {
                float* o = rb.y + (i64)v * rb.nrows + rb.row;
                *o = acc ? *o + f[g][2 + j] : f[g][2 + j];
            }
        }
    }
}

// y[v][row] = W[row] . x[v] for v < n (n <= 8 NT: NT groups of 8 vectors share each decoded
// A fragment) over up to three matrices (rows as rf_mmvq8); grid: ceil(16-row tiles /
// (RF_MMVQ8_WARPS / KS)).
template <typename T, int KS, int NT, typename A>
__device__ __forceinline__ void rf_mmvq8_mma(const void* __restrict__ w0, const void* __restrict__ w1,
                                             const void* __restrict__ w2, const A x, float* y0, float* y1,
                                             float* y2, int ncols, int r1, int r2, int ntotal, int n,
                                             int acc) {
    constexpr int TPB = RF_MMVQ8_WARPS / KS;  // tiles per block
    constexpr int KPB = T::QK / 32;           // 32-element sub-blocks per weight block
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int gid = (lane & 31) >> 2, t = lane & 3;
    const int tile = blockIdx.x * TPB + warp / KS, ks = warp % KS;
    const RfRow ra = rf_row_at(tile * RF_MMA_ROWS + gid, w0, w1, w2, y0, y1, y2, r1, r2, ntotal);
    const RfRow rb = rf_row_at(tile * RF_MMA_ROWS + 8 + gid, w0, w1, w2, y0, y1, y2, r1, r2, ntotal);
    const int nkb = ncols / 32;
    const typename T::block* ba = (const typename T::block*)ra.w + (i64)(ra.live ? ra.row : 0) * (nkb / KPB);
    const typename T::block* bb = (const typename T::block*)rb.w + (i64)(rb.live ? rb.row : 0) * (nkb / KPB);
    const int kb0 = (int)((i64)nkb * ks / KS), kb1 = (int)((i64)nkb * (ks + 1) / KS);
    float f[1][NT][4];
#pragma unroll
    for (int g = 0; g < NT; ++g) f[0][g][0] = f[0][g][1] = f[0][g][2] = f[0][g][3] = 0.f;
    rf_grid_wait();  // the activations (and `acc`'s y) come from the kernels before
#pragma unroll 4
    for (int kb = kb0; kb < kb1; ++kb) {
        const int blk = kb / KPB;
        const typename T::block* const pa[1] = {ba + blk};
        const typename T::block* const pb[1] = {bb + blk};
        rf_mma_step<T, NT, 1>(pa, pb, kb % KPB, kb, gid, t, x, f);
    }
    __shared__ float part[KS > 1 ? RF_MMA_PART(NT) : 1];
    rf_mma_finish<KS, NT>(f[0], ra, rb, n, acc, part);
}

// The staged tiles' chunk for RT tiles a block: RfStage<T>'s, halved where the RT * 16 rows'
// padded chunks would pass 40 KiB of shared memory and half a chunk is still whole 16-byte
// pieces (two tiles of Q8_0 and Q5_1; Q6_K's half chunk is not, so it has no two-tile form).
template <typename T, int RT>
struct RfStageRT {
    static constexpr int CB0 = RfStage<T>::CB;
    static constexpr int BLK = (int)sizeof(typename T::block);
    static constexpr bool HALF = RT * RF_MMA_ROWS * (CB0 * BLK / 16 + 1) * 16 > 40960 &&
                                 (CB0 / 2 * BLK) % 16 == 0;
    static constexpr int CB = HALF ? CB0 / 2 : CB0;  // blocks per chunk
    static constexpr int V16 = CB * BLK / 16;          // 16-byte pieces of a row's chunk
};

// The same tiles with the weights staged: the block's 8 warps take RT 16-row tiles (rows
// 16 RT b ..) and copy each chunk of their rows (RfStageRT<T, RT>::CB blocks, 2,048 or 1,024
// weights a row) into shared memory with 16-byte coalesced loads, the next chunk's loads in
// flight while the warps compute the current one from shared memory (warp w its blocks w, w + 8,
// ...). Why: the direct form reads each lane's bytes with 2- and 4-byte loads scattered over 16
// rows and is bound by their latency (one vector ran at 0.75x the one-warp-per-row kernel on the
// H100). With RT = 2 the two tiles share each activation load (B fragment and pairs): a block
// moves half as many activation bytes through L1 per weight byte (32 vectors re-read ~4x the
// weights' bytes with one tile). Rows sit 16 bytes apart more than their chunk in shared memory,
// so the 8 rows a fragment load touches fall in different banks. Precondition (the launcher's,
// as for rf_mmvq8s): every row starts 16-byte aligned. Grid: one block per RT tiles. Each tile's
// sums are the same bits for every RT (the same warp takes the same blocks in the same order).
template <typename T, int NT, int RT, typename A>
__device__ __forceinline__ void rf_mmvq8_mma_s(const void* __restrict__ w0, const void* __restrict__ w1,
                                               const void* __restrict__ w2, const A x, float* y0, float* y1,
                                               float* y2, int ncols, int r1, int r2, int ntotal,
                                               int n, int acc) {
    typedef RfStageRT<T, RT> S;
    typedef typename T::block B;
    static_assert(S::CB * S::BLK % 16 == 0, "a chunk must be whole 16-byte pieces");
    constexpr int ROWS = RT * RF_MMA_ROWS;
    constexpr int KPB = T::QK / 32;
    constexpr int RS = S::V16 + 1;  // a row's 16-byte pieces in shared memory, padded
    constexpr int NTH = RF_MMVQ8_WARPS * 32;  // threads that copy (a wavefront's first 32 lanes)
    constexpr int U = (ROWS * S::V16 + NTH - 1) / NTH;  // pieces per thread and chunk
    // The stage, then (after the last chunk) the warps' partial sums: RF_MMA_PART(NT) floats a tile.
    constexpr int PART16 = RF_MMA_PART(NT) * RT / 4;
    constexpr int STAGE16 = ROWS * RS > PART16 ? ROWS * RS : PART16;
    __shared__ uint4 stage[STAGE16];
    __shared__ const uint4* rowsrc[ROWS];
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const bool on = lane < 32;
    const int ct = warp * 32 + (lane & 31);  // copying thread (lanes 32.. of a wavefront idle)
    const int gid = (lane & 31) >> 2, t = lane & 3;
    const int row0 = blockIdx.x * ROWS;
    const int nb = ncols / T::QK;
    if (threadIdx.x < ROWS) {
        const RfRow r = rf_row_at(row0 + threadIdx.x, w0, w1, w2, y0, y1, y2, r1, r2, ntotal);
        rowsrc[threadIdx.x] = (const uint4*)((const B*)r.w + (i64)(r.live ? r.row : 0) * nb);
    }
    __syncthreads();
    const int nchunk = (nb + S::CB - 1) / S::CB;
    float f[RT][NT][4];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
        for (int g = 0; g < NT; ++g) f[r][g][0] = f[r][g][1] = f[r][g][2] = f[r][g][3] = 0.f;
    uint4 piece[U];
    // This thread's pieces of chunk c (a short last chunk has fewer per row).
#define RF_MMA_STAGE_LOAD(c)                                                                 \
    {                                                                                        \
        const int v16_ = min(S::CB, nb - (c) * S::CB) * S::BLK / 16;                         \
        _Pragma("unroll") for (int u = 0; u < U; ++u) {                                      \
            const int k = ct + u * NTH, row = k / S::V16, off = k % S::V16;                  \
            if (on && row < ROWS && off < v16_)                                              \
                piece[u] = rowsrc[row][(i64)(c) * S::V16 + off];                             \
        }                                                                                    \
    }
    RF_MMA_STAGE_LOAD(0)
    rf_grid_wait();  // the first chunk's weights are in flight; x (and acc's y) come from before
    for (int c = 0; c < nchunk; ++c) {
        const int cb = min(S::CB, nb - c * S::CB);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = ct + u * NTH, row = k / S::V16, off = k % S::V16;
            if (on && row < ROWS && off < S::V16) stage[row * RS + off] = piece[u];
        }
        __syncthreads();
        if (c + 1 < nchunk) RF_MMA_STAGE_LOAD(c + 1)
        const int kb0 = c * S::CB * KPB;
        for (int i = warp; i < cb * KPB; i += RF_MMVQ8_WARPS) {
            const B* pa[RT];
            const B* pb[RT];
#pragma unroll
            for (int r = 0; r < RT; ++r) {
                pa[r] = (const B*)(stage + (r * RF_MMA_ROWS + gid) * RS) + i / KPB;
                pb[r] = (const B*)(stage + (r * RF_MMA_ROWS + 8 + gid) * RS) + i / KPB;
            }
            rf_mma_step<T, NT, RT>(pa, pb, i % KPB, kb0 + i, gid, t, x, f);
        }
        __syncthreads();  // the stage is rewritten by the next chunk
    }
#undef RF_MMA_STAGE_LOAD
    // The stage is free now (the loop's last barrier): the partial sums meet in it, and warp r
    // (r < RT) adds tile r's in warp order and writes its rows.
    float* part = (float*)stage;
    constexpr int PT = RF_MMA_PART(NT);  // floats of a tile's partial sums
    if (on) {
#pragma unroll
        for (int r = 0; r < RT; ++r)
#pragma unroll
            for (int i = 0; i < NT * 4; ++i) part[r * PT + (warp * 32 + lane) * NT * 4 + i] = f[r][i / 4][i % 4];
    }
    __syncthreads();
    if (warp >= RT || !on) return;
    const int r = warp;
    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT * 4; ++i) s[i / 4][i % 4] = part[r * PT + lane * NT * 4 + i];
#pragma unroll
    for (int k = 1; k < RF_MMVQ8_WARPS; ++k) {
#pragma unroll
        for (int i = 0; i < NT * 4; ++i) s[i / 4][i % 4] += part[r * PT + (k * 32 + lane) * NT * 4 + i];
    }
    const RfRow ra = rf_row_at(row0 + r * RF_MMA_ROWS + gid, w0, w1, w2, y0, y1, y2, r1, r2, ntotal);
    const RfRow rb = rf_row_at(row0 + r * RF_MMA_ROWS + 8 + gid, w0, w1, w2, y0, y1, y2, r1, r2, ntotal);
    rf_mma_finish<1, NT>(s, ra, rb, n, acc, nullptr);
}

// Entry points: `name_w1/_w2/_w4/_w8` (one vector, 1, 2, 4 or 8 warps per row: few rows want
// several warps each to keep enough loads in flight; the launcher picks by the row count),
// `name_n` (up to RF_MMVQ8_MAXN vectors, one warp per row), and their staged forms
// `name_s1/_s2/_s4` and `name_sn` for 16-byte aligned rows; `name_m2/_m4/_m8` the tensor-core
// tiles (up to RF_MMVQ8_MAXN vectors; 2, 4 or 8 warps per 16-row tile) and `name_mm2/4/8`
// (up to RF_MMA_MAXN: two groups of 8 vectors per decoded tile); `name_ms` / `name_mms` those
// tiles with the weights staged through shared memory (16-byte aligned rows); each tensor-core
// form with a `p` suffix reads the packed activations (RfActPacked) instead of the q8a layout,
// and `name_mq2p/4p/8p`, `name_mqsp` (packed only) take four groups of 8 (up to
// RF_MMA_PACKED_MAXN vectors: a 32-sequence decode step reads the weights once);
// `name_ms2p/_mms2p/_mqs2p` (RF_MMVQ8_PAIR) are the staged packed forms with two tiles a block.
#define RF_MMVQ8_ARGS                                                                           \
    const void* __restrict__ w0, const void* __restrict__ w1, const void* __restrict__ w2,      \
        const int* __restrict__ xq, const float2* __restrict__ xm, float* y0, float* y1,        \
        float* y2, int ncols, int r1, int r2, int ntotal
#define RF_MMVQ8_1(name, T, WPR)                                                                \
    extern "C" __global__ void name(RF_MMVQ8_ARGS, int acc) {                                   \
        rf_mmvq8<T, 1, WPR>(w0, w1, w2, xq, xm, y0, y1, y2, ncols, r1, r2, ntotal, 1, acc);     \
    }
#define RF_MMVQ8S_1(name, T, WPR)                                                               \
    extern "C" __global__ void name(RF_MMVQ8_ARGS, int acc) {                                   \
        rf_mmvq8s<T, 1, WPR>(w0, w1, w2, xq, xm, y0, y1, y2, ncols, r1, r2, ntotal, 1, acc);    \
    }
// The tensor-core forms over the q8a layout (RfActRows) and, `p` suffix, over the packed one
// (RfActPacked: `xq` / `xm` point at q8a_pack_mma's quants and float4 pairs).
#define RF_MMA_ROWS_ACT const RfActRows x = {xq, xm, ncols / 4, ncols / 32, n}
#define RF_MMA_PACKED_ACT const RfActPacked x = {(const int2*)xq, (const float4*)xm, ncols / 32}
#define RF_MMVQ8M(name, T, KS, NT, ACT)                                                         \
    extern "C" __global__ void name(RF_MMVQ8_ARGS, int n, int acc) {                            \
        ACT;                                                                                    \
        rf_mmvq8_mma<T, KS, NT>(w0, w1, w2, x, y0, y1, y2, ncols, r1, r2, ntotal, n, acc);      \
    }
#define RF_MMVQ8MSR(name, T, NT, RT, ACT)                                                       \
    extern "C" __global__ void name(RF_MMVQ8_ARGS, int n, int acc) {                            \
        ACT;                                                                                    \
        rf_mmvq8_mma_s<T, NT, RT>(w0, w1, w2, x, y0, y1, y2, ncols, r1, r2, ntotal, n, acc);    \
    }
// The tensor-core forms exist only in CUDA builds: HIP has no int8 MMA (the launcher never
// takes them there: `KernelDevice::int8_mma`), and compiling their dp4a stand-ins made up
// ~96% of hipcc's time for this file (680 of ~705 s for gfx90a on a 2-core machine).
#if defined(RF_CUDA)
#define RF_MMVQ8_TC(name, T)                                                                    \
    RF_MMVQ8M(name##_m2, T, 2, 1, RF_MMA_ROWS_ACT)                                              \
    RF_MMVQ8M(name##_m4, T, 4, 1, RF_MMA_ROWS_ACT)                                              \
    RF_MMVQ8M(name##_m8, T, 8, 1, RF_MMA_ROWS_ACT)                                              \
    RF_MMVQ8M(name##_mm2, T, 2, 2, RF_MMA_ROWS_ACT)                                             \
    RF_MMVQ8M(name##_mm4, T, 4, 2, RF_MMA_ROWS_ACT)                                             \
    RF_MMVQ8M(name##_mm8, T, 8, 2, RF_MMA_ROWS_ACT)                                             \
    RF_MMVQ8M(name##_m2p, T, 2, 1, RF_MMA_PACKED_ACT)                                           \
    RF_MMVQ8M(name##_m4p, T, 4, 1, RF_MMA_PACKED_ACT)                                           \
    RF_MMVQ8M(name##_m8p, T, 8, 1, RF_MMA_PACKED_ACT)                                           \
    RF_MMVQ8M(name##_mm2p, T, 2, 2, RF_MMA_PACKED_ACT)                                          \
    RF_MMVQ8M(name##_mm4p, T, 4, 2, RF_MMA_PACKED_ACT)                                          \
    RF_MMVQ8M(name##_mm8p, T, 8, 2, RF_MMA_PACKED_ACT)                                          \
    RF_MMVQ8MSR(name##_ms, T, 1, 1, RF_MMA_ROWS_ACT)                                                \
    RF_MMVQ8MSR(name##_mms, T, 2, 1, RF_MMA_ROWS_ACT)                                               \
    RF_MMVQ8MSR(name##_msp, T, 1, 1, RF_MMA_PACKED_ACT)                                             \
    RF_MMVQ8MSR(name##_mmsp, T, 2, 1, RF_MMA_PACKED_ACT)                                            \
    RF_MMVQ8M(name##_mq2p, T, 2, 4, RF_MMA_PACKED_ACT)                                          \
    RF_MMVQ8M(name##_mq4p, T, 4, 4, RF_MMA_PACKED_ACT)                                          \
    RF_MMVQ8M(name##_mq8p, T, 8, 4, RF_MMA_PACKED_ACT)                                          \
    RF_MMVQ8MSR(name##_mqsp, T, 4, 1, RF_MMA_PACKED_ACT)
#else
#define RF_MMVQ8_TC(name, T)
#endif
#define RF_MMVQ8(name, T)                                                                       \
    RF_MMVQ8_1(name##_w1, T, 1)                                                                 \
    RF_MMVQ8_1(name##_w2, T, 2)                                                                 \
    RF_MMVQ8_1(name##_w4, T, 4)                                                                 \
    RF_MMVQ8_1(name##_w8, T, 8)                                                                 \
    extern "C" __global__ void name##_n(RF_MMVQ8_ARGS, int n, int acc) {                        \
        rf_mmvq8<T, RF_MMVQ8_MAXN, 1>(w0, w1, w2, xq, xm, y0, y1, y2, ncols, r1, r2, ntotal, n, \
                                      acc);                                                     \
    }                                                                                           \
    RF_MMVQ8S_1(name##_s1, T, 1)                                                                \
    RF_MMVQ8S_1(name##_s2, T, 2)                                                                \
    RF_MMVQ8S_1(name##_s4, T, 4)                                                                \
    extern "C" __global__ void name##_sn(RF_MMVQ8_ARGS, int n, int acc) {                       \
        rf_mmvq8s<T, RF_MMVQ8_MAXN, 1>(w0, w1, w2, xq, xm, y0, y1, y2, ncols, r1, r2, ntotal, n, \
                                       acc);                                                    \
    }                                                                                           \
    RF_MMVQ8_TC(name, T)
// The staged packed tiles two a block (`_ms2p`, `_mms2p`, `_mqs2p`): every type but Q6_K,
// whose two tiles' chunks pass the static shared memory (RfStageRT).
#define RF_MMVQ8_PAIR(name, T)                                                                  \
    RF_MMVQ8MSR(name##_ms2p, T, 1, 2, RF_MMA_PACKED_ACT)                                        \
    RF_MMVQ8MSR(name##_mms2p, T, 2, 2, RF_MMA_PACKED_ACT)                                       \
    RF_MMVQ8MSR(name##_mqs2p, T, 4, 2, RF_MMA_PACKED_ACT)

RF_MMVQ8(mmvq_q4_0_q8a, Q8Q4_0)
RF_MMVQ8(mmvq_q4_1_q8a, Q8Q4_1)
RF_MMVQ8(mmvq_q5_0_q8a, Q8Q5_0)
RF_MMVQ8(mmvq_q5_1_q8a, Q8Q5_1)
RF_MMVQ8(mmvq_q8_0_q8a, Q8Q8_0)
RF_MMVQ8(mmvq_q4_k_q8a, Q8Q4_K)
RF_MMVQ8(mmvq_q5_k_q8a, Q8Q5_K)
RF_MMVQ8(mmvq_q6_k_q8a, Q8Q6_K)
#if defined(RF_CUDA)
RF_MMVQ8_PAIR(mmvq_q4_0_q8a, Q8Q4_0)
RF_MMVQ8_PAIR(mmvq_q4_1_q8a, Q8Q4_1)
RF_MMVQ8_PAIR(mmvq_q5_0_q8a, Q8Q5_0)
RF_MMVQ8_PAIR(mmvq_q5_1_q8a, Q8Q5_1)
RF_MMVQ8_PAIR(mmvq_q8_0_q8a, Q8Q8_0)
RF_MMVQ8_PAIR(mmvq_q4_k_q8a, Q8Q4_K)
RF_MMVQ8_PAIR(mmvq_q5_k_q8a, Q8Q5_K)
#endif
