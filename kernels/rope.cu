// rope.cu — rotary position embedding, llama.cpp conventions.
//   x, out: [n_tokens, n_heads, head_dim] f32 (may alias), pos: [n_tokens] i32.
//   The first n_rot dims of each head rotate, the rest are copied. Pair i (< n_rot / 2) turns by
//   theta = pos * freq_scale * freq_base^(-2i / n_rot) / ff[i], where ff is the model's
//   `rope_freqs` tensor (Llama 3.1 frequency factors, [n_rot / 2] f32) or null (all 1).
//   rope_f32:      pairs (2i, 2i + 1)          (llama.cpp "normal", used by llama-family GGUFs)
//   rope_neox_f32: pairs (i, i + n_rot / 2)    (NeoX / Qwen2 style)
// Launch: grid (n_tokens * n_heads), 1-D block; threads stride over head_dim / 2 pairs.
#include "common.cuh"

// Head row `hr` (token hr / n_heads) of x into out.
__device__ __forceinline__ void rf_rope_row(const float* x, float* out, const i32* __restrict__ pos,
                                            int hr, int n_heads, int head_dim, int n_rot,
                                            float freq_base, float freq_scale,
                                            const float* __restrict__ ff, bool neox) {
    const int tok = hr / n_heads;
    const i64 base = (i64)hr * head_dim;
    const float p = (float)pos[tok] * freq_scale;
    const int half_rot = n_rot / 2;
    for (int i = threadIdx.x; i < head_dim / 2; i += blockDim.x) {
        if (i < half_rot) {
            float theta = p * powf(freq_base, -2.0f * (float)i / (float)n_rot);
            if (ff) theta /= ff[i];
            float s, c;
            sincosf(theta, &s, &c);
            const int a = neox ? i : 2 * i;
            const int b = neox ? i + half_rot : 2 * i + 1;
            const float x0 = x[base + a], x1 = x[base + b];
            out[base + a] = x0 * c - x1 * s;
            out[base + b] = x0 * s + x1 * c;
        } else {
            // Unrotated tail: copy the two elements this thread owns.
            out[base + 2 * i] = x[base + 2 * i];
            out[base + 2 * i + 1] = x[base + 2 * i + 1];
        }
    }
}

extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rope_f32(const float* x, float* out, const i32* __restrict__ pos, int n_heads,
                                    int head_dim, int n_rot, float freq_base, float freq_scale,
                                    const float* __restrict__ ff) {
    rf_rope_row(x, out, pos, blockIdx.x, n_heads, head_dim, n_rot, freq_base, freq_scale, ff, false);
}

extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rope_neox_f32(const float* x, float* out, const i32* __restrict__ pos,
                                         int n_heads, int head_dim, int n_rot, float freq_base,
                                         float freq_scale, const float* __restrict__ ff) {
    rf_rope_row(x, out, pos, blockIdx.x, n_heads, head_dim, n_rot, freq_base, freq_scale, ff, true);
}

// Q and K of a step in one launch, in place: grid n_tokens * (n_heads_q + n_heads_k); the first
// n_tokens * n_heads_q blocks rotate q's head rows, the rest k's. The same bits as two rope_f32
// (rope_neox_f32) launches.
__device__ __forceinline__ void rf_rope_qk(float* q, float* k, const i32* __restrict__ pos,
                                           int n_tokens, int hq, int hk, int head_dim, int n_rot,
                                           float freq_base, float freq_scale,
                                           const float* __restrict__ ff, bool neox) {
    const int nq = n_tokens * hq;
    if ((int)blockIdx.x < nq) {
        rf_rope_row(q, q, pos, blockIdx.x, hq, head_dim, n_rot, freq_base, freq_scale, ff, neox);
    } else {
        rf_rope_row(k, k, pos, blockIdx.x - nq, hk, head_dim, n_rot, freq_base, freq_scale, ff, neox);
    }
}

extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rope_qk_f32(float* q, float* k, const i32* __restrict__ pos,
                                       int n_tokens, int hq, int hk, int head_dim, int n_rot,
                                       float freq_base, float freq_scale, const float* __restrict__ ff) {
    rf_rope_qk(q, k, pos, n_tokens, hq, hk, head_dim, n_rot, freq_base, freq_scale, ff, false);
}

extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rope_qk_neox_f32(float* q, float* k, const i32* __restrict__ pos,
                                            int n_tokens, int hq, int hk, int head_dim, int n_rot,
                                            float freq_base, float freq_scale, const float* __restrict__ ff) {
    rf_rope_qk(q, k, pos, n_tokens, hq, hk, head_dim, n_rot, freq_base, freq_scale, ff, true);
}
