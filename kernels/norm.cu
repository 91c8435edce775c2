// norm.cu — RMSNorm: out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w.
//   x, out: [nrows, ncols] f32 (may alias), w: [ncols] f32. Launch: grid nrows, 1-D block
//   (a multiple of RF_WARP, at most RF_MAX_THREADS).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rmsnorm_f32(const float* x, const float* __restrict__ w, float* out,
                                       int ncols, float eps) {
    __shared__ float scratch[RF_MAX_WARPS];
    const float* xr = x + (i64)blockIdx.x * ncols;
    float* orow = out + (i64)blockIdx.x * ncols;
    float ss = 0.f;
    for (int c = threadIdx.x; c < ncols; c += blockDim.x) ss += xr[c] * xr[c];
    ss = rf_block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)ncols + eps);
    for (int c = threadIdx.x; c < ncols; c += blockDim.x) orow[c] = xr[c] * inv * w[c];
}
