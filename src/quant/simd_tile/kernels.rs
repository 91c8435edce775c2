//! The [`TileKernel`](super::TileKernel) implementations: how each weight type's blocks unpack
//! for the tile kernels (the legacy 32-element types through one macro, the K-quants with mins
//! through another, Q6_K and Q3_K with their 16-element scales through a third).

use super::lanes::{rows_block, transpose_rows8};
use super::*;

/// The [`TileKernel`] and [`TileBlock`] of a 32-element type: the generic bodies, and how its
/// block reads (`$b` is the block in the three expressions: its min, its 32 quants, and the
/// address of its stored quants).
macro_rules! legacy_kernel {
    ($block:ty, $kind:ident, $offset:expr, $min:expr,
     m($b:ident) => $m:expr, quants => $quants:expr, qs => $qs:expr) => {
        impl TileKernel for $block {
            const KIND: Quants = Quants::$kind;
            const OFFSET: i32 = $offset;
            const HAS_MIN: bool = $min;
            const SUBS: usize = 1;
            #[inline(always)]
            unsafe fn pack_block<const VNNI: bool>(
                w: &[*const Self; 8],
                i: usize,
                out: &mut [RowsBlock],
            ) {
                out[0] = rows_block::<Self, VNNI>(w, i);
            }
            #[inline(always)]
            unsafe fn rows4<const VNNI: bool>(w: [&[Self]; 4], act: &ActQ8) -> [f32; 4] {
                rows4_body::<Self, VNNI>(w, act)
            }
        }

        impl TileBlock for $block {
            fn d(&self) -> [u8; 2] {
                self.d
            }
            fn m(&self) -> [u8; 2] {
                #[allow(unused_variables)] // the types without a min
                let $b = self;
                $m
            }
            #[inline(always)]
            unsafe fn quants(&self) -> __m256i {
                let $b = self;
                $quants
            }
            fn qs(&self) -> *const u8 {
                let $b = self;
                $qs
            }
        }
    };
}

/// The 5-bit quants of a Q5 block in element order: the nibbles, and bit e of `qh` (little
/// endian) as bit 4 of element e.
#[inline(always)]
unsafe fn five_bit(qh: [u8; 4], qs: &[u8; 16]) -> __m256i {
    // Byte e takes byte e / 8 of qh, then keeps bit e % 8 of it.
    let bits = _mm256_set1_epi32(i32::from_le_bytes(qh));
    let pick = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let mask = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(
        _mm256_and_si256(_mm256_shuffle_epi8(bits, pick), mask),
        mask,
    );
    _mm256_or_si256(nibbles(qs), _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
}

legacy_kernel!(BlockQ4_0, U4, -8, false,
    m(b) => [0; 2], quants => nibbles(&b.qs), qs => b.qs.as_ptr());
legacy_kernel!(BlockQ4_1, U4, 0, true,
    m(b) => b.m, quants => nibbles(&b.qs), qs => b.qs.as_ptr());
// SAFETY (of the load): `qs` is 32 readable bytes.
legacy_kernel!(BlockQ8_0, I8, 0, false,
    m(b) => [0; 2], quants => load256(b.qs.as_ptr().cast()), qs => b.qs.as_ptr().cast());
legacy_kernel!(BlockQ5_0, U5, -16, false,
    m(b) => [0; 2], quants => five_bit(b.qh, &b.qs), qs => b.qs.as_ptr());
legacy_kernel!(BlockQ5_1, U5, 0, true,
    m(b) => b.m, quants => five_bit(b.qh, &b.qs), qs => b.qs.as_ptr());

/// The K-quants with a scale and a min per 32-element sub-block (Q4_K, Q5_K: 256 elements, 8
/// sub-blocks, 6-bit scales and mins; element `x = d * sc_s * q - dmin * m_s`) as 8 sub-blocks:
/// quants `$kind` (from `$sub`), the scale `d * sc_s` and the min `-(dmin * m_s)` per sub-block,
/// both formed in f32 (`dot::dot_tile_scalar` does the same).
macro_rules! kquant_min_kernel {
    ($block:ty, $kind:ident, $sub:ident) => {
        impl TileKernel for $block {
            const KIND: Quants = Quants::$kind;
            const OFFSET: i32 = 0;
            const HAS_MIN: bool = true;
            const SUBS: usize = 8;

            #[inline(always)]
            unsafe fn pack_block<const VNNI: bool>(
                w: &[*const Self; 8],
                i: usize,
                out: &mut [RowsBlock],
            ) {
                // SAFETY (of every read below): the caller passes rows of more than `i` blocks.
                let b = |r: usize| &*w[r].add(i);
                // The 8 rows' scales and mins (`[row][s]` as u64), transposed to `[s][row]`.
                let (mut sc, mut mn) = ([0u64; 8], [0u64; 8]);
                for r in 0..8 {
                    let (a, c) = q4k_scales(&b(r).scales);
                    (sc[r], mn[r]) = (u64::from_le_bytes(a), u64::from_le_bytes(c));
                }
                let (sc, mn) = (transpose8x8_bytes(sc), transpose8x8_bytes(mn));
                let (d, dmin) = (f16_rows8!(r => b(r).d), f16_rows8!(r => b(r).dmin));
                for (s, o) in out[..8].iter_mut().enumerate() {
                    let q = transpose_rows8(rows8!(r => $sub(b(r), s)));
                    // d * sc_s and -(dmin * m_s) of the 8 rows, as `dot::dot_tile_scalar` forms
                    // them.
                    let u8f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                    let dm = _mm256_mul_ps(dmin, u8f(column8(&mn, s)));
                    *o = RowsBlock {
                        q,
                        s: [_mm256_setzero_si256(); 8],
                        d: _mm256_mul_ps(d, u8f(column8(&sc, s))),
                        m: _mm256_xor_ps(dm, _mm256_set1_ps(-0.0)),
                    };
                }
            }

            #[inline(always)]
            unsafe fn rows4<const VNNI: bool>(w: [&[Self]; 4], act: &ActQ8) -> [f32; 4] {
                let nb = w[0].len();
                assert!(
                    w.iter().all(|r| r.len() == nb)
                        && act.blk.len() >= 8 * nb
                        && act.qs.len() >= 256 * nb
                );
                let wp = w.map(<[Self]>::as_ptr);
                let (qs, blk) = (act.qs.as_ptr(), act.blk.as_ptr());
                let (mut acc, mut mn) = (_mm_setzero_ps(), _mm_setzero_ps());
                for i in 0..nb {
                    prefetch_ahead::<4>(wp[0].cast(), i, std::mem::size_of::<Self>());
                    // SAFETY: i < nb and every array covers nb blocks (asserted above).
                    let b = |r: usize| &*wp[r].add(i);
                    // The 4 rows' d and -dmin (F16C) side by side: [d_0..d_3 | -dmin_0..-dmin_3].
                    let h = |r: usize, f: fn(&Self) -> [u8; 2]| u16::from_le_bytes(f(b(r))) as i16;
                    let dd = _mm256_cvtph_ps(_mm_set_epi16(
                        h(3, |x| x.dmin),
                        h(2, |x| x.dmin),
                        h(1, |x| x.dmin),
                        h(0, |x| x.dmin),
                        h(3, |x| x.d),
                        h(2, |x| x.d),
                        h(1, |x| x.d),
                        h(0, |x| x.d),
                    ));
                    let dd = _mm256_xor_ps(dd, _mm256_setr_ps(0., 0., 0., 0., -0., -0., -0., -0.));
                    // The rows' 8 scales and 8 mins, transposed once per block: column s holds
                    // sub-block s's scales of rows 0..4, then its mins.
                    let mut rows = [0u64; 8];
                    for r in 0..4 {
                        let (sc, m) = q4k_scales(&b(r).scales);
                        (rows[r], rows[4 + r]) = (u64::from_le_bytes(sc), u64::from_le_bytes(m));
                    }
                    let cols = transpose8x8_bytes(rows);
                    for s in 0..8 {
                        let ai = 8 * i + s;
                        let y = load256(qs.add(32 * ai).cast());
                        let ab = *blk.add(ai);
                        let z = _mm256_setzero_si256();
                        let p = [
                            dot_u8_i8::<VNNI>(z, $sub(b(0), s), y),
                            dot_u8_i8::<VNNI>(z, $sub(b(1), s), y),
                            dot_u8_i8::<VNNI>(z, $sub(b(2), s), y),
                            dot_u8_i8::<VNNI>(z, $sub(b(3), s), y),
                        ];
                        // [d * sc | -dmin * m] of the 4 rows, as `dot_tile_scalar` forms them
                        // (-(dmin m) and (-dmin) m are the same float).
                        let wm = _mm256_mul_ps(
                            dd,
                            _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(column8(&cols, s))),
                        );
                        let (dw, mw) = (_mm256_castps256_ps128(wm), _mm256_extractf128_ps::<1>(wm));
                        let sc = _mm_mul_ps(dw, _mm_set1_ps(ab.d));
                        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(reduce4(p)), sc, acc);
                        mn = _mm_fmadd_ps(mw, _mm_set1_ps(ab.ds), mn);
                    }
                }
                let mut o = [0f32; 4];
                // SAFETY: `o` is 16 writable bytes.
                _mm_storeu_ps(o.as_mut_ptr(), _mm_add_ps(acc, mn));
                o
            }
        }
    };
}

kquant_min_kernel!(BlockQ4K, U4, q4k_sub);
kquant_min_kernel!(BlockQ5K, U5, q5k_sub);

/// The 8 scales and 8 mins of a Q4_K block (6 bits each, packed in 12 bytes as
/// `blocks::scale_min_k4` reads them), unpacked with 32-bit word operations.
#[inline(always)]
fn q4k_scales(q: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let w = |k: usize| u32::from_le_bytes([q[4 * k], q[4 * k + 1], q[4 * k + 2], q[4 * k + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const TOP2: u32 = 0x0303_0303;
    // Scales 0..4 are the low 6 bits of bytes 0..4, mins 0..4 those of bytes 4..8; scales
    // 4..8 take the low nibbles of bytes 8..12 and the top 2 bits of bytes 0..4, mins 4..8
    // the high nibbles of bytes 8..12 and the top 2 bits of bytes 4..8.
    let sc_lo = w0 & LOW6;
    let sc_hi = (w2 & LOW4) | (((w0 >> 6) & TOP2) << 4);
    let m_lo = w1 & LOW6;
    let m_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & TOP2) << 4);
    let join = |a: u32, b: u32| (u64::from(a) | (u64::from(b) << 32)).to_le_bytes();
    (join(sc_lo, sc_hi), join(m_lo, m_hi))
}

/// An 8 x 8 byte matrix (row r: the bytes of `rows[r]`, little endian) transposed: column c
/// is the low (c even) or high (c odd) 8 bytes of vector c / 2 (see [`column8`]).
#[inline(always)]
unsafe fn transpose8x8_bytes(rows: [u64; 8]) -> [__m128i; 4] {
    let x = |r: usize| _mm_cvtsi64_si128(rows[r] as i64);
    // Bytes of rows (0, 1), (2, 3), ... interleaved, then 16-bit pairs, then 32-bit quads.
    let t = [
        _mm_unpacklo_epi8(x(0), x(1)),
        _mm_unpacklo_epi8(x(2), x(3)),
        _mm_unpacklo_epi8(x(4), x(5)),
        _mm_unpacklo_epi8(x(6), x(7)),
    ];
    let u = [
        _mm_unpacklo_epi16(t[0], t[1]),
        _mm_unpackhi_epi16(t[0], t[1]),
        _mm_unpacklo_epi16(t[2], t[3]),
        _mm_unpackhi_epi16(t[2], t[3]),
    ];
    [
        _mm_unpacklo_epi32(u[0], u[2]),
        _mm_unpackhi_epi32(u[0], u[2]),
        _mm_unpacklo_epi32(u[1], u[3]),
        _mm_unpackhi_epi32(u[1], u[3]),
    ]
}

/// Column `c` of a [`transpose8x8_bytes`] result, in the low 8 bytes.
#[inline(always)]
unsafe fn column8(t: &[__m128i; 4], c: usize) -> __m128i {
    let v = t[c / 2];
    if c % 2 == 1 {
        _mm_unpackhi_epi64(v, v)
    } else {
        v
    }
}

/// Sub-block `s` of a Q4_K block: its 32 quants (0..15) in element order. Elements 64j..64j+32
/// are the low nibbles of bytes 32j..32j+32, the next 32 their high nibbles.
#[inline(always)]
unsafe fn q4k_sub(b: &BlockQ4K, s: usize) -> __m256i {
    // SAFETY: s < 8, so 32 (s / 2) + 32 <= 128 bytes of `qs`.
    let v = load256(b.qs.as_ptr().add(32 * (s / 2)));
    let v = if s % 2 == 1 {
        _mm256_srli_epi16(v, 4)
    } else {
        v
    };
    _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
}

/// Sub-block `s` of a Q5_K block: its 32 quants (0..31) in element order: the nibbles as in
/// Q4_K, and bit `s` of byte e of `qh` as bit 4 of element e.
#[inline(always)]
unsafe fn q5k_sub(b: &BlockQ5K, s: usize) -> __m256i {
    // SAFETY: s < 8, so 32 (s / 2) + 32 <= 128 bytes of `qs`; `qh` is 32 bytes.
    let v = load256(b.qs.as_ptr().add(32 * (s / 2)));
    let v = if s % 2 == 1 {
        _mm256_srli_epi16(v, 4)
    } else {
        v
    };
    let m4 = _mm256_set1_epi8(0x0F);
    // A 16-bit shift moves the next byte's bits into this one's top, which the mask drops.
    let h = _mm256_srl_epi16(load256(b.qh.as_ptr()), _mm_cvtsi32_si128(s as i32));
    let h = _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 4);
    _mm256_or_si256(_mm256_and_si256(v, m4), h)
}

/// Sub-block `4n + K` of a Q6_K block: its 32 quants (0..63, before the -32 offset) in element
/// order. Half n of the block takes bytes 64n.. of `ql` and 32n.. of `qh`; its sub-block K
/// takes the low (K < 2) or high nibbles of `ql[64n + 32 (K % 2)..][..32]` and bits 2K, 2K + 1
/// of `qh[32n..][..32]` as bits 4 and 5.
#[inline(always)]
unsafe fn q6k_sub_k<const K: usize>(b: &BlockQ6K, n: usize) -> __m256i {
    // SAFETY: n < 2 and K < 4: 64n + 32 (K % 2) + 32 <= 128 bytes of `ql`, 32n + 32 <= 64 of
    // `qh`.
    let l = load256(b.ql.as_ptr().add(64 * n + 32 * (K % 2)));
    let l = if K >= 2 { _mm256_srli_epi16(l, 4) } else { l };
    let h = load256(b.qh.as_ptr().add(32 * n));
    // Bits 2K, 2K + 1 of each byte to bits 4, 5; the bits a 16-bit shift brings in from the
    // neighbouring byte land outside the mask.
    let h = match K {
        0 => _mm256_slli_epi16(h, 4),
        1 => _mm256_slli_epi16(h, 2),
        2 => h,
        _ => _mm256_srli_epi16(h, 2),
    };
    _mm256_or_si256(
        _mm256_and_si256(l, _mm256_set1_epi8(0x0F)),
        _mm256_and_si256(h, _mm256_set1_epi8(0x30)),
    )
}

/// An 8 x 8 matrix of 16-bit words (row r: `rows[r]`) transposed: word r of output c is word
/// c of row r.
#[inline(always)]
unsafe fn transpose8x8_words(x: [__m128i; 8]) -> [__m128i; 8] {
    let t = [
        _mm_unpacklo_epi16(x[0], x[1]),
        _mm_unpackhi_epi16(x[0], x[1]),
        _mm_unpacklo_epi16(x[2], x[3]),
        _mm_unpackhi_epi16(x[2], x[3]),
        _mm_unpacklo_epi16(x[4], x[5]),
        _mm_unpackhi_epi16(x[4], x[5]),
        _mm_unpacklo_epi16(x[6], x[7]),
        _mm_unpackhi_epi16(x[6], x[7]),
    ];
    // Words 0..4 (from t[0], t[2]) and 4..8 (t[1], t[3]) of rows 0..4; the same of rows 4..8.
    let u = [
        _mm_unpacklo_epi32(t[0], t[2]),
        _mm_unpackhi_epi32(t[0], t[2]),
        _mm_unpacklo_epi32(t[1], t[3]),
        _mm_unpackhi_epi32(t[1], t[3]),
        _mm_unpacklo_epi32(t[4], t[6]),
        _mm_unpackhi_epi32(t[4], t[6]),
        _mm_unpacklo_epi32(t[5], t[7]),
        _mm_unpackhi_epi32(t[5], t[7]),
    ];
    [
        _mm_unpacklo_epi64(u[0], u[4]),
        _mm_unpackhi_epi64(u[0], u[4]),
        _mm_unpacklo_epi64(u[1], u[5]),
        _mm_unpackhi_epi64(u[1], u[5]),
        _mm_unpacklo_epi64(u[2], u[6]),
        _mm_unpackhi_epi64(u[2], u[6]),
        _mm_unpacklo_epi64(u[3], u[7]),
        _mm_unpackhi_epi64(u[3], u[7]),
    ]
}

/// Sub-block `s` (0..8) of a Q6_K block, as [`q6k_sub_k`].
#[inline(always)]
unsafe fn q6k_sub(b: &BlockQ6K, s: usize) -> __m256i {
    match s % 4 {
        0 => q6k_sub_k::<0>(b, s / 4),
        1 => q6k_sub_k::<1>(b, s / 4),
        2 => q6k_sub_k::<2>(b, s / 4),
        _ => q6k_sub_k::<3>(b, s / 4),
    }
}

/// The K-quants with an i8 scale per 16 elements and a fixed offset (Q6_K: `x = d * sc_h * (q -
/// 32)`, q 6 bits; Q3_K: `x = d * sc_h * (q - 4)`, q 3 bits, the scales 6-bit less 32) as 8
/// sub-blocks of 32, each met by one activation block. A sub-block's integer sum is
/// `sc_lo * sum_lo((q - o) y) + sc_hi * sum_hi((q - o) y)` over its two halves, exact in i32
/// (|sum| <= 2 * 128 * 16 * 32 * 127 < 2^24, so f32 holds it exactly too); then
/// `acc = fma(f32(isum), d * d_x, acc)` as for every type (`dot::dot_tile_scalar`). The offset
/// `o = 1 << $shift` meets the activations' half sums (`ActLanes`' `hsums`; the one-row kernel
/// forms them from the quants). `$sub_k::<K>(b, n)`: sub-block 4n + K's quants (unsigned, before
/// the offset); `$sub(b, s)` the same for a run-time s; `$scales(b)`: the 16 scales as i8.
macro_rules! kquant_scaled16_kernel {
    ($block:ty, $sub_k:ident, $sub:ident, $scales:ident, $shift:literal) => {
        impl TileKernel for $block {
            const KIND: Quants = Quants::U6;
            const OFFSET: i32 = 0;
            const HAS_MIN: bool = false;
            const SUBS: usize = 8;

            #[inline(always)]
            unsafe fn pack_block<const VNNI: bool>(w: &[*const Self; 8], i: usize, out: &mut [RowsBlock]) {
                // SAFETY (of every read below): the caller passes rows of more than `i` blocks.
                let b = |r: usize| &*w[r].add(i);
                // The rows' scales as 8 words each (word s: the pair of sub-block s), transposed: word
                // r of `sw[s]` is row r's pair.
                let sw = transpose8x8_words(rows8!(r => $scales(b(r))));
                let d = f16_rows8!(r => b(r).d);
                let even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
                let odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
                for (s, o) in out[..8].iter_mut().enumerate() {
                    let q = transpose_rows8(rows8!(r => $sub(b(r), s)));
                    // The 8 rows' scales of the two halves (i8), as i32 lanes.
                    let lo = _mm256_cvtepi8_epi32(_mm_shuffle_epi8(sw[s], even));
                    let hi = _mm256_cvtepi8_epi32(_mm_shuffle_epi8(sw[s], odd));
                    // Each scale in both i16 of its lane (`madd` against i16 pair sums), and the pair
                    // (o sc_lo, o sc_hi) (o the offset, |o sc| <= 4096) that meets a lane's packed half sums.
                    let dup = |v: __m256i| _mm256_or_si256(v, _mm256_slli_epi32(v, 16));
                    let lo16 = _mm256_and_si256(lo, _mm256_set1_epi32(0xFFFF));
                    let hi16 = _mm256_and_si256(hi, _mm256_set1_epi32(0xFFFF));
                    let pair = _mm256_or_si256(
                        _mm256_and_si256(_mm256_slli_epi32::<$shift>(lo), _mm256_set1_epi32(0xFFFF)),
                        _mm256_slli_epi32(_mm256_slli_epi32::<$shift>(hi), 16),
                    );
                    let z = _mm256_setzero_si256();
                    *o = RowsBlock {
                        q,
                        // See `RowsBlock::s`.
                        s: [dup(lo16), dup(hi16), pair, lo, hi, z, z, z],
                        d,
                        m: _mm256_setzero_ps(),
                    };
                }
            }

            #[inline(always)]
            unsafe fn rows4<const VNNI: bool>(w: [&[Self]; 4], act: &ActQ8) -> [f32; 4] {
                let nb = w[0].len();
                assert!(
                    w.iter().all(|r| r.len() == nb) && act.blk.len() >= 8 * nb && act.qs.len() >= 256 * nb
                );
                let wp = w.map(<[Self]>::as_ptr);
                let (qs, blk) = (act.qs.as_ptr(), act.blk.as_ptr());
                let mut acc = _mm_setzero_ps();
                let ones = _mm256_set1_epi8(1);
                for i in 0..nb {
                    prefetch_ahead::<4>(wp[0].cast(), i, std::mem::size_of::<Self>());
                    // SAFETY: i < nb and every array covers nb blocks (asserted above).
                    let b = |r: usize| &*wp[r].add(i);
                    let h = |r: usize| u16::from_le_bytes(b(r).d) as i16;
                    let dv = _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, h(3), h(2), h(1), h(0)));
                    // The 4 rows' 16 scales as i16.
                    // (Written out: a closure would not inherit the target features.)
                    let scw = [
                        _mm256_cvtepi8_epi16($scales(b(0))),
                        _mm256_cvtepi8_epi16($scales(b(1))),
                        _mm256_cvtepi8_epi16($scales(b(2))),
                        _mm256_cvtepi8_epi16($scales(b(3))),
                    ];
                    // Sub-block s's two scales, each over one 128-bit half: word s of the row's scales
                    // (`[sc_2s, sc_2s+1]`) everywhere, then its low i16 to the low half, its high i16 to
                    // the high half.
                    let pick = _mm256_setr_epi8(
                        0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3,
                        2, 3, 2, 3,
                    );
                    for n in 0..2 {
                        macro_rules! sub {
                            ($k:literal) => {{
                                let s = 4 * n + $k;
                                let ai = 8 * i + s;
                                let y = load256(qs.add(32 * ai).cast());
                                let ab = *blk.add(ai);
                                // The offset times the activations' pair sums: `maddubs(q, y) - ys` is the
                                // pairs of (q - o) y (|.| <= 2 * 32 * 127, no saturation).
                                let ys = _mm256_slli_epi16::<$shift>(_mm256_maddubs_epi16(ones, y));
                                let at = _mm256_set1_epi32(s as i32);
                                macro_rules! row {
                                    ($r:expr) => {{
                                        let scv = _mm256_shuffle_epi8(
                                            _mm256_permutevar8x32_epi32(scw[$r], at),
                                            pick,
                                        );
                                        let q = $sub_k::<$k>(b($r), n);
                                        let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q, y), ys);
                                        _mm256_madd_epi16(p, scv)
                                    }};
                                }
                                let p = [row!(0), row!(1), row!(2), row!(3)];
                                let sc = _mm_mul_ps(dv, _mm_set1_ps(ab.d));
                                acc = _mm_fmadd_ps(_mm_cvtepi32_ps(reduce4(p)), sc, acc);
                            }};
                        }
                        sub!(0);
                        sub!(1);
                        sub!(2);
                        sub!(3);
                    }
                }
                let mut o = [0f32; 4];
                // SAFETY: `o` is 16 writable bytes.
                _mm_storeu_ps(o.as_mut_ptr(), acc);
                o
            }
        }
    };
}

kquant_scaled16_kernel!(BlockQ6K, q6k_sub_k, q6k_sub, q6k_scales, 5);
kquant_scaled16_kernel!(BlockQ3K, q3k_sub_k, q3k_sub, q3k_scales, 2);

/// The 16 i8 scales of a Q6_K block.
#[inline(always)]
unsafe fn q6k_scales(b: &BlockQ6K) -> __m128i {
    load128(b.scales.as_ptr())
}

/// The 16 scales of a Q3_K block (6 bits each, less 32, as `blocks::scale_q3k` reads them),
/// unpacked with 32-bit word operations: scale j takes the low (j < 8) or high nibble of byte j
/// % 8 and bits 2 (j / 4), 2 (j / 4) + 1 of byte 8 + j % 4 as bits 4 and 5.
#[inline(always)]
unsafe fn q3k_scales(b: &BlockQ3K) -> __m128i {
    let s = &b.scales;
    let w = |k: usize| u32::from_le_bytes([s[4 * k], s[4 * k + 1], s[4 * k + 2], s[4 * k + 3]]);
    let (a0, a1, a2) = (w(0), w(1), w(2));
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let v = _mm_setr_epi32(
        ((a0 & LOW4) | ((a2 & LOW2) << 4)) as i32,
        ((a1 & LOW4) | (((a2 >> 2) & LOW2) << 4)) as i32,
        (((a0 >> 4) & LOW4) | (((a2 >> 4) & LOW2) << 4)) as i32,
        (((a1 >> 4) & LOW4) | (((a2 >> 6) & LOW2) << 4)) as i32,
    );
    _mm_sub_epi8(v, _mm_set1_epi8(32))
}

/// Sub-block `4n + K` of a Q3_K block: its 32 quants (0..7, before the -4 offset) in element
/// order: bits 2K, 2K + 1 of `qs[32n..][..32]`, and bit 4n + K of `hmask` as bit 2.
#[inline(always)]
unsafe fn q3k_sub_k<const K: usize>(b: &BlockQ3K, n: usize) -> __m256i {
    // SAFETY: n < 2: 32n + 32 <= 64 bytes of `qs`; `hmask` is 32 bytes.
    let q = load256(b.qs.as_ptr().add(32 * n));
    let q = match K {
        0 => q,
        1 => _mm256_srli_epi16(q, 2),
        2 => _mm256_srli_epi16(q, 4),
        _ => _mm256_srli_epi16(q, 6),
    };
    // As in `q5k_sub`, the bits a 16-bit shift brings in from the next byte are masked off.
    let h = _mm256_srl_epi16(
        load256(b.hmask.as_ptr()),
        _mm_cvtsi32_si128((4 * n + K) as i32),
    );
    _mm256_or_si256(
        _mm256_and_si256(q, _mm256_set1_epi8(3)),
        _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 2),
    )
}

/// Sub-block `s` (0..8) of a Q3_K block, as [`q3k_sub_k`].
#[inline(always)]
unsafe fn q3k_sub(b: &BlockQ3K, s: usize) -> __m256i {
    match s % 4 {
        0 => q3k_sub_k::<0>(b, s / 4),
        1 => q3k_sub_k::<1>(b, s / 4),
        2 => q3k_sub_k::<2>(b, s / 4),
        _ => q3k_sub_k::<3>(b, s / 4),
    }
}
