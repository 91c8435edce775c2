// sample.cu — token selection on the device; only the chosen id goes back to the host.
// Launch: one block of a multiple of RF_WARP threads (at most RF_MAX_THREADS).
#include "common.cuh"

// Largest candidate set top-k / top-p considers.
#define RF_MAX_TOPK 256

// (value, index) ordered by value descending, then index ascending: a strict total order, so
// ties resolve to the lowest id on every backend.
__device__ __forceinline__ bool rf_before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

// Block-wide best (value, index) under rf_before; every thread receives it.
__device__ __forceinline__ void rf_block_best(float* v, int* i, float* sv, int* si) {
    for (int m = RF_WARP / 2; m > 0; m >>= 1) {
        const float ov = rf_shfl_xor(*v, m);
        const int oi = rf_shfl_xor_int(*i, m);
        if (rf_before(ov, oi, *v, *i)) { *v = ov; *i = oi; }
    }
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int nwarps = blockDim.x / RF_WARP;
    __syncthreads();
    if (lane == 0) { sv[warp] = *v; si[warp] = *i; }
    __syncthreads();
    *v = lane < nwarps ? sv[lane] : -RF_INF;
    *i = lane < nwarps ? si[lane] : 0x7fffffff;
    for (int m = RF_WARP / 2; m > 0; m >>= 1) {
        const float ov = rf_shfl_xor(*v, m);
        const int oi = rf_shfl_xor_int(*i, m);
        if (rf_before(ov, oi, *v, *i)) { *v = ov; *i = oi; }
    }
}

// Greedy, one block per row (grid x = rows): out[r] = argmax(logits[r * n .. r * n + n)),
// lowest id on ties, a NaN never chosen; a row whose first logit is NaN gives 0. That is the
// host's `sample::argmax` (a scan keeping the first entry until a larger one comes), so a
// greedy token chosen here is the one the host would choose from the same logits.
extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) argmax_f32(const float* __restrict__ logits, int n, i32* __restrict__ out) {
    __shared__ float sv[RF_MAX_WARPS];
    __shared__ int si[RF_MAX_WARPS];
    const float* row = logits + (i64)blockIdx.x * n;
    float bv = -RF_INF;
    int bi = 0x7fffffff;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        if (rf_before(row[j], j, bv, bi)) { bv = row[j]; bi = j; }
    rf_block_best(&bv, &bi, sv, si);
    if (threadIdx.x == 0) out[blockIdx.x] = (row[0] != row[0] || bi == 0x7fffffff) ? 0 : bi;
}

// Top-k then top-p (nucleus) sampling with temperature.
//   top_k <= 0 means RF_MAX_TOPK; top_k is capped at RF_MAX_TOPK, so top-p alone sees only the
//   best RF_MAX_TOPK tokens (their probabilities are normalised over the whole vocabulary first).
//   u in [0, 1) is the uniform draw from the host's seeded RNG; temperature <= 0 is greedy.
// The candidates are found by k block-wide arg-max passes, each excluding those already taken:
// O(k * n / threads), fine for k of tens; a radix select is the faster path (not written yet).
extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) sample_topk_topp_f32(const float* __restrict__ logits, int n, int top_k,
                                                float top_p, float temperature, float u,
                                                i32* __restrict__ out) {
    __shared__ float sv[RF_MAX_WARPS];
    __shared__ int si[RF_MAX_WARPS];
    __shared__ float cand_v[RF_MAX_TOPK];
    __shared__ int cand_i[RF_MAX_TOPK];
    __shared__ float scratch[RF_MAX_WARPS];

    int k = top_k <= 0 ? RF_MAX_TOPK : min(top_k, RF_MAX_TOPK);
    k = min(k, n);
    if (temperature <= 0.f) k = 1;

    float lv = RF_INF;  // last candidate taken; the first pass takes the global best
    int li = -1;
    for (int c = 0; c < k; ++c) {
        float bv = -RF_INF;
        int bi = 0x7fffffff;
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            const float x = logits[j];
            if (rf_before(lv, li, x, j) && rf_before(x, j, bv, bi)) { bv = x; bi = j; }
        }
        rf_block_best(&bv, &bi, sv, si);
        if (threadIdx.x == 0) { cand_v[c] = bv; cand_i[c] = bi; }
        lv = bv;
        li = bi;
    }
    if (k == 1) {
        if (threadIdx.x == 0) out[0] = cand_i[0];
        return;
    }
    // Softmax normaliser over the whole vocabulary.
    __syncthreads();
    const float vmax = cand_v[0];
    const float inv_t = 1.0f / temperature;
    float z = 0.f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) z += expf((logits[j] - vmax) * inv_t);
    z = rf_block_sum(z, scratch);
    if (threadIdx.x == 0) {
        // Smallest prefix whose mass reaches top_p (at least one token).
        float cum = 0.f;
        int keep = 0;
        while (keep < k) {
            cum += expf((cand_v[keep] - vmax) * inv_t) / z;
            ++keep;
            if (cum >= top_p) break;
        }
        const float target = u * cum;
        float acc = 0.f;
        int pick = cand_i[keep - 1];
        for (int c = 0; c < keep; ++c) {
            acc += expf((cand_v[c] - vmax) * inv_t) / z;
            if (target < acc) { pick = cand_i[c]; break; }
        }
        out[0] = pick;
    }
}
