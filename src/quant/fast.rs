//! Fast single-thread dequantization: SIMD kernels where the CPU has them (checked at run time),
//! otherwise the scalar reference. Lengths are checked by the caller (`super::dequantize`).

use super::blocks::*;
use super::{reference, GgmlType};

#[inline(always)]
fn per_block<B: Block>(src: &[u8], dst: &mut [f32], f: impl Fn(&B, &mut [f32])) {
    if let Some(blocks) = as_blocks::<B>(src) {
        for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(B::ELEMS)) {
            f(b, y);
        }
    }
}

/// Dequantizes `dst.len()` elements; `src` has exactly the matching bytes.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::has_avx2() {
        // SAFETY: the CPU has AVX2/FMA/F16C (checked just above); the caller checked that `src`
        // holds exactly the blocks for `dst`, and `as_blocks` re-checks whole blocks.
        unsafe {
            use super::simd;
            match ty {
                GgmlType::F16 => return simd::dequant_f16(src, dst),
                GgmlType::Q4_0 => return simd::dequant_q4_0(as_blocks(src).unwrap_or(&[]), dst),
                GgmlType::Q4_1 => return simd::dequant_q4_1(as_blocks(src).unwrap_or(&[]), dst),
                GgmlType::Q8_0 => return simd::dequant_q8_0(as_blocks(src).unwrap_or(&[]), dst),
                GgmlType::Q4_K => return simd::dequant_q4_k(as_blocks(src).unwrap_or(&[]), dst),
                GgmlType::Q6_K => return simd::dequant_q6_k(as_blocks(src).unwrap_or(&[]), dst),
                _ => {}
            }
        }
    }
    match ty {
        GgmlType::F32 => {
            for (c, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
                *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (c, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *y = f16([c[0], c[1]]);
            }
        }
        GgmlType::BF16 => {
            for (c, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *y = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_0 => per_block(src, dst, reference::q4_0),
        GgmlType::Q4_1 => per_block(src, dst, reference::q4_1),
        GgmlType::Q5_0 => per_block(src, dst, reference::q5_0),
        GgmlType::Q5_1 => per_block(src, dst, reference::q5_1),
        GgmlType::Q8_0 => per_block(src, dst, reference::q8_0),
        GgmlType::Q8_1 => per_block(src, dst, reference::q8_1),
        GgmlType::Q2_K => per_block(src, dst, reference::q2_k),
        GgmlType::Q3_K => per_block(src, dst, reference::q3_k),
        GgmlType::Q4_K => per_block(src, dst, reference::q4_k),
        GgmlType::Q5_K => per_block(src, dst, reference::q5_k),
        GgmlType::Q6_K => per_block(src, dst, reference::q6_k),
        GgmlType::Q8_K => per_block(src, dst, reference::q8_k),
        GgmlType::IQ4_NL => per_block(src, dst, reference::iq4_nl),
        // Unsupported types are rejected by the caller's length check.
        _ => {}
    }
}
