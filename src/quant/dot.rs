//! CPU matrix-vector and matrix-matrix products over quantized weight rows.
//!
//! Every output element `Y[b, r]` is computed by one thread, by the same row kernel whether it is
//! reached through `matvec` or `matmul`, so `matmul` row b equals `matvec(X[b])` bit for bit and
//! neither depends on the number of threads.

use super::blocks::{as_blocks, f16, KVALUES_IQ4NL};
#[cfg(target_arch = "x86_64")]
use super::simd;
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

/// One activation row quantized to 32-element Q8 blocks, as ggml's Q8_0/Q8_1 but with f32
/// scales (ggml rounds them to f16; keeping f32 is slightly more accurate and costs nothing).
pub struct ActQ8 {
    /// Per block: the scale d (x ~ d * q).
    pub d: Vec<f32>,
    /// Per block: sum of the quants, as f32 (exact: |sum| <= 32 * 127). Serves the min terms.
    pub sum: Vec<f32>,
    /// Per block: sum of the quants as i32 (the Q4_0 kernel subtracts 8 * sum in integers).
    pub isum: Vec<i32>,
    /// The quants, 32 per block, in -127..=127 (never -128, which `maddubs` could not take).
    pub qs: Vec<i8>,
}

impl ActQ8 {
    pub fn new(x: &[f32]) -> Self {
        let nb = x.len() / 32;
        let mut a = ActQ8 {
            d: Vec::with_capacity(nb),
            sum: Vec::with_capacity(nb),
            isum: Vec::with_capacity(nb),
            qs: vec![0; nb * 32],
        };
        for (xb, qb) in x.chunks_exact(32).zip(a.qs.chunks_exact_mut(32)) {
            let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // A NaN/Inf activation makes the block's scale NaN, so it propagates to the output as
            // in the f32 path instead of being silently quantized to some finite value.
            let finite = xb.iter().all(|v| v.is_finite());
            let d = if finite { amax / 127.0 } else { f32::NAN };
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (q, v) in qb.iter_mut().zip(xb) {
                // With a NaN d, id is NaN and the quants become 0 (valid); d carries the NaN.
                *q = (v * id).round().clamp(-127.0, 127.0) as i8;
                sum += *q as i32;
            }
            a.d.push(d);
            a.sum.push(sum as f32);
            a.isum.push(sum);
        }
        a
    }
}

/// How a weight type is multiplied.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    /// AVX2 integer kernels with Q8 activations (Q4_0, Q4_1, Q8_0, Q4_K, Q6_K).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// Portable integer kernel with Q8 activations (legacy 32-element types).
    Q8Scalar,
    /// Dequantize the row, then an f32 dot product (float types; the K-quants other than Q4_K
    /// until they get integer kernels, see the module docs).
    Float { fma: bool },
}

fn choose(ty: GgmlType) -> Path {
    #[cfg(target_arch = "x86_64")]
    let avx2 = simd::has_avx2();
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    match ty {
        #[cfg(target_arch = "x86_64")]
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 | GgmlType::Q4_K | GgmlType::Q6_K
            if avx2 =>
        {
            Path::Avx2
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
            acc[b] += d * a.d[i] * isum as f32 + m * a.d[i] * a.sum[i];
        }
    }
    acc
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

/// Per-thread scratch: a dequantized weight row for the float path.
struct Scratch {
    row: Vec<f32>,
}

/// One weight row times B activation rows. The same code runs for every B, and each b's
/// arithmetic does not depend on the others, so results are identical for B = 1 and B = 4.
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
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Path::Avx2 is chosen only when `simd::has_avx2()`; the activations were built
        // from `cols` values, so they cover every block of the row; as_blocks checked the length.
        Path::Avx2 => unsafe {
            match ty {
                GgmlType::Q4_0 => simd::dot_q4_0(as_blocks(w).unwrap_or(&[]), acts),
                GgmlType::Q4_1 => simd::dot_q4_1(as_blocks(w).unwrap_or(&[]), acts),
                GgmlType::Q4_K => simd::dot_q4_k(as_blocks(w).unwrap_or(&[]), acts),
                GgmlType::Q6_K => simd::dot_q6_k(as_blocks(w).unwrap_or(&[]), acts),
                _ => simd::dot_q8_0(as_blocks(w).unwrap_or(&[]), acts),
            }
        },
        Path::Q8Scalar => dot_legacy_scalar(ty, w, acts),
        Path::Float { fma } => {
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

/// Rows per parallel task: enough work per task (a 576-wide Q4_1 row is 360 bytes) to amortise
/// Rayon's overhead, while leaving many tasks for balance.
const ROWS_PER_TASK: usize = 16;

/// Activation rows processed together against each weight row in `matmul`.
const BATCH_TILE: usize = 4;

fn quantize_acts(path: Path, x: &[f32], cols: usize) -> Vec<ActQ8> {
    if matches!(path, Path::Float { .. }) {
        return Vec::new();
    }
    x.par_chunks(cols).map(ActQ8::new).collect()
}

pub fn matvec(ty: GgmlType, w: &[u8], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let rb = w.len() / rows.max(1);
    let path = choose(ty);
    let acts = quantize_acts(path, x, cols);
    let empty = ActQ8 {
        d: vec![],
        sum: vec![],
        isum: vec![],
        qs: vec![],
    };
    let act = acts.first().unwrap_or(&empty);
    y.par_chunks_mut(ROWS_PER_TASK)
        .zip(w.par_chunks(rb.max(1) * ROWS_PER_TASK))
        .for_each_init(
            || Scratch {
                row: vec![0.0f32; cols],
            },
            |scratch, (yc, wc)| {
                for (yr, wr) in yc.iter_mut().zip(wc.chunks_exact(rb.max(1))) {
                    *yr = dot_row::<1>(ty, path, wr, [act], [x], scratch)[0];
                }
            },
        );
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
    if rows == 0 || batch == 0 {
        return;
    }
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let rb = w.len() / rows;
    let path = choose(ty);
    let acts = quantize_acts(path, x, cols);
    let empty = ActQ8 {
        d: vec![],
        sum: vec![],
        isum: vec![],
        qs: vec![],
    };
    let act = |b: usize| acts.get(b).unwrap_or(&empty);
    let xr = |b: usize| &x[b * cols..(b + 1) * cols];
    // [rows, batch], transposed into y afterwards so tasks write disjoint memory.
    let mut t = vec![0.0f32; rows * batch];
    t.par_chunks_mut(ROWS_PER_TASK * batch)
        .zip(w.par_chunks(rb.max(1) * ROWS_PER_TASK))
        .for_each_init(
            || Scratch {
                row: vec![0.0f32; cols],
            },
            |scratch, (tc, wc)| {
                for (tr, wr) in tc.chunks_exact_mut(batch).zip(wc.chunks_exact(rb.max(1))) {
                    let mut b = 0;
                    while b + BATCH_TILE <= batch {
                        let o = dot_row::<BATCH_TILE>(
                            ty,
                            path,
                            wr,
                            [act(b), act(b + 1), act(b + 2), act(b + 3)],
                            [xr(b), xr(b + 1), xr(b + 2), xr(b + 3)],
                            scratch,
                        );
                        tr[b..b + BATCH_TILE].copy_from_slice(&o);
                        b += BATCH_TILE;
                    }
                    for (bb, o) in tr.iter_mut().enumerate().skip(b) {
                        *o = dot_row::<1>(ty, path, wr, [act(bb)], [xr(bb)], scratch)[0];
                    }
                }
            },
        );
    for r in 0..rows {
        for b in 0..batch {
            y[b * rows + r] = t[r * batch + b];
        }
    }
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
mod tests {
    use super::*;

    /// On AVX2 machines the portable integer kernel is not reached for Q4_0/Q4_1/Q8_0 through the
    /// public API, so compare it with the SIMD kernel here: same integer sums, different float
    /// summation order, so they agree to float rounding (1e-5 of the sum of |terms|).
    #[test]
    fn portable_legacy_kernel_matches_simd() {
        let cols = 1024;
        let wf: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.4)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.6)
            .collect();
        let act = ActQ8::new(&x);
        let xq: Vec<f32> = (0..cols)
            .map(|i| act.d[i / 32] * act.qs[i] as f32)
            .collect();
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let w = crate::quant::quantize(ty, &wf).unwrap();
            let mut wd = vec![0.0; cols];
            crate::quant::dequantize_ref(ty, &w, &mut wd).unwrap();
            let exact: f64 = wd.iter().zip(&xq).map(|(a, b)| *a as f64 * *b as f64).sum();
            let mag: f64 = wd
                .iter()
                .zip(&xq)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let scalar = dot_legacy_scalar::<1>(ty, &w, [&act])[0];
            assert!(
                (scalar as f64 - exact).abs() <= 1e-5 * mag,
                "{ty}: scalar {scalar} vs {exact}"
            );
            let mut scratch = Scratch {
                row: vec![0.0; cols],
            };
            let path = choose(ty);
            let fast = dot_row::<1>(ty, path, &w, [&act], [&x], &mut scratch)[0];
            assert!(
                (fast as f64 - exact).abs() <= 1e-5 * mag,
                "{ty}: fast {fast} vs {exact}"
            );
        }
    }
}
