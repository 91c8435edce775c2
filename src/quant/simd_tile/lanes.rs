//! The lanes kernel: 8 weight rows (transposed a chunk of blocks at a time into
//! [`RowsBlock`](super::RowsBlock)s) times up to 8 interleaved activation rows.

use super::*;

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
pub(super) unsafe fn transpose_rows8(r: [__m256i; 8]) -> [__m256i; 8] {
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
pub(super) unsafe fn rows_block<B: TileBlock, const VNNI: bool>(
    w: &[*const B; 8],
    i: usize,
) -> RowsBlock {
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

/// Weight rows times the interleaved activation rows of `a`, 8 weight rows per tile (a last
/// partial tile repeats its last row).
#[inline(always)]
pub(super) unsafe fn lanes_over<B: TileKernel, const VNNI: bool>(
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
