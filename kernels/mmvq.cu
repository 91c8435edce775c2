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
// prompts), so a step of n tokens reads the weights once instead of n times. Measured on an
// H100 (8B FFN shape, Q4_0): 8 vectors in 175 us against 28.6 us for one, so the step is bound
// by the per-vector dequantize-and-dot, not by the weights: a version where each warp took 4
// rows (x loaded once for them) was no faster on the quantized types (docs/PERFORMANCE.md).
// Dequantizing a lane's share of a block once for all vectors is the next step.
#define RF_MMVQN_MAX 8

template <typename T>
__device__ __forceinline__ void rf_mmvq_n(const void* __restrict__ w, const float* __restrict__ x,
                                          float* __restrict__ y, int ncols, int nrows, int n) {
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= nrows) return;  // the whole warp leaves together
    const int lane = threadIdx.x;
    const int nb = ncols / T::QK;
    const typename T::block* br = (const typename T::block*)w + (i64)row * nb;
    constexpr int per_step = RF_WARP / T::LPB;
    float sum[RF_MMVQN_MAX];
#pragma unroll
    for (int j = 0; j < RF_MMVQN_MAX; ++j) sum[j] = 0.f;
    for (int ib = lane / T::LPB; ib < nb; ib += per_step) {
        const typename T::block* b = br + ib;
#pragma unroll
        for (int j = 0; j < RF_MMVQN_MAX; ++j)
            if (j < n) sum[j] += T::dot(b, lane % T::LPB, x + (i64)j * ncols + (i64)ib * T::QK);
    }
#pragma unroll
    for (int j = 0; j < RF_MMVQN_MAX; ++j) {
        if (j < n) {  // n is the same for the whole warp
            const float s = rf_warp_sum(sum[j]);
            if (lane == 0) y[(i64)j * nrows + row] = s;
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
