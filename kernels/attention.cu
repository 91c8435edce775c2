// attention.cu — scaled dot-product attention over an f16 KV cache, with GQA and a causal mask.
//   q, out: [n_tokens, n_heads, head_dim] f32
//   k, v:   a layer's K and V planes of the cache's block 0, rows found through RfKvMap (common.cuh:
//           paged, or one contiguous [n_kv_heads, seq_cap, head_dim] block); query head h reads kv head
//           h / (n_heads / n_kv_heads). The map's four arguments (table, n_blocks, block_halfs, bs)
//           follow head_dim in every kernel.
//   Token t sits at position pos0 + t and attends to positions 0 ..= pos0 + t, or with a sliding
//   window (window > 0: Mistral) to the last `window` of them, pos0 + t - window + 1 ..= pos0 + t.
// One block per (token, head); its warps split the positions and keep an online softmax
// (running max, running sum, running V accumulator), then merge through shared memory. There is
// no limit on the sequence length and no score buffer.
// Launch: grid (n_tokens, n_heads), block RF_WARP * w with w <= RF_ATTN_MAX_WARPS;
// head_dim % RF_WARP == 0 and head_dim <= RF_ATTN_MAX_HEAD_DIM.
// Decode is the case n_tokens == 1, pos0 == seq_len - 1. A long decode context is split across
// blocks instead (attn_decode_part_f16kv_f32, then attn_merge_f32: flash-decoding), so it is not
// left to one block per head.
#include "common.cuh"
#include "q8a.cuh"

#define RF_ATTN_MAX_WARPS 8
#define RF_ATTN_MAX_HEAD_DIM 256
#define RF_ATTN_MAX_ND (RF_ATTN_MAX_HEAD_DIM / RF_WARP)

// Keys a warp of the split decode kernel scores at once: their K rows (then V rows) are loaded
// together, so the loads of eight positions are in flight at a time instead of one (a lone
// position's load, warp sum and exponent made a serial chain per key: ~7x slower decode at a
// 4,000-token context). The one-block kernels keep one key at a time (KB = 1): with eight,
// short-context decode measured 1.8% slower on an H200.
#define RF_ATTN_KB 8

// One warp's online softmax over positions first + (warp + k * nwarps) * KB + u (u < KB)
// below `end`: running max m, running sum l and the V accumulator acc (this
// lane's columns lane + i * RF_WARP), updated once per group of KB keys. qr holds the
// scaled query's columns. A key past `end` is loaded from position end - 1 (valid memory) and
// weighed 0.
template <int KB>
__device__ __forceinline__ void rf_attn_warp(const float (&qr)[RF_ATTN_MAX_ND], const rf_half* __restrict__ kh,
                                             const rf_half* __restrict__ vh, const RfKvMap& map,
                                             int head_dim, int nd,
                                             int first, int end, float& m, float& l,
                                             float (&acc)[RF_ATTN_MAX_ND]) {
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int nwarps = blockDim.x / RF_WARP;
    for (int j0 = first + warp * KB; j0 < end; j0 += nwarps * KB) {
        float s[KB];
#pragma unroll
        for (int u = 0; u < KB; ++u) {
            const rf_half* kj = kh + map.row(min(j0 + u, end - 1), head_dim);
            float x = 0.f;
#pragma unroll
            for (int i = 0; i < RF_ATTN_MAX_ND; ++i)
                if (i < nd) x += qr[i] * rf_h2f(kj[lane + i * RF_WARP]);
            s[u] = x;
        }
#pragma unroll
        for (int u = 0; u < KB; ++u) s[u] = rf_warp_sum(s[u]);
        float m_new = m;
#pragma unroll
        for (int u = 0; u < KB; ++u)
            if (j0 + u < end) m_new = fmaxf(m_new, s[u]);
        const float corr = expf(m - m_new);
        l *= corr;
#pragma unroll
        for (int i = 0; i < RF_ATTN_MAX_ND; ++i) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < KB; ++u) {
            const float pj = j0 + u < end ? expf(s[u] - m_new) : 0.f;
            l += pj;
            const rf_half* vj = vh + map.row(min(j0 + u, end - 1), head_dim);
#pragma unroll
            for (int i = 0; i < RF_ATTN_MAX_ND; ++i)
                if (i < nd) acc[i] += pj * rf_h2f(vj[lane + i * RF_WARP]);
        }
        m = m_new;
    }
}

// The block's warps' (m, l, acc) in shared memory, and the block's max gm and sum gl; the
// caller then combines s_acc per column with weights expf(s_m[w] - gm).
struct RfAttnShared {
    float m[RF_ATTN_MAX_WARPS];
    float l[RF_ATTN_MAX_WARPS];
    float acc[RF_ATTN_MAX_WARPS * RF_ATTN_MAX_HEAD_DIM];
};

__device__ __forceinline__ void rf_attn_gather(RfAttnShared& sh, float m, float l,
                                               const float (&acc)[RF_ATTN_MAX_ND], int head_dim,
                                               int nd, float& gm, float& gl) {
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int nwarps = blockDim.x / RF_WARP;
    if (lane == 0) {
        sh.m[warp] = m;
        sh.l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < RF_ATTN_MAX_ND; ++i)
        if (i < nd) sh.acc[warp * head_dim + lane + i * RF_WARP] = acc[i];
    __syncthreads();
    gm = -RF_INF;
    for (int w = 0; w < nwarps; ++w) gm = fmaxf(gm, sh.m[w]);
    gl = 0.f;
    for (int w = 0; w < nwarps; ++w) gl += sh.l[w] * expf(sh.m[w] - gm);
}

// Column d of the block's combined, unnormalized V sum.
__device__ __forceinline__ float rf_attn_column(const RfAttnShared& sh, int head_dim, int d, float gm) {
    const int nwarps = blockDim.x / RF_WARP;
    float o = 0.f;
    for (int w = 0; w < nwarps; ++w) o += sh.acc[w * head_dim + d] * expf(sh.m[w] - gm);
    return o;
}

// The scaled query of (token t, head h) in registers (this lane's columns).
__device__ __forceinline__ void rf_attn_query(const float* __restrict__ q, int t, int h, int n_heads,
                                              int head_dim, int nd, float scale,
                                              float (&qr)[RF_ATTN_MAX_ND], float (&acc)[RF_ATTN_MAX_ND]) {
    const int lane = threadIdx.x % RF_WARP;
    const float* qh = q + ((i64)t * n_heads + h) * head_dim;
#pragma unroll
    for (int i = 0; i < RF_ATTN_MAX_ND; ++i) {
        qr[i] = i < nd ? qh[lane + i * RF_WARP] * scale : 0.f;
        acc[i] = 0.f;
    }
}

// qs / meta: when not null, the output is also quantized to the q8a layout of mmvq_q8.cu (row
// t's quants at qs + t * n_heads * head_dim, its blocks' (d, sum) at meta + t * n_heads *
// head_dim / 32): the O product's input in the same launch, the same bits as quantize_q8a_f32
// of `out` (head_dim % 32 == 0; the block is a multiple of 32 threads).
// Row t (of q, out, qs) over cache positions up to kv_len; head blockIdx.y.
__device__ __forceinline__ void rf_attn_row(int t, int kv_len, const float* __restrict__ q,
                                            const rf_half* __restrict__ kc, const rf_half* __restrict__ vc,
                                            float* __restrict__ out, int n_heads, int n_kv_heads,
                                            int head_dim, const RfKvMap& map, float scale, int window,
                                            i8* __restrict__ qs, float2* __restrict__ meta) {
    __shared__ RfAttnShared sh;
    const int h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int nd = head_dim / RF_WARP;
    const int kv_first = (window > 0 && kv_len > window) ? kv_len - window : 0;
    float qr[RF_ATTN_MAX_ND], acc[RF_ATTN_MAX_ND];
    rf_attn_query(q, t, h, n_heads, head_dim, nd, scale, qr, acc);
    float m = -RF_INF, l = 0.f;
    rf_attn_warp<1>(qr, kc + map.head(kvh, head_dim), vc + map.head(kvh, head_dim), map, head_dim, nd,
                    kv_first, kv_len, m, l, acc);
    float gm, gl;
    rf_attn_gather(sh, m, l, acc, head_dim, nd, gm, gl);
    float* oh = out + ((i64)t * n_heads + h) * head_dim;
    // Every thread takes each round (a dead one holds 0), so the 32-lane groups that quantize
    // stay whole: group g of round d0 is q8 block (d0 + 32 g) / 32 of this head.
    for (int d0 = 0; d0 < head_dim; d0 += blockDim.x) {
        const int d = d0 + threadIdx.x;
        const bool live = d < head_dim;
        float y = 0.f;
        if (live) {
            y = rf_attn_column(sh, head_dim, d, gm) / gl;
            oh[d] = y;
        }
        if (qs != nullptr) {
            const i64 blk = (((i64)t * n_heads + h) * head_dim + (live ? d : 0)) / 32;
            rf_q8a_store(y, live, blk, threadIdx.x % 32, qs, meta);
        }
    }
}

// Token blockIdx.x of a step at positions pos0 ..: rf_attn_row over its causal prefix.
__device__ __forceinline__ void rf_attn(const float* __restrict__ q, const rf_half* __restrict__ kc,
                                        const rf_half* __restrict__ vc, float* __restrict__ out,
                                        int n_heads, int n_kv_heads, int head_dim, const RfKvMap& map,
                                        int pos0, float scale, int window, i8* __restrict__ qs = nullptr,
                                        float2* __restrict__ meta = nullptr) {
    const int t = blockIdx.x;
    rf_attn_row(t, pos0 + t + 1, q, kc, vc, out, n_heads, n_kv_heads, head_dim, map, scale, window, qs,
                meta);
}


// Keys per lane group per round of rf_attn_warp_wide.
#define RF_ATTN_WIDE_U 4

// rf_attn_warp's result, for heads of 8 * L halfs with L dividing the warp (64, 128, 256 on
// NVIDIA): a group of L = head_dim / 8 lanes takes one key, each lane 8 of its columns with one
// 16-byte load of K and one of V, so a warp has RF_WARP / L keys per load and, with
// RF_ATTN_WIDE_U keys per group and round, K and V of 4-16 keys in flight in one round trip
// (rf_attn_warp: four 2-byte loads per key and lane, V loaded after the scores). Each group keeps
// its own running (m, l, acc); the groups of a warp merge at the end, so on return every lane
// holds the warp's state for its columns 8 * (lane % L) ..; rows must be 16-byte aligned.
__device__ __forceinline__ void rf_attn_warp_wide(const float* __restrict__ qh, float scale,
                                                  const rf_half* __restrict__ kh,
                                                  const rf_half* __restrict__ vh, const RfKvMap& map,
                                                  int head_dim, int first, int end, float& m, float& l,
                                                  float (&acc)[8]) {
    const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
    const int nwarps = blockDim.x / RF_WARP;
    const int L = head_dim / 8, G = RF_WARP / L;  // lanes per key, keys per warp-wide load
    const int g = lane / L, c = lane % L;
    float qv[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        qv[e] = qh[c * 8 + e] * scale;
        acc[e] = 0.f;
    }
    m = -RF_INF;
    l = 0.f;
    const int step = nwarps * G * RF_ATTN_WIDE_U;
    for (int j0 = first + warp * G * RF_ATTN_WIDE_U; j0 < end; j0 += step) {
        uint4 kr[RF_ATTN_WIDE_U], vr[RF_ATTN_WIDE_U];
#pragma unroll
        for (int u = 0; u < RF_ATTN_WIDE_U; ++u) {
            const i64 row = map.row(min(j0 + u * G + g, end - 1), head_dim) + c * 8;
            kr[u] = *(const uint4*)(kh + row);
            vr[u] = *(const uint4*)(vh + row);
        }
        float sc[RF_ATTN_WIDE_U];
#pragma unroll
        for (int u = 0; u < RF_ATTN_WIDE_U; ++u) {
            const rf_half* kk = (const rf_half*)&kr[u];
            float x = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) x += qv[e] * rf_h2f(kk[e]);
            for (int off = L / 2; off > 0; off >>= 1) x += rf_shfl_xor(x, off);
            sc[u] = x;
        }
        float m_new = m;
#pragma unroll
        for (int u = 0; u < RF_ATTN_WIDE_U; ++u)
            if (j0 + u * G + g < end) m_new = fmaxf(m_new, sc[u]);
        // A group whose keys all lie past `end` keeps m = -inf (nothing to scale).
        const float corr = m_new == -RF_INF ? 1.f : expf(m - m_new);
        l *= corr;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] *= corr;
#pragma unroll
        for (int u = 0; u < RF_ATTN_WIDE_U; ++u) {
            const float pj = j0 + u * G + g < end ? expf(sc[u] - m_new) : 0.f;
            l += pj;
            const rf_half* vv = (const rf_half*)&vr[u];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[e] += pj * rf_h2f(vv[e]);
        }
        m = m_new;
    }
    // The warp's groups merged (butterfly over the group bits of the lane index).
    for (int off = L; off < RF_WARP; off <<= 1) {
        const float m_o = rf_shfl_xor(m, off), l_o = rf_shfl_xor(l, off);
        const float m_n = fmaxf(m, m_o);
        const float a = m == -RF_INF ? 0.f : expf(m - m_n);
        const float b = m_o == -RF_INF ? 0.f : expf(m_o - m_n);
        l = l * a + l_o * b;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = acc[e] * a + rf_shfl_xor(acc[e], off) * b;
        m = m_n;
    }
}

// Decode over a long context split across blocks (flash-decoding): block (sp, h) takes
// positions kv_first + sp * chunk .. + chunk (below pos + 1) of head h and writes its max, its
// sum and its unnormalized V sum to part[(h * gridDim.x + sp) * (head_dim + 2) ..] as
// (m, l, acc[head_dim]); attn_merge_f32 combines the splits. Every split holds a position.
// `wide` (the caches' rows 16-byte aligned) with a head of 8 * L halfs, L dividing the warp: the
// warps read K and V with rf_attn_warp_wide.
extern "C" __global__ void attn_decode_part_f16kv_f32(const float* __restrict__ q, const rf_half* __restrict__ k,
                                                      const rf_half* __restrict__ v, float* __restrict__ part,
                                                      int n_heads, int n_kv_heads, int head_dim,
                                                      const u32* __restrict__ table, int n_blocks,
                                                      int block_halfs, int bs, int pos, float scale,
                                                      int window, int chunk, int wide) {
    const RfKvMap map{table, n_blocks, block_halfs, bs};
    __shared__ RfAttnShared sh;
    const int sp = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (n_heads / n_kv_heads);
    const int nd = head_dim / RF_WARP;
    const int kv_len = pos + 1;
    const int kv_first = (window > 0 && kv_len > window) ? kv_len - window : 0;
    const int b0 = kv_first + sp * chunk, b1 = min(b0 + chunk, kv_len);
    const rf_half* kh = k + map.head(kvh, head_dim);
    const rf_half* vh = v + map.head(kvh, head_dim);
    float m = -RF_INF, l = 0.f, gm, gl;
    const int L = head_dim / 8;
    if (wide && head_dim % 8 == 0 && L <= RF_WARP && RF_WARP % L == 0) {
        // 16-byte loads (`wide`: the launcher found both caches 16-byte aligned).
        float acc[8];
        rf_attn_warp_wide(q + (i64)h * head_dim, scale, kh, vh, map, head_dim, b0, b1, m, l, acc);
        const int lane = threadIdx.x % RF_WARP, warp = threadIdx.x / RF_WARP;
        if (lane == 0) {
            sh.m[warp] = m;
            sh.l[warp] = l;
        }
        if (lane < L) {
#pragma unroll
            for (int e = 0; e < 8; ++e) sh.acc[warp * head_dim + lane * 8 + e] = acc[e];
        }
        __syncthreads();
        gm = -RF_INF;
        for (int w = 0; w < (int)(blockDim.x / RF_WARP); ++w) gm = fmaxf(gm, sh.m[w]);
        gl = 0.f;
        for (int w = 0; w < (int)(blockDim.x / RF_WARP); ++w)
            gl += sh.m[w] == -RF_INF ? 0.f : sh.l[w] * expf(sh.m[w] - gm);
    } else {
        float qr[RF_ATTN_MAX_ND], acc[RF_ATTN_MAX_ND];
        rf_attn_query(q, 0, h, n_heads, head_dim, nd, scale, qr, acc);
        rf_attn_warp<RF_ATTN_KB>(qr, kh, vh, map, head_dim, nd, b0, b1, m, l, acc);
        rf_attn_gather(sh, m, l, acc, head_dim, nd, gm, gl);
    }
    float* pp = part + ((i64)h * gridDim.x + sp) * (head_dim + 2);
    if (threadIdx.x == 0) {
        pp[0] = gm;
        pp[1] = gl;
    }
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) pp[2 + d] = rf_attn_column(sh, head_dim, d, gm);
}

// The splits of attn_decode_part_f16kv_f32 combined: out[h][d] (one token), and with qs / meta
// not null also its q8a form as rf_attn writes it. Grid: n_heads blocks of a multiple of 32
// threads (head_dim % 32 == 0 for the q8a form).
extern "C" __global__ void attn_merge_f32(const float* __restrict__ part, float* __restrict__ out,
                                          int n_heads, int head_dim, int nsplit, i8* __restrict__ qs,
                                          float2* __restrict__ meta) {
    rf_grid_launch_dependents();  // the O product follows (vendor.cuh)
    const int h = blockIdx.x;
    const int stride = head_dim + 2;
    const float* ph = part + (i64)h * nsplit * stride;
    float gm = -RF_INF;
    for (int sp = 0; sp < nsplit; ++sp) gm = fmaxf(gm, ph[sp * stride]);
    float gl = 0.f;
    for (int sp = 0; sp < nsplit; ++sp) gl += ph[sp * stride + 1] * expf(ph[sp * stride] - gm);
    float* oh = out + (i64)h * head_dim;
    for (int d0 = 0; d0 < head_dim; d0 += blockDim.x) {
        const int d = d0 + threadIdx.x;
        const bool live = d < head_dim;
        float y = 0.f;
        if (live) {
            float o = 0.f;
            for (int sp = 0; sp < nsplit; ++sp) o += ph[sp * stride + 2 + d] * expf(ph[sp * stride] - gm);
            y = o / gl;
            oh[d] = y;
        }
        if (qs != nullptr) {
            const i64 blk = ((i64)h * head_dim + (live ? d : 0)) / 32;
            rf_q8a_store(y, live, blk, threadIdx.x % 32, qs, meta);
        }
    }
}

// Decode: one new token at position pos (= seq_len - 1).
extern "C" __global__ void attn_decode_f16kv_f32(const float* __restrict__ q, const rf_half* __restrict__ k,
                                                 const rf_half* __restrict__ v, float* __restrict__ out,
                                                 int n_heads, int n_kv_heads, int head_dim,
                                                 const u32* __restrict__ table, int n_blocks, int block_halfs,
                                                 int bs, int pos, float scale, int window) {
    const RfKvMap map{table, n_blocks, block_halfs, bs};
    rf_attn(q, k, v, out, n_heads, n_kv_heads, head_dim, map, pos, scale, window);
}

// Decode with the output also quantized (see rf_attn): qs, meta as quantize_q8a_f32 writes them.
extern "C" __global__ void attn_decode_q8a_f16kv_f32(const float* __restrict__ q, const rf_half* __restrict__ k,
                                                     const rf_half* __restrict__ v, float* __restrict__ out,
                                                     int n_heads, int n_kv_heads, int head_dim,
                                                     const u32* __restrict__ table, int n_blocks,
                                                     int block_halfs, int bs, int pos, float scale,
                                                     int window, i8* __restrict__ qs,
                                                     float2* __restrict__ meta) {
    rf_grid_launch_dependents();  // the O product follows (vendor.cuh)
    const RfKvMap map{table, n_blocks, block_halfs, bs};
    rf_attn(q, k, v, out, n_heads, n_kv_heads, head_dim, map, pos, scale, window, qs, meta);
}

// Decode of gridDim.x sequences in one launch (`seqs`, common.cuh), grid (sequences, n_heads):
// each block is attn_decode_q8a_f16kv_f32's for its sequence's row, through its own block table
// in the pool whose layer planes are k and v (qs null: no quantized output).
extern "C" __global__ void attn_decode_batch_f16kv_f32(const float* __restrict__ q,
                                                       const RfSeqKv* __restrict__ seqs,
                                                       const rf_half* __restrict__ k,
                                                       const rf_half* __restrict__ v, float* __restrict__ out,
                                                       int n_heads, int n_kv_heads, int head_dim, int n_blocks,
                                                       int block_halfs, int bs, float scale, int window,
                                                       i8* __restrict__ qs, float2* __restrict__ meta) {
    rf_grid_launch_dependents();  // the O product follows (vendor.cuh)
    const RfSeqKv sq = seqs[blockIdx.x];
    const RfKvMap map{(const u32*)sq.table, n_blocks, block_halfs, bs};
    rf_attn_row(sq.row, sq.pos + 1, q, k, v, out, n_heads, n_kv_heads, head_dim, map, scale, window, qs,
                meta);
}

// Prefill: n_tokens (= gridDim.x) new tokens at positions pos0 .. pos0 + n_tokens, causal.
extern "C" __global__ void attn_prefill_f16kv_f32(const float* __restrict__ q, const rf_half* __restrict__ k,
                                                  const rf_half* __restrict__ v, float* __restrict__ out,
                                                  int n_heads, int n_kv_heads, int head_dim,
                                                  const u32* __restrict__ table, int n_blocks, int block_halfs,
                                                  int bs, int pos0, float scale, int window) {
    const RfKvMap map{table, n_blocks, block_halfs, bs};
    rf_attn(q, k, v, out, n_heads, n_kv_heads, head_dim, map, pos0, scale, window);
}

// Prefill in tiles: one block of RF_ATTN_TILE_THREADS threads per (RF_ATTN_TQ consecutive
// tokens, query head). The block walks the keys in tiles of RF_ATTN_TK positions staged in shared
// memory (f16 pairs), so each key is read from memory once per query tile instead of once per
// query; thread (row r = tid / 16, column c = tid % 16) scores keys c and c + 16 of the tile for
// token r, the row's 16 threads meet by shuffles (xor masks below 16: within a 16-lane group on
// wave32 and wave64 alike) for the online softmax, and the thread keeps output dimensions
// 2c + 32i and 2c + 32i + 1 of its token. head_dim % 32 == 0, head_dim <= RF_ATTN_TILE_MAX_D.
// Key tiles start at multiples of RF_ATTN_TK, and a masked key changes nothing (its weight is an
// exact 0 and the running max ignores it), so a token's result does not depend on which tokens
// share its block: a prompt gives the same bits in one chunk or several.
// Grid (ceil(n_tokens / RF_ATTN_TQ), n_heads).
#define RF_ATTN_TQ 16
#define RF_ATTN_TK 32
#define RF_ATTN_TILE_THREADS (RF_ATTN_TQ * 16)
#define RF_ATTN_TILE_MAX_D 128

__device__ __forceinline__ float2 rf_h2f2(u32 w) {
    return make_float2(rf_h2f((rf_half)(w & 0xFFFFu)), rf_h2f((rf_half)(w >> 16)));
}

__device__ __forceinline__ float rf_max16(float v) {
#pragma unroll
    for (int m = 8; m > 0; m >>= 1) v = fmaxf(v, rf_shfl_xor(v, m));
    return v;
}

__device__ __forceinline__ float rf_sum16(float v) {
#pragma unroll
    for (int m = 8; m > 0; m >>= 1) v += rf_shfl_xor(v, m);
    return v;
}

extern "C" __global__ void __launch_bounds__(RF_ATTN_TILE_THREADS)
attn_prefill_tiled_f16kv_f32(const float* __restrict__ q, const rf_half* __restrict__ kc,
                             const rf_half* __restrict__ vc, float* __restrict__ out, int n_tokens,
                             int n_heads, int n_kv_heads, int head_dim, const u32* __restrict__ table,
                             int n_blocks, int block_halfs, int bs, int pos0, float scale, int window) {
    const RfKvMap map{table, n_blocks, block_halfs, bs};
    constexpr int DW = RF_ATTN_TILE_MAX_D / 2;  // f16 pairs of a row, at most
    __shared__ float2 s_q[RF_ATTN_TQ][DW];
    __shared__ u32 s_k[RF_ATTN_TK][DW + 1];  // +1: rows on different banks
    __shared__ u32 s_v[RF_ATTN_TK][DW];
    __shared__ float s_p[RF_ATTN_TQ][RF_ATTN_TK + 1];

    const int t0 = blockIdx.x * RF_ATTN_TQ, h = blockIdx.y;
    const int tid = threadIdx.x, r = tid / 16, c = tid % 16;
    const int dw = head_dim / 2;
    const int kvh = h / (n_heads / n_kv_heads);
    const int t = t0 + r;                    // this thread's token
    const bool live = t < n_tokens;
    const int t_last = min(t0 + RF_ATTN_TQ, n_tokens) - 1;
    const int p_t = pos0 + (live ? t : t_last);  // its position (a dead row mirrors the last)
    const int first_t = (window > 0 && p_t + 1 > window) ? p_t + 1 - window : 0;
    // Keys the block needs: from the first token's window start to the last token's position.
    const int p0 = pos0 + t0;
    const int j_lo = ((window > 0 && p0 + 1 > window) ? p0 + 1 - window : 0) / RF_ATTN_TK * RF_ATTN_TK;
    const int j_hi = pos0 + t_last;  // inclusive; every row up to it is written in the cache
    const rf_half* kh = kc + map.head(kvh, head_dim);
    const rf_half* vh = vc + map.head(kvh, head_dim);

    // The block's queries, scaled, as pairs.
    for (int i = tid; i < RF_ATTN_TQ * dw; i += RF_ATTN_TILE_THREADS) {
        const int rr = i / dw, w = i % dw;
        float2 v = make_float2(0.f, 0.f);
        if (t0 + rr < n_tokens) {
            const float* qr = q + ((i64)(t0 + rr) * n_heads + h) * head_dim;
            v = make_float2(qr[2 * w] * scale, qr[2 * w + 1] * scale);
        }
        s_q[rr][w] = v;
    }

    float acc[RF_ATTN_TILE_MAX_D / 16];  // dims 2c + 32i (even) and + 1 (odd)
#pragma unroll
    for (int i = 0; i < RF_ATTN_TILE_MAX_D / 16; ++i) acc[i] = 0.f;
    float m = -RF_INF, l = 0.f;
    const int ni = head_dim / 32;

    for (int kt = j_lo; kt <= j_hi; kt += RF_ATTN_TK) {
        __syncthreads();  // the previous tile's K, V and P are no longer read (and s_q is written)
        for (int i = tid; i < RF_ATTN_TK * dw; i += RF_ATTN_TILE_THREADS) {
            const int jj = i / dw, w = i % dw, j = kt + jj;
            const bool in = j <= j_hi;
            const i64 row = in ? map.row(j, head_dim) : 0;
            s_k[jj][w] = in ? ((const u32*)(kh + row))[w] : 0u;
            s_v[jj][w] = in ? ((const u32*)(vh + row))[w] : 0u;
        }
        __syncthreads();
        float sa = 0.f, sb = 0.f;
        for (int w = 0; w < dw; ++w) {
            const float2 qv = s_q[r][w];
            const float2 ka = rf_h2f2(s_k[c][w]), kb = rf_h2f2(s_k[c + 16][w]);
            sa += qv.x * ka.x + qv.y * ka.y;
            sb += qv.x * kb.x + qv.y * kb.y;
        }
        const int ja = kt + c, jb = kt + c + 16;
        sa = (ja >= first_t && ja <= p_t) ? sa : -RF_INF;
        sb = (jb >= first_t && jb <= p_t) ? sb : -RF_INF;
        const float m_new = fmaxf(m, rf_max16(fmaxf(sa, sb)));
        const float m_use = m_new == -RF_INF ? 0.f : m_new;  // no key yet: keep exp finite
        const float pa = expf(sa - m_use), pb = expf(sb - m_use);
        const float corr = expf(m - m_use);
        l = l * corr + rf_sum16(pa + pb);
        m = m_new;
        s_p[r][c] = pa;
        s_p[r][c + 16] = pb;
#pragma unroll
        for (int i = 0; i < RF_ATTN_TILE_MAX_D / 16; ++i) acc[i] *= corr;
        __syncthreads();
        for (int jj = 0; jj < RF_ATTN_TK; ++jj) {
            const float p = s_p[r][jj];
#pragma unroll
            for (int i = 0; i < RF_ATTN_TILE_MAX_D / 32; ++i) {
                if (i < ni) {
                    const float2 v = rf_h2f2(s_v[jj][c + 16 * i]);
                    acc[2 * i] += p * v.x;
                    acc[2 * i + 1] += p * v.y;
                }
            }
        }
    }
    if (!live) return;
    float* o = out + ((i64)t * n_heads + h) * head_dim;
    const float inv = 1.f / l;
#pragma unroll
    for (int i = 0; i < RF_ATTN_TILE_MAX_D / 32; ++i) {
        if (i < ni) {
            o[2 * c + 32 * i] = acc[2 * i] * inv;
            o[2 * c + 32 * i + 1] = acc[2 * i + 1] * inv;
        }
    }
}
