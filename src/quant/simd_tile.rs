//! Register-tiled x86-64 kernels for the weight types the common GGUF models ship their
//! projections in (Q4_0, Q4_1, Q8_0): R weight rows times T activation rows per call.
//!
//! Why tiles: a weight block is decoded (nibbles, f16 scales) once and used for T activation
//! rows, and an activation block is loaded once for R weight rows; prefill (T = 4) therefore does
//! a quarter of the decoding work of a row-at-a-time kernel, and decode (T = 1) shares the
//! activation loads and scale broadcasts across 4 rows.
//!
//! Two instruction sets, one body: AVX2 (`vpmaddubsw` + `vpmaddwd` + add), and, with the cargo
//! feature `cpu-avx512`, AVX-512 VNNI (`vpdpbusd`: u8 x i8 products summed into i32 lanes in one
//! instruction, and 32 vector registers, so a 4 x 4 tile's 16 accumulators do not spill). The
//! feature needs Rust 1.89 (stable AVX-512 intrinsics and target features), newer than the
//! crate's minimum (1.85), hence opt-in; it makes prefill ~25% faster on Zen 4 (see
//! docs/PERFORMANCE.md). (Emitting `vpdpbusd` from inline assembly under 1.85 was tried: with 16
//! registers and fixed operand registers it was no faster than AVX2.)
//!
//! Determinism: output (r, t) is computed by exactly the same sequence of operations whatever R
//! and T are (accumulators are per (r, t), the min term of row r sits in lane r of a vector whose
//! lanes never mix, and the final reduction is fixed), so a 4 x 4 tile, a 4 x 1 tile and a 1 x 1
//! tile give bit-identical results; `matmul` row b therefore equals `matvec(X[b])`, independent of
//! how rows are split across threads. Both ISAs compute the same i32 lanes for Q4_0 and Q4_1
//! (bit-identical results); for Q8_0 the VNNI lanes carry an offset that cancels only in their
//! sum, so the two agree to float rounding.

use super::act::ActQ8;
use super::blocks::*;
use std::arch::x86_64::*;

/// Whether the VNNI variants may run: built with `cpu-avx512`, and AVX-512 F/VL/BW/VNNI on top
/// of the AVX2 set.
pub fn has_vnni() -> bool {
    cfg!(feature = "cpu-avx512")
        && super::simd::has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Which integer-dot instructions a tile kernel uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx2,
    Vnni,
}

impl Isa {
    /// The best the CPU supports under the process's cap ([`super::cpu_isa`]), or None
    /// without AVX2. The hardware is probed once per process; the cap is read at each call.
    pub fn detect() -> Option<Isa> {
        static HW: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        let hw = *HW.get_or_init(|| {
            if has_vnni() {
                Some(Isa::Vnni)
            } else if super::simd::has_avx2() {
                Some(Isa::Avx2)
            } else {
                None
            }
        });
        Self::capped(hw, super::cpu_isa())
    }

    /// `hw`, the best the CPU has, under `cap` (VNNI implies AVX2: `has_vnni` checks both).
    fn capped(hw: Option<Isa>, cap: super::CpuIsa) -> Option<Isa> {
        match (hw, cap) {
            (Some(Isa::Vnni), super::CpuIsa::Avx2) => Some(Isa::Avx2),
            (hw, _) => hw,
        }
    }
}

#[inline(always)]
unsafe fn h2f(b: [u8; 2]) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(
        _mm_cvtsi32_si128(u16::from_le_bytes(b) as i32),
    ))
}

/// Four f16 values -> four f32 lanes (missing rows are 0).
#[inline(always)]
unsafe fn h2f4(v: [u16; 4]) -> __m128 {
    _mm_cvtph_ps(_mm_set_epi16(
        0,
        0,
        0,
        0,
        v[3] as i16,
        v[2] as i16,
        v[1] as i16,
        v[0] as i16,
    ))
}

/// Fixed horizontal sum of 8 lanes: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).
#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn lane(v: __m128, r: usize) -> f32 {
    let mut a = [0f32; 4];
    _mm_storeu_ps(a.as_mut_ptr(), v);
    a[r]
}

/// Bytes ahead of the current weight position that a matvec tile prefetches: the rows of one
/// tile are short (a 576-wide Q4_1 row is 360 bytes) and four of them are read side by side,
/// which the hardware stream prefetcher does not follow well; decode streams every weight from
/// DRAM once per token, so the loads must be in flight well before use.
const PREFETCH_AHEAD: usize = 4096;

/// Prefetches the weight bytes that block `i` of the tile `PREFETCH_AHEAD` bytes further on
/// will read, for tiles whose R rows are contiguous (`base` is row 0; `bpb` bytes per block per
/// row). Only a hint: an address past the matrix is never dereferenced.
#[inline(always)]
unsafe fn prefetch_ahead<const R: usize>(base: *const u8, i: usize, bpb: usize) {
    let p = base.wrapping_add(PREFETCH_AHEAD + i * R * bpb);
    let mut off = 0;
    while off < R * bpb + 64 {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast());
        off += 64;
    }
}

/// 16 packed bytes -> 32 nibbles (low nibbles are elements 0..16, high nibbles 16..32).
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY (of the load): `qs` is 16 readable bytes; loadu has no alignment requirement.
    let raw = _mm_loadu_si128(qs.as_ptr().cast());
    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

#[inline(always)]
unsafe fn load_act(a: &ActQ8, i: usize) -> __m256i {
    let y = &a.qs[32 * i..32 * i + 32];
    // SAFETY: `y` is exactly 32 readable bytes.
    _mm256_loadu_si256(y.as_ptr().cast())
}

/// `init[t] + sum of u8(q) * i8(y[t])` over groups of 4 bytes, as 8 i32 lanes, for each t. On
/// the AVX2 path the pairs go through i16 (`maddubs` saturates), so `q * y` pairs must stay below
/// 2^15: true for q < 128 (4-bit quants, |q| of the sign trick) and |y| <= 127.
#[inline(always)]
unsafe fn dot_u8_i8<const T: usize, const VNNI: bool>(
    init: [__m256i; T],
    q: __m256i,
    y: &[__m256i; T],
) -> [__m256i; T] {
    // VNNI = true is only instantiated by the `cpu-avx512` entry points.
    #[cfg(feature = "cpu-avx512")]
    if VNNI {
        return init_dpbusd(init, q, y);
    }
    let ones = _mm256_set1_epi16(1);
    let mut out = init;
    for t in 0..T {
        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y[t]), ones);
        out[t] = _mm256_add_epi32(init[t], p);
    }
    out
}

/// `vpdpbusd` per activation vector.
#[cfg(feature = "cpu-avx512")]
#[allow(clippy::incompatible_msrv)] // the feature documents its Rust 1.89 requirement
#[inline(always)]
unsafe fn init_dpbusd<const T: usize>(
    init: [__m256i; T],
    q: __m256i,
    y: &[__m256i; T],
) -> [__m256i; T] {
    std::array::from_fn(|t| _mm256_dpbusd_epi32(init[t], q, y[t]))
}

/// Sums and stores an R x T tile: `out[r][t] = hsum(acc[r][t]) + lane r of min[t]`.
#[inline(always)]
unsafe fn finish<const R: usize, const T: usize>(
    acc: &[[__m256; T]; R],
    min: &[__m128; T],
) -> [[f32; T]; R] {
    let mut out = [[0f32; T]; R];
    for r in 0..R {
        for t in 0..T {
            out[r][t] = hsum(acc[r][t]) + lane(min[t], r);
        }
    }
    out
}

/// Q4_1 rows x activation rows. Per block: `d_x * (d_w * sum(q*y) + m_w * sum(y))`. The first
/// term accumulates in 8 float lanes per (r, t); the second, `m_w * (d_x * sum(y))`, in lane r
/// of one 4-lane vector per t (the four rows' mins are converted together).
#[inline(always)]
unsafe fn q4_1_body<const R: usize, const T: usize, const VNNI: bool>(
    w: [&[BlockQ4_1]; R],
    acts: [&ActQ8; T],
) -> [[f32; T]; R] {
    const { assert!(R >= 1 && R <= 4 && T >= 1) };
    let nb = w[0].len();
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut min = [_mm_setzero_ps(); T];
    let zero = _mm256_setzero_si256();
    for i in 0..nb {
        if T == 1 {
            prefetch_ahead::<R>(w[0].as_ptr().cast(), i, 20);
        }
        let mut q = [zero; R];
        let mut dw = [_mm256_setzero_ps(); R];
        let mut mh = [0u16; 4];
        for r in 0..R {
            let blk = &w[r][i];
            q[r] = nibbles(&blk.qs);
            dw[r] = _mm256_set1_ps(h2f(blk.d));
            mh[r] = u16::from_le_bytes(blk.m);
        }
        let m4 = h2f4(mh);
        let y: [__m256i; T] = std::array::from_fn(|t| load_act(acts[t], i));
        let dx: [__m256; T] = std::array::from_fn(|t| _mm256_set1_ps(acts[t].blk[i].d));
        for t in 0..T {
            min[t] = _mm_fmadd_ps(m4, _mm_set1_ps(acts[t].blk[i].ds), min[t]);
        }
        for r in 0..R {
            let p = dot_u8_i8::<T, VNNI>([zero; T], q[r], &y);
            for t in 0..T {
                let pf = _mm256_cvtepi32_ps(p[t]);
                acc[r][t] = _mm256_fmadd_ps(pf, _mm256_mul_ps(dw[r], dx[t]), acc[r][t]);
            }
        }
    }
    finish(&acc, &min)
}

/// Q4_0 rows x activation rows. Per block: `d_w * d_x * (sum(q*y) - 8 * sum(y))`; the
/// `-8 * sum(y)` is spread over the 8 integer lanes (`-sum(y)` each) as the accumulator's
/// initial value, so it costs nothing per (r, t).
#[inline(always)]
unsafe fn q4_0_body<const R: usize, const T: usize, const VNNI: bool>(
    w: [&[BlockQ4_0]; R],
    acts: [&ActQ8; T],
) -> [[f32; T]; R] {
    const { assert!(R >= 1 && R <= 4 && T >= 1) };
    let nb = w[0].len();
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let zero = _mm256_setzero_si256();
    for i in 0..nb {
        if T == 1 {
            prefetch_ahead::<R>(w[0].as_ptr().cast(), i, 18);
        }
        let mut q = [zero; R];
        let mut dw = [_mm256_setzero_ps(); R];
        for r in 0..R {
            let blk = &w[r][i];
            q[r] = nibbles(&blk.qs);
            dw[r] = _mm256_set1_ps(h2f(blk.d));
        }
        let y: [__m256i; T] = std::array::from_fn(|t| load_act(acts[t], i));
        let dx: [__m256; T] = std::array::from_fn(|t| _mm256_set1_ps(acts[t].blk[i].d));
        let init: [__m256i; T] = std::array::from_fn(|t| _mm256_set1_epi32(-acts[t].blk[i].isum));
        for r in 0..R {
            let p = dot_u8_i8::<T, VNNI>(init, q[r], &y);
            for t in 0..T {
                let pf = _mm256_cvtepi32_ps(p[t]);
                acc[r][t] = _mm256_fmadd_ps(pf, _mm256_mul_ps(dw[r], dx[t]), acc[r][t]);
            }
        }
    }
    finish(&acc, &[_mm_setzero_ps(); T])
}

/// Q8_0 rows x activation rows: signed x signed. VNNI: the weights biased to unsigned
/// (`q + 128`, an xor) and `-128 * sum(y)` spread over the 8 lanes (`-16 * sum(y)` each) as the
/// accumulator's initial value. AVX2: the sign trick (|q| times y with q's sign), as ggml.
#[inline(always)]
unsafe fn q8_0_body<const R: usize, const T: usize, const VNNI: bool>(
    w: [&[BlockQ8_0]; R],
    acts: [&ActQ8; T],
) -> [[f32; T]; R] {
    const { assert!(R >= 1 && R <= 4 && T >= 1) };
    let nb = w[0].len();
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let zero = _mm256_setzero_si256();
    let bias = _mm256_set1_epi8(-128);
    for i in 0..nb {
        if T == 1 {
            prefetch_ahead::<R>(w[0].as_ptr().cast(), i, 34);
        }
        let mut q = [zero; R];
        let mut dw = [_mm256_setzero_ps(); R];
        for r in 0..R {
            let blk = &w[r][i];
            // SAFETY: `blk.qs` is 32 readable bytes.
            q[r] = _mm256_loadu_si256(blk.qs.as_ptr().cast());
            dw[r] = _mm256_set1_ps(h2f(blk.d));
        }
        let qu = if VNNI {
            q.map(|v| _mm256_xor_si256(v, bias))
        } else {
            q.map(|v| _mm256_sign_epi8(v, v))
        };
        let y: [__m256i; T] = std::array::from_fn(|t| load_act(acts[t], i));
        let dx: [__m256; T] = std::array::from_fn(|t| _mm256_set1_ps(acts[t].blk[i].d));
        let init: [__m256i; T] = std::array::from_fn(|t| {
            if VNNI {
                _mm256_set1_epi32(-16 * acts[t].blk[i].isum)
            } else {
                zero
            }
        });
        for r in 0..R {
            let p = if VNNI {
                dot_u8_i8::<T, VNNI>(init, qu[r], &y)
            } else {
                dot_u8_i8::<T, VNNI>(init, qu[r], &y.map(|v| _mm256_sign_epi8(v, q[r])))
            };
            for t in 0..T {
                let pf = _mm256_cvtepi32_ps(p[t]);
                acc[r][t] = _mm256_fmadd_ps(pf, _mm256_mul_ps(dw[r], dx[t]), acc[r][t]);
            }
        }
    }
    finish(&acc, &[_mm_setzero_ps(); T])
}

/// Runs a tile body over `out.len()` contiguous rows of `nb` blocks each: 4-row tiles, then
/// single rows. Bit-identical per (row, activation row) to any other split (see module docs).
#[inline(always)]
unsafe fn over_rows<B, const R: usize, const T: usize>(
    w: &[B],
    nb: usize,
    acts: [&ActQ8; T],
    out: &mut [[f32; T]],
    tile: impl Fn([&[B]; R], [&ActQ8; T]) -> [[f32; T]; R],
    tile1: impl Fn([&[B]; 1], [&ActQ8; T]) -> [[f32; T]; 1],
) {
    let row = |r: usize| &w[r * nb..(r + 1) * nb];
    let rows = out.len();
    let mut r = 0;
    while r + R <= rows {
        let o = tile(std::array::from_fn(|k| row(r + k)), acts);
        out[r..r + R].copy_from_slice(&o);
        r += R;
    }
    while r < rows {
        out[r] = tile1([row(r)], acts)[0];
        r += 1;
    }
}

/// Rows per tile: 4 x 4 tiles (rows x activation rows) keep 16 accumulators in registers.
pub const TILE_ROWS: usize = 4;

macro_rules! rows_entry {
    ($(#[$m:meta])* $name:ident, $body:ident, $block:ty) => {
        $(#[$m])*
        ///
        /// `w` holds `out.len()` rows of `nb` blocks, row-major; `out[r][t] = W[r] . X[t]`.
        ///
        /// # Safety
        /// `isa` must be what [`Isa::detect`] returned (or a lesser set the CPU has); every
        /// `acts[t]` covers `nb` 32-element blocks. (Lengths of `w` are checked: a short `w`
        /// panics, it is never read out of bounds.)
        pub unsafe fn $name<const T: usize>(
            isa: Isa,
            w: &[$block],
            nb: usize,
            acts: [&ActQ8; T],
            out: &mut [[f32; T]],
        ) {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2<const T: usize>(
                w: &[$block],
                nb: usize,
                acts: [&ActQ8; T],
                out: &mut [[f32; T]],
            ) {
                over_rows(
                    w,
                    nb,
                    acts,
                    out,
                    |w, a| $body::<TILE_ROWS, T, false>(w, a),
                    |w, a| $body::<1, T, false>(w, a),
                )
            }
            #[cfg(feature = "cpu-avx512")]
            #[allow(clippy::incompatible_msrv)] // the feature documents its Rust 1.89 requirement
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
            unsafe fn vnni<const T: usize>(
                w: &[$block],
                nb: usize,
                acts: [&ActQ8; T],
                out: &mut [[f32; T]],
            ) {
                over_rows(
                    w,
                    nb,
                    acts,
                    out,
                    |w, a| $body::<TILE_ROWS, T, true>(w, a),
                    |w, a| $body::<1, T, true>(w, a),
                )
            }
            match isa {
                #[cfg(feature = "cpu-avx512")]
                Isa::Vnni => vnni(w, nb, acts, out),
                // `Isa::detect` never returns Vnni without the feature.
                _ => avx2(w, nb, acts, out),
            }
        }
    };
}

rows_entry!(
    /// Q4_1 rows times T activation rows (Q8).
    q4_1_rows, q4_1_body, BlockQ4_1
);
rows_entry!(
    /// Q4_0 rows times T activation rows (Q8).
    q4_0_rows, q4_0_body, BlockQ4_0
);
rows_entry!(
    /// Q8_0 rows times T activation rows (Q8).
    q8_0_rows, q8_0_body, BlockQ8_0
);

/// Quantizes 32 activations to Q8 exactly as `dot::quantize_act_block` does (same scale, same
/// round-half-away-from-zero, same clamp), or returns None when a value is not finite (the
/// scalar code gives such a block its NaN scale). Returns (amax / 127, sum of the quants).
///
/// # Safety
/// AVX2 must be available; `x` and `q` hold at least 32 elements.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_act_block(x: &[f32], q: &mut [i8]) -> Option<(f32, i32)> {
    assert!(x.len() >= 32 && q.len() >= 32);
    let sign = _mm256_set1_ps(-0.0);
    let inf = _mm256_set1_ps(f32::INFINITY);
    let mut v = [_mm256_setzero_ps(); 4];
    let mut amax = _mm256_setzero_ps();
    let mut finite = 0xFF;
    for (k, vk) in v.iter_mut().enumerate() {
        // SAFETY: 8 floats at 8k < 32 <= x.len().
        *vk = _mm256_loadu_ps(x.as_ptr().add(8 * k));
        let a = _mm256_andnot_ps(sign, *vk);
        finite &= _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_LT_OQ>(a, inf));
        amax = _mm256_max_ps(amax, a);
    }
    if finite != 0xFF {
        return None;
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let d = _mm_cvtss_f32(m) / 127.0;
    let id = _mm256_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
    let (half, one, lim) = (
        _mm256_set1_ps(0.5),
        _mm256_set1_ps(1.0),
        _mm256_set1_ps(127.0),
    );
    let mut qi = [_mm256_setzero_si256(); 4];
    let mut sum = _mm256_setzero_si256();
    for k in 0..4 {
        let xv = _mm256_mul_ps(v[k], id);
        // Round half away from zero, as f32::round: truncate, then step away from zero when
        // the (exactly representable) fraction is at least one half.
        let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(xv);
        let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(xv, t));
        let away = _mm256_or_ps(one, _mm256_and_ps(sign, xv));
        let step = _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(frac, half), away);
        let r = _mm256_add_ps(t, step);
        let r = _mm256_min_ps(
            _mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), lim)),
            lim,
        );
        qi[k] = _mm256_cvttps_epi32(r);
        sum = _mm256_add_epi32(sum, qi[k]);
    }
    // i32 -> i16 -> i8 packs interleave the 128-bit lanes; the permute restores element order.
    let p16a = _mm256_packs_epi32(qi[0], qi[1]);
    let p16b = _mm256_packs_epi32(qi[2], qi[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: 32 bytes fit in `q` (asserted above).
    _mm256_storeu_si256(q.as_mut_ptr().cast(), p8);
    let s = _mm_add_epi32(
        _mm256_castsi256_si128(sum),
        _mm256_extracti128_si256(sum, 1),
    );
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    Some((d, _mm_cvtsi128_si32(s)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::CpuIsa;

    #[test]
    fn the_cap_lowers_vnni_to_avx2_and_nothing_else() {
        for (hw, cap, want) in [
            (Some(Isa::Vnni), CpuIsa::Best, Some(Isa::Vnni)),
            (Some(Isa::Vnni), CpuIsa::Avx2, Some(Isa::Avx2)),
            (Some(Isa::Avx2), CpuIsa::Best, Some(Isa::Avx2)),
            (Some(Isa::Avx2), CpuIsa::Avx2, Some(Isa::Avx2)),
            (None, CpuIsa::Best, None),
            (None, CpuIsa::Avx2, None),
        ] {
            assert_eq!(Isa::capped(hw, cap), want, "{hw:?} under {cap:?}");
        }
    }
}
