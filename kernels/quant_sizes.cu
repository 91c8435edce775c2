// quant_sizes.cu — writes the device compiler's sizeof() of every block struct, so a test can
// compare the device layout with GgmlType::block_bytes. Order matches RF_BLOCK_SIZE_ORDER in
// src/backend/kernels.rs. Launch: one thread.
#include "quant_blocks.cuh"

extern "C" __global__ void quant_block_sizes(u32* out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    out[0] = sizeof(float);
    out[1] = sizeof(rf_half);
    out[2] = sizeof(block_q4_0);
    out[3] = sizeof(block_q4_1);
    out[4] = sizeof(block_q5_0);
    out[5] = sizeof(block_q5_1);
    out[6] = sizeof(block_q8_0);
    out[7] = sizeof(block_q8_1);
    out[8] = sizeof(block_q4_K);
    out[9] = sizeof(block_q5_K);
    out[10] = sizeof(block_q6_K);
}
