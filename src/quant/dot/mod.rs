//! CPU matrix-vector and matrix-matrix products over quantized weight rows.
//!
//! Every output element `Y[b, r]` is computed by one thread, by the same arithmetic whether it is
//! reached through `matvec` or `matmul` and whatever tile it falls in, so `matmul` row b equals
//! `matvec(X[b])` bit for bit and neither depends on the number of threads.
//!
//! Work split: rows are grouped in tiles of `ROW_ALIGN`; the tiles of every matrix of a call
//! (several matrices sharing one input are fused into one call, see `matmul_fused`) are handed
//! to Rayon as one index range cut into a few pieces per thread, so a small matrix (the 135M
//! model's are 576..1536 rows) costs one fork-join, not dozens of tiny tasks.

#[cfg(target_arch = "x86_64")]
use super::act::{ActLanes, LANES};
use super::act::{ActQ8, ActsQ8, ACTS};
use super::blocks::{as_blocks, f16, KVALUES_IQ4NL};
#[cfg(target_arch = "x86_64")]
use super::simd;
#[cfg(target_arch = "x86_64")]
use super::simd_tile::{self, Isa};
use super::{fast, reference_row, GgmlType, QuantError};
use rayon::prelude::*;

/// Validates every length before any kernel runs.
pub fn check_shapes(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    y: &[f32],
) -> Result<(), QuantError> {
    if !ty.is_supported() {
        return Err(QuantError::Unsupported {
            ty,
            op: "matvec/matmul",
        });
    }
    let block = ty.block_elems() as usize;
    let row_bytes = ty
        .row_bytes(cols as u64)
        .ok_or(QuantError::NotWholeBlocks {
            ty,
            elems: cols,
            block,
        })?;
    let expected = usize::try_from(row_bytes)
        .ok()
        .and_then(|rb| rb.checked_mul(rows))
        .ok_or(QuantError::Overflow { ty, rows, cols })?;
    if w.len() != expected {
        return Err(QuantError::ByteLength {
            ty,
            expected,
            got: w.len(),
        });
    }
    let xn = batch.checked_mul(cols).ok_or(QuantError::Overflow {
        ty,
        rows: batch,
        cols,
    })?;
    if x.len() != xn {
        return Err(QuantError::Length {
            what: "activations [batch, cols]",
            expected: xn,
            got: x.len(),
        });
    }
    let yn = batch.checked_mul(rows).ok_or(QuantError::Overflow {
        ty,
        rows: batch,
        cols: rows,
    })?;
    if y.len() != yn {
        return Err(QuantError::Length {
            what: "output [batch, rows]",
            expected: yn,
            got: y.len(),
        });
    }
    Ok(())
}

/// f32 dot product with 8 independent accumulators (a fixed order, so deterministic).
#[inline]
pub fn dot_f32_scalar(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        s += x * y;
    }
    s
}

/// How a weight type is multiplied.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Path {
    /// Register-tiled kernels (several rows x several activation rows), Q4_0 / Q4_1 / Q5_0 /
    /// Q5_1 / Q8_0 / Q3_K / Q4_K / Q5_K / Q6_K.
    #[cfg(target_arch = "x86_64")]
    Tile(Isa),
    /// Portable integer kernel with Q8 activations (legacy 32-element types).
    Q8Scalar,
    /// Dequantize the row, then an f32 dot product (float types; Q2_K, which has no integer
    /// kernel yet).
    Float { fma: bool },
}

fn choose(ty: GgmlType) -> Path {
    #[cfg(target_arch = "x86_64")]
    let isa = Isa::detect();
    #[cfg(target_arch = "x86_64")]
    let avx2 = isa.is_some();
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    match ty {
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::Q3_K
        | GgmlType::Q4_K
        | GgmlType::Q5_K
        | GgmlType::Q6_K
            if isa.is_some() =>
        {
            Path::Tile(isa.unwrap_or(Isa::Avx2))
        }
        GgmlType::Q4_0
        | GgmlType::Q4_1
        | GgmlType::Q5_0
        | GgmlType::Q5_1
        | GgmlType::Q8_0
        | GgmlType::Q8_1
        | GgmlType::IQ4_NL => Path::Q8Scalar,
        _ => Path::Float { fma: avx2 },
    }
}

/// Portable legacy kernel: unpack each weight block to (d, m, 32 small ints), integer dot with
/// each activation row, then `d_w*d_x*isum + m_w*d_x*sum_x`.
fn dot_legacy_scalar<const B: usize>(ty: GgmlType, w: &[u8], acts: [&ActQ8; B]) -> [f32; B] {
    let bb = ty.block_bytes() as usize;
    let mut acc = [0.0f32; B];
    let mut q = [0i8; 32];
    for (i, blk) in w.chunks_exact(bb).enumerate() {
        let (d, m) = unpack_legacy(ty, blk, &mut q);
        for b in 0..B {
            let a = acts[b];
            let y = &a.qs[32 * i..32 * i + 32];
            let isum: i32 = q.iter().zip(y).map(|(&p, &v)| p as i32 * v as i32).sum();
            let ab = a.blk[i];
            acc[b] += d * ab.d * isum as f32 + m * ab.d * ab.sum;
        }
    }
    acc
}

/// The scalar reference of the tile kernels (`simd_tile`), bit for bit: per block the exact
/// integer dot `isum` of the weight and activation quants, then `acc = fma(isum, d_w * d_x, acc)`
/// block after block, and for Q4_1 the min term `mn = fma(m_w, d_x * sum_x, mn)` beside it;
/// the result is `acc + mn` (Q4_1, Q5_1) or `acc`. For Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0; the
/// K-quants have their own below.
#[cfg(test)]
pub(crate) fn dot_tile_scalar(ty: GgmlType, w: &[u8], act: &ActQ8) -> f32 {
    match ty {
        GgmlType::Q4_K | GgmlType::Q5_K => return dot_tile_scalar_k_min(ty, w, act),
        GgmlType::Q6_K | GgmlType::Q3_K => return dot_tile_scalar_scaled16(ty, w, act),
        _ => {}
    }
    let bb = ty.block_bytes() as usize;
    let mut q = [0i8; 32];
    let (mut acc, mut mn) = (0.0f32, 0.0f32);
    let has_min = matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1);
    for (i, blk) in w.chunks_exact(bb).enumerate() {
        // Q4_0's quants come back with their -8 offset applied, so `isum` includes it.
        let (d, m) = unpack_legacy(ty, blk, &mut q);
        let y = &act.qs[32 * i..32 * i + 32];
        let isum: i32 = q.iter().zip(y).map(|(&p, &v)| p as i32 * v as i32).sum();
        let ab = act.blk[i];
        acc = (isum as f32).mul_add(d * ab.d, acc);
        if has_min {
            mn = m.mul_add(ab.ds, mn);
        }
    }
    if has_min {
        acc + mn
    } else {
        acc
    }
}

/// [`dot_tile_scalar`] for Q4_K and Q5_K: each 32-element sub-block s as a block of its own,
/// with the scale `d * sc_s` and the min term `fma(-(dmin * m_s), d_x * sum_x, mn)`, both in
/// f32. (Q5_K's fifth bit of element e of sub-block s is bit s of `qh[e]`.)
#[cfg(test)]
fn dot_tile_scalar_k_min(ty: GgmlType, w: &[u8], act: &ActQ8) -> f32 {
    let (mut acc, mut mn) = (0.0f32, 0.0f32);
    let bb = ty.block_bytes() as usize;
    for (i, blk) in w.chunks_exact(bb).enumerate() {
        let (d, dmin) = (f16([blk[0], blk[1]]), f16([blk[2], blk[3]]));
        let scales: &[u8; 12] = blk[4..16].try_into().expect("12 bytes");
        let (qh, qs) = if ty == GgmlType::Q5_K {
            (Some(&blk[16..48]), &blk[48..176])
        } else {
            (None, &blk[16..144])
        };
        for s in 0..8 {
            let (sc, m) = crate::quant::blocks::scale_min_k4(s, scales);
            let ai = 8 * i + s;
            let y = &act.qs[32 * ai..32 * ai + 32];
            let q = |e: usize| {
                let nib = (qs[32 * (s / 2) + e] >> (4 * (s % 2))) & 0xF;
                let high = qh.map_or(0, |h| ((h[e] >> s) & 1) << 4);
                i32::from(nib | high)
            };
            let isum: i32 = (0..32).map(|e| q(e) * i32::from(y[e])).sum();
            let ab = act.blk[ai];
            acc = (isum as f32).mul_add((d * f32::from(sc)) * ab.d, acc);
            mn = (-(dmin * f32::from(m))).mul_add(ab.ds, mn);
        }
    }
    acc + mn
}

/// [`dot_tile_scalar`] for Q6_K and Q3_K: sub-block s (32 elements) has the integer sum
/// `sum_h sc[2s + h] * sum_{e in half h} q_e y_e` (q after its offset: 6-bit less 32, or 3-bit
/// less 4; Q3_K's scales 6-bit less 32), then `acc = fma(isum, d * d_x, acc)`.
#[cfg(test)]
fn dot_tile_scalar_scaled16(ty: GgmlType, w: &[u8], act: &ActQ8) -> f32 {
    let mut acc = 0.0f32;
    let bb = ty.block_bytes() as usize;
    for (i, blk) in w.chunks_exact(bb).enumerate() {
        let d = f16([blk[bb - 2], blk[bb - 1]]);
        for s in 0..8 {
            let ai = 8 * i + s;
            let y = &act.qs[32 * ai..32 * ai + 32];
            let (q, sc) = scaled16_sub(ty, blk, s);
            let isum: i32 = (0..2)
                .map(|h| {
                    let part: i32 = (16 * h..16 * h + 16).map(|e| q[e] * i32::from(y[e])).sum();
                    sc[h] * part
                })
                .sum();
            acc = (isum as f32).mul_add(d * act.blk[ai].d, acc);
        }
    }
    acc
}

/// Sub-block s of a Q6_K or Q3_K block: its 32 quants after the offset, and its two scales.
#[cfg(test)]
fn scaled16_sub(ty: GgmlType, blk: &[u8], s: usize) -> ([i32; 32], [i32; 2]) {
    let (n, k) = (s / 4, s % 4);
    if ty == GgmlType::Q6_K {
        let (ql, qh, sc) = (&blk[..128], &blk[128..192], &blk[192..208]);
        let q = std::array::from_fn(|e| {
            let l = ql[64 * n + 32 * (k % 2) + e];
            let lo = if k >= 2 { l >> 4 } else { l & 0xF };
            i32::from(lo | (((qh[32 * n + e] >> (2 * k)) & 3) << 4)) - 32
        });
        (q, [0, 1].map(|h| i32::from(sc[2 * s + h] as i8)))
    } else {
        let (hm, qs) = (&blk[..32], &blk[32..96]);
        let scales: &[u8; 12] = blk[96..108].try_into().expect("12 bytes");
        let q = std::array::from_fn(|e| {
            let low = (qs[32 * n + e] >> (2 * k)) & 3;
            let high = (hm[e] >> (4 * n + k)) & 1;
            i32::from(low | (high << 2)) - 4
        });
        let sc = [0, 1].map(|h| i32::from(crate::quant::blocks::scale_q3k(2 * s + h, scales)));
        (q, sc)
    }
}

/// Integer quants of one legacy block (offsets applied) and its (d, m); m = 0 for symmetric types.
fn unpack_legacy(ty: GgmlType, blk: &[u8], q: &mut [i8; 32]) -> (f32, f32) {
    let d = f16([blk[0], blk[1]]);
    match ty {
        GgmlType::Q4_0 | GgmlType::IQ4_NL | GgmlType::Q4_1 => {
            let (qs, m, off) = match ty {
                GgmlType::Q4_1 => (&blk[4..20], f16([blk[2], blk[3]]), 0),
                GgmlType::Q4_0 => (&blk[2..18], 0.0, -8),
                _ => (&blk[2..18], 0.0, 0),
            };
            for j in 0..16 {
                let (lo, hi) = ((qs[j] & 0xF) as usize, (qs[j] >> 4) as usize);
                if ty == GgmlType::IQ4_NL {
                    q[j] = KVALUES_IQ4NL[lo];
                    q[j + 16] = KVALUES_IQ4NL[hi];
                } else {
                    q[j] = lo as i8 + off;
                    q[j + 16] = hi as i8 + off;
                }
            }
            (d, m)
        }
        GgmlType::Q5_0 | GgmlType::Q5_1 => {
            let (qh, qs, m, off) = if ty == GgmlType::Q5_1 {
                (&blk[4..8], &blk[8..24], f16([blk[2], blk[3]]), 0)
            } else {
                (&blk[2..6], &blk[6..22], 0.0, -16)
            };
            let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                q[j] = ((qs[j] & 0xF) | h0) as i8 + off;
                q[j + 16] = ((qs[j] >> 4) | h1) as i8 + off;
            }
            (d, m)
        }
        // Q8_0 (d, qs[32]) and Q8_1 (d, s, qs[32]).
        _ => {
            let qs = if ty == GgmlType::Q8_1 {
                &blk[4..36]
            } else {
                &blk[2..34]
            };
            for j in 0..32 {
                q[j] = qs[j] as i8;
            }
            (d, 0.0)
        }
    }
}

fn dot_f32(fma: bool, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if fma {
        // SAFETY: `fma` is only true when `simd::has_avx2()` (AVX2 + FMA + F16C) held.
        return unsafe { simd::dot_f32(a, b) };
    }
    let _ = fma;
    dot_f32_scalar(a, b)
}

/// Per-task scratch (empty until needed): a dequantized weight row for the float path, lanes
/// tile outputs for the tiled kernels.
#[derive(Default)]
struct Scratch {
    row: Vec<f32>,
    #[cfg(target_arch = "x86_64")]
    tile: Vec<[f32; LANES]>,
}

/// One weight row times B activation rows, for the paths without a tiled kernel. The same code
/// runs for every B, and each b's arithmetic does not depend on the others, so results are
/// identical for B = 1 and B = 4.
#[inline(always)]
fn dot_row<const B: usize>(
    ty: GgmlType,
    path: Path,
    w: &[u8],
    acts: [&ActQ8; B],
    xs: [&[f32]; B],
    scratch: &mut Scratch,
) -> [f32; B] {
    match path {
        // Tiles are handled by `tile_rows`; a tiled type reaching here takes the portable path.
        #[cfg(target_arch = "x86_64")]
        Path::Tile(_) => dot_legacy_scalar(ty, w, acts),
        Path::Q8Scalar => dot_legacy_scalar(ty, w, acts),
        Path::Float { fma } => {
            if scratch.row.len() != xs[0].len() {
                scratch.row.resize(xs[0].len(), 0.0);
            }
            // The caller validated `ty` and the row length, so this cannot fail; NaN if it did.
            if fast::dequantize(ty, w, &mut scratch.row).is_err() {
                return [f32::NAN; B];
            }
            let mut out = [0.0f32; B];
            for b in 0..B {
                out[b] = dot_f32(fma, &scratch.row, xs[b]);
            }
            out
        }
    }
}

/// Activation rows processed together against each weight row in `matmul` (paths without a
/// tiled kernel).
const BATCH_TILE: usize = 4;

/// Rows a parallel piece is aligned to: the AMX lanes kernel takes 16 weight rows at a time (a
/// piece's remainder goes to the AVX kernel), the one-row tile kernel 4.
const ROW_ALIGN: usize = 16;

/// Fewest activation rows the lanes kernel takes (padding the other lanes); fewer go through
/// the one-row kernel each, which costs about a third of a lanes pass per row.
#[cfg(target_arch = "x86_64")]
const LANES_MIN_ROWS: usize = 3;

/// Pieces per thread the rows are cut into: more than one so that a thread the OS descheduled
/// (the machine is shared) can have its work stolen, few enough that a decode matvec of some
/// tens of microseconds pays for a handful of task handoffs only.
const PIECES_PER_THREAD: usize = 4;

/// Rows of one piece per activation row at least: below this a piece is cheaper than handing
/// it to another thread (a 576-wide Q4_1 row is ~40 ns of work).
const MIN_PIECE_ROWS: usize = 64;

/// One weight matrix of a product; all matrices of one call share `cols` and the input.
#[derive(Clone, Copy, Debug)]
pub struct WeightMatrix<'a> {
    pub ty: GgmlType,
    /// `[rows, cols]` row-major, in `ty`'s blocks.
    pub data: &'a [u8],
    pub rows: usize,
}

/// An output matrix written by several tasks at disjoint indices.
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: tasks write disjoint elements (each output row belongs to exactly one piece, each
// piece to exactly one task), and the buffer outlives the parallel loop (borrowed mutably by
// the caller for its whole duration).
unsafe impl Send for SharedOut {}
// SAFETY: as above.
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// # Safety
    /// No other thread reads or writes index `i` during the parallel loop.
    #[inline(always)]
    unsafe fn write(&self, i: usize, v: f32) {
        assert!(i < self.len);
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        *self.ptr.add(i) = v;
    }

    /// Elements `i .. i + n` as a slice.
    ///
    /// # Safety
    /// No other thread reads or writes them while the slice lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // disjointness is the caller's contract, as for `write`
    unsafe fn slice(&self, i: usize, n: usize) -> &mut [f32] {
        assert!(i <= self.len && n <= self.len - i);
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        std::slice::from_raw_parts_mut(self.ptr.add(i), n)
    }
}

/// Computes rows `r0 .. r1` of `mat` for every activation row into `out` (`[batch, mat.rows]`).
#[allow(clippy::too_many_arguments)]
fn rows_range(
    mat: &WeightMatrix,
    path: Path,
    r0: usize,
    r1: usize,
    acts: &ActsQ8,
    x: &[f32],
    cols: usize,
    batch: usize,
    out: &SharedOut,
    scratch: &mut Scratch,
) {
    let rows = mat.rows;
    let rb = mat.data.len() / rows;
    let w = &mat.data[r0 * rb..r1 * rb];
    let act = |b: usize| {
        if matches!(path, Path::Float { .. }) {
            ActQ8::EMPTY
        } else {
            acts.row(b)
        }
    };
    let xr = |b: usize| &x[b * cols..(b + 1) * cols];
    // Output element (b, r) for a row r of this piece.
    let put = |b: usize, r: usize, v: f32| {
        assert!(r0 <= r && r < r1 && b < batch);
        // SAFETY: rows r0..r1 of this matrix belong to this piece only (`matmul_fused` cuts the
        // rows into disjoint pieces, each run by one task), so no other thread touches (b, r).
        unsafe { out.write(b * rows + r, v) };
    };
    #[cfg(target_arch = "x86_64")]
    if let Path::Tile(isa) = path {
        let n = r1 - r0;
        let groups = acts.lanes();
        let tile = &mut scratch.tile;
        tile.resize(n * groups.len(), [0.0; LANES]);
        lanes_kernel(mat.ty, isa, w, cols, groups, &mut tile[..n * groups.len()]);
        let mut b = 0;
        for (g, tg) in groups.iter().zip(tile.chunks_exact(n.max(1))) {
            for t in 0..g.rows() {
                assert!(b + t < batch);
                // SAFETY: rows r0..r1 of this matrix belong to this piece only (`matmul_fused`
                // cuts the rows into disjoint pieces, each run by one task).
                let dst = unsafe { out.slice((b + t) * rows + r0, n) };
                for (d, o) in dst.iter_mut().zip(tg) {
                    *d = o[t];
                }
            }
            b += g.rows();
        }
        for b in b..batch {
            // SAFETY: as above.
            let dst = unsafe { out.slice(b * rows + r0, n) };
            rows4_kernel(mat.ty, isa, w, cols, &act(b), dst);
        }
        return;
    }
    for (r, wr) in (r0..r1).zip(w.chunks_exact(rb)) {
        let mut b = 0;
        while b + BATCH_TILE <= batch {
            let a: [ActQ8; BATCH_TILE] = std::array::from_fn(|t| act(b + t));
            let o = dot_row::<BATCH_TILE>(
                mat.ty,
                path,
                wr,
                std::array::from_fn(|t| &a[t]),
                std::array::from_fn(|t| xr(b + t)),
                scratch,
            );
            for (t, &v) in o.iter().enumerate() {
                put(b + t, r, v);
            }
            b += BATCH_TILE;
        }
        for b in b..batch {
            let o = dot_row::<1>(mat.ty, path, wr, [&act(b)], [xr(b)], scratch);
            put(b, r, o[0]);
        }
    }
}

/// The AMX form of a weight type's lanes kernel, if it has one.
#[cfg(target_arch = "x86_64")]
fn amx_type(ty: GgmlType) -> Option<simd_tile::amx::AmxType> {
    use simd_tile::amx::AmxType;
    match ty {
        GgmlType::Q4_0 => Some(AmxType::Q4_0),
        GgmlType::Q4_1 => Some(AmxType::Q4_1),
        GgmlType::Q8_0 => Some(AmxType::Q8_0),
        _ => None,
    }
}

/// Runs the one-row tile kernel of `ty` (a type [`choose`] gives `Path::Tile`) over the rows of `w` (`out.len()`
/// rows of `cols` weights).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rows4_kernel(ty: GgmlType, isa: Isa, w: &[u8], cols: usize, act: &ActQ8, out: &mut [f32]) {
    let nb = cols / ty.block_elems() as usize;
    // SAFETY: Path::Tile(isa) is chosen only with `isa` from `Isa::detect()`; `w` holds
    // `out.len()` rows of the length `check_shapes` validated (as_blocks re-checks whole blocks,
    // the kernels slice rows with bounds checks), and the activations were quantized from `cols`
    // values, so they cover the `nb` blocks of a row (the kernels assert it).
    unsafe {
        match ty {
            GgmlType::Q4_1 => simd_tile::q4_1_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
            GgmlType::Q4_0 => simd_tile::q4_0_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
            GgmlType::Q5_0 => simd_tile::q5_0_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
            GgmlType::Q5_1 => simd_tile::q5_1_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
            GgmlType::Q4_K => simd_tile::q4_k_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
            GgmlType::Q5_K => simd_tile::q5_k_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
            GgmlType::Q6_K => simd_tile::q6_k_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
            GgmlType::Q3_K => simd_tile::q3_k_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
            _ => simd_tile::q8_0_rows4(isa, as_blocks(w).unwrap_or(&[]), nb, act, out),
        }
    }
}

/// Runs the lanes tile kernel of `ty` (a type [`choose`] gives `Path::Tile`): the rows of `w`
/// times the interleaved activation rows of each group in `groups`, group g's results in
/// `out[g * n .. (g + 1) * n]` (`n` rows each).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes_kernel(
    ty: GgmlType,
    isa: Isa,
    w: &[u8],
    cols: usize,
    groups: &[ActLanes],
    out: &mut [[f32; LANES]],
) {
    let nb = cols / ty.block_elems() as usize;
    if groups.is_empty() || out.len() < groups.len() {
        return;
    }
    let n = out.len() / groups.len();
    // AMX tile products for whole groups of 16 rows where the CPU has them (each tile unpacked
    // once for all the groups), the AVX kernel for the rest (the same bits either way).
    let rb = nb * ty.block_bytes() as usize;
    let done = amx_type(ty)
        .filter(|_| {
            isa == Isa::Vnni && groups.iter().all(|g| g.nb() == nb) && simd_tile::amx::enabled()
        })
        .map_or(0, |t| {
            let mut outs: Vec<&mut [[f32; LANES]]> = out.chunks_exact_mut(n).collect();
            // SAFETY: enabled() checked; `w` holds n rows of rb bytes (as below).
            unsafe { simd_tile::amx::lanes(t, w, rb, groups, &mut outs) }
        });
    if done == n {
        return;
    }
    let w = &w[done * rb..];
    for (a, out) in groups.iter().zip(out.chunks_exact_mut(n)) {
        let out = &mut out[done..];
        // SAFETY: as in `rows4_kernel`; `a` was interleaved from rows of `cols` values (the
        // kernels assert it covers `nb` blocks).
        macro_rules! run {
            ($f:ident) => {
                unsafe { simd_tile::$f(isa, as_blocks(w).unwrap_or(&[]), nb, a, out) }
            };
        }
        match ty {
            GgmlType::Q4_1 => run!(q4_1_lanes),
            GgmlType::Q4_0 => run!(q4_0_lanes),
            GgmlType::Q5_0 => run!(q5_0_lanes),
            GgmlType::Q5_1 => run!(q5_1_lanes),
            GgmlType::Q4_K => run!(q4_k_lanes),
            GgmlType::Q5_K => run!(q5_k_lanes),
            GgmlType::Q6_K => run!(q6_k_lanes),
            GgmlType::Q3_K => run!(q3_k_lanes),
            _ => run!(q8_0_lanes),
        }
    }
}

/// The fused product: for every matrix m, `Y_m[b, r] = sum_c W_m[r, c] * X[b, c]`. Shapes are
/// checked by the caller.
pub fn matmul_fused(
    mats: &[WeightMatrix],
    cols: usize,
    x: &[f32],
    batch: usize,
    ys: &mut [&mut [f32]],
) {
    if batch == 0 {
        return;
    }
    if cols == 0 {
        for y in ys.iter_mut() {
            y.fill(0.0);
        }
        return;
    }
    let paths: Vec<Path> = mats.iter().map(|m| choose(m.ty)).collect();
    let need_acts = paths.iter().any(|p| !matches!(p, Path::Float { .. }));
    // `ys` stays mutably borrowed until the function returns, so the pointers stay valid and
    // unaliased for the whole parallel loop.
    let outs: Vec<SharedOut> = ys
        .iter_mut()
        .map(|y| SharedOut {
            ptr: y.as_mut_ptr(),
            len: y.len(),
        })
        .collect();
    // The rows of all matrices, concatenated, cut into pieces of whole 4-row groups.
    let total: usize = mats.iter().map(|m| m.rows).sum();
    let threads = rayon::current_num_threads();
    let min_rows = MIN_PIECE_ROWS.div_ceil(batch).max(ROW_ALIGN);
    let pieces = (threads * PIECES_PER_THREAD)
        .min(total.div_ceil(min_rows))
        .max(1);
    let piece_rows = total.div_ceil(pieces).next_multiple_of(ROW_ALIGN);
    let pieces = total.div_ceil(piece_rows);
    let run = |acts: &ActsQ8| {
        let do_piece = |scratch: &mut Scratch, p: usize| {
            // Global rows [g0, g1) of this piece, split at matrix boundaries.
            let (g0, g1) = (p * piece_rows, ((p + 1) * piece_rows).min(total));
            let mut base = 0;
            for (mi, m) in mats.iter().enumerate() {
                let (lo, hi) = (g0.max(base), g1.min(base + m.rows));
                if lo < hi {
                    rows_range(
                        m,
                        paths[mi],
                        lo - base,
                        hi - base,
                        acts,
                        x,
                        cols,
                        batch,
                        &outs[mi],
                        scratch,
                    );
                }
                base += m.rows;
            }
        };
        if pieces == 1 {
            do_piece(&mut Scratch::default(), 0);
        } else {
            (0..pieces)
                .into_par_iter()
                .for_each_init(Scratch::default, do_piece);
        }
    };
    if !need_acts {
        return run(&ActsQ8::default());
    }
    let prepare = |acts: &mut ActsQ8| {
        acts.fill(x, cols);
        #[cfg(target_arch = "x86_64")]
        if paths.iter().any(|p| matches!(p, Path::Tile(_))) {
            acts.fill_lanes(LANES_MIN_ROWS);
        }
    };
    ACTS.with(|cell| match cell.try_borrow_mut() {
        Ok(mut acts) => {
            prepare(&mut acts);
            run(&acts);
        }
        // Re-entered from a task this thread ran while waiting (nested parallel callers):
        // use a private buffer rather than fail.
        Err(_) => {
            let mut acts = ActsQ8::default();
            prepare(&mut acts);
            run(&acts);
        }
    });
}

pub fn matvec(ty: GgmlType, w: &[u8], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    matmul(ty, w, rows, cols, x, 1, y);
}

pub fn matmul(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) {
    if rows == 0 {
        return;
    }
    matmul_fused(
        &[WeightMatrix { ty, data: w, rows }],
        cols,
        x,
        batch,
        &mut [y],
    );
}

pub fn matmul_exact(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<(), QuantError> {
    if rows == 0 || batch == 0 {
        return Ok(());
    }
    if cols == 0 {
        y.fill(0.0);
        return Ok(());
    }
    let rb = w.len() / rows;
    let mut t = vec![0.0f32; rows * batch];
    t.par_chunks_mut(batch)
        .zip(w.par_chunks(rb.max(1)))
        .try_for_each_init(
            || vec![0.0f32; cols],
            |buf, (tr, wr)| -> Result<(), QuantError> {
                reference_row(ty, wr, buf)?;
                for (b, o) in tr.iter_mut().enumerate() {
                    let xb = &x[b * cols..(b + 1) * cols];
                    *o = buf
                        .iter()
                        .zip(xb)
                        .map(|(&a, &c)| a as f64 * c as f64)
                        .sum::<f64>() as f32;
                }
                Ok(())
            },
        )?;
    for r in 0..rows {
        for b in 0..batch {
            y[b * rows + r] = t[r * batch + b];
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
