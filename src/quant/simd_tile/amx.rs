//! AMX-INT8 forms of the lanes kernels for Q4_0, Q4_1 and Q8_0 (the batched decode products of
//! the models people run on CPUs: SmolLM2's Q4_1 layers and Q8_0 head, Q4_0 files).
//!
//! One tile product (`tdpbusd`, `tdpbssd` for Q8_0) multiplies one 32-element block of 16 weight
//! rows (tile A: 16 rows of 32 bytes, the nibbles unpacked to bytes; Q8_0's quants are read in
//! place with the row stride) by the same block of the 8 interleaved activation rows
//! ([`LaneBlock::qs`](super::LaneBlock) is already tile B's layout: 8 groups of 4 quants of 8
//! lanes), giving the 16 x 8 integer sums of that block at once. Each block's sums are then
//! scaled and accumulated in f32 with the very steps of the AVX lanes kernel (`f32(sum +
//! offset) * (d_w * d_x)` fused into the running sum, the min terms summed apart and added
//! last), so the results have the same bits as `lanes_over` (tested).
//!
//! The tile registers: tmm0 the 16 x 8 i32 sums, tmm1 the weights, tmm2 the activations.
//! Linux grants the tile data state per process on request (`arch_prctl`), once.

use super::{ActLanes, LANES};
use std::arch::asm;
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// Weight rows per tile product.
pub const ROWS: usize = 16;

/// The block types with an AMX form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AmxType {
    Q4_0,
    Q4_1,
    Q8_0,
}

impl AmxType {
    /// Bytes per 32-element block.
    const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
    /// Offset of the quants in a block.
    const fn qs_at(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q8_0 => 2,
            Self::Q4_1 => 4,
        }
    }
}

/// Whether this process may run the AMX kernels: the CPU has AMX-TILE, AMX-INT8 and the
/// AVX-512 the scaling uses, the OS granted the tile state, and the ISA cap
/// ([`crate::quant::cpu_isa`]) is the default. Probed once; the cap is read at each call.
pub fn enabled() -> bool {
    static HW: OnceLock<bool> = OnceLock::new();
    *HW.get_or_init(probe) && crate::quant::cpu_isa() == crate::quant::CpuIsa::Best
}

fn probe() -> bool {
    if !super::has_vnni() || !is_x86_feature_detected!("f16c") {
        return false;
    }
    // CPUID leaf 7 exists on every CPU with AVX-512 (checked above).
    let l7 = __cpuid_count(7, 0);
    let (tile, int8) = (l7.edx & (1 << 24) != 0, l7.edx & (1 << 25) != 0);
    if !(tile && int8) {
        return false;
    }
    request_tile_state()
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments; it only changes which register
    // state this process may use.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The `ldtilecfg` operand: palette 1, the sums (tmm0, tmm3) 16 rows x 32 bytes (8 i32), the
/// weights (tmm1, tmm4) 16 x 32, the activations (tmm2, tmm5) 8 x 32.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

impl TileConfig {
    fn lanes() -> Self {
        let mut c = [0u8; 64];
        c[0] = 1;
        for (t, rows) in [(0usize, ROWS as u8), (1, ROWS as u8), (2, 8)]
            .into_iter()
            .flat_map(|(t, r)| [(t, r), (t + 3, r)])
        {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&32u16.to_le_bytes());
            c[48 + t] = rows;
        }
        Self(c)
    }
}

#[repr(C, align(64))]
struct Aligned<T>(T);

/// `out[r][t] = W[r] . X[t]` for the first `out.len() / 16 * 16` rows of `w` (rows of
/// `row_bytes`, blocks of `ty`) and the interleaved activation rows of `a`; returns the rows
/// done (the caller runs the rest with the AVX kernel).
///
/// # Safety
/// [`enabled`] returned true; `w` holds `out.len()` rows of `row_bytes` = `a.nb()` blocks.
pub unsafe fn lanes(
    ty: AmxType,
    w: &[u8],
    row_bytes: usize,
    a: &ActLanes,
    out: &mut [[f32; LANES]],
) -> usize {
    let nb = a.nb();
    assert_eq!(row_bytes, nb * ty.block_bytes());
    assert!(w.len() >= out.len() * row_bytes);
    let rows = out.len() / ROWS * ROWS;
    if rows == 0 || nb == 0 {
        return 0;
    }
    match ty {
        AmxType::Q4_0 => tiles::<0>(w, row_bytes, a, &mut out[..rows]),
        AmxType::Q4_1 => tiles::<1>(w, row_bytes, a, &mut out[..rows]),
        AmxType::Q8_0 => tiles::<2>(w, row_bytes, a, &mut out[..rows]),
    }
    rows
}

const fn ty_of(t: u8) -> AmxType {
    match t {
        0 => AmxType::Q4_0,
        1 => AmxType::Q4_1,
        _ => AmxType::Q8_0,
    }
}

/// Blocks whose weights are unpacked (and scales converted) ahead of their tile products: the
/// unpacked bytes are in L1 and long stored when the tile loads read them.
const CHUNK: usize = 16;

/// The kernel for `rows` (a multiple of 16) rows; `TY` indexes [`AmxType`] (0 Q4_0, 1 Q4_1,
/// 2 Q8_0). Per tile of 16 rows, a chunk of blocks at a time: the 16 rows' scales (and mins)
/// of every block gathered and converted, their nibbles unpacked; then the tile products, two
/// blocks in flight (tmm0/tmm3 the sums, tmm1/tmm4 the weights, tmm2/tmm5 the activations),
/// each block's sums scaled into the running sums in block order.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
unsafe fn tiles<const TY: u8>(w: &[u8], rb: usize, a: &ActLanes, out: &mut [[f32; LANES]]) {
    let ty = ty_of(TY);
    let (bs, qs_at) = (ty.block_bytes(), ty.qs_at());
    let nb = a.nb();
    // Q4_0's quants are q - 8: the sums take -8 times the activations' quant sum.
    let offset = _mm256_set1_epi32(if ty == AmxType::Q4_0 { -8 } else { 0 });
    let cfg = TileConfig::lanes();
    let mut abuf = Aligned([[0u8; ROWS * 32]; CHUNK]);
    let mut cbuf = Aligned([[0i32; ROWS * LANES]; 2]);
    let mut dw = Aligned([[0f32; ROWS]; CHUNK]);
    let mut mw = Aligned([[0f32; ROWS]; CHUNK]);
    // Byte offsets of the 16 rows' blocks from the first's (gather indices).
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(i32::try_from(rb).expect("row bytes fit i32")),
    );
    let low4 = _mm_set1_epi8(0x0F);
    // SAFETY: `cfg` is a valid palette-1 configuration (64 bytes, aligned).
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    for (tile, o) in out.chunks_exact_mut(ROWS).enumerate() {
        let base = w.as_ptr().add(tile * ROWS * rb);
        let mut acc = [_mm256_setzero_ps(); ROWS];
        let mut mn = [_mm256_setzero_ps(); ROWS];
        let mut i0 = 0;
        while i0 < nb {
            let n = (nb - i0).min(CHUNK);
            for j in 0..n {
                let blk = base.add((i0 + j) * bs);
                // The 16 rows' scales: the first 4 bytes of each block (d, then Q4_1's m).
                let dm = _mm512_i32gather_epi32::<1>(idx, blk.cast());
                _mm512_store_ps(
                    dw.0[j].as_mut_ptr(),
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm)),
                );
                if ty == AmxType::Q4_1 {
                    _mm512_store_ps(
                        mw.0[j].as_mut_ptr(),
                        _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm))),
                    );
                }
                if ty != AmxType::Q8_0 {
                    for k in 0..ROWS {
                        let q = _mm_loadu_si128(blk.add(k * rb + qs_at).cast());
                        let lo = _mm_and_si128(q, low4);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), low4);
                        _mm256_store_si256(
                            abuf.0[j].as_mut_ptr().add(32 * k).cast(),
                            _mm256_set_m128i(hi, lo),
                        );
                    }
                }
            }
            let mut j = 0;
            while j < n {
                let pair = n - j >= 2;
                // A: Q8_0's signed quants in place (one row every `rb` bytes), else the
                // unpacked nibbles.
                let (a0, a1, astride) = if ty == AmxType::Q8_0 {
                    let b = base.add((i0 + j) * bs + qs_at);
                    (b, b.add(bs), rb)
                } else {
                    (abuf.0[j].as_ptr(), abuf.0[(j + 1).min(n - 1)].as_ptr(), 32)
                };
                let lb0 = &a.blocks[i0 + j];
                asm!("tileloadd tmm1, [{b} + {s}*1]", b = in(reg) a0, s = in(reg) astride,
                     options(nostack, readonly));
                asm!("tileloadd tmm2, [{b} + {s}*1]", b = in(reg) lb0.qs.as_ptr(), s = in(reg) 32usize,
                     options(nostack, readonly));
                asm!("tilezero tmm0", options(nostack, nomem));
                if ty == AmxType::Q8_0 {
                    asm!("tdpbssd tmm0, tmm1, tmm2", options(nostack, nomem));
                } else {
                    asm!("tdpbusd tmm0, tmm1, tmm2", options(nostack, nomem));
                }
                if pair {
                    let lb1 = &a.blocks[i0 + j + 1];
                    asm!("tileloadd tmm4, [{b} + {s}*1]", b = in(reg) a1, s = in(reg) astride,
                         options(nostack, readonly));
                    asm!("tileloadd tmm5, [{b} + {s}*1]", b = in(reg) lb1.qs.as_ptr(), s = in(reg) 32usize,
                         options(nostack, readonly));
                    asm!("tilezero tmm3", options(nostack, nomem));
                    if ty == AmxType::Q8_0 {
                        asm!("tdpbssd tmm3, tmm4, tmm5", options(nostack, nomem));
                    } else {
                        asm!("tdpbusd tmm3, tmm4, tmm5", options(nostack, nomem));
                    }
                }
                asm!("tilestored [{b} + {s}*1], tmm0", b = in(reg) cbuf.0[0].as_mut_ptr(), s = in(reg) 32usize,
                     options(nostack));
                if pair {
                    asm!("tilestored [{b} + {s}*1], tmm3", b = in(reg) cbuf.0[1].as_mut_ptr(), s = in(reg) 32usize,
                         options(nostack));
                }
                for h in 0..(1 + pair as usize) {
                    // The next tile (16 rows, contiguous after these) prefetched at the pace of
                    // this one's products, a block's share per block: spread, not in a burst
                    // (a burst waits for the core's few outstanding-miss slots). Only a hint:
                    // the address may lie past the matrix and is never dereferenced.
                    let ahead = base.wrapping_add(ROWS * rb + (i0 + j + h) * ROWS * bs);
                    let mut off = 0;
                    while off < ROWS * bs {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
                        off += 64;
                    }
                    let lb = &a.blocks[i0 + j + h];
                    let dx = _mm256_loadu_ps(lb.d.as_ptr());
                    let init =
                        _mm256_mullo_epi32(offset, _mm256_loadu_si256(lb.isum.as_ptr().cast()));
                    let c = &cbuf.0[h];
                    let d = &dw.0[j + h];
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let s =
                            _mm256_add_epi32(init, _mm256_load_si256(c.as_ptr().add(8 * k).cast()));
                        let sc = _mm256_mul_ps(_mm256_set1_ps(d[k]), dx);
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sc, *acc);
                    }
                    if ty == AmxType::Q4_1 {
                        // The min terms, summed apart over the blocks as the AVX kernel does.
                        let ds = _mm256_loadu_ps(lb.ds.as_ptr());
                        let m = &mw.0[j + h];
                        for (k, v) in mn.iter_mut().enumerate() {
                            *v = _mm256_fmadd_ps(_mm256_set1_ps(m[k]), ds, *v);
                        }
                    }
                }
                j += 1 + pair as usize;
            }
            i0 += n;
        }
        for (k, dst) in o.iter_mut().enumerate() {
            let v = if ty == AmxType::Q4_1 {
                _mm256_add_ps(acc[k], mn[k])
            } else {
                acc[k]
            };
            _mm256_storeu_ps(dst.as_mut_ptr(), v);
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}
