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
//!
//! Where the CPU has AMX-INT8 (Sapphire Rapids and later) and Linux grants the tile state, the
//! lanes products of Q4_0, Q4_1 and Q8_0 take 16 weight rows at a time through tile products
//! instead ([`amx`], the same bits; `ROCMFORGE_CPU_ISA=vnni` keeps the VNNI kernel).

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

pub mod amx;
mod kernels;
mod lanes;

use lanes::lanes_over;

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
            (Some(Isa::Vnni), CpuIsa::Vnni, Some(Isa::Vnni)),
            (Some(Isa::Avx2), CpuIsa::Vnni, Some(Isa::Avx2)),
            (Some(Isa::Avx2), CpuIsa::Best, Some(Isa::Avx2)),
            (Some(Isa::Avx2), CpuIsa::Avx2, Some(Isa::Avx2)),
            (None, CpuIsa::Best, None),
            (None, CpuIsa::Avx2, None),
        ] {
            assert_eq!(Isa::capped(hw, cap), want, "{hw:?} under {cap:?}");
        }
    }
}
