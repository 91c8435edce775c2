// norm.cu — RMSNorm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w.
//   x, out: [nrows, ncols] f32 (may alias), w: [ncols] f32. Launch: grid nrows, 1-D block
//   (a multiple of RF_WARP, at most RF_MAX_THREADS).
#include "common.cuh"
#include "q8a.cuh"

// 1 / sqrt(mean(xr^2) + eps) of one row, for every thread of the block.
__device__ __forceinline__ float rf_rms_inv(const float* xr, int ncols, float eps) {
    __shared__ float scratch[RF_MAX_WARPS];
    float ss = 0.f;
    for (int c = threadIdx.x; c < ncols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = rf_block_sum(ss, scratch);
    return rsqrtf(ss / (float)ncols + eps);
}

extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rmsnorm_f32(const float* x, const float* __restrict__ w, float* out,
                                       int ncols, float eps) {
    const float* xr = x + (i64)blockIdx.x * ncols;
    float* orow = out + (i64)blockIdx.x * ncols;
    const float inv = rf_rms_inv(xr, ncols, eps);
    for (int c = threadIdx.x; c < ncols; c += blockDim.x) orow[c] = xr[c] * inv * w[c];
}

// rmsnorm_f32 with its output also quantized to the q8a layout of mmvq_q8.cu (row r's quants
// at qs + r * ncols, its blocks' (d, sum) at meta + r * ncols / 32): the norm before a product
// in one launch, the same bits as rmsnorm_f32 then quantize_q8a_f32. ncols % 32 == 0.
extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rmsnorm_q8a_f32(const float* x, const float* __restrict__ w, float* out,
                                           i8* __restrict__ qs, float2* __restrict__ meta,
                                           int ncols, float eps) {
    const float* xr = x + (i64)blockIdx.x * ncols;
    float* orow = out + (i64)blockIdx.x * ncols;
    const float inv = rf_rms_inv(xr, ncols, eps);
    // 32-element blocks: each group of 32 threads takes every (blockDim / 32)-th block.
    const int groups = blockDim.x / 32, g = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int nblk = ncols / 32;
    for (int b0 = 0; b0 < nblk; b0 += groups) {
        const int b = b0 + g;
        const bool live = b < nblk;
        const int c = b * 32 + lane;
        const float v = live ? xr[c] * inv * w[c] : 0.f;
        if (live) orow[c] = v;
        rf_q8a_store(v, live, (i64)blockIdx.x * nblk + b, lane, qs, meta);
    }
}
