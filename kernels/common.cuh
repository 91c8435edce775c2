// common.cuh — reductions and small helpers shared by every kernel file.
#pragma once
#include "vendor.cuh"

// Largest block the kernels are launched with; shared scratch arrays are sized by it.
#define RF_MAX_THREADS 1024
#define RF_MAX_WARPS (RF_MAX_THREADS / RF_WARP)

__device__ __forceinline__ float rf_warp_sum(float v) {
#pragma unroll
    for (int m = RF_WARP / 2; m > 0; m >>= 1) v += rf_shfl_xor(v, m);
    return v;
}

__device__ __forceinline__ float rf_warp_max(float v) {
#pragma unroll
    for (int m = RF_WARP / 2; m > 0; m >>= 1) v = fmaxf(v, rf_shfl_xor(v, m));
    return v;
}

// Sum over the whole (1-D) block; every thread gets the result. `scratch` holds RF_MAX_WARPS.
__device__ __forceinline__ float rf_block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % RF_WARP;
    const int warp = threadIdx.x / RF_WARP;
    const int nwarps = (blockDim.x + RF_WARP - 1) / RF_WARP;
    v = rf_warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return rf_warp_sum(v);
}

__device__ __forceinline__ float rf_block_max(float v, float* scratch) {
    const int lane = threadIdx.x % RF_WARP;
    const int warp = threadIdx.x / RF_WARP;
    const int nwarps = (blockDim.x + RF_WARP - 1) / RF_WARP;
    v = rf_warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -RF_INF;
    return rf_warp_max(v);
}

// Unaligned-safe 32-bit load from a 2-byte aligned address (GGUF blocks of 18, 22, 34 or
// 210 bytes keep only 2-byte alignment inside a row).
__device__ __forceinline__ u32 rf_load_u32_a2(const u8* p) {
    const u16* q = (const u16*)p;
    return (u32)q[0] | ((u32)q[1] << 16);
}

// 32-bit load from a 4-byte aligned address.
__device__ __forceinline__ u32 rf_load_u32_a4(const u8* p) { return *(const u32*)p; }

// Where a KV cache's rows are (attention.cu, elementwise.cu). A sequence's cache is blocks of
// `bs` positions; in a block, each layer has a K and a V plane of [n_kv_heads, bs, head_dim]
// f16, and the next block of the pool starts `block_halfs` halfs further (model/paged.rs's
// layout, on the device). `table` lists the sequence's blocks in position order (ids clamped
// below n_blocks, so a wrong table reads the wrong rows of the pool, never past it); a null
// table is one contiguous block of `bs` (the capacity) positions. The kernels take a plane's
// address in block 0 and add the head (`head`) and the row (`row`).
struct RfKvMap {
    const u32* table;
    int n_blocks;
    int block_halfs;
    int bs;
    __device__ __forceinline__ i64 head(int kvh, int head_dim) const { return (i64)kvh * bs * head_dim; }
    __device__ __forceinline__ i64 row(int j, int head_dim) const {
        const int b = j / bs;
        const i64 blk = table != nullptr ? (i64)min(table[b], (u32)(n_blocks - 1)) : 0;
        return blk * block_halfs + (i64)(j - b * bs) * head_dim;
    }
};

// One decoding token of each of several sequences (a batched decode step; the host writes the
// table, `ops::seq_kv_entry`): entry i is the sequence whose row of the step is `row`, its new
// token at position `pos`, its block table (RfKvMap::table) at device address `table`.
struct RfSeqKv {
    u64 table;
    int pos;
    int row;
};
