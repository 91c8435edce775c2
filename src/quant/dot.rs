//! CPU matrix-vector and matrix-matrix products over quantized weight rows.
//!
//! Every output element `Y[b, r]` is computed by one thread, by the same row kernel whether it is
//! reached through `matvec` or `matmul`, so `matmul` row b equals `matvec(X[b])` bit for bit and
//! neither depends on the number of threads.

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
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
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

/// Rows per parallel task: enough work per task (a 576-wide Q4_1 row is 360 bytes) to amortise
/// Rayon's overhead, while leaving many tasks for balance.
const ROWS_PER_TASK: usize = 16;

pub fn matvec(ty: GgmlType, w: &[u8], rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let rb = w.len() / rows.max(1);
    y.par_chunks_mut(ROWS_PER_TASK)
        .zip(w.par_chunks(rb.max(1) * ROWS_PER_TASK))
        .for_each_init(
            || vec![0.0f32; cols],
            |buf, (yc, wc)| {
                for (yr, wr) in yc.iter_mut().zip(wc.chunks_exact(rb.max(1))) {
                    fast::dequantize(ty, wr, buf);
                    *yr = dot_f32(buf, x);
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
    // [rows, batch], transposed into y afterwards so tasks write disjoint memory.
    let mut t = vec![0.0f32; rows * batch];
    t.par_chunks_mut(ROWS_PER_TASK * batch)
        .zip(w.par_chunks(rb.max(1) * ROWS_PER_TASK))
        .for_each_init(
            || vec![0.0f32; cols],
            |buf, (tc, wc)| {
                for (tr, wr) in tc.chunks_exact_mut(batch).zip(wc.chunks_exact(rb.max(1))) {
                    fast::dequantize(ty, wr, buf);
                    for (b, o) in tr.iter_mut().enumerate() {
                        *o = dot_f32(buf, &x[b * cols..(b + 1) * cols]);
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
