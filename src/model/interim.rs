//! TEMPORARY: scalar dequantization of the few types SmolLM2 uses, so the forward pass can be
//! developed before the quant kernels land on main. Removed once `crate::quant` provides
//! `dequantize`/`matvec`/`matmul`.

use crate::quant::GgmlType;
use half::f16;
use rayon::prelude::*;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), String> {
    match ty {
        GgmlType::F32 => {
            for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (i, d) in dst.iter_mut().enumerate() {
                *d = f16_at(src, 2 * i);
            }
        }
        GgmlType::Q8_0 => {
            for (blk, out) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
                let d = f16_at(blk, 0);
                for (o, &q) in out.iter_mut().zip(&blk[2..]) {
                    *o = d * (q as i8) as f32;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (blk, out) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                for j in 0..16 {
                    let q = blk[4 + j];
                    out[j] = (q & 0x0f) as f32 * d + m;
                    out[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        other => return Err(format!("interim dequantizer lacks {other}")),
    }
    Ok(())
}

/// y[b, r] = sum_c W[r, c] x[b, c], weights dequantized row by row.
pub fn matmul(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<(), String> {
    let rb = ty.row_bytes(cols as u64).ok_or("bad row")? as usize;
    let mut out = vec![0f32; rows * batch];
    out.par_chunks_mut(batch)
        .enumerate()
        .try_for_each(|(r, o)| -> Result<(), String> {
            let mut row = vec![0f32; cols];
            dequantize(ty, &w[r * rb..(r + 1) * rb], &mut row)?;
            for (b, ob) in o.iter_mut().enumerate() {
                let xb = &x[b * cols..(b + 1) * cols];
                *ob = row.iter().zip(xb).map(|(a, b)| a * b).sum();
            }
            Ok(())
        })?;
    for r in 0..rows {
        for b in 0..batch {
            y[b * rows + r] = out[r * batch + b];
        }
    }
    Ok(())
}
