// elementwise.cu — SwiGLU, GeGLU, residual add, scaling, axpy, the f32 -> f16 KV-cache store and
// the KV cache's prefix copy.
// Launch: 1-D grid-stride, any 1-D block.
#include "common.cuh"
#include "q8a.cuh"

// out = silu(gate) * up, [n] f32.
extern "C" __global__ void swiglu_f32(const float* gate, const float* up, float* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

// out = gelu_tanh(gate) * up, [n] f32 (Gemma's GeGLU: GELU with the tanh approximation).
extern "C" __global__ void geglu_tanh_f32(const float* gate, const float* up, float* out, int n) {
    const float sqrt_2_over_pi = 0.7978846f;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float x = gate[i];
        const float t = tanhf(sqrt_2_over_pi * (x + 0.044715f * x * x * x));
        out[i] = 0.5f * x * (1.0f + t) * up[i];
    }
}

// out = x * s, [n] f32 (out may alias x): Gemma's embedding scale.
extern "C" __global__ void scale_f32(const float* x, float* out, float s, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = x[i] * s;
    }
}

// y += a * x, [n] f32: one expert's weighted output into a token's sum.
extern "C" __global__ void axpy_f32(const float* x, float* y, float a, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        y[i] += a * x[i];
    }
}

// out = a + b, [n] f32 (out may alias a or b).
extern "C" __global__ void add_f32(const float* a, const float* b, float* out, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        out[i] = a[i] + b[i];
    }
}

__device__ __forceinline__ void rf_kv_store(const float* __restrict__ src, rf_half* __restrict__ cache,
                                            int n_tokens, int n_kv_heads, int head_dim, const RfKvMap& map,
                                            int pos0) {
    const i64 n = (i64)n_tokens * n_kv_heads * head_dim;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const int d = (int)(i % head_dim);
        const int h = (int)((i / head_dim) % n_kv_heads);
        const int t = (int)(i / ((i64)head_dim * n_kv_heads));
        cache[map.head(h, head_dim) + map.row(pos0 + t, head_dim) + d] = rf_f2h(src[i]);
    }
}

// Writes k and v (or, with gridDim.y 1, k alone) for n_tokens new positions into f16 caches;
// blockIdx.y 0 stores k, 1 stores v.
//   k, v:   [n_tokens, n_kv_heads, head_dim] f32
//   kc, vc: a layer's K and V planes of block 0, rows through the map (RfKvMap, common.cuh: a
//           paged cache, or one contiguous [n_kv_heads, seq_cap, head_dim] block); token t goes
//           to position pos0 + t.
extern "C" __global__ void kv_store2_f32_f16(const float* __restrict__ k, rf_half* __restrict__ kc,
                                             const float* __restrict__ v, rf_half* __restrict__ vc,
                                             int n_tokens, int n_kv_heads, int head_dim,
                                             const u32* __restrict__ table, int n_blocks, int block_halfs,
                                             int bs, int pos0) {
    const RfKvMap map{table, n_blocks, block_halfs, bs};
    if (blockIdx.y == 0) rf_kv_store(k, kc, n_tokens, n_kv_heads, head_dim, map, pos0);
    else rf_kv_store(v, vc, n_tokens, n_kv_heads, head_dim, map, pos0);
}

// kv_store2_f32_f16 for one new token of each of gridDim.x sequences (a batched decode step):
// entry i of `seqs` (RfSeqKv, common.cuh) stores k and v row `row` at its position, through
// its block table, in the pool whose layer planes are kc and vc. Grid (sequences, 2).
extern "C" __global__ void kv_store2_batch_f32_f16(const float* __restrict__ k, const float* __restrict__ v,
                                                   const RfSeqKv* __restrict__ seqs, rf_half* __restrict__ kc,
                                                   rf_half* __restrict__ vc, int n_kv_heads, int head_dim,
                                                   int n_blocks, int block_halfs, int bs) {
    const RfSeqKv sq = seqs[blockIdx.x];
    const RfKvMap map{(const u32*)sq.table, n_blocks, block_halfs, bs};
    const int w = n_kv_heads * head_dim;
    const float* src = (blockIdx.y == 0 ? k : v) + (i64)sq.row * w;
    rf_half* cache = (blockIdx.y == 0 ? kc : vc) + map.row(sq.pos, head_dim);
    for (int i = threadIdx.x; i < w; i += blockDim.x) {
        const int d = i % head_dim, h = i / head_dim;
        cache[map.head(h, head_dim) + d] = rf_f2h(src[i]);
    }
}

// Positions 0..len of each of `segs` segments (a KV cache's [layer][k|v][head] planes) copied
// from a cache of `src_cap` positions per segment into one of `dst_cap`: the prefix cache's
// snapshot of a sequence and its restore into a new one. Rows of head_dim f16 moved as 16-byte
// pieces (head_dim % 8 == 0, the launcher's check). 1-D grid-stride.
extern "C" __global__ void kv_copy_f16(const uint4* __restrict__ src, uint4* __restrict__ dst, int segs,
                                       int len, int head_dim, int src_cap, int dst_cap) {
    const i64 row = head_dim / 8;
    const i64 per_seg = (i64)len * row;
    const i64 n = per_seg * segs;
    for (i64 i = blockIdx.x * (i64)blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x) {
        const i64 sg = i / per_seg, r = i % per_seg;
        dst[sg * dst_cap * row + r] = src[sg * src_cap * row + r];
    }
}

// The gated activations with their output also quantized to q8a (mmvq_q8.cu's layout over the
// n values as n / 32 blocks): the input of the down projection in one launch, the same bits as
// swiglu_f32 / geglu_tanh_f32 then quantize_q8a_f32. n % 32 == 0; launch RF_Q8A_GLU_THREADS
// threads per block, ceil(n / RF_Q8A_GLU_THREADS) blocks.
#define RF_Q8A_GLU_THREADS 256
__device__ __forceinline__ void rf_glu_q8a(const float* gate, const float* up, float* out, i8* qs,
                                           float2* meta, int n, bool gelu) {
    const i64 i = (i64)blockIdx.x * RF_Q8A_GLU_THREADS + threadIdx.x;
    const bool live = i < n;
    float v = 0.f;
    if (live) {
        const float x = gate[i];
        if (gelu) {
            const float t = tanhf(0.7978846f * (x + 0.044715f * x * x * x));
            v = 0.5f * x * (1.0f + t) * up[i];
        } else {
            v = x / (1.0f + expf(-x)) * up[i];
        }
        out[i] = v;
    }
    rf_q8a_store(v, live, i / 32, threadIdx.x % 32, qs, meta);
}

extern "C" __global__ void swiglu_q8a_f32(const float* gate, const float* up, float* out, i8* qs,
                                          float2* meta, int n) {
    rf_grid_launch_dependents();  // a product follows (vendor.cuh)
    rf_glu_q8a(gate, up, out, qs, meta, n, false);
}

extern "C" __global__ void geglu_tanh_q8a_f32(const float* gate, const float* up, float* out,
                                              i8* qs, float2* meta, int n) {
    rf_grid_launch_dependents();  // a product follows (vendor.cuh)
    rf_glu_q8a(gate, up, out, qs, meta, n, true);
}
