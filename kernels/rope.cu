// rope.cu — rotary position embedding, llama.cpp conventions.
//   x, out: [n_tokens, n_heads, head_dim] f32 (may alias), pos: [n_tokens] i32.
//   The first n_rot dims of each head rotate, the rest are copied. Pair i (< n_rot / 2) turns by
//   theta = pos * freq_scale * freq_base^(-2i / n_rot) / ff[i], where ff is the model's
//   `rope_freqs` tensor (Llama 3.1 frequency factors, [n_rot / 2] f32) or null (all 1).
//   rope_f32:      pairs (2i, 2i + 1)          (llama.cpp "normal", used by llama-family GGUFs)
//   rope_neox_f32: pairs (i, i + n_rot / 2)    (NeoX / Qwen2 style)
// Launch: grid (n_tokens * n_heads), 1-D block; threads stride over head_dim / 2 pairs.
#include "common.cuh"

__device__ __forceinline__ void rf_rope(const float* x, float* out, const i32* __restrict__ pos,
                                        int n_heads, int head_dim, int n_rot, float freq_base,
                                        float freq_scale, const float* __restrict__ ff, bool neox) {
    const int tok = blockIdx.x / n_heads;
    const i64 base = (i64)blockIdx.x * head_dim;
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
    rf_rope(x, out, pos, n_heads, head_dim, n_rot, freq_base, freq_scale, ff, false);
}

extern "C" __global__ void __launch_bounds__(RF_MAX_THREADS) rope_neox_f32(const float* x, float* out, const i32* __restrict__ pos,
                                         int n_heads, int head_dim, int n_rot, float freq_base,
                                         float freq_scale, const float* __restrict__ ff) {
    rf_rope(x, out, pos, n_heads, head_dim, n_rot, freq_base, freq_scale, ff, true);
}
