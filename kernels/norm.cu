// norm.cu — RMSNorm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w.
//   x, out: [nrows, ncols] f32 (may alias), w: [ncols] f32. Launch: grid nrows, 1-D block
//   (a multiple of RF_WARP, at most RF_MAX_THREADS).
//
// Decode normalizes one row with one block, so the kernel's time is its chain of dependent
// global loads, not bandwidth: each thread loads all of its columns of x and w at once into
// registers (up to RF_NORM_REG each: rows of up to RF_NORM_REG * blockDim columns), sums, and
// writes from the registers; columns past that are read again as before. Each thread visits its
// columns c = threadIdx.x + k * blockDim.x in order, so the sums keep the bits of a plain strided
// loop.
#include "common.cuh"
#include "q8a.cuh"

#define RF_NORM_REG 8

// Loads thread's columns k < RF_NORM_REG of xr and w into v and wv (zeros past ncols) and
// returns 1 / sqrt(mean(xr^2) + eps) of the row, for every thread of the block.
__device__ __forceinline__ float rf_rms_inv(const float* xr, const float* __restrict__ w, int ncols, float eps,
                                            float (&v)[RF_NORM_REG], float (&wv)[RF_NORM_REG]) {
    __shared__ float scratch[RF_MAX_WARPS];
#pragma unroll
    for (int k = 0; k < RF_NORM_REG; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        const bool live = c < ncols;
        v[k] = live ? xr[c] : 0.f;
        wv[k] = live ? w[c] : 0.f;
    }
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < RF_NORM_REG; ++k) ss += v[k] * v[k];
    for (int c = threadIdx.x + RF_NORM_REG * blockDim.x; c < ncols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = rf_block_sum(ss, scratch);
    return rsqrtf(ss / (float)ncols + eps);
}

extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rmsnorm_f32(const float* x, const float* __restrict__ w, float* out,
                                       int ncols, float eps) {
    const float* xr = x + (i64)blockIdx.x * ncols;
    float* orow = out + (i64)blockIdx.x * ncols;
    float v[RF_NORM_REG], wv[RF_NORM_REG];
    const float inv = rf_rms_inv(xr, w, ncols, eps, v, wv);
#pragma unroll
    for (int k = 0; k < RF_NORM_REG; ++k) {
        const int c = threadIdx.x + k * blockDim.x;
        if (c < ncols) orow[c] = v[k] * inv * wv[k];
    }
    for (int c = threadIdx.x + RF_NORM_REG * blockDim.x; c < ncols; c += blockDim.x) orow[c] = xr[c] * inv * w[c];
}

// rmsnorm_f32 with its output also quantized to the q8a layout of mmvq_q8.cu (row r's quants
// at qs + r * ncols, its blocks' (d, sum) at meta + r * ncols / 32): the norm before a product
// in one launch, the same bits as rmsnorm_f32 then quantize_q8a_f32. ncols % 32 == 0.
// Each group of 32 threads takes every (blockDim / 32)-th 32-element block: block g + k * groups
// is the thread's column threadIdx.x + k * blockDim.x, its register k.
// Grid (nrows, split): the `split` blocks of a row each sum the whole row (the same threads in
// the same order, so the same bits) and write the registers k with k % split == blockIdx.y (and
// the columns past the registers likewise): a decode step's one row is no longer one SM's work.
extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rmsnorm_q8a_f32(const float* x, const float* __restrict__ w, float* out,
                                           i8* __restrict__ qs, float2* __restrict__ meta,
                                           int ncols, float eps) {
    rf_grid_launch_dependents();  // a product follows (vendor.cuh)
    const float* xr = x + (i64)blockIdx.x * ncols;
    float* orow = out + (i64)blockIdx.x * ncols;
    float v[RF_NORM_REG], wv[RF_NORM_REG];
    const float inv = rf_rms_inv(xr, w, ncols, eps, v, wv);
    const int groups = blockDim.x / 32, g = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nblk = ncols / 32;
    const int split = gridDim.y, part = blockIdx.y;
#pragma unroll
    for (int k = 0; k < RF_NORM_REG; ++k) {
        if (k * groups >= nblk) break;  // the same for the whole block
        if (k % split != part) continue;
        const int b = g + k * groups;
        const bool live = b < nblk;
        const float y = live ? v[k] * inv * wv[k] : 0.f;
        if (live) orow[b * 32 + lane] = y;
        rf_q8a_store(y, live, (i64)blockIdx.x * nblk + b, lane, qs, meta);
    }
    for (int b0 = RF_NORM_REG * groups, i = RF_NORM_REG; b0 < nblk; b0 += groups, ++i) {
        if (i % split != part) continue;
        const int b = b0 + g;
        const bool live = b < nblk;
        const int c = b * 32 + lane;
        const float y = live ? xr[c] * inv * w[c] : 0.f;
        if (live) orow[c] = y;
        rf_q8a_store(y, live, (i64)blockIdx.x * nblk + b, lane, qs, meta);
    }
}
