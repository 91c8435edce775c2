// attention.cu — scaled dot-product attention over an f16 KV cache, with GQA and a causal mask.
//   q, out: [n_tokens, n_heads, head_dim] f32
//   k, v:   [n_kv_heads, seq_cap, head_dim] f16; query head h reads kv head h / (n_heads / n_kv_heads)
//   Token t sits at position pos0 + t and attends to positions 0 ..= pos0 + t, or with a sliding
//   window (window > 0: Mistral) to the last `window` of them, pos0 + t - window + 1 ..= pos0 + t.
// One block per (token, head); its warps split the positions and keep an online softmax
// (running max, running sum, running V accumulator), then merge through shared memory. There is
// no limit on the sequence length and no score buffer.
// Launch: grid (n_tokens, n_heads), block RF_WARP * w with w <= RF_ATTN_MAX_WARPS;
// head_dim % RF_WARP == 0 and head_dim <= RF_ATTN_MAX_HEAD_DIM.
// Decode is the case n_tokens == 1, pos0 == seq_len - 1.
#include "common.cuh"

#define RF_ATTN_MAX_WARPS 8
#define RF_ATTN_MAX_HEAD_DIM 256
#define RF_ATTN_MAX_ND (RF_ATTN_MAX_HEAD_DIM / RF_WARP)

__device__ __forceinline__ void rf_attn(const float* __restrict__ q, const rf_half* __restrict__ kc,
                                        const rf_half* __restrict__ vc, float* __restrict__ out,
                                        int n_heads, int n_kv_heads, int head_dim, int seq_cap,
                                        int pos0, float scale, int window) {
    __shared__ float s_m[RF_ATTN_MAX_WARPS];
    __shared__ float s_l[RF_ATTN_MAX_WARPS];
    __shared__ float s_acc[RF_ATTN_MAX_WARPS * RF_ATTN_MAX_HEAD_DIM];

    const int t = blockIdx.x, h = blockIdx.y;
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int nwarps = blockDim.x / RF_WARP;
    const int kvh = h / (n_heads / n_kv_heads);
    const int nd = head_dim / RF_WARP;
    const int kv_len = pos0 + t + 1;
    const int kv_first = (window > 0 && kv_len > window) ? kv_len - window : 0;
    const float* qh = q + ((i64)t * n_heads + h) * head_dim;
    const rf_half* kh = kc + (i64)kvh * seq_cap * head_dim;
    const rf_half* vh = vc + (i64)kvh * seq_cap * head_dim;

    float qr[RF_ATTN_MAX_ND];
    float acc[RF_ATTN_MAX_ND];
#pragma unroll
    for (int i = 0; i < RF_ATTN_MAX_ND; ++i) {
        qr[i] = i < nd ? qh[lane + i * RF_WARP] * scale : 0.f;
        acc[i] = 0.f;
    }
    float m = -RF_INF, l = 0.f;
    for (int j = kv_first + warp; j < kv_len; j += nwarps) {
        const rf_half* kj = kh + (i64)j * head_dim;
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < RF_ATTN_MAX_ND; ++i)
            if (i < nd) s += qr[i] * rf_h2f(kj[lane + i * RF_WARP]);
        s = rf_warp_sum(s);
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new);
        const float pj = expf(s - m_new);
        l = l * corr + pj;
        const rf_half* vj = vh + (i64)j * head_dim;
#pragma unroll
        for (int i = 0; i < RF_ATTN_MAX_ND; ++i)
            if (i < nd) acc[i] = acc[i] * corr + pj * rf_h2f(vj[lane + i * RF_WARP]);
        m = m_new;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < RF_ATTN_MAX_ND; ++i)
        if (i < nd) s_acc[warp * head_dim + lane + i * RF_WARP] = acc[i];
    __syncthreads();

    float gm = -RF_INF;
    for (int w = 0; w < nwarps; ++w) gm = fmaxf(gm, s_m[w]);
    float gl = 0.f;
    for (int w = 0; w < nwarps; ++w) gl += s_l[w] * expf(s_m[w] - gm);
    float* oh = out + ((i64)t * n_heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.f;
        for (int w = 0; w < nwarps; ++w) o += s_acc[w * head_dim + d] * expf(s_m[w] - gm);
        oh[d] = o / gl;
    }
}

// Decode: one new token at position pos (= seq_len - 1).
extern "C" __global__ void attn_decode_f16kv_f32(const float* __restrict__ q, const rf_half* __restrict__ k,
                                                 const rf_half* __restrict__ v, float* __restrict__ out,
                                                 int n_heads, int n_kv_heads, int head_dim, int seq_cap,
                                                 int pos, float scale, int window) {
    rf_attn(q, k, v, out, n_heads, n_kv_heads, head_dim, seq_cap, pos, scale, window);
}

// Prefill: n_tokens (= gridDim.x) new tokens at positions pos0 .. pos0 + n_tokens, causal.
extern "C" __global__ void attn_prefill_f16kv_f32(const float* __restrict__ q, const rf_half* __restrict__ k,
                                                  const rf_half* __restrict__ v, float* __restrict__ out,
                                                  int n_heads, int n_kv_heads, int head_dim, int seq_cap,
                                                  int pos0, float scale, int window) {
    rf_attn(q, k, v, out, n_heads, n_kv_heads, head_dim, seq_cap, pos0, scale, window);
}
