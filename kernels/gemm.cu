// gemm.cu — the portable prefill GEMM: y[t * ldy + r] = sum_j x[t, j] * w[r, j].
//   w: [rows, k] f16 (a dequantized weight tile), x: [n, k] f16 (activations), both row-major;
//   y: f32, token t's outputs at y + t * ldy (ldy >= rows: the tile is a column range of Y).
// The same product as cuBLAS's gemm_f16_nt in cuda/blas.rs; used on HIP (hipBLAS is not bound)
// and on CUDA when cuBLAS is absent or disabled.
//
// One block computes a RF_GEMM_BM x RF_GEMM_BN tile (weight rows x tokens), staging
// RF_GEMM_BK-deep slices of both operands in shared memory as f32. Block (16, 16): thread
// (tx, ty) owns rows tx + 16 i and tokens ty + 16 j (i, j < 4), so a warp's stores to y run
// along r, which is contiguous. Accumulation is f32. Only __syncthreads is used: nothing depends
// on the warp width, so wave64 and wave32 run the same code. Any rows, k, n (bounds-checked
// loads fill zeros); no alignment beyond the f16 element's is assumed.
// Launch: grid (ceil(rows / 64), ceil(n / 64)), block (16, 16), no dynamic shared memory.
#include "common.cuh"

#define RF_GEMM_BM 64
#define RF_GEMM_BN 64
#define RF_GEMM_BK 32
#define RF_GEMM_T 16
#define RF_GEMM_THREADS (RF_GEMM_T * RF_GEMM_T)
#define RF_GEMM_PER (RF_GEMM_BM / RF_GEMM_T)

extern "C" __global__ void __launch_bounds__(RF_GEMM_THREADS)
gemm_f16_nt_f32(const rf_half* __restrict__ w, const rf_half* __restrict__ x, float* __restrict__ y,
                int rows, int k, int n, int ldy) {
    // [j][r] so the inner loop reads a row of each; +1 keeps the transposing stores (threads
    // running along j) on distinct banks.
    __shared__ float ws[RF_GEMM_BK][RF_GEMM_BM + 1];
    __shared__ float xs[RF_GEMM_BK][RF_GEMM_BN + 1];

    const int tx = threadIdx.x, ty = threadIdx.y;
    const int tid = ty * RF_GEMM_T + tx;
    const int r0 = blockIdx.x * RF_GEMM_BM;
    const int t0 = blockIdx.y * RF_GEMM_BN;

    float acc[RF_GEMM_PER][RF_GEMM_PER];
#pragma unroll
    for (int i = 0; i < RF_GEMM_PER; ++i)
#pragma unroll
        for (int j = 0; j < RF_GEMM_PER; ++j) acc[i][j] = 0.f;

    for (int k0 = 0; k0 < k; k0 += RF_GEMM_BK) {
        // Consecutive threads read consecutive j of one row: coalesced along k.
        for (int e = tid; e < RF_GEMM_BM * RF_GEMM_BK; e += RF_GEMM_THREADS) {
            const int rr = e / RF_GEMM_BK, jj = e % RF_GEMM_BK;
            const int r = r0 + rr, j = k0 + jj;
            ws[jj][rr] = (r < rows && j < k) ? rf_h2f(w[(i64)r * k + j]) : 0.f;
        }
        for (int e = tid; e < RF_GEMM_BN * RF_GEMM_BK; e += RF_GEMM_THREADS) {
            const int tt = e / RF_GEMM_BK, jj = e % RF_GEMM_BK;
            const int t = t0 + tt, j = k0 + jj;
            xs[jj][tt] = (t < n && j < k) ? rf_h2f(x[(i64)t * k + j]) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int jj = 0; jj < RF_GEMM_BK; ++jj) {
            float a[RF_GEMM_PER], b[RF_GEMM_PER];
#pragma unroll
            for (int i = 0; i < RF_GEMM_PER; ++i) a[i] = ws[jj][tx + RF_GEMM_T * i];
#pragma unroll
            for (int j = 0; j < RF_GEMM_PER; ++j) b[j] = xs[jj][ty + RF_GEMM_T * j];
#pragma unroll
            for (int i = 0; i < RF_GEMM_PER; ++i)
#pragma unroll
                for (int j = 0; j < RF_GEMM_PER; ++j) acc[i][j] += a[i] * b[j];
        }
        __syncthreads();  // the next slice overwrites ws/xs
    }
#pragma unroll
    for (int j = 0; j < RF_GEMM_PER; ++j) {
        const int t = t0 + ty + RF_GEMM_T * j;
        if (t >= n) continue;
#pragma unroll
        for (int i = 0; i < RF_GEMM_PER; ++i) {
            const int r = r0 + tx + RF_GEMM_T * i;
            if (r < rows) y[(i64)t * ldy + r] = acc[i][j];
        }
    }
}
