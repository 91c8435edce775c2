// mmvq.cu — matrix-vector products y = W x reading GGUF blocks directly (weights stay quantized).
//   W: [nrows, ncols] in the block format of the entry point, rows contiguous.
//   x: [ncols] f32 (16-byte aligned), y: [nrows] f32.
// Launch: block (RF_WARP, ROWS_PER_BLOCK), grid ceil(nrows / ROWS_PER_BLOCK); one warp per row,
// LPB lanes per quant block, RF_WARP / LPB blocks in flight per warp. ncols % QK == 0.
#include "quant_blocks.cuh"

template <typename T>
__device__ __forceinline__ void rf_mmvq(const void* __restrict__ w, const float* __restrict__ x,
                                        float* __restrict__ y, int ncols, int nrows) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= nrows) return;  // the whole warp leaves together: row depends on threadIdx.y only
    const int lane = threadIdx.x;
    const int nb = ncols / T::QK;
    const typename T::block* br = (const typename T::block*)w + (i64)row * nb;
    constexpr int per_step = RF_WARP / T::LPB;
    float sum = 0.f;
    for (int ib = lane / T::LPB; ib < nb; ib += per_step) {
        sum += T::dot(br + ib, lane % T::LPB, x + (i64)ib * T::QK);
    }
    sum = rf_warp_sum(sum);
    if (lane == 0) y[row] = sum;
}

// Batched: y[j] = W x[j] for the n <= RF_MMVQN_MAX vectors of x ([n, ncols], y [n, nrows]):
// each weight block is loaded once for all of them (decode of several sequences, short
// prompts), so a step of n tokens reads the weights once instead of n times. Each warp takes
// RF_MMVQN_ROWS rows, so every x value it loads serves that many rows (at n = 8 the vectors,
// not the weights, are most of the traffic).
// Launch: block (RF_WARP, ROWS_PER_BLOCK), grid ceil(nrows / (ROWS_PER_BLOCK * RF_MMVQN_ROWS)).
#define RF_MMVQN_MAX 8
#define RF_MMVQN_ROWS 4

template <typename T>
__device__ __forceinline__ void rf_mmvq_n(const void* __restrict__ w, const float* __restrict__ x,
                                          float* __restrict__ y, int ncols, int nrows, int n) {
    const int row0 = (blockIdx.x * blockDim.y + threadIdx.y) * RF_MMVQN_ROWS;
    if (row0 >= nrows) return;  // the whole warp leaves together: row0 depends on threadIdx.y only
    const int lane = threadIdx.x;
    const int nb = ncols / T::QK;
    const typename T::block* br = (const typename T::block*)w + (i64)row0 * nb;
    constexpr int per_step = RF_WARP / T::LPB;
    float sum[RF_MMVQN_ROWS][RF_MMVQN_MAX];
#pragma unroll
    for (int r = 0; r < RF_MMVQN_ROWS; ++r)
#pragma unroll
        for (int j = 0; j < RF_MMVQN_MAX; ++j) sum[r][j] = 0.f;
    for (int ib = lane / T::LPB; ib < nb; ib += per_step) {
#pragma unroll
        for (int j = 0; j < RF_MMVQN_MAX; ++j) {
            if (j >= n) break;
            const float* xj = x + (i64)j * ncols + (i64)ib * T::QK;
#pragma unroll
            for (int r = 0; r < RF_MMVQN_ROWS; ++r)
                if (row0 + r < nrows) sum[r][j] += T::dot(br + (i64)r * nb + ib, lane % T::LPB, xj);
        }
    }
#pragma unroll
    for (int r = 0; r < RF_MMVQN_ROWS; ++r) {
#pragma unroll
        for (int j = 0; j < RF_MMVQN_MAX; ++j) {
            if (j < n && row0 + r < nrows) {  // the same for the whole warp
                const float s = rf_warp_sum(sum[r][j]);
                if (lane == 0) y[(i64)j * nrows + row0 + r] = s;
            }
        }
    }
}

#define RF_MMVQ(name, T)                                                                      \
    extern "C" __global__ void name(const void* __restrict__ w, const float* __restrict__ x,  \
                                    float* __restrict__ y, int ncols, int nrows) {            \
        rf_mmvq<T>(w, x, y, ncols, nrows);                                                    \
    }                                                                                         \
    extern "C" __global__ void name##_n(const void* __restrict__ w, const float* __restrict__ x, \
                                        float* __restrict__ y, int ncols, int nrows, int n) { \
        rf_mmvq_n<T>(w, x, y, ncols, nrows, n);                                               \
    }

RF_MMVQ(mmvq_f32_f32, QF32)
RF_MMVQ(mmvq_f16_f32, QF16)
RF_MMVQ(mmvq_q4_0_f32, QQ4_0)
RF_MMVQ(mmvq_q4_1_f32, QQ4_1)
RF_MMVQ(mmvq_q5_0_f32, QQ5_0)
RF_MMVQ(mmvq_q5_1_f32, QQ5_1)
RF_MMVQ(mmvq_q8_0_f32, QQ8_0)
RF_MMVQ(mmvq_q4_k_f32, QQ4_K)
RF_MMVQ(mmvq_q5_k_f32, QQ5_K)
RF_MMVQ(mmvq_q6_k_f32, QQ6_K)
