// q8a.cuh — the 8-bit activation format of mmvq_q8.cu (see there): one warp-group of 32 lanes
// quantizes one 32-element block. Shared by the quantize kernel and the kernels that fuse it
// (RMSNorm, the gated activations), so every producer writes the same bits.
#pragma once
#include "common.cuh"

// Lanes 0..31 of a 32-lane group (all of them active; on wave64 the group is half a wavefront:
// the xor masks below 32 stay inside it) hold v = element `lane` of block `blk`; writes the
// block's quants and its (d, quant sum). `live`: whether the block exists (dead lanes still
// take part in the shuffles).
__device__ __forceinline__ void rf_q8a_store(float v, bool live, i64 blk, int lane, i8* __restrict__ qs,
                                             float2* __restrict__ meta) {
    float amax = fabsf(v);
    int finite = fabsf(v) <= 3.402823466e38f ? 1 : 0;  // false for NaN and Inf
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) {
        amax = fmaxf(amax, rf_shfl_xor(amax, m));
        finite &= rf_shfl_xor_int(finite, m);
    }
    // A NaN/Inf activation makes the scale NaN, so the product is NaN as in the f32 path.
    const float d = finite ? amax / 127.f : __int_as_float(0x7fc00000);
    const float id = (finite && d != 0.f) ? 1.f / d : 0.f;
    const int q = (int)fminf(fmaxf(roundf(v * id), -127.f), 127.f);
    float sum = (float)q;
#pragma unroll
    for (int m = 16; m > 0; m >>= 1) sum += rf_shfl_xor(sum, m);
    if (!live) return;
    qs[blk * 32 + lane] = (i8)q;
    if (lane == 0) {
        float2 md;
        md.x = d;
        md.y = sum;
        meta[blk] = md;
    }
}
