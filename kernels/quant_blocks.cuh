// quant_blocks.cuh — GGUF block layouts as the device sees them, and per type:
//   QK   elements per block,
//   LPB  lanes that cooperate on one block in a matrix-vector product,
//   get(b, i)        element i of block b (scalar dequantization, used by gather / tile kernels),
//   dot(b, part, x)  partial dot product of block b with x[0..QK) for lane `part` of LPB.
// Sizes must equal GgmlType::block_bytes on the Rust side; tests check both directions.
// Half fields are raw bits (rf_half); blocks are packed back to back, so inside a row only the
// struct's own alignment (2 bytes for most types) can be assumed.
#pragma once
#include "common.cuh"

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK_K 256
#define K_SCALE_SIZE 12

// Q4_0: 32 weights, 4.5 bits each: scale d, 16 bytes of nibbles (low nibbles = elements 0..15).
struct block_q4_0 { rf_half d; u8 qs[QK4_0 / 2]; };
// Q4_1: 32 weights, 5 bits each: scale d, min m, nibbles.
struct block_q4_1 { rf_half d; rf_half m; u8 qs[QK4_1 / 2]; };
// Q5_0: 32 weights, 5.5 bits each: d, the fifth bits (32 bits), nibbles.
struct block_q5_0 { rf_half d; u8 qh[4]; u8 qs[QK5_0 / 2]; };
// Q5_1: 32 weights, 6 bits each: d, m, fifth bits, nibbles.
struct block_q5_1 { rf_half d; rf_half m; u8 qh[4]; u8 qs[QK5_1 / 2]; };
// Q8_0: 32 weights, 8.5 bits each.
struct block_q8_0 { rf_half d; i8 qs[QK8_0]; };
// Q8_1: 32 weights, 9 bits each (d and d * sum(qs)); the activation format of llama.cpp's mmvq.
struct block_q8_1 { rf_half d; rf_half s; i8 qs[QK8_0]; };
// Q4_K: 256 weights in 8 sub-blocks of 32, 4.5 bits each: super scale/min, 6-bit packed
// sub-block scales and mins (12 bytes), nibbles.
struct block_q4_K { rf_half d; rf_half dmin; u8 scales[K_SCALE_SIZE]; u8 qs[QK_K / 2]; };
// Q5_K: as Q4_K plus one high bit per weight: 5.5 bits each.
struct block_q5_K { rf_half d; rf_half dmin; u8 scales[K_SCALE_SIZE]; u8 qh[QK_K / 8]; u8 qs[QK_K / 2]; };
// Q6_K: 256 weights in 16 sub-blocks of 16, 6.5625 bits each: low 4 bits, high 2 bits,
// 8-bit sub-block scales, super scale.
struct block_q6_K { u8 ql[QK_K / 2]; u8 qh[QK_K / 4]; i8 scales[QK_K / 16]; rf_half d; };

// The 6-bit scale and min of sub-block j (0..8) of a Q4_K / Q5_K block.
__device__ __forceinline__ void rf_scale_min_k4(int j, const u8* q, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(q[j] & 63);
        *m = (float)(q[j + 4] & 63);
    } else {
        *sc = (float)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (float)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

__device__ __forceinline__ float rf_nib(u32 q, int i, int hi) { return (float)((q >> (8 * i + 4 * hi)) & 0xF); }

// Plain float weights are handled as "blocks" of 4 elements so one lane step is one vector load
// (rows of a multiple of 4 elements keep every group 16-byte (f32) / 8-byte (f16) aligned).
struct f32x4 { float v[4]; };
struct f16x4 { rf_half v[4]; };

struct QF32 {
    typedef f32x4 block;
    static constexpr int QK = 4;
    static constexpr int LPB = 1;
    static __device__ __forceinline__ float get(const block* b, int i) { return b->v[i]; }
    static __device__ __forceinline__ float dot(const block* b, int, const float* x) {
        const float4 w = *(const float4*)b;
        const float4 v = *(const float4*)x;
        return w.x * v.x + w.y * v.y + w.z * v.z + w.w * v.w;
    }
};

struct QF16 {
    typedef f16x4 block;
    static constexpr int QK = 4;
    static constexpr int LPB = 1;
    static __device__ __forceinline__ float get(const block* b, int i) { return rf_h2f(b->v[i]); }
    static __device__ __forceinline__ float dot(const block* b, int, const float* x) {
        const uint2 w = *(const uint2*)b;
        const float4 v = *(const float4*)x;
        return rf_h2f((u16)(w.x & 0xFFFF)) * v.x + rf_h2f((u16)(w.x >> 16)) * v.y +
               rf_h2f((u16)(w.y & 0xFFFF)) * v.z + rf_h2f((u16)(w.y >> 16)) * v.w;
    }
};

// Legacy 32-element blocks: 4 lanes per block, lane p owns bytes qs[4p..4p+4), i.e. elements
// 4p..4p+3 (low nibbles) and 16+4p..16+4p+3 (high nibbles).
struct QQ4_0 {
    typedef block_q4_0 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 4;
    static __device__ __forceinline__ float get(const block* b, int i) {
        const int j = i & 15;
        const int q = i < 16 ? (b->qs[j] & 0xF) : (b->qs[j] >> 4);
        return (float)(q - 8) * rf_h2f(b->d);
    }
    static __device__ __forceinline__ float dot(const block* b, int p, const float* x) {
        const u32 q = rf_load_u32_a2(b->qs + 4 * p);
        const float4 xl = *(const float4*)(x + 4 * p);
        const float4 xh = *(const float4*)(x + 16 + 4 * p);
        const float s = (rf_nib(q, 0, 0) - 8.f) * xl.x + (rf_nib(q, 1, 0) - 8.f) * xl.y +
                        (rf_nib(q, 2, 0) - 8.f) * xl.z + (rf_nib(q, 3, 0) - 8.f) * xl.w +
                        (rf_nib(q, 0, 1) - 8.f) * xh.x + (rf_nib(q, 1, 1) - 8.f) * xh.y +
                        (rf_nib(q, 2, 1) - 8.f) * xh.z + (rf_nib(q, 3, 1) - 8.f) * xh.w;
        return s * rf_h2f(b->d);
    }
};

struct QQ4_1 {
    typedef block_q4_1 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 4;
    static __device__ __forceinline__ float get(const block* b, int i) {
        const int j = i & 15;
        const int q = i < 16 ? (b->qs[j] & 0xF) : (b->qs[j] >> 4);
        return (float)q * rf_h2f(b->d) + rf_h2f(b->m);
    }
    static __device__ __forceinline__ float dot(const block* b, int p, const float* x) {
        const u32 q = rf_load_u32_a2(b->qs + 4 * p);
        const float4 xl = *(const float4*)(x + 4 * p);
        const float4 xh = *(const float4*)(x + 16 + 4 * p);
        const float s = rf_nib(q, 0, 0) * xl.x + rf_nib(q, 1, 0) * xl.y + rf_nib(q, 2, 0) * xl.z +
                        rf_nib(q, 3, 0) * xl.w + rf_nib(q, 0, 1) * xh.x + rf_nib(q, 1, 1) * xh.y +
                        rf_nib(q, 2, 1) * xh.z + rf_nib(q, 3, 1) * xh.w;
        const float sx = xl.x + xl.y + xl.z + xl.w + xh.x + xh.y + xh.z + xh.w;
        return s * rf_h2f(b->d) + sx * rf_h2f(b->m);
    }
};

// Fifth bit of element i (0..31) of a Q5 block: bit i of qh.
__device__ __forceinline__ float rf_q5(u32 q, u32 qh, int p, int i, int hi) {
    const int e = 4 * p + i + 16 * hi;
    return (float)(((q >> (8 * i + 4 * hi)) & 0xF) | (((qh >> e) & 1) << 4));
}

struct QQ5_0 {
    typedef block_q5_0 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 4;
    static __device__ __forceinline__ float get(const block* b, int i) {
        const u32 qh = rf_load_u32_a2(b->qh);
        const int j = i & 15;
        const int lo = i < 16 ? (b->qs[j] & 0xF) : (b->qs[j] >> 4);
        const int q = lo | (((qh >> i) & 1) << 4);
        return (float)(q - 16) * rf_h2f(b->d);
    }
    static __device__ __forceinline__ float dot(const block* b, int p, const float* x) {
        const u32 qh = rf_load_u32_a2(b->qh);
        const u32 q = rf_load_u32_a2(b->qs + 4 * p);
        const float4 xl = *(const float4*)(x + 4 * p);
        const float4 xh = *(const float4*)(x + 16 + 4 * p);
        const float s = (rf_q5(q, qh, p, 0, 0) - 16.f) * xl.x + (rf_q5(q, qh, p, 1, 0) - 16.f) * xl.y +
                        (rf_q5(q, qh, p, 2, 0) - 16.f) * xl.z + (rf_q5(q, qh, p, 3, 0) - 16.f) * xl.w +
                        (rf_q5(q, qh, p, 0, 1) - 16.f) * xh.x + (rf_q5(q, qh, p, 1, 1) - 16.f) * xh.y +
                        (rf_q5(q, qh, p, 2, 1) - 16.f) * xh.z + (rf_q5(q, qh, p, 3, 1) - 16.f) * xh.w;
        return s * rf_h2f(b->d);
    }
};

struct QQ5_1 {
    typedef block_q5_1 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 4;
    static __device__ __forceinline__ float get(const block* b, int i) {
        const u32 qh = rf_load_u32_a2(b->qh);
        const int j = i & 15;
        const int lo = i < 16 ? (b->qs[j] & 0xF) : (b->qs[j] >> 4);
        const int q = lo | (((qh >> i) & 1) << 4);
        return (float)q * rf_h2f(b->d) + rf_h2f(b->m);
    }
    static __device__ __forceinline__ float dot(const block* b, int p, const float* x) {
        const u32 qh = rf_load_u32_a2(b->qh);
        const u32 q = rf_load_u32_a2(b->qs + 4 * p);
        const float4 xl = *(const float4*)(x + 4 * p);
        const float4 xh = *(const float4*)(x + 16 + 4 * p);
        const float s = rf_q5(q, qh, p, 0, 0) * xl.x + rf_q5(q, qh, p, 1, 0) * xl.y +
                        rf_q5(q, qh, p, 2, 0) * xl.z + rf_q5(q, qh, p, 3, 0) * xl.w +
                        rf_q5(q, qh, p, 0, 1) * xh.x + rf_q5(q, qh, p, 1, 1) * xh.y +
                        rf_q5(q, qh, p, 2, 1) * xh.z + rf_q5(q, qh, p, 3, 1) * xh.w;
        const float sx = xl.x + xl.y + xl.z + xl.w + xh.x + xh.y + xh.z + xh.w;
        return s * rf_h2f(b->d) + sx * rf_h2f(b->m);
    }
};

// Q8_0: 4 lanes per block, lane p owns elements 8p..8p+7.
struct QQ8_0 {
    typedef block_q8_0 block;
    static constexpr int QK = 32;
    static constexpr int LPB = 4;
    static __device__ __forceinline__ float get(const block* b, int i) { return (float)b->qs[i] * rf_h2f(b->d); }
    static __device__ __forceinline__ float dot(const block* b, int p, const float* x) {
        const u8* qs = (const u8*)b->qs + 8 * p;
        const u32 q0 = rf_load_u32_a2(qs);
        const u32 q1 = rf_load_u32_a2(qs + 4);
        const float4 x0 = *(const float4*)(x + 8 * p);
        const float4 x1 = *(const float4*)(x + 8 * p + 4);
        const float s = (float)(i8)(q0 & 0xFF) * x0.x + (float)(i8)((q0 >> 8) & 0xFF) * x0.y +
                        (float)(i8)((q0 >> 16) & 0xFF) * x0.z + (float)(i8)(q0 >> 24) * x0.w +
                        (float)(i8)(q1 & 0xFF) * x1.x + (float)(i8)((q1 >> 8) & 0xFF) * x1.y +
                        (float)(i8)((q1 >> 16) & 0xFF) * x1.z + (float)(i8)(q1 >> 24) * x1.w;
        return s * rf_h2f(b->d);
    }
};

// K-quants: 32 lanes per block. For Q4_K / Q5_K lane p covers group g = p / 8 (64 elements,
// sub-blocks 2g and 2g+1) and bytes qs[32g + 4k .. +4) with k = p % 8: elements
// 64g + 4k + i (low nibbles) and 64g + 32 + 4k + i (high nibbles), i < 4.
struct QQ4_K {
    typedef block_q4_K block;
    static constexpr int QK = QK_K;
    static constexpr int LPB = 32;
    static __device__ __forceinline__ float get(const block* b, int i) {
        const int g = i / 64, w = i % 64, hi = w >= 32, l = w % 32;
        const int q = hi ? (b->qs[32 * g + l] >> 4) : (b->qs[32 * g + l] & 0xF);
        float sc, m;
        rf_scale_min_k4(2 * g + hi, b->scales, &sc, &m);
        return rf_h2f(b->d) * sc * (float)q - rf_h2f(b->dmin) * m;
    }
    static __device__ __forceinline__ float dot(const block* b, int p, const float* x) {
        const int g = p / 8, k = p % 8;
        const u32 q = rf_load_u32_a4(b->qs + 32 * g + 4 * k);
        const float4 xl = *(const float4*)(x + 64 * g + 4 * k);
        const float4 xh = *(const float4*)(x + 64 * g + 32 + 4 * k);
        float sc1, m1, sc2, m2;
        rf_scale_min_k4(2 * g, b->scales, &sc1, &m1);
        rf_scale_min_k4(2 * g + 1, b->scales, &sc2, &m2);
        const float sl = rf_nib(q, 0, 0) * xl.x + rf_nib(q, 1, 0) * xl.y + rf_nib(q, 2, 0) * xl.z + rf_nib(q, 3, 0) * xl.w;
        const float sh = rf_nib(q, 0, 1) * xh.x + rf_nib(q, 1, 1) * xh.y + rf_nib(q, 2, 1) * xh.z + rf_nib(q, 3, 1) * xh.w;
        const float xsl = xl.x + xl.y + xl.z + xl.w;
        const float xsh = xh.x + xh.y + xh.z + xh.w;
        return rf_h2f(b->d) * (sc1 * sl + sc2 * sh) - rf_h2f(b->dmin) * (m1 * xsl + m2 * xsh);
    }
};

struct QQ5_K {
    typedef block_q5_K block;
    static constexpr int QK = QK_K;
    static constexpr int LPB = 32;
    static __device__ __forceinline__ float get(const block* b, int i) {
        const int g = i / 64, w = i % 64, hi = w >= 32, l = w % 32;
        const int lo = hi ? (b->qs[32 * g + l] >> 4) : (b->qs[32 * g + l] & 0xF);
        const int q = lo | (((b->qh[l] >> (2 * g + hi)) & 1) << 4);
        float sc, m;
        rf_scale_min_k4(2 * g + hi, b->scales, &sc, &m);
        return rf_h2f(b->d) * sc * (float)q - rf_h2f(b->dmin) * m;
    }
    static __device__ __forceinline__ float dot(const block* b, int p, const float* x) {
        const int g = p / 8, k = p % 8;
        const u32 q = rf_load_u32_a4(b->qs + 32 * g + 4 * k);
        const u32 h = rf_load_u32_a4(b->qh + 4 * k);
        const float4 xl = *(const float4*)(x + 64 * g + 4 * k);
        const float4 xh = *(const float4*)(x + 64 * g + 32 + 4 * k);
        float sc1, m1, sc2, m2;
        rf_scale_min_k4(2 * g, b->scales, &sc1, &m1);
        rf_scale_min_k4(2 * g + 1, b->scales, &sc2, &m2);
        const int bl = 2 * g, bh = 2 * g + 1;
#define RF_Q5K(i, hi, bit) ((float)(((q >> (8 * (i) + 4 * (hi))) & 0xF) | (((h >> (8 * (i) + (bit))) & 1) << 4)))
        const float sl = RF_Q5K(0, 0, bl) * xl.x + RF_Q5K(1, 0, bl) * xl.y + RF_Q5K(2, 0, bl) * xl.z + RF_Q5K(3, 0, bl) * xl.w;
        const float sh = RF_Q5K(0, 1, bh) * xh.x + RF_Q5K(1, 1, bh) * xh.y + RF_Q5K(2, 1, bh) * xh.z + RF_Q5K(3, 1, bh) * xh.w;
#undef RF_Q5K
        const float xsl = xl.x + xl.y + xl.z + xl.w;
        const float xsh = xh.x + xh.y + xh.z + xh.w;
        return rf_h2f(b->d) * (sc1 * sl + sc2 * sh) - rf_h2f(b->dmin) * (m1 * xsl + m2 * xsh);
    }
};

// Q6_K: lane p covers half h = p / 16 (128 elements) and l in {2r, 2r+1}, r = p % 16; each l
// yields the four elements 128h + l + 32t, t < 4.
struct QQ6_K {
    typedef block_q6_K block;
    static constexpr int QK = QK_K;
    static constexpr int LPB = 32;
    static __device__ __forceinline__ float get(const block* b, int i) {
        const int h = i / 128, r = i % 128, t = r / 32, l = r % 32;
        const u8 qlb = b->ql[64 * h + l + (t & 1) * 32];
        const int lo = t >= 2 ? (qlb >> 4) : (qlb & 0xF);
        const int q = (lo | (((b->qh[32 * h + l] >> (2 * t)) & 3) << 4)) - 32;
        return rf_h2f(b->d) * (float)b->scales[8 * h + l / 16 + 2 * t] * (float)q;
    }
    static __device__ __forceinline__ float dot(const block* b, int p, const float* x) {
        const int h = p / 16, r = p % 16, l = 2 * r;
        const u16 qa = *(const u16*)(b->ql + 64 * h + l);       // ql[l], ql[l+1]
        const u16 qb = *(const u16*)(b->ql + 64 * h + l + 32);  // ql[l+32], ql[l+33]
        const u16 qh = *(const u16*)(b->qh + 32 * h + l);
        const i8* sc = b->scales + 8 * h + l / 16;
        const float* xb = x + 128 * h + l;
        float acc = 0.f;
#pragma unroll
        for (int t = 0; t < 4; ++t) {
            const u16 qlw = (t & 1) ? qb : qa;
            const int sh = t >= 2 ? 4 : 0;
            const float2 xv = *(const float2*)(xb + 32 * t);
            const int q0 = (((qlw >> sh) & 0xF) | (((qh >> (2 * t)) & 3) << 4)) - 32;
            const int q1 = (((qlw >> (8 + sh)) & 0xF) | (((qh >> (8 + 2 * t)) & 3) << 4)) - 32;
            acc += (float)sc[2 * t] * ((float)q0 * xv.x + (float)q1 * xv.y);
        }
        return rf_h2f(b->d) * acc;
    }
};
