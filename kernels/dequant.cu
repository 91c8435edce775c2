// dequant.cu — dequantize a tile of weight rows to f16 (the A operand of cuBLAS GEMMs in
// prefill). w: [nrows, ncols] blocks; the tile is rows [row0, row0 + tile_rows); out:
// [tile_rows, ncols] f16 (raw bits).
//   dequantize_{t}_f16:   one element per thread. Launch: grid (tile_rows, ceil(ncols / blockDim.x)).
//   dequantize8_{t}_f16:  eight consecutive elements per thread, read with the block's scales
//                         decoded once and written as one 16-byte store; needs ncols % 8 == 0 and
//                         `out` 16-byte aligned. Launch: grid (tile_rows, ceil(ncols / 8 / blockDim.x)).
// Both compute each element with the same expression as T::get (quant_blocks.cuh).
#include "quant_blocks.cuh"

template <typename T>
__device__ __forceinline__ void rf_dequant_f16(const void* __restrict__ w, rf_half* __restrict__ out,
                                               int ncols, int row0, int tile_rows) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= tile_rows || c >= ncols) return;
    const int nb = ncols / T::QK;
    const typename T::block* row = (const typename T::block*)w + (i64)(row0 + r) * nb;
    out[(i64)r * ncols + c] = rf_f2h(T::get(row + c / T::QK, c % T::QK));
}

// Elements c .. c + 8 of a row of blocks (c % 8 == 0). The generic form goes through T::get
// (it also serves the 4-element f32 / f16 "blocks", where eight elements span two); the
// common types decode their bytes and scales once.
template <typename T>
struct RfGet8 {
    static __device__ __forceinline__ void get(const typename T::block* row, int c, float* v) {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = T::get(row + (c + j) / T::QK, (c + j) % T::QK);
    }
};

// Byte k (0..8) of the two words (q0: bytes 0..4, q1: bytes 4..8).
__device__ __forceinline__ u32 rf_byte8(u32 q0, u32 q1, int k) { return ((k < 4 ? q0 : q1) >> (8 * (k & 3))) & 0xFF; }

// Q4_0 / Q4_1: elements i0..i0+8 are the low (i0 < 16) or high nibbles of bytes i0 % 16 ..
template <>
struct RfGet8<QQ4_0> {
    static __device__ __forceinline__ void get(const block_q4_0* row, int c, float* v) {
        const block_q4_0* b = row + c / 32;
        const int i0 = c % 32, sh = i0 >= 16 ? 4 : 0;
        const u32 q0 = rf_load_u32_a2(b->qs + (i0 & 15)), q1 = rf_load_u32_a2(b->qs + (i0 & 15) + 4);
        const float d = rf_h2f(b->d);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (float)((int)((rf_byte8(q0, q1, k) >> sh) & 0xF) - 8) * d;
    }
};

template <>
struct RfGet8<QQ4_1> {
    static __device__ __forceinline__ void get(const block_q4_1* row, int c, float* v) {
        const block_q4_1* b = row + c / 32;
        const int i0 = c % 32, sh = i0 >= 16 ? 4 : 0;
        const u32 q0 = rf_load_u32_a2(b->qs + (i0 & 15)), q1 = rf_load_u32_a2(b->qs + (i0 & 15) + 4);
        const float d = rf_h2f(b->d), m = rf_h2f(b->m);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (float)((rf_byte8(q0, q1, k) >> sh) & 0xF) * d + m;
    }
};

template <>
struct RfGet8<QQ5_0> {
    static __device__ __forceinline__ void get(const block_q5_0* row, int c, float* v) {
        const block_q5_0* b = row + c / 32;
        const int i0 = c % 32, sh = i0 >= 16 ? 4 : 0;
        const u32 qh = rf_load_u32_a2(b->qh);
        const u32 q0 = rf_load_u32_a2(b->qs + (i0 & 15)), q1 = rf_load_u32_a2(b->qs + (i0 & 15) + 4);
        const float d = rf_h2f(b->d);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int q = (int)(((rf_byte8(q0, q1, k) >> sh) & 0xF) | (((qh >> (i0 + k)) & 1) << 4));
            v[k] = (float)(q - 16) * d;
        }
    }
};

template <>
struct RfGet8<QQ5_1> {
    static __device__ __forceinline__ void get(const block_q5_1* row, int c, float* v) {
        const block_q5_1* b = row + c / 32;
        const int i0 = c % 32, sh = i0 >= 16 ? 4 : 0;
        const u32 qh = rf_load_u32_a2(b->qh);
        const u32 q0 = rf_load_u32_a2(b->qs + (i0 & 15)), q1 = rf_load_u32_a2(b->qs + (i0 & 15) + 4);
        const float d = rf_h2f(b->d), m = rf_h2f(b->m);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int q = (int)(((rf_byte8(q0, q1, k) >> sh) & 0xF) | (((qh >> (i0 + k)) & 1) << 4));
            v[k] = (float)q * d + m;
        }
    }
};

template <>
struct RfGet8<QQ8_0> {
    static __device__ __forceinline__ void get(const block_q8_0* row, int c, float* v) {
        const block_q8_0* b = row + c / 32;
        const u8* qs = (const u8*)b->qs + c % 32;
        const u32 q0 = rf_load_u32_a2(qs), q1 = rf_load_u32_a2(qs + 4);
        const float d = rf_h2f(b->d);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (float)(i8)rf_byte8(q0, q1, k) * d;
    }
};

// Q4_K / Q5_K: elements i0..i0+8 lie in one sub-block (2g + hi) of 32: bytes l0..l0+8 of the
// group's 32 nibble bytes (4-byte aligned: the blocks are 144 / 176 bytes, qs at 16 / 48).
template <>
struct RfGet8<QQ4_K> {
    static __device__ __forceinline__ void get(const block_q4_K* row, int c, float* v) {
        const block_q4_K* b = row + c / QK_K;
        const int i = c % QK_K, g = i / 64, hi = (i % 64) >= 32, l0 = i % 32;
        const u32 q0 = rf_load_u32_a4(b->qs + 32 * g + l0), q1 = rf_load_u32_a4(b->qs + 32 * g + l0 + 4);
        float sc, m;
        rf_scale_min_k4(2 * g + hi, b->scales, &sc, &m);
        const float ds = rf_h2f(b->d) * sc, dm = rf_h2f(b->dmin) * m;
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = ds * (float)((rf_byte8(q0, q1, k) >> (4 * hi)) & 0xF) - dm;
    }
};

template <>
struct RfGet8<QQ5_K> {
    static __device__ __forceinline__ void get(const block_q5_K* row, int c, float* v) {
        const block_q5_K* b = row + c / QK_K;
        const int i = c % QK_K, g = i / 64, hi = (i % 64) >= 32, l0 = i % 32;
        const u32 q0 = rf_load_u32_a4(b->qs + 32 * g + l0), q1 = rf_load_u32_a4(b->qs + 32 * g + l0 + 4);
        const u32 h0 = rf_load_u32_a4(b->qh + l0), h1 = rf_load_u32_a4(b->qh + l0 + 4);
        float sc, m;
        rf_scale_min_k4(2 * g + hi, b->scales, &sc, &m);
        const float ds = rf_h2f(b->d) * sc, dm = rf_h2f(b->dmin) * m;
        const int bit = 2 * g + hi;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const u32 q = ((rf_byte8(q0, q1, k) >> (4 * hi)) & 0xF) | (((rf_byte8(h0, h1, k) >> bit) & 1) << 4);
            v[k] = ds * (float)q - dm;
        }
    }
};

// Q6_K: elements i0..i0+8 share the half h, the quarter t and one 16-element scale; their low
// bits are bytes l0.. of ql (low or high nibbles), their high bits bytes l0.. of qh.
template <>
struct RfGet8<QQ6_K> {
    static __device__ __forceinline__ void get(const block_q6_K* row, int c, float* v) {
        const block_q6_K* b = row + c / QK_K;
        const int i = c % QK_K, h = i / 128, t = (i % 128) / 32, l0 = i % 32;
        const u8* ql = b->ql + 64 * h + l0 + (t & 1) * 32;
        const u8* qh = b->qh + 32 * h + l0;
        const u32 q0 = rf_load_u32_a2(ql), q1 = rf_load_u32_a2(ql + 4);
        const u32 h0 = rf_load_u32_a2(qh), h1 = rf_load_u32_a2(qh + 4);
        const float ds = rf_h2f(b->d) * (float)b->scales[8 * h + l0 / 16 + 2 * t];
        const int sh = t >= 2 ? 4 : 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const int q = (int)(((rf_byte8(q0, q1, k) >> sh) & 0xF) | (((rf_byte8(h0, h1, k) >> (2 * t)) & 3) << 4)) - 32;
            v[k] = ds * (float)q;
        }
    }
};

__device__ __forceinline__ u32 rf_pack_h2(float a, float b) { return (u32)rf_f2h(a) | ((u32)rf_f2h(b) << 16); }

template <typename T>
__device__ __forceinline__ void rf_dequant8_f16(const void* __restrict__ w, rf_half* __restrict__ out,
                                                int ncols, int row0, int tile_rows) {
    const int r = blockIdx.x;
    const int c = (blockIdx.y * blockDim.x + threadIdx.x) * 8;
    if (r >= tile_rows || c >= ncols) return;
    const int nb = ncols / T::QK;
    const typename T::block* row = (const typename T::block*)w + (i64)(row0 + r) * nb;
    float v[8];
    RfGet8<T>::get(row, c, v);
    uint4 o;
    o.x = rf_pack_h2(v[0], v[1]);
    o.y = rf_pack_h2(v[2], v[3]);
    o.z = rf_pack_h2(v[4], v[5]);
    o.w = rf_pack_h2(v[6], v[7]);
    *(uint4*)(out + (i64)r * ncols + c) = o;
}

#define RF_DEQUANT(t, T)                                                                            \
    extern "C" __global__ void dequantize_##t##_f16(const void* __restrict__ w, rf_half* __restrict__ out, \
                                                    int ncols, int row0, int tile_rows) {            \
        rf_dequant_f16<T>(w, out, ncols, row0, tile_rows);                                          \
    }                                                                                               \
    extern "C" __global__ void dequantize8_##t##_f16(const void* __restrict__ w, rf_half* __restrict__ out, \
                                                     int ncols, int row0, int tile_rows) {           \
        rf_dequant8_f16<T>(w, out, ncols, row0, tile_rows);                                         \
    }

RF_DEQUANT(f32, QF32)
RF_DEQUANT(f16, QF16)
RF_DEQUANT(q4_0, QQ4_0)
RF_DEQUANT(q4_1, QQ4_1)
RF_DEQUANT(q5_0, QQ5_0)
RF_DEQUANT(q5_1, QQ5_1)
RF_DEQUANT(q8_0, QQ8_0)
RF_DEQUANT(q4_k, QQ4_K)
RF_DEQUANT(q5_k, QQ5_K)
RF_DEQUANT(q6_k, QQ6_K)
