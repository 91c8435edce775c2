//! x86-64 AVX2/FMA/F16C kernels. Callers check the CPU features at run time
//! (`has_avx2()`) before calling anything here; every function is `unsafe` for that reason.
//!
//! Dequantizers compute exactly the scalar reference's products (multiply then add, never a fused
//! multiply-add), so they are bit-exact with `reference`. The integer dot kernels of the
//! quantized types are in `simd_tile`.

use super::blocks::*;
use std::arch::x86_64::*;

/// Whether the AVX2 kernels may run on this CPU (cached by the std macro).
pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// f16 -> f32 with the F16C instruction (exact, like `blocks::f16`, without half's per-call
/// run-time feature check, which costs more than the conversion in these loops).
#[inline(always)]
unsafe fn h2f(b: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(b) as i32),
    ))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// f32 dot product with FMA, 4 accumulators of 8 lanes, fixed order.
///
/// # Safety
/// AVX2 and FMA must be available; `a.len() == b.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acck) in acc.iter_mut().enumerate() {
            // SAFETY: i + 8k + 8 <= n, both slices have n readable floats.
            let x = _mm256_loadu_ps(a.as_ptr().add(i + 8 * k));
            let y = _mm256_loadu_ps(b.as_ptr().add(i + 8 * k));
            *acck = _mm256_fmadd_ps(x, y, *acck);
        }
        i += 32;
    }
    let mut s = hsum(_mm256_add_ps(
        _mm256_add_ps(acc[0], acc[1]),
        _mm256_add_ps(acc[2], acc[3]),
    ));
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

#[inline(always)]
unsafe fn store8(y: &mut [f32], v: __m256) {
    // SAFETY: callers pass `y` with at least 8 floats (a block's slice).
    _mm256_storeu_ps(y.as_mut_ptr(), v);
}

/// 16 bytes of signed quants -> two vectors of 8 f32 (elements 0..8, 8..16).
#[inline(always)]
unsafe fn i8x16_to_f32(v: __m128i) -> (__m256, __m256) {
    (
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8))),
    )
}

/// Dequantizes Q4_0/Q4_1 blocks: `d * q (+ m)` per element, bit-exact with the reference
/// (`offset` is -8 for Q4_0 and 0 for Q4_1; `m` is None for Q4_0).
#[inline(always)]
unsafe fn dequant_q4(qs: &[u8; 16], d: f32, m: Option<f32>, offset: i8, y: &mut [f32]) {
    // SAFETY: `qs` is 16 readable bytes.
    let raw = _mm_loadu_si128(qs.as_ptr().cast());
    let mask = _mm_set1_epi8(0x0F);
    let off = _mm_set1_epi8(offset);
    let lo = _mm_add_epi8(_mm_and_si128(raw, mask), off);
    let hi = _mm_add_epi8(_mm_and_si128(_mm_srli_epi16(raw, 4), mask), off);
    let dv = _mm256_set1_ps(d);
    for (k, v) in [lo, hi].into_iter().enumerate() {
        let (a, b) = i8x16_to_f32(v);
        let (mut a, mut b) = (_mm256_mul_ps(dv, a), _mm256_mul_ps(dv, b));
        if let Some(m) = m {
            a = _mm256_add_ps(a, _mm256_set1_ps(m));
            b = _mm256_add_ps(b, _mm256_set1_ps(m));
        }
        store8(&mut y[16 * k..], a);
        store8(&mut y[16 * k + 8..], b);
    }
}

/// # Safety
/// AVX2/FMA/F16C available; `y.len() == 32 * w.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_q4_0(w: &[BlockQ4_0], y: &mut [f32]) {
    for (b, y) in w.iter().zip(y.chunks_exact_mut(32)) {
        dequant_q4(&b.qs, h2f(b.d), None, -8, y);
    }
}

/// # Safety
/// As `dequant_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_q4_1(w: &[BlockQ4_1], y: &mut [f32]) {
    for (b, y) in w.iter().zip(y.chunks_exact_mut(32)) {
        dequant_q4(&b.qs, h2f(b.d), Some(h2f(b.m)), 0, y);
    }
}

/// # Safety
/// As `dequant_q4_0`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_q8_0(w: &[BlockQ8_0], y: &mut [f32]) {
    for (b, y) in w.iter().zip(y.chunks_exact_mut(32)) {
        // The reference computes q * d; multiplication commutes exactly in IEEE.
        let dv = _mm256_set1_ps(h2f(b.d));
        for k in 0..2 {
            // SAFETY: 16 of the block's 32 quant bytes.
            let v = _mm_loadu_si128(b.qs.as_ptr().add(16 * k).cast());
            let (a, c) = i8x16_to_f32(v);
            store8(&mut y[16 * k..], _mm256_mul_ps(a, dv));
            store8(&mut y[16 * k + 8..], _mm256_mul_ps(c, dv));
        }
    }
}

/// F16 -> f32 with F16C (exact, as the reference).
///
/// # Safety
/// F16C/AVX available; `src.len() == 2 * y.len()`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn dequant_f16(src: &[u8], y: &mut [f32]) {
    let n = y.len().min(src.len() / 2);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: 16 bytes at 2i are in `src` (2(i + 8) <= src.len()); 8 floats at i are in `y`.
        let h = _mm_loadu_si128(src.as_ptr().add(2 * i).cast());
        _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    while i < n {
        y[i] = f16([src[2 * i], src[2 * i + 1]]);
        i += 1;
    }
}

/// 32 bytes -> four vectors of 8 f32 (bytes 0..8, 8..16, 16..24, 24..32), signed or unsigned.
#[inline(always)]
unsafe fn bytes_to_f32<const SIGNED: bool>(v: __m256i) -> [__m256; 4] {
    let lo = _mm256_castsi256_si128(v);
    let hi = _mm256_extracti128_si256(v, 1);
    [
        cvt8::<SIGNED>(lo),
        cvt8::<SIGNED>(_mm_srli_si128(lo, 8)),
        cvt8::<SIGNED>(hi),
        cvt8::<SIGNED>(_mm_srli_si128(hi, 8)),
    ]
}

#[inline(always)]
unsafe fn cvt8<const SIGNED: bool>(x: __m128i) -> __m256 {
    if SIGNED {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(x))
    } else {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(x))
    }
}

/// Bits `s..s+2` of each byte of `qh`, moved to bits 4..6 (Q6_K's high quant bits).
#[inline(always)]
unsafe fn q6_high(qh: __m256i, s: i32) -> __m256i {
    let h = match s {
        0 => qh,
        2 => _mm256_srli_epi16(qh, 2),
        4 => _mm256_srli_epi16(qh, 4),
        _ => _mm256_srli_epi16(qh, 6),
    };
    _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(3)), 4)
}

/// Q4_K: per 32-element sub-block `d1 * q - m1` with the reference's scalar d1, m1 (bit-exact).
///
/// # Safety
/// As `dequant_q4_0`, with `y.len() == 256 * w.len()`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_q4_k(w: &[BlockQ4K], y: &mut [f32]) {
    let mask = _mm256_set1_epi8(0x0F);
    for (b, y) in w.iter().zip(y.chunks_exact_mut(256)) {
        let (d, dmin) = (h2f(b.d), h2f(b.dmin));
        for j in 0..4 {
            // SAFETY: 32 of the block's 128 quant bytes.
            let v = _mm256_loadu_si256(b.qs.as_ptr().add(32 * j).cast());
            let halves = [
                _mm256_and_si256(v, mask),
                _mm256_and_si256(_mm256_srli_epi16(v, 4), mask),
            ];
            for (h, q) in halves.into_iter().enumerate() {
                let (sc, m) = scale_min_k4(2 * j + h, &b.scales);
                let dv = _mm256_set1_ps(d * sc as f32);
                let mv = _mm256_set1_ps(dmin * m as f32);
                for (k, f) in bytes_to_f32::<false>(q).into_iter().enumerate() {
                    store8(
                        &mut y[64 * j + 32 * h + 8 * k..],
                        _mm256_sub_ps(_mm256_mul_ps(dv, f), mv),
                    );
                }
            }
        }
    }
}

/// Q6_K: `(d * sc) * (q - 32)` per 16-element group, bit-exact with the reference.
///
/// # Safety
/// As `dequant_q4_k`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequant_q6_k(w: &[BlockQ6K], y: &mut [f32]) {
    let m4 = _mm256_set1_epi8(0x0F);
    let off = _mm256_set1_epi8(32);
    for (b, y) in w.iter().zip(y.chunks_exact_mut(256)) {
        let d = h2f(b.d);
        for n in 0..2 {
            // SAFETY: 32-byte loads inside ql (128 bytes) and qh (64 bytes).
            let ql0 = _mm256_loadu_si256(b.ql.as_ptr().add(64 * n).cast());
            let ql1 = _mm256_loadu_si256(b.ql.as_ptr().add(64 * n + 32).cast());
            let qh = _mm256_loadu_si256(b.qh.as_ptr().add(32 * n).cast());
            let qs = [
                _mm256_or_si256(_mm256_and_si256(ql0, m4), q6_high(qh, 0)),
                _mm256_or_si256(_mm256_and_si256(ql1, m4), q6_high(qh, 2)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    q6_high(qh, 4),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    q6_high(qh, 6),
                ),
            ];
            for (k, q) in qs.into_iter().enumerate() {
                let f = bytes_to_f32::<true>(_mm256_sub_epi8(q, off));
                for (g, fv) in f.into_iter().enumerate() {
                    let sc = b.scales[8 * n + 2 * k + g / 2] as i8;
                    let dv = _mm256_set1_ps(d * sc as f32);
                    store8(&mut y[128 * n + 32 * k + 8 * g..], _mm256_mul_ps(dv, fv));
                }
            }
        }
    }
}
