//! Register-tiled x86-64 kernels for the weight types the common GGUF models ship their
//! projections in: the legacy 32-element types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0; llama.cpp's
//! Q4_K_M files keep Q5_0 for the tensors whose width is not a multiple of 256, all of Gemma 3
//! 270M's layers) and the K-quants Q4_K, Q5_K and Q6_K, taken as 8 sub-blocks of 32 per
//! 256-element block (Q6_K's two 16-element scales per sub-block applied in integers).
//!
//! Every output is `sum_i f32(isum_i) * (d_w,i * d_x,i)` accumulated block after block with one
//! fused multiply-add per block (plus, for Q4_1 and Q5_1, `sum_i m_w,i * ds_x,i` the same way),
//! where
//! `isum_i` is the exact integer dot product of block i's weight and activation quants. Integer
//! sums do not depend on the order they are formed in, and the float steps are the same for every
//! output, so an output does not depend on the kernel, the tile it falls in, the ISA or the
//! number of threads: [`super::dot::dot_tile_scalar`] is the scalar reference, bit for bit.
//!
//! Two kernels, each with one float lane per output, so no horizontal sum per output remains:
//! - `*_rows4` (one activation row, decode): 4 weight rows in 4 lanes. Each row's integer
//!   dot is formed in 8 i32 lanes as usual, then the 4 rows' vectors are summed across in one
//!   transpose-add tree. (Eight rows in eight lanes did the same work in fewer instructions but
//!   read eight rows side by side, and decode is bound by memory: on the 2-core VM the
//!   eight-row kernel took ~10% longer over a model's layers and ~15% longer on a Q8_0 output
//!   head, with any prefetch distance; docs/PERFORMANCE.md.)
//! - `*_lanes` (up to 8 activation rows, batched decode and prefill): 8 weight rows times 8
//!   activation rows, an 8 x 8 tile of outputs, weight rows in the float lanes. The
//!   activations come interleaved ([`ActLanes`]: the 4 quants of each row's group side by side);
//!   the 8 weight rows' blocks are transposed a chunk at a time (`RowsBlock`: a group of 4
//!   quants of all 8 rows in one vector, unpacked once), so one activation row's group,
//!   broadcast from memory, times one weight vector gives 8 rows' partial dots. The 4-bit
//!   products sum in i16 lanes (8 groups of `2 * 15 * 127` stay below 2^15) before one
//!   widening per block. (The kernel before broadcast each weight row's group by a shuffle
//!   against the interleaved activations and unpacked its scales per row; the transposed tile
//!   takes ~18% less time on SmolLM2's Q4_1 shapes at 8 rows and the same on Q8_0, where the
//!   AVX2 sign trick dominates: docs/PERFORMANCE.md.)
//!
//! Two instruction sets, one body, chosen at run time ([`Isa::detect`]): AVX2 (`vpmaddubsw` +
//! `vpmaddwd`), and AVX-512 VNNI on 256-bit vectors (`vpdpbusd`: u8 x i8 products summed into
//! i32 lanes in one instruction; Zen 4, Ice Lake and later). The VNNI set needs Rust 1.89
//! (stable AVX-512 intrinsics and target features), the crate's minimum; it was behind the
//! opt-in feature `cpu-avx512` while the minimum was 1.85, which is now a no-op.

use super::act::{ActLanes, ActQ8, LaneBlock, LANES};
use super::blocks::*;
use std::arch::x86_64::*;

/// Whether the VNNI variants may run: AVX-512 F/VL/BW/VNNI on top of the AVX2 set.
pub fn has_vnni() -> bool {
    super::simd::has_avx2()
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

/// Bytes ahead of the current weight position that a decode tile prefetches: the rows of one
/// tile are short (a 576-wide Q4_1 row is 360 bytes) and four of them are read side by side,
/// which the hardware stream prefetcher does not follow well; decode streams every weight from
/// DRAM once per token, so the loads must be in flight well before use. 4 KiB (~3 four-row
/// tiles of a 576-wide Q4_1 matrix); 2 to 6 KiB measured alike with four rows (2-core VM,
/// interleaved runs over every product of SmolLM2's decode step).
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

/// 32 bytes from any address. `lddqu` rather than `loadu`: the `loadu` intrinsics are a
/// `copy_nonoverlapping`, which a build with debug assertions (the `test` profile the serving
/// benchmarks use) checks and routes through the stack, several times slower in these loops.
#[inline(always)]
unsafe fn load256(p: *const u8) -> __m256i {
    _mm256_lddqu_si256(p.cast())
}

/// 16 bytes from any address (see [`load256`]).
#[inline(always)]
unsafe fn load128(p: *const u8) -> __m128i {
    _mm_lddqu_si128(p.cast())
}

/// 16 packed bytes -> 32 nibbles (low nibbles are elements 0..16, high nibbles 16..32).
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> __m256i {
    // SAFETY (of the load): `qs` is 16 readable bytes; the load has no alignment requirement.
    let raw = load128(qs.as_ptr());
    let both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// `init + sum of u8(q) * i8(y)` over groups of 4 bytes, as 8 i32 lanes. On the AVX2 path the
/// pairs go through i16 (`maddubs` saturates), so `q * y` pairs must stay below 2^15: true for
/// q <= 128 and |y| <= 127.
#[inline(always)]
unsafe fn dot_u8_i8<const VNNI: bool>(init: __m256i, q: __m256i, y: __m256i) -> __m256i {
    // VNNI = true is only instantiated by the `vnni` entry points.
    if VNNI {
        return dpbusd(init, q, y);
    }
    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), _mm256_set1_epi16(1));
    _mm256_add_epi32(init, p)
}

#[inline(always)]
unsafe fn dpbusd(init: __m256i, q: __m256i, y: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(init, q, y)
}

/// Lane r of the result = the sum of the 8 i32 lanes of `p[r]` (exact; a fixed tree).
#[inline(always)]
unsafe fn reduce4(p: [__m256i; 4]) -> __m128i {
    let h01 = _mm256_hadd_epi32(p[0], p[1]);
    let h23 = _mm256_hadd_epi32(p[2], p[3]);
    // Per 128-bit half: [p0, p1, p2, p3] summed over that half's 4 lanes.
    let g = _mm256_hadd_epi32(h01, h23);
    _mm_add_epi32(_mm256_castsi256_si128(g), _mm256_extracti128_si256::<1>(g))
}

/// The weight quants of one block, as the lanes kernels take them.
#[derive(Clone, Copy, PartialEq)]
enum Quants {
    /// Unsigned 4-bit (Q4_0 before its -8 offset, Q4_1).
    U4,
    /// Signed 8-bit (Q8_0).
    I8,
    /// Unsigned 5-bit (Q5_0 before its -16 offset, Q5_1, Q5_K): 4 groups of `maddubs` pairs
    /// at most sum in i16 (`4 * 2 * 31 * 127` < 2^15).
    U5,
    /// Unsigned 6-bit (Q6_K before its -32 offset; Q3_K's 3-bit quants before their -4 too),
    /// each 16-element half of a sub-block with its own i8 scale, applied in integers (2 groups
    /// of pairs at most sum in i16).
    U6,
}

/// Runs `$body` for `$g` = 0..8, written out (so that the group index is a constant in each
/// copy and arrays of vectors stay in registers).
macro_rules! unroll8 {
    ($g:ident => $body:expr) => {{
        {
            let $g = 0usize;
            $body;
        }
        {
            let $g = 1usize;
            $body;
        }
        {
            let $g = 2usize;
            $body;
        }
        {
            let $g = 3usize;
            $body;
        }
        {
            let $g = 4usize;
            $body;
        }
        {
            let $g = 5usize;
            $body;
        }
        {
            let $g = 6usize;
            $body;
        }
        {
            let $g = 7usize;
            $body;
        }
    }};
}

/// `[e(0), .., e(7)]` for the expression `e` of `$r` (written out, as `unroll8!`: a closure
/// would not inherit the target features).
macro_rules! rows8 {
    ($r:ident => $e:expr) => {
        [
            {
                let $r = 0usize;
                $e
            },
            {
                let $r = 1usize;
                $e
            },
            {
                let $r = 2usize;
                $e
            },
            {
                let $r = 3usize;
                $e
            },
            {
                let $r = 4usize;
                $e
            },
            {
                let $r = 5usize;
                $e
            },
            {
                let $r = 6usize;
                $e
            },
            {
                let $r = 7usize;
                $e
            },
        ]
    };
}

/// The 8 f16 values `e(0), .., e(7)` (as little-endian bytes) of the expression `e` of `$r`, as
/// 8 f32 lanes (F16C). Registers, not a `[u16; 8]` in memory: 2-byte stores read back as one
/// wider load stall store forwarding.
macro_rules! f16_rows8 {
    ($r:ident => $e:expr) => {{
        let [h0, h1, h2, h3, h4, h5, h6, h7] = rows8!($r => u16::from_le_bytes($e) as i16);
        _mm256_cvtph_ps(_mm_set_epi16(h7, h6, h5, h4, h3, h2, h1, h0))
    }};
}

/// A weight block type the tile kernels take: how its 32-element (sub-)blocks look to them.
trait TileKernel: Block + Sized {
    const KIND: Quants;
    /// -8 (Q4_0: quants stored with +8), -16 (Q5_0), else 0: the activation sum's multiple
    /// to add.
    const OFFSET: i32;
    /// Whether the block has a min (`d * q + m`, or Q4_K's `- dmin * m_s * q`).
    const HAS_MIN: bool;
    /// 32-element sub-blocks per block (8 for Q4_K's 256 elements, else 1).
    const SUBS: usize;
    /// The `SUBS` sub-blocks of block `i` of the 8 rows, transposed, into `out[..SUBS]` (a
    /// block at a time, so that the scales are unpacked once per block).
    unsafe fn pack_block<const VNNI: bool>(w: &[*const Self; 8], i: usize, out: &mut [RowsBlock]);
    /// Four weight rows times one activation row (lane r: `w[r]`).
    unsafe fn rows4<const VNNI: bool>(w: [&[Self]; 4], act: &ActQ8) -> [f32; 4];
}

/// Bytes of one sub-block of `B` (the prefetch's stride).
const fn sub_bytes<B: TileKernel>() -> usize {
    std::mem::size_of::<B>() / B::SUBS
}

/// A 32-element block (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) as the generic kernels read it.
trait TileBlock: TileKernel {
    fn d(&self) -> [u8; 2];
    fn m(&self) -> [u8; 2];
    /// The 32 quants in element order (unsigned nibbles, or signed bytes).
    unsafe fn quants(&self) -> __m256i;
    /// The stored quants: 16 bytes of packed nibbles (element j low, j + 16 high), or 32
    /// signed bytes (not read for U5, whose quants take their fifth bit from elsewhere).
    fn qs(&self) -> *const u8;
}

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

/// The integer lanes' starting value: `OFFSET * sum(y)`, plus on the VNNI Q8_0 path the
/// `-128 * sum(y)` that undoes the weights' bias.
#[inline(always)]
fn init_of<B: TileKernel, const VNNI: bool>(isum: i32) -> i32 {
    let bias = if VNNI && B::KIND == Quants::I8 {
        -128
    } else {
        0
    };
    (B::OFFSET + bias) * isum
}

/// Stores 8 float lanes.
#[inline(always)]
unsafe fn store8(v: __m256) -> [f32; 8] {
    let mut o = [0f32; 8];
    // SAFETY: `o` is 32 writable bytes.
    _mm256_storeu_ps(o.as_mut_ptr(), v);
    o
}

/// Four weight rows (lane r: `w[r]`) times one activation row.
#[inline(always)]
unsafe fn rows4_body<B: TileBlock, const VNNI: bool>(w: [&[B]; 4], act: &ActQ8) -> [f32; 4] {
    let nb = w[0].len();
    assert!(w.iter().all(|r| r.len() == nb) && act.blk.len() >= nb && act.qs.len() >= 32 * nb);
    // Raw pointers in the loop: the bounds are checked once, above.
    let wp = w.map(<[B]>::as_ptr);
    let (qs, blk) = (act.qs.as_ptr(), act.blk.as_ptr());
    let mut acc = _mm_setzero_ps();
    let mut mn = _mm_setzero_ps();
    for i in 0..nb {
        prefetch_ahead::<4>(wp[0].cast(), i, std::mem::size_of::<B>());
        // SAFETY: i < nb and every array covers nb blocks (asserted above).
        let y = load256(qs.add(32 * i).cast());
        let ab = *blk.add(i);
        // Written out for each r (a loop here is not unrolled, and its array of vectors then
        // lives in memory; nor `array::from_fn`, whose closure would not inherit the target
        // features).
        macro_rules! row_dot {
            ($r:expr) => {{
                // SAFETY: as above.
                let q = (*wp[$r].add(i)).quants();
                let zero = _mm256_setzero_si256();
                if B::KIND == Quants::I8 && !VNNI {
                    dot_u8_i8::<false>(zero, _mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q))
                } else if B::KIND == Quants::I8 {
                    dot_u8_i8::<VNNI>(zero, _mm256_xor_si256(q, _mm256_set1_epi8(-128)), y)
                } else {
                    dot_u8_i8::<VNNI>(zero, q, y)
                }
            }};
        }
        let p = [row_dot!(0), row_dot!(1), row_dot!(2), row_dot!(3)];
        let init = _mm_set1_epi32(init_of::<B, VNNI>(ab.isum));
        let s = _mm_add_epi32(reduce4(p), init);
        let f16s = |f: fn(&B) -> [u8; 2]| {
            // SAFETY: as above.
            let h = |r: usize| u16::from_le_bytes(f(&*wp[r].add(i))) as i16;
            // Registers, not a [u16; 4] in memory: 2-byte stores read back as one wider load
            // stall store forwarding.
            _mm_set_epi16(0, 0, 0, 0, h(3), h(2), h(1), h(0))
        };
        let sc = _mm_mul_ps(_mm_cvtph_ps(f16s(B::d)), _mm_set1_ps(ab.d));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(s), sc, acc);
        if B::HAS_MIN {
            mn = _mm_fmadd_ps(_mm_cvtph_ps(f16s(B::m)), _mm_set1_ps(ab.ds), mn);
        }
    }
    if B::HAS_MIN {
        acc = _mm_add_ps(acc, mn);
    }
    let mut o = [0f32; 4];
    // SAFETY: `o` is 16 writable bytes.
    _mm_storeu_ps(o.as_mut_ptr(), acc);
    o
}

/// Blocks of an 8-row tile transposed at a time: their [`RowsBlock`]s (9 KiB) stay in L1 while
/// the activation lanes pass over them.
const CHUNK: usize = 16;
// `rows8_body` packs whole blocks of the K-quants' 8 sub-blocks.
const _: () = assert!(CHUNK.is_multiple_of(8));

/// One block of 8 weight rows, transposed for the lanes kernel: a group of 4 quants of all 8
/// rows is one 32-byte vector (`[row][4]`), so row k's partial dot with a lane's group (the
/// lane's 4 quants broadcast) lands in i32 lane k.
#[derive(Clone, Copy)]
#[repr(C)]
struct RowsBlock {
    /// Group g (quants 4g..4g+4) of every row, as the unsigned operand of the byte products:
    /// the 4-bit quants; for Q8_0, |q| on AVX2 and q + 128 with VNNI.
    q: [__m256i; 8],
    /// Q8_0 on AVX2: the signed quants (their signs go onto the activations). Q6_K and Q3_K:
    /// their rows' scales of the two halves, each in both i16 of its lane (0, 1), the pairs
    /// `(o sc_lo, o sc_hi)` (o the offset, 32 or 4) as two i16 (2), and the scales as i32 (3,
    /// 4). Unused otherwise.
    s: [__m256i; 8],
    /// The 8 rows' scales, and their mins (Q4_1; zero otherwise).
    d: __m256,
    m: __m256,
}

/// Within each 128-bit half, the 4 x 4 transpose of 32-bit words: half h of output j holds
/// word j of half h of each input, in input order.
#[inline(always)]
unsafe fn transpose4x4(y0: __m256i, y1: __m256i, y2: __m256i, y3: __m256i) -> [__m256i; 4] {
    let t0 = _mm256_unpacklo_epi32(y0, y1);
    let t1 = _mm256_unpackhi_epi32(y0, y1);
    let t2 = _mm256_unpacklo_epi32(y2, y3);
    let t3 = _mm256_unpackhi_epi32(y2, y3);
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

/// 8 rows of 32 quants each (element order) -> 8 groups of 4 quants of all 8 rows (group g,
/// quants 4g..4g+4, of row k in i32 lane k of vector g).
#[inline(always)]
unsafe fn transpose_rows8(r: [__m256i; 8]) -> [__m256i; 8] {
    // Halves [row k | row k + 4]: elements 0..16, then 16..32.
    macro_rules! lo {
        ($k:expr) => {
            _mm256_permute2x128_si256::<0x20>(r[$k], r[$k + 4])
        };
    }
    macro_rules! hi {
        ($k:expr) => {
            _mm256_permute2x128_si256::<0x31>(r[$k], r[$k + 4])
        };
    }
    let [a, b, c, d] = transpose4x4(lo!(0), lo!(1), lo!(2), lo!(3));
    let [e, f, g, h] = transpose4x4(hi!(0), hi!(1), hi!(2), hi!(3));
    [a, b, c, d, e, f, g, h]
}

/// Block `i` of the 8 rows `w` (row k in i32 lane k of every vector).
#[inline(always)]
unsafe fn rows_block<B: TileBlock, const VNNI: bool>(w: &[*const B; 8], i: usize) -> RowsBlock {
    // SAFETY (of every read below): the caller passes rows of more than `i` blocks.
    let b = |r: usize| &*w[r].add(i);
    // Rows r (low half) and r + 4 (high half), 16 bytes each from byte `off` of the quants.
    macro_rules! pair {
        ($r:expr, $off:expr) => {
            _mm256_set_m128i(
                load128(b($r + 4).qs().add($off)),
                load128(b($r).qs().add($off)),
            )
        };
    }
    let zero = _mm256_setzero_si256();
    let mut q = [zero; 8];
    let mut s = [zero; 8];
    if B::KIND == Quants::U5 {
        // Each row's 32 quants built in a register, then words 0..4 (halves [row r | row
        // r + 4]) and 4..8 transposed.
        q = transpose_rows8(rows8!(r => b(r).quants()));
    } else if B::KIND == Quants::U4 {
        // Word j of the packed nibbles holds quants 4j..4j+4 (low) and 16+4j.. (high).
        let g = transpose4x4(pair!(0, 0), pair!(1, 0), pair!(2, 0), pair!(3, 0));
        let m = _mm256_set1_epi8(0x0F);
        for j in 0..4 {
            q[j] = _mm256_and_si256(g[j], m);
            q[j + 4] = _mm256_and_si256(_mm256_srli_epi16(g[j], 4), m);
        }
    } else {
        let lo = transpose4x4(pair!(0, 0), pair!(1, 0), pair!(2, 0), pair!(3, 0));
        let hi = transpose4x4(pair!(0, 16), pair!(1, 16), pair!(2, 16), pair!(3, 16));
        s[..4].copy_from_slice(&lo);
        s[4..].copy_from_slice(&hi);
        for g in 0..8 {
            q[g] = if VNNI {
                _mm256_xor_si256(s[g], _mm256_set1_epi8(-128))
            } else {
                _mm256_sign_epi8(s[g], s[g])
            };
        }
    }
    RowsBlock {
        q,
        s,
        d: f16_rows8!(r => b(r).d()),
        m: if B::HAS_MIN {
            f16_rows8!(r => b(r).m())
        } else {
            _mm256_setzero_ps()
        },
    }
}

/// Lanes `t0 .. t0 + 4` (t0 is 0 or 4) of the tile over the transposed blocks `pack` and the
/// activation blocks `lanes` beside them, added to `acc` (one vector of 8 rows per lane);
/// prefetches the 8-row blocks from `ahead` on, one per block (none when null).
#[inline(always)]
unsafe fn lanes4_pass<B: TileKernel, const VNNI: bool>(
    pack: &[RowsBlock],
    lanes: &[LaneBlock],
    t0: usize,
    acc: &mut [__m256; 8],
    ahead: *const u8,
) {
    assert!(t0 <= 4 && pack.len() <= lanes.len());
    let mut ahead = ahead;
    let (mut a0, mut a1, mut a2, mut a3) = (acc[t0], acc[t0 + 1], acc[t0 + 2], acc[t0 + 3]);
    let ones = _mm256_set1_epi16(1);
    for (pb, lb) in pack.iter().zip(lanes) {
        if !ahead.is_null() {
            // A block of 8 rows ahead, spread over the loop (a burst of them would wait for
            // the core's few outstanding-miss slots).
            let mut off = 0;
            while off < 8 * sub_bytes::<B>() {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
                off += 64;
            }
            ahead = ahead.wrapping_add(8 * sub_bytes::<B>());
        }
        // SAFETY (of the reads through these): t0 + 3 < LANES, and group g < 8 of lane t is
        // the 4 bytes at 32 g + 4 t of the block's 256.
        let (il, isum, dx) = (
            lb.qs.as_ptr().add(4 * t0),
            lb.isum.as_ptr().add(t0),
            lb.d.as_ptr().add(t0),
        );
        // Group g of lane t0 + t, broadcast.
        macro_rules! x {
            ($g:expr, $t:expr) => {
                _mm256_set1_epi32(std::ptr::read_unaligned(
                    il.add(32 * $g + 4 * $t).cast::<i32>(),
                ))
            };
        }
        macro_rules! init {
            ($t:expr) => {
                _mm256_set1_epi32(init_of::<B, VNNI>(*isum.add($t)))
            };
        }
        let (s0, s1, s2, s3);
        if B::KIND == Quants::U4 && !VNNI {
            // 8 groups of `maddubs` pairs (each |pair| <= 2 * 15 * 127) sum in i16 without
            // overflow, then widen once.
            let z = _mm256_setzero_si256();
            let (mut p0, mut p1, mut p2, mut p3) = (z, z, z, z);
            unroll8!(g => {
                let w = pb.q[g];
                p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(w, x!(g, 0)));
                p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(w, x!(g, 1)));
                p2 = _mm256_add_epi16(p2, _mm256_maddubs_epi16(w, x!(g, 2)));
                p3 = _mm256_add_epi16(p3, _mm256_maddubs_epi16(w, x!(g, 3)));
            });
            s0 = _mm256_add_epi32(init!(0), _mm256_madd_epi16(p0, ones));
            s1 = _mm256_add_epi32(init!(1), _mm256_madd_epi16(p1, ones));
            s2 = _mm256_add_epi32(init!(2), _mm256_madd_epi16(p2, ones));
            s3 = _mm256_add_epi32(init!(3), _mm256_madd_epi16(p3, ones));
        } else if B::KIND == Quants::U5 && !VNNI {
            // As for 4 bits, but 4 groups at most per i16 sum (each |pair| <= 2 * 31 * 127).
            let z = _mm256_setzero_si256();
            let (mut s, mut p) = ([init!(0), init!(1), init!(2), init!(3)], [z; 4]);
            unroll8!(g => {
                let w = pb.q[g];
                p[0] = _mm256_add_epi16(p[0], _mm256_maddubs_epi16(w, x!(g, 0)));
                p[1] = _mm256_add_epi16(p[1], _mm256_maddubs_epi16(w, x!(g, 1)));
                p[2] = _mm256_add_epi16(p[2], _mm256_maddubs_epi16(w, x!(g, 2)));
                p[3] = _mm256_add_epi16(p[3], _mm256_maddubs_epi16(w, x!(g, 3)));
                if g == 3 || g == 7 {
                    for k in 0..4 {
                        s[k] = _mm256_add_epi32(s[k], _mm256_madd_epi16(p[k], ones));
                        p[k] = z;
                    }
                }
            });
            (s0, s1, s2, s3) = (s[0], s[1], s[2], s[3]);
        } else if B::KIND == Quants::U6 {
            // Groups 0..4 are the first half of the sub-block, 4..8 the second: each half's
            // sum times its rows' scales, less 32 sc times the lane's half sums (the offset).
            let hs = lb.hsums.as_ptr().add(t0);
            macro_rules! offset {
                ($t:expr) => {
                    _mm256_madd_epi16(pb.s[2], _mm256_set1_epi32(*hs.add($t)))
                };
            }
            let z = _mm256_setzero_si256();
            if VNNI {
                let (mut lo, mut hi) = ([z; 4], [z; 4]);
                unroll8!(g => {
                    let w = pb.q[g];
                    let acc = if g < 4 { &mut lo } else { &mut hi };
                    acc[0] = dot_u8_i8::<VNNI>(acc[0], w, x!(g, 0));
                    acc[1] = dot_u8_i8::<VNNI>(acc[1], w, x!(g, 1));
                    acc[2] = dot_u8_i8::<VNNI>(acc[2], w, x!(g, 2));
                    acc[3] = dot_u8_i8::<VNNI>(acc[3], w, x!(g, 3));
                });
                let scaled = |k: usize| {
                    _mm256_add_epi32(
                        _mm256_mullo_epi32(lo[k], pb.s[3]),
                        _mm256_mullo_epi32(hi[k], pb.s[4]),
                    )
                };
                s0 = _mm256_sub_epi32(scaled(0), offset!(0));
                s1 = _mm256_sub_epi32(scaled(1), offset!(1));
                s2 = _mm256_sub_epi32(scaled(2), offset!(2));
                s3 = _mm256_sub_epi32(scaled(3), offset!(3));
            } else {
                // Two groups of pairs (each |pair| <= 2 * 63 * 127) sum in i16, then `madd`
                // against the scales widens and scales them at once.
                let mut s = [
                    _mm256_sub_epi32(z, offset!(0)),
                    _mm256_sub_epi32(z, offset!(1)),
                    _mm256_sub_epi32(z, offset!(2)),
                    _mm256_sub_epi32(z, offset!(3)),
                ];
                let mut p = [z; 4];
                unroll8!(g => {
                    let w = pb.q[g];
                    p[0] = _mm256_add_epi16(p[0], _mm256_maddubs_epi16(w, x!(g, 0)));
                    p[1] = _mm256_add_epi16(p[1], _mm256_maddubs_epi16(w, x!(g, 1)));
                    p[2] = _mm256_add_epi16(p[2], _mm256_maddubs_epi16(w, x!(g, 2)));
                    p[3] = _mm256_add_epi16(p[3], _mm256_maddubs_epi16(w, x!(g, 3)));
                    if g % 2 == 1 {
                        let sc = pb.s[g / 4];
                        for k in 0..4 {
                            s[k] = _mm256_add_epi32(s[k], _mm256_madd_epi16(p[k], sc));
                            p[k] = z;
                        }
                    }
                });
                (s0, s1, s2, s3) = (s[0], s[1], s[2], s[3]);
            }
        } else if VNNI {
            // Two chains per lane (even and odd groups): one `vpdpbusd` waits for the previous
            // one into the same register, and 4 chains of 8 left the unit idle half the time
            // (the integer sums do not depend on the split).
            let z = _mm256_setzero_si256();
            let mut e = [init!(0), init!(1), init!(2), init!(3)];
            let mut o = [z; 4];
            unroll8!(g => {
                let w = pb.q[g];
                let acc = if g.is_multiple_of(2) { &mut e } else { &mut o };
                acc[0] = dot_u8_i8::<VNNI>(acc[0], w, x!(g, 0));
                acc[1] = dot_u8_i8::<VNNI>(acc[1], w, x!(g, 1));
                acc[2] = dot_u8_i8::<VNNI>(acc[2], w, x!(g, 2));
                acc[3] = dot_u8_i8::<VNNI>(acc[3], w, x!(g, 3));
            });
            s0 = _mm256_add_epi32(e[0], o[0]);
            s1 = _mm256_add_epi32(e[1], o[1]);
            s2 = _mm256_add_epi32(e[2], o[2]);
            s3 = _mm256_add_epi32(e[3], o[3]);
        } else {
            // Q8_0 on AVX2, the sign trick: |q| times x carrying q's sign.
            let (mut p0, mut p1, mut p2, mut p3) = (init!(0), init!(1), init!(2), init!(3));
            unroll8!(g => {
                let (w, sg) = (pb.q[g], pb.s[g]);
                p0 = dot_u8_i8::<false>(p0, w, _mm256_sign_epi8(x!(g, 0), sg));
                p1 = dot_u8_i8::<false>(p1, w, _mm256_sign_epi8(x!(g, 1), sg));
                p2 = dot_u8_i8::<false>(p2, w, _mm256_sign_epi8(x!(g, 2), sg));
                p3 = dot_u8_i8::<false>(p3, w, _mm256_sign_epi8(x!(g, 3), sg));
            });
            (s0, s1, s2, s3) = (p0, p1, p2, p3);
        }
        // The same float steps as every kernel: f32(isum) * (d_w * d_x), fused into the sum.
        macro_rules! sc {
            ($t:expr) => {
                _mm256_mul_ps(pb.d, _mm256_set1_ps(*dx.add($t)))
            };
        }
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), sc!(0), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), sc!(1), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2), sc!(2), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s3), sc!(3), a3);
    }
    (acc[t0], acc[t0 + 1], acc[t0 + 2], acc[t0 + 3]) = (a0, a1, a2, a3);
}

/// Eight weight rows times the (up to) 8 interleaved activation rows of `a`: `[lane][row]`.
/// The rows' blocks are transposed a chunk at a time (see [`RowsBlock`]), then each half of
/// the lanes passes over the chunk: a weight vector serves 4 lanes, an activation group
/// (broadcast from memory, no shuffle) serves 8 rows. `next_tile`: where the next tile's
/// rows start, prefetched along the way.
#[inline(always)]
unsafe fn rows8_body<B: TileKernel, const VNNI: bool>(
    w: [&[B]; 8],
    a: &ActLanes,
    pack: &mut [RowsBlock; CHUNK],
    next_tile: *const u8,
) -> [[f32; 8]; LANES] {
    // Sub-blocks per row (each meets one activation block).
    let nb = w[0].len() * B::SUBS;
    assert!(a.nb() >= nb && w.iter().all(|r| r.len() * B::SUBS == nb));
    let wp = w.map(<[B]>::as_ptr);
    // Lanes past the rows given repeat the last one: with 4 rows or fewer, half a pass.
    let lanes = if a.rows() > 4 { 8 } else { 4 };
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut mn = [_mm256_setzero_ps(); 8];
    let mut i0 = 0;
    while i0 < nb {
        let n = (nb - i0).min(CHUNK);
        // A chunk is whole blocks: CHUNK is a multiple of SUBS (1 or 8), and so are i0 and nb.
        for (k, pb) in pack[..n].chunks_exact_mut(B::SUBS).enumerate() {
            // SAFETY: i0 + k SUBS < nb, so block i0 / SUBS + k is within every row (asserted
            // above).
            B::pack_block::<VNNI>(&wp, i0 / B::SUBS + k, pb);
        }
        let blocks = &a.blocks[i0..i0 + n];
        // The next tile's bytes at the pace of this one's blocks: its 8 rows follow these in
        // memory, and the 8 row streams a tile reads side by side are more than the hardware
        // prefetcher follows (without it, the loads of weights arriving from DRAM took a third
        // of the kernel's time in a served model).
        let ahead = next_tile.wrapping_add(i0 * 8 * sub_bytes::<B>());
        for t0 in (0..lanes).step_by(4) {
            let ahead = if t0 == 0 { ahead } else { std::ptr::null() };
            lanes4_pass::<B, VNNI>(&pack[..n], blocks, t0, &mut acc, ahead);
        }
        if B::HAS_MIN {
            // One lane at a time, so that its sum stays in a register over the chunk.
            for (t, m) in mn[..lanes].iter_mut().enumerate() {
                let mut v = *m;
                for (pb, lb) in pack[..n].iter().zip(blocks) {
                    v = _mm256_fmadd_ps(pb.m, _mm256_set1_ps(lb.ds[t]), v);
                }
                *m = v;
            }
        }
        i0 += n;
    }
    let mut out = [[0f32; 8]; LANES];
    for (t, o) in out.iter_mut().enumerate() {
        let t = t.min(lanes.min(a.rows()) - 1);
        *o = store8(if B::HAS_MIN {
            _mm256_add_ps(acc[t], mn[t])
        } else {
            acc[t]
        });
    }
    out
}

/// Weight rows (`out.len()` rows of `nb` blocks, row-major) times one activation row, 4 rows
/// per tile; a last partial tile repeats its last row in the unused lanes.
#[inline(always)]
unsafe fn rows4_over<B: TileKernel, const VNNI: bool>(
    w: &[B],
    nb: usize,
    act: &ActQ8,
    out: &mut [f32],
) {
    let rows = out.len();
    let row = |r: usize| &w[r * nb..(r + 1) * nb];
    let mut r = 0;
    while r < rows {
        let mut tile = [row(r); 4];
        for (k, t) in tile.iter_mut().enumerate() {
            *t = row((r + k).min(rows - 1));
        }
        let o = B::rows4::<VNNI>(tile, act);
        let n = (rows - r).min(4);
        out[r..r + n].copy_from_slice(&o[..n]);
        r += 4;
    }
}

/// Weight rows times the interleaved activation rows of `a`, 8 weight rows per tile (a last
/// partial tile repeats its last row).
#[inline(always)]
unsafe fn lanes_over<B: TileKernel, const VNNI: bool>(
    w: &[B],
    nb: usize,
    a: &ActLanes,
    out: &mut [[f32; LANES]],
) {
    let rows = out.len();
    let row = |r: usize| &w[r * nb..(r + 1) * nb];
    // SAFETY: every field is a vector or an array of vectors, for which all-zero bytes are a
    // value.
    let mut pack: [RowsBlock; CHUNK] = std::mem::zeroed();
    let mut r = 0;
    while r < rows {
        let mut tile = [row(r); 8];
        for (k, t) in tile.iter_mut().enumerate() {
            *t = row((r + k).min(rows - 1));
        }
        // Prefetched while this tile runs: only a hint, never dereferenced (it may lie past
        // the matrix).
        let next = w.as_ptr().wrapping_add((r + 8) * nb).cast::<u8>();
        let o = rows8_body::<B, VNNI>(tile, a, &mut pack, next);
        for (k, dst) in out[r..(r + 8).min(rows)].iter_mut().enumerate() {
            for (t, d) in dst.iter_mut().enumerate() {
                *d = o[t][k];
            }
        }
        r += 8;
    }
}

macro_rules! tile_entries {
    ($block:ty, $rows4:ident, $lanes:ident) => {
        /// Weight rows times one activation row: `out[r] = W[r] . x`.
        ///
        /// # Safety
        /// `isa` must be what [`Isa::detect`] returned (or a lesser set the CPU has); `act`
        /// covers `nb` 32-element blocks. (Lengths of `w` are checked: a short `w` panics, it
        /// is never read out of bounds.)
        pub unsafe fn $rows4(isa: Isa, w: &[$block], nb: usize, act: &ActQ8, out: &mut [f32]) {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2(w: &[$block], nb: usize, act: &ActQ8, out: &mut [f32]) {
                rows4_over::<$block, false>(w, nb, act, out)
            }
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
            unsafe fn vnni(w: &[$block], nb: usize, act: &ActQ8, out: &mut [f32]) {
                rows4_over::<$block, true>(w, nb, act, out)
            }
            let subs = nb * <$block as TileKernel>::SUBS;
            assert!(act.blk.len() >= subs && act.qs.len() >= 32 * subs);
            match isa {
                Isa::Vnni => vnni(w, nb, act, out),
                _ => avx2(w, nb, act, out),
            }
        }

        /// Weight rows times up to 8 interleaved activation rows: `out[r][t] = W[r] . X[t]`
        /// (lanes past `a`'s rows repeat its last row).
        ///
        /// # Safety
        /// As for the single-row kernel; `a` covers `nb` blocks (checked).
        pub unsafe fn $lanes(
            isa: Isa,
            w: &[$block],
            nb: usize,
            a: &ActLanes,
            out: &mut [[f32; LANES]],
        ) {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2(w: &[$block], nb: usize, a: &ActLanes, out: &mut [[f32; LANES]]) {
                lanes_over::<$block, false>(w, nb, a, out)
            }
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
            unsafe fn vnni(w: &[$block], nb: usize, a: &ActLanes, out: &mut [[f32; LANES]]) {
                lanes_over::<$block, true>(w, nb, a, out)
            }
            match isa {
                Isa::Vnni => vnni(w, nb, a, out),
                _ => avx2(w, nb, a, out),
            }
        }
    };
}

tile_entries!(BlockQ4_1, q4_1_rows4, q4_1_lanes);
tile_entries!(BlockQ4_0, q4_0_rows4, q4_0_lanes);
tile_entries!(BlockQ8_0, q8_0_rows4, q8_0_lanes);
tile_entries!(BlockQ5_0, q5_0_rows4, q5_0_lanes);
tile_entries!(BlockQ5_1, q5_1_rows4, q5_1_lanes);
tile_entries!(BlockQ4K, q4_k_rows4, q4_k_lanes);
tile_entries!(BlockQ5K, q5_k_rows4, q5_k_lanes);
tile_entries!(BlockQ6K, q6_k_rows4, q6_k_lanes);
tile_entries!(BlockQ3K, q3_k_rows4, q3_k_lanes);

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
