//! Quantization formats: type ids and block geometry (`qtype`), block layouts (`blocks`), scalar
//! reference dequantizers (`reference`), quantizers (`quantize`), fast single-thread paths
//! (`fast`, with SIMD in `simd`), and CPU matrix-vector / matrix-matrix products (`dot`, over Q8
//! activations from `act`, with the register-tiled Q4_0/Q4_1/Q8_0 kernels in `simd_tile`).
//!
//! Contract: `dequantize` and `dequantize_par` are bit-exact with `dequantize_ref`, which is
//! bit-exact with ggml (and `gguf.quants.dequantize`). `matvec`/`matmul` quantize activations
//! the way ggml does, so they differ from the exact oracles `matvec_exact`/`matmul_exact` by a
//! per-type tolerance (see `tests/quant_dot.rs`), but every output row is computed by one thread
//! in a fixed order, so results do not depend on the thread count.

mod act;
pub mod blocks;
mod dot;
mod fast;
mod isa;
pub mod qtype;
mod quantize;
pub mod reference;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(target_arch = "x86_64")]
mod simd_tile;

pub use dot::WeightMatrix;
pub use isa::{cpu_isa, set_cpu_isa, tile_kernels, CpuIsa};
pub use qtype::{GgmlType, TypeId};

use blocks::*;
use rayon::prelude::*;

/// Everything a quant operation can reject. Malformed block *contents* (NaN/Inf scales) are not
/// errors: they dequantize to the IEEE values ggml would produce, so a bad tensor can still be
/// inspected. Only shapes, lengths, types and non-finite inputs to `quantize` are rejected.
#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("unsupported quant type {ty} for {op}")]
    Unsupported { ty: GgmlType, op: &'static str },
    #[error("{ty}: {elems} elements is not a whole number of {block}-element blocks")]
    NotWholeBlocks {
        ty: GgmlType,
        elems: usize,
        block: usize,
    },
    #[error("{ty}: wrong byte length: expected {expected} bytes, got {got}")]
    ByteLength {
        ty: GgmlType,
        expected: usize,
        got: usize,
    },
    #[error("{what}: wrong length: expected {expected}, got {got}")]
    Length {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{ty}: shape [{rows}, {cols}] overflows")]
    Overflow {
        ty: GgmlType,
        rows: usize,
        cols: usize,
    },
    #[error("{ty}: cannot quantize non-finite value {value} at index {index}")]
    NonFinite {
        ty: GgmlType,
        index: usize,
        value: f32,
    },
    #[error("tensor {tensor}: {source}")]
    InTensor {
        tensor: String,
        source: Box<QuantError>,
    },
}

impl QuantError {
    /// Adds the tensor name as context (`"tensor blk.0.attn_q.weight: ..."`).
    pub fn in_tensor(self, tensor: impl Into<String>) -> Self {
        QuantError::InTensor {
            tensor: tensor.into(),
            source: Box::new(self),
        }
    }
}

/// Checks that `src` holds exactly the blocks for `elems` elements of `ty`.
fn check_lengths(ty: GgmlType, src: usize, elems: usize) -> Result<(), QuantError> {
    if !ty.is_supported() {
        return Err(QuantError::Unsupported {
            ty,
            op: "dequantize",
        });
    }
    let block = ty.block_elems() as usize;
    if !elems.is_multiple_of(block) {
        return Err(QuantError::NotWholeBlocks { ty, elems, block });
    }
    let expected = (elems / block)
        .checked_mul(ty.block_bytes() as usize)
        .ok_or(QuantError::Overflow {
            ty,
            rows: 1,
            cols: elems,
        })?;
    if src != expected {
        return Err(QuantError::ByteLength {
            ty,
            expected,
            got: src,
        });
    }
    Ok(())
}

/// Applies a per-block function over matching block / element chunks (lengths already checked).
#[inline(always)]
fn per_block<B: Block>(src: &[u8], dst: &mut [f32], f: impl Fn(&B, &mut [f32])) {
    if let Some(blocks) = as_blocks::<B>(src) {
        for (b, y) in blocks.iter().zip(dst.chunks_exact_mut(B::ELEMS)) {
            f(b, y);
        }
    }
}

/// Scalar reference dequantization of `dst.len()` elements from `src`.
pub fn dequantize_ref(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_lengths(ty, src.len(), dst.len())?;
    dequantize_scalar(ty, src, dst)
}

/// The scalar dispatch behind [`dequantize_ref`] and the fast path's fallback; lengths are
/// checked by the caller.
fn dequantize_scalar(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    match ty {
        GgmlType::F32 => {
            for (c, y) in src.chunks_exact(4).zip(dst.iter_mut()) {
                *y = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        GgmlType::F16 => {
            for (c, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *y = f16([c[0], c[1]]);
            }
        }
        GgmlType::BF16 => {
            for (c, y) in src.chunks_exact(2).zip(dst.iter_mut()) {
                *y = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
        }
        GgmlType::Q4_0 => per_block(src, dst, reference::q4_0),
        GgmlType::Q4_1 => per_block(src, dst, reference::q4_1),
        GgmlType::Q5_0 => per_block(src, dst, reference::q5_0),
        GgmlType::Q5_1 => per_block(src, dst, reference::q5_1),
        GgmlType::Q8_0 => per_block(src, dst, reference::q8_0),
        GgmlType::Q8_1 => per_block(src, dst, reference::q8_1),
        GgmlType::Q2_K => per_block(src, dst, reference::q2_k),
        GgmlType::Q3_K => per_block(src, dst, reference::q3_k),
        GgmlType::Q4_K => per_block(src, dst, reference::q4_k),
        GgmlType::Q5_K => per_block(src, dst, reference::q5_k),
        GgmlType::Q6_K => per_block(src, dst, reference::q6_k),
        GgmlType::Q8_K => per_block(src, dst, reference::q8_k),
        GgmlType::IQ4_NL => per_block(src, dst, reference::iq4_nl),
        ty => {
            return Err(QuantError::Unsupported {
                ty,
                op: "dequantize",
            })
        }
    }
    Ok(())
}

/// Fast single-thread dequantization (SIMD where the CPU has it); bit-exact with the reference.
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_lengths(ty, src.len(), dst.len())?;
    fast::dequantize(ty, src, dst)
}

/// Elements per parallel task: large enough that scheduling costs nothing next to the work,
/// small enough to balance 2..64 threads on typical tensors.
const PAR_CHUNK_ELEMS: usize = 1 << 16;

/// Whole-tensor dequantization on the Rayon pool; bit-exact with the reference (every block is
/// decoded independently, so the split cannot change any value).
pub fn dequantize_par(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_lengths(ty, src.len(), dst.len())?;
    let be = ty.block_elems() as usize;
    let chunk_blocks = (PAR_CHUNK_ELEMS / be).max(1);
    let chunk_bytes = chunk_blocks * ty.block_bytes() as usize;
    dst.par_chunks_mut(chunk_blocks * be)
        .zip(src.par_chunks(chunk_bytes))
        .try_for_each(|(y, s)| fast::dequantize(ty, s, y))
}

/// Quantizes `src` (a whole number of blocks) into `ty`. F32/F16/BF16 store any value (F16/BF16
/// round to nearest even); block types reject non-finite inputs with `QuantError::NonFinite`.
pub fn quantize(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    if !ty.is_supported() {
        return Err(QuantError::Unsupported { ty, op: "quantize" });
    }
    let be = ty.block_elems() as usize;
    if !src.len().is_multiple_of(be) {
        return Err(QuantError::NotWholeBlocks {
            ty,
            elems: src.len(),
            block: be,
        });
    }
    match ty {
        GgmlType::F32 => return Ok(src.iter().flat_map(|v| v.to_le_bytes()).collect()),
        GgmlType::F16 => return Ok(src.iter().flat_map(|&v| to_f16(v)).collect()),
        GgmlType::BF16 => {
            return Ok(src
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect())
        }
        _ => {}
    }
    if let Some(index) = src.iter().position(|v| !v.is_finite()) {
        return Err(QuantError::NonFinite {
            ty,
            index,
            value: src[index],
        });
    }
    let bb = ty.block_bytes() as usize;
    let mut out = vec![0u8; src.len() / be * bb];
    // Blocks are independent; parallel chunks give the same bytes as a sequential pass.
    out.par_chunks_mut(bb * 64)
        .zip(src.par_chunks(be * 64))
        .for_each(|(o, x)| {
            for (ob, xb) in o.chunks_exact_mut(bb).zip(x.chunks_exact(be)) {
                quantize_block(ty, xb, ob);
            }
        });
    Ok(out)
}

fn put<B: Block>(b: B, out: &mut [u8]) {
    out.copy_from_slice(blocks_as_bytes(std::slice::from_ref(&b)));
}

/// One block; `ty` is a supported block type (checked by the caller).
fn quantize_block(ty: GgmlType, x: &[f32], out: &mut [u8]) {
    match ty {
        GgmlType::Q4_0 => put(quantize::q4_0(x), out),
        GgmlType::Q4_1 => put(quantize::q4_1(x), out),
        GgmlType::Q5_0 => put(quantize::q5_0(x), out),
        GgmlType::Q5_1 => put(quantize::q5_1(x), out),
        GgmlType::Q8_0 => put(quantize::q8_0(x), out),
        GgmlType::Q8_1 => put(quantize::q8_1(x), out),
        GgmlType::Q2_K => put(quantize::q2_k(x), out),
        GgmlType::Q3_K => put(quantize::q3_k(x), out),
        GgmlType::Q4_K => put(quantize::q4_k(x), out),
        GgmlType::Q5_K => put(quantize::q5_k(x), out),
        GgmlType::Q6_K => put(quantize::q6_k(x), out),
        GgmlType::Q8_K => put(quantize::q8_k(x), out),
        GgmlType::IQ4_NL => put(quantize::iq4_nl(x), out),
        // F32/F16/BF16 are handled before the per-block loop; nothing else passes `is_supported`.
        _ => {}
    }
}

/// `y[r] = sum_c W[r,c] * x[c]`; W row-major `[rows, cols]` in type `ty`. Activations are quantized
/// to 32-element Q8 blocks with f32 scales (ggml's Q8_0/Q8_1; for Q4_K/Q5_K/Q6_K too, where ggml
/// uses 256-element Q8_K: same integer math, finer scales) on the int8 paths (Q4_0, Q4_1, Q5_0,
/// Q5_1, Q8_0, IQ4_NL, Q4_K, Q5_K, Q6_K), or kept f32 for float weights, Q2_K and Q3_K
/// (dequantized row times f32; no int8 kernel for them yet). Rayon over rows. Non-finite activations or scales make the affected outputs
/// non-finite (NaN/Inf), never an error or a silently finite value.
pub fn matvec(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), QuantError> {
    dot::check_shapes(ty, w, rows, cols, x, 1, y)?;
    dot::matvec(ty, w, rows, cols, x, y);
    Ok(())
}

/// `Y[b, r] = sum_c W[r,c] * X[b,c]`; X is `[batch, cols]`, Y is `[batch, rows]` (prompt prefill).
/// Each weight block is read once for several batch rows.
pub fn matmul(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<(), QuantError> {
    dot::check_shapes(ty, w, rows, cols, x, batch, y)?;
    dot::matmul(ty, w, rows, cols, x, batch, y);
    Ok(())
}

/// The shape checks of [`matmul`], alone: `w` is `[rows, cols]` in `ty`, `x` is `[batch, cols]`,
/// `y` is `[batch, rows]`.
pub fn check_product(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    y: &[f32],
) -> Result<(), QuantError> {
    dot::check_shapes(ty, w, rows, cols, x, batch, y)
}

/// Several products of one input in one parallel pass: `Y_p[b, r] = sum_c W_p[r, c] * X[b, c]`
/// for every matrix p (`[mats[p].rows, cols]`), `ys[p]` being `[batch, mats[p].rows]`. Each
/// output equals what `matmul` gives for that matrix alone, bit for bit; fusing saves the
/// fork-join and the activation quantization of all but one (Q/K/V, or gate/up, in decode).
pub fn matmul_fused(
    mats: &[WeightMatrix],
    cols: usize,
    x: &[f32],
    batch: usize,
    ys: &mut [&mut [f32]],
) -> Result<(), QuantError> {
    if mats.len() != ys.len() {
        return Err(QuantError::Length {
            what: "fused outputs",
            expected: mats.len(),
            got: ys.len(),
        });
    }
    for (m, y) in mats.iter().zip(ys.iter()) {
        dot::check_shapes(m.ty, m.data, m.rows, cols, x, batch, y)?;
    }
    dot::matmul_fused(mats, cols, x, batch, ys);
    Ok(())
}

/// The oracle for `matvec`: weights dequantized by the reference, f32 activations (not
/// quantized), f64 accumulation.
pub fn matvec_exact(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    y: &mut [f32],
) -> Result<(), QuantError> {
    matmul_exact(ty, w, rows, cols, x, 1, y)
}

/// The oracle for `matmul` (see `matvec_exact`).
pub fn matmul_exact(
    ty: GgmlType,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    batch: usize,
    y: &mut [f32],
) -> Result<(), QuantError> {
    dot::check_shapes(ty, w, rows, cols, x, batch, y)?;
    dot::matmul_exact(ty, w, rows, cols, x, batch, y)
}

/// Reference dequantization of one row (used by the exact oracles).
fn reference_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    dequantize_ref(ty, src, dst)
}

#[cfg(test)]
mod tests;
