// get_rows.cu — embedding lookup: gather rows ids[i] of a quantized table into f32.
//   table: [n_rows_table, ncols] blocks, ids: [n_ids] i32, out: [n_ids, ncols] f32.
// Launch: grid (n_ids, ceil(ncols / blockDim.x)), any 1-D block. Ids out of range write zeros
// and set *bad to 1 (the host checks it; a kernel cannot return an error).
#include "quant_blocks.cuh"

template <typename T>
__device__ __forceinline__ void rf_get_rows(const void* __restrict__ table, const i32* __restrict__ ids,
                                            float* __restrict__ out, int ncols, int n_table_rows,
                                            i32* __restrict__ bad) {
    const int r = blockIdx.x;
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= ncols) return;
    const i32 id = ids[r];
    float* o = out + (i64)r * ncols;
    if (id < 0 || id >= n_table_rows) {
        o[c] = 0.f;
        if (c == 0) *bad = 1;
        return;
    }
    const int nb = ncols / T::QK;
    const typename T::block* row = (const typename T::block*)table + (i64)id * nb;
    o[c] = T::get(row + c / T::QK, c % T::QK);
}

#define RF_GET_ROWS(name, T)                                                                        \
    extern "C" __global__ void name(const void* __restrict__ table, const i32* __restrict__ ids,   \
                                    float* __restrict__ out, int ncols, int n_table_rows,           \
                                    i32* __restrict__ bad) {                                        \
        rf_get_rows<T>(table, ids, out, ncols, n_table_rows, bad);                                  \
    }

RF_GET_ROWS(get_rows_f32_f32, QF32)
RF_GET_ROWS(get_rows_f16_f32, QF16)
RF_GET_ROWS(get_rows_q4_0_f32, QQ4_0)
RF_GET_ROWS(get_rows_q4_1_f32, QQ4_1)
RF_GET_ROWS(get_rows_q5_0_f32, QQ5_0)
RF_GET_ROWS(get_rows_q5_1_f32, QQ5_1)
RF_GET_ROWS(get_rows_q8_0_f32, QQ8_0)
RF_GET_ROWS(get_rows_q4_k_f32, QQ4_K)
RF_GET_ROWS(get_rows_q5_k_f32, QQ5_K)
RF_GET_ROWS(get_rows_q6_k_f32, QQ6_K)
