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

/// Per-thread buffers of the kernel: one 16-row tile's unpacked quants and converted scales
/// and mins, for every block of a row (reused across calls).
#[derive(Default)]
struct Scratch {
    abuf: Vec<u8>,
    dw: Vec<f32>,
    mw: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
}

/// `outs[g][r][t] = W[r] . X_g[t]` for the first `n / 16 * 16` rows of `w` (rows of
/// `row_bytes`, blocks of `ty`; `n` = every `outs[g].len()`) and the interleaved activation
/// rows of each group `groups[g]`: each 16-row tile is unpacked once for all the groups (a
/// prompt's). Returns the rows done (the caller runs the rest with the AVX kernel).
///
/// # Safety
/// [`enabled`] returned true; `w` holds `n` rows of `row_bytes` = `nb` blocks, the `nb` of
/// every group.
pub unsafe fn lanes(
    ty: AmxType,
    w: &[u8],
    row_bytes: usize,
    groups: &[ActLanes],
    outs: &mut [&mut [[f32; LANES]]],
) -> usize {
    let (Some(g0), Some(o0)) = (groups.first(), outs.first()) else {
        return 0;
    };
    let (nb, n) = (g0.nb(), o0.len());
    assert_eq!(groups.len(), outs.len());
    assert!(groups.iter().all(|g| g.nb() == nb) && outs.iter().all(|o| o.len() == n));
    assert_eq!(row_bytes, nb * ty.block_bytes());
    assert!(w.len() >= n * row_bytes);
    let rows = n / ROWS * ROWS;
    if rows == 0 || nb == 0 {
        return 0;
    }
    SCRATCH.with(|cell| {
        let mut fresh = Scratch::default();
        let mut held = cell.try_borrow_mut();
        let s = match held.as_deref_mut() {
            Ok(s) => s,
            Err(_) => &mut fresh,
        };
        match ty {
            AmxType::Q4_0 => tiles::<0>(w, row_bytes, groups, outs, rows, s),
            AmxType::Q4_1 => tiles::<1>(w, row_bytes, groups, outs, rows, s),
            AmxType::Q8_0 => tiles::<2>(w, row_bytes, groups, outs, rows, s),
        }
    });
    rows
}

const fn ty_of(t: u8) -> AmxType {
    match t {
        0 => AmxType::Q4_0,
        1 => AmxType::Q4_1,
        _ => AmxType::Q8_0,
    }
}

/// The kernel for the first `rows` (a multiple of 16) rows; `TY` indexes [`AmxType`] (0 Q4_0,
/// 1 Q4_1, 2 Q8_0). Per tile of 16 rows: the 16 rows' scales (and mins) of every block gathered
/// and converted, their nibbles unpacked, once; then, for each group, the tile products, two
/// blocks in flight (tmm0/tmm3 the sums, tmm1/tmm4 the weights, tmm2/tmm5 the activations),
/// each block's sums scaled into the running sums in block order.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw")]
unsafe fn tiles<const TY: u8>(
    w: &[u8],
    rb: usize,
    groups: &[ActLanes],
    outs: &mut [&mut [[f32; LANES]]],
    rows: usize,
    sc: &mut Scratch,
) {
    let ty = ty_of(TY);
    let (bs, qs_at) = (ty.block_bytes(), ty.qs_at());
    let nb = groups[0].nb();
    // Q4_0's quants are q - 8: the sums take -8 times the activations' quant sum.
    let offset = _mm256_set1_epi32(if ty == AmxType::Q4_0 { -8 } else { 0 });
    let cfg = TileConfig::lanes();
    if ty != AmxType::Q8_0 {
        sc.abuf.resize(nb * ROWS * 32, 0);
    }
    sc.dw.resize(nb * ROWS, 0.0);
    sc.mw.resize(nb * ROWS, 0.0);
    let mut cbuf = Aligned([[0i32; ROWS * LANES]; 2]);
    // Byte offsets of the 16 rows' blocks from the first's (gather indices).
    let idx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(i32::try_from(rb).expect("row bytes fit i32")),
    );
    let low4 = _mm_set1_epi8(0x0F);
    // SAFETY: `cfg` is a valid palette-1 configuration (64 bytes, aligned).
    asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly));
    for tile in 0..rows / ROWS {
        let base = w.as_ptr().add(tile * ROWS * rb);
        for i in 0..nb {
            let blk = base.add(i * bs);
            // The 16 rows' scales: the first 4 bytes of each block (d, then Q4_1's m).
            let dm = _mm512_i32gather_epi32::<1>(idx, blk.cast());
            _mm512_storeu_ps(
                sc.dw.as_mut_ptr().add(i * ROWS),
                _mm512_cvtph_ps(_mm512_cvtepi32_epi16(dm)),
            );
            if ty == AmxType::Q4_1 {
                _mm512_storeu_ps(
                    sc.mw.as_mut_ptr().add(i * ROWS),
                    _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(dm))),
                );
            }
            if ty != AmxType::Q8_0 {
                let dst = sc.abuf.as_mut_ptr().add(i * ROWS * 32);
                for k in 0..ROWS {
                    let q = _mm_loadu_si128(blk.add(k * rb + qs_at).cast());
                    let lo = _mm_and_si128(q, low4);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(q), low4);
                    _mm256_storeu_si256(dst.add(32 * k).cast(), _mm256_set_m128i(hi, lo));
                }
            }
        }
        for (gi, (a, out)) in groups.iter().zip(outs.iter_mut()).enumerate() {
            let mut acc = [_mm256_setzero_ps(); ROWS];
            let mut mn = [_mm256_setzero_ps(); ROWS];
            let mut j = 0;
            while j < nb {
                let pair = nb - j >= 2;
                // A: Q8_0's signed quants in place (one row every `rb` bytes), else the
                // unpacked nibbles.
                let (a0, a1, astride) = if ty == AmxType::Q8_0 {
                    let b = base.add(j * bs + qs_at);
                    (b, b.add(bs), rb)
                } else {
                    let b = sc.abuf.as_ptr().add(j * ROWS * 32);
                    (b, b.add(ROWS * 32 * usize::from(pair)), 32)
                };
                let lb0 = &a.blocks[j];
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
                    let lb1 = &a.blocks[j + 1];
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
                for h in 0..(1 + usize::from(pair)) {
                    if gi == 0 {
                        // The next tile (16 rows, contiguous after these) prefetched at the pace
                        // of this one's products, a block's share per block: spread, not in a
                        // burst (a burst waits for the core's few outstanding-miss slots). Only
                        // a hint: the address may lie past the matrix and is never dereferenced.
                        let ahead = base.wrapping_add(ROWS * rb + (j + h) * ROWS * bs);
                        let mut off = 0;
                        while off < ROWS * bs {
                            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(off).cast());
                            off += 64;
                        }
                    }
                    let lb = &a.blocks[j + h];
                    let dx = _mm256_loadu_ps(lb.d.as_ptr());
                    let init =
                        _mm256_mullo_epi32(offset, _mm256_loadu_si256(lb.isum.as_ptr().cast()));
                    let c = &cbuf.0[h];
                    let d = &sc.dw[(j + h) * ROWS..(j + h + 1) * ROWS];
                    for (k, acc) in acc.iter_mut().enumerate() {
                        let s =
                            _mm256_add_epi32(init, _mm256_load_si256(c.as_ptr().add(8 * k).cast()));
                        let scale = _mm256_mul_ps(_mm256_set1_ps(d[k]), dx);
                        *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, *acc);
                    }
                    if ty == AmxType::Q4_1 {
                        // The min terms, summed apart over the blocks as the AVX kernel does.
                        let ds = _mm256_loadu_ps(lb.ds.as_ptr());
                        let m = &sc.mw[(j + h) * ROWS..(j + h + 1) * ROWS];
                        for (k, v) in mn.iter_mut().enumerate() {
                            *v = _mm256_fmadd_ps(_mm256_set1_ps(m[k]), ds, *v);
                        }
                    }
                }
                j += 1 + usize::from(pair);
            }
            for (k, dst) in out[tile * ROWS..(tile + 1) * ROWS].iter_mut().enumerate() {
                let v = if ty == AmxType::Q4_1 {
                    _mm256_add_ps(acc[k], mn[k])
                } else {
                    acc[k]
                };
                _mm256_storeu_ps(dst.as_mut_ptr(), v);
            }
        }
    }
    asm!("tilerelease", options(nostack, nomem));
}
