//! Fast single-thread dequantization: SIMD kernels where the CPU has them (checked at run time),
//! otherwise the scalar reference. Lengths are checked by the caller (`super::dequantize`).

use super::blocks::*;
use super::{GgmlType, QuantError};

/// Dequantizes `dst.len()` elements; `src` has exactly the matching bytes.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        // SAFETY: the CPU has AVX2/FMA/F16C (checked just above); the caller checked that `src`
        // holds exactly the blocks for `dst`, and `as_blocks` re-checks whole blocks.
        unsafe {
            use super::simd;
            match ty {
                GgmlType::F16 => simd::dequant_f16(src, dst),
                GgmlType::Q4_0 => simd::dequant_q4_0(as_blocks(src).unwrap_or(&[]), dst),
                GgmlType::Q4_1 => simd::dequant_q4_1(as_blocks(src).unwrap_or(&[]), dst),
                GgmlType::Q8_0 => simd::dequant_q8_0(as_blocks(src).unwrap_or(&[]), dst),
                GgmlType::Q4_K => simd::dequant_q4_k(as_blocks(src).unwrap_or(&[]), dst),
                GgmlType::Q6_K => simd::dequant_q6_k(as_blocks(src).unwrap_or(&[]), dst),
                _ => return super::dequantize_scalar(ty, src, dst),
            }
        }
        return Ok(());
    }
    super::dequantize_scalar(ty, src, dst)
}
