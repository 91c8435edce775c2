// dequant.cu — dequantize a tile of weight rows to f16 (the A operand of cuBLAS GEMMs in
// prefill). w: [nrows, ncols] blocks; the tile is rows [row0, row0 + tile_rows); out:
// [tile_rows, ncols] f16 (raw bits). Launch: grid (tile_rows, ceil(ncols / blockDim.x)).
#include "quant_blocks.cuh"

template <typename T>
__device__ __forceinline__ void rf_dequant_f16(const void* __restrict__ w, rf_half* __restrict__ out,
                                               int ncols, int row0, int tile_rows) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (r >= tile_rows || c >= ncols) return;
    const int nb = ncols / T::QK;
    const typename T::block* row = (const typename T::block*)w + (i64)(row0 + r) * nb;
    out[(i64)r * ncols + c] = rf_f2h(T::get(row + c / T::QK, c % T::QK));
}

#define RF_DEQUANT(name, T)                                                                   \
    extern "C" __global__ void name(const void* __restrict__ w, rf_half* __restrict__ out,   \
                                    int ncols, int row0, int tile_rows) {                     \
        rf_dequant_f16<T>(w, out, ncols, row0, tile_rows);                                    \
    }

RF_DEQUANT(dequantize_f32_f16, QF32)
RF_DEQUANT(dequantize_f16_f16, QF16)
RF_DEQUANT(dequantize_q4_0_f16, QQ4_0)
RF_DEQUANT(dequantize_q4_1_f16, QQ4_1)
RF_DEQUANT(dequantize_q5_0_f16, QQ5_0)
RF_DEQUANT(dequantize_q5_1_f16, QQ5_1)
RF_DEQUANT(dequantize_q8_0_f16, QQ8_0)
RF_DEQUANT(dequantize_q4_k_f16, QQ4_K)
RF_DEQUANT(dequantize_q5_k_f16, QQ5_K)
RF_DEQUANT(dequantize_q6_k_f16, QQ6_K)
