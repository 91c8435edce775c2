//! Rewrites a GGUF file with its weight matrices in another type (llama.cpp's `llama-quantize`):
//! every tensor is streamed through in row chunks (dequantized to f32, quantized to its new
//! type, written), so memory stays bounded whatever the model's size; the metadata is copied
//! with `general.file_type` set for the new type.
//!
//! Which tensors change: every matrix whose name ends in `.weight` (rows of `shape[0]`
//! elements), except the MoE routers (`ffn_gate_inp`, kept exact as llama.cpp keeps them);
//! vectors (norms, biases) keep their type. A matrix whose rows are not whole blocks of the
//! chosen type takes the first of Q8_0 and F16 that fits (a note says so). The output head and
//! the token embeddings may take types of their own. The K mixes (`Q4_K_M`, `Q5_K_M`) follow
//! llama.cpp's published rule: the value projection and the FFN down projection of the first
//! and last eighth of the layers, and of every third layer between, take Q6_K, and so does the
//! output head.

use crate::gguf::{GgufError, GgufFile, GgufWriter, TensorInfo, TensorSpec, Value};
use crate::quant::{dequantize_par, quantize, GgmlType, QuantError};
use rayon::prelude::*;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Errors of [`requantize_file`], with the tensor or file they concern.
#[derive(Debug, thiserror::Error)]
pub enum RequantizeError {
    #[error("{0}")]
    Gguf(#[from] GgufError),
    #[error("tensor {tensor:?}: {source}")]
    Quant {
        tensor: String,
        #[source]
        source: QuantError,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is not a type models are quantized to (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16, bf16, f32)")]
    TargetType(GgmlType),
    #[error("the output {0} is the input file")]
    SameFile(PathBuf),
}

/// The types of a requantization: `weights` for every matrix, the output head and the token
/// embeddings their own when given; `more_bits`: the type of the K mixes' chosen `attn_v` and
/// `ffn_down` layers ([`use_more_bits`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequantizePlan {
    pub weights: GgmlType,
    pub output: Option<GgmlType>,
    pub token_embd: Option<GgmlType>,
    pub more_bits: Option<GgmlType>,
}

impl RequantizePlan {
    /// The plan of a type or mix name: `q4_0` .. `f32`, or `q4_k_m` / `q5_k_m` (their weights
    /// Q4_K / Q5_K, the chosen layers' `attn_v` and `ffn_down` and the output head Q6_K).
    pub fn named(name: &str) -> Option<Self> {
        let mix = |weights| Self {
            weights,
            output: Some(GgmlType::Q6_K),
            token_embd: None,
            more_bits: Some(GgmlType::Q6_K),
        };
        match name.to_ascii_lowercase().as_str() {
            "q4_k_m" => Some(mix(GgmlType::Q4_K)),
            "q5_k_m" => Some(mix(GgmlType::Q5_K)),
            other => GgmlType::from_name(other).map(|weights| Self {
                weights,
                output: None,
                token_embd: None,
                more_bits: None,
            }),
        }
    }

    /// llama.cpp's `general.file_type` of the plan (its mixes' own numbers).
    pub fn file_type(&self) -> u32 {
        match (self.weights, self.more_bits) {
            (GgmlType::Q4_K, Some(GgmlType::Q6_K)) => 15,
            (GgmlType::Q5_K, Some(GgmlType::Q6_K)) => 17,
            (w, _) => crate::synth::file_type(w),
        }
    }
}

/// llama.cpp's choice of the K mixes' layers that get more bits: layer `i` of `n` when it is in
/// the first or last eighth, or every third one between.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    // Short-circuit: the subtraction runs only when i >= n / 8.
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// Layer index of a `blk.N.` tensor name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// What one tensor became.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorChange {
    pub name: String,
    pub from: GgmlType,
    pub to: GgmlType,
    /// The planned type did not fit the rows (`to` is the fallback).
    pub fell_back: bool,
}

/// Totals of a requantization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequantizeReport {
    pub tensors: Vec<TensorChange>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Types a whole model may be quantized to.
pub fn is_target_type(t: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        t,
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2_K | Q3_K | Q4_K | Q5_K | Q6_K
    ) && t.is_supported()
}

/// The type `t` (a tensor as the file has it) takes under `plan` in a model of `n_layers`
/// layers, and whether that is a fallback because the rows are not whole blocks of the planned
/// type.
pub fn planned_type(plan: &RequantizePlan, t: &TensorInfo, n_layers: usize) -> (GgmlType, bool) {
    let matrix = t.shape.len() >= 2 && t.name.ends_with(".weight");
    if !matrix || t.name.contains("ffn_gate_inp") {
        return (t.ggml_type, false);
    }
    let more = plan.more_bits.filter(|_| {
        (t.name.ends_with(".attn_v.weight") || t.name.ends_with(".ffn_down.weight"))
            && layer_of(&t.name).is_some_and(|i| use_more_bits(i, n_layers))
    });
    let want = match t.name.as_str() {
        "output.weight" => plan.output.unwrap_or(plan.weights),
        "token_embd.weight" => plan.token_embd.unwrap_or(plan.weights),
        _ => more.unwrap_or(plan.weights),
    };
    let row = t.shape[0];
    let fits = |ty: GgmlType| row.is_multiple_of(ty.block_elems());
    if fits(want) {
        return (want, false);
    }
    let fallback = [GgmlType::Q8_0, GgmlType::F16]
        .into_iter()
        .find(|&ty| fits(ty))
        .unwrap_or(GgmlType::F32);
    (fallback, true)
}

/// f32 values converted per chunk: bounds the memory of one tensor's conversion.
const CHUNK_ELEMS: u64 = 4 << 20;

/// Writes `input` requantized under `plan` to `output` (through `output.part`, renamed at the
/// end, so a failure leaves no half-written model under the final name). `progress(done,
/// total)` is called with source bytes after each chunk.
pub fn requantize_file(
    input: &Path,
    output: &Path,
    plan: &RequantizePlan,
    mut progress: impl FnMut(u64, u64),
) -> Result<RequantizeReport, RequantizeError> {
    for t in [
        Some(plan.weights),
        plan.output,
        plan.token_embd,
        plan.more_bits,
    ]
    .into_iter()
    .flatten()
    {
        if !is_target_type(t) {
            return Err(RequantizeError::TargetType(t));
        }
    }
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same {
        return Err(RequantizeError::SameFile(output.to_path_buf()));
    }
    let src = GgufFile::open(input)?;
    let n_layers = src
        .tensors()
        .iter()
        .filter_map(|t| layer_of(&t.name))
        .max()
        .map_or(0, |l| l + 1);
    let changes: Vec<TensorChange> = src
        .tensors()
        .iter()
        .map(|t| {
            let (to, fell_back) = planned_type(plan, t, n_layers);
            TensorChange {
                name: t.name.clone(),
                from: t.ggml_type,
                to,
                fell_back,
            }
        })
        .collect();
    let specs: Vec<TensorSpec> = src
        .tensors()
        .iter()
        .zip(&changes)
        .map(|(t, c)| TensorSpec {
            name: t.name.clone(),
            shape: t.shape.clone(),
            ggml_type: c.to,
        })
        .collect();
    let mut md = src.metadata().clone();
    md.insert(
        crate::model::names::keys::FILE_TYPE,
        Value::U32(plan.file_type()),
    );
    let part = output.with_extension(match output.extension() {
        Some(e) => format!("{}.part", e.to_string_lossy()),
        None => "part".into(),
    });
    let io = |source| RequantizeError::Io {
        path: part.clone(),
        source,
    };
    let file = std::fs::File::create(&part).map_err(io)?;
    let result = (|| {
        let mut w = GgufWriter::new(BufWriter::with_capacity(8 << 20, file), &md, &specs)?;
        let total: u64 = src.tensors().iter().map(|t| t.n_bytes).sum();
        let mut done = 0u64;
        for (t, c) in src.tensors().iter().zip(&changes) {
            let data = src.tensor_data(t);
            if c.to == c.from {
                w.write_tensor(data)?;
                done += t.n_bytes;
                progress(done, total);
                continue;
            }
            convert(t, data, c.to, &mut w, |b| {
                done += b;
                progress(done, total);
            })?;
        }
        let mut inner = w.finish()?;
        inner.flush().map_err(io)?;
        let file = inner.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok::<u64, RequantizeError>(total)
    })();
    let bytes_in = match result {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    std::fs::rename(&part, output).map_err(|source| RequantizeError::Io {
        path: output.to_path_buf(),
        source,
    })?;
    let bytes_out = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(RequantizeReport {
        tensors: changes,
        bytes_in,
        bytes_out,
    })
}

/// Streams tensor `t` (`data` in its file type) into `to`: whole rows per chunk, dequantized
/// and quantized in parallel, written in order; `advanced(source bytes)` after each chunk.
fn convert<W: Write>(
    t: &TensorInfo,
    data: &[u8],
    to: GgmlType,
    w: &mut GgufWriter<W>,
    mut advanced: impl FnMut(u64),
) -> Result<(), RequantizeError> {
    let err = |source| RequantizeError::Quant {
        tensor: t.name.clone(),
        source,
    };
    let row = t.shape[0].max(1);
    let rows = t.n_elements / row;
    let src_row = t.ggml_type.row_bytes(row).ok_or_else(|| {
        err(QuantError::Unsupported {
            ty: t.ggml_type,
            op: "requantize",
        })
    })? as usize;
    let rows_per_chunk = (CHUNK_ELEMS / row).max(1);
    let mut r0 = 0u64;
    while r0 < rows {
        let n = rows_per_chunk.min(rows - r0) as usize;
        let bytes = &data[r0 as usize * src_row..(r0 as usize + n) * src_row];
        let mut f = vec![0f32; n * row as usize];
        dequantize_par(t.ggml_type, bytes, &mut f).map_err(err)?;
        // Rows quantize independently: split the chunk into row groups for the pool.
        let group = (n / rayon::current_num_threads().max(1)).max(1);
        let parts: Vec<Vec<u8>> = f
            .par_chunks(group * row as usize)
            .map(|x| quantize(to, x))
            .collect::<Result<_, _>>()
            .map_err(err)?;
        for p in &parts {
            w.write_tensor_part(p)?;
        }
        advanced(bytes.len() as u64);
        r0 += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{write_to_vec, Metadata};

    fn info(name: &str, shape: &[u64], ty: GgmlType) -> TensorInfo {
        let n: u64 = shape.iter().product();
        TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
            ggml_type: ty,
            offset: 0,
            n_elements: n,
            n_bytes: ty.row_bytes(n).unwrap_or(0),
            info_offset: 0,
        }
    }

    #[test]
    fn matrices_change_vectors_and_routers_stay_rows_that_do_not_fit_fall_back() {
        let plan = RequantizePlan {
            weights: GgmlType::Q4_K,
            output: Some(GgmlType::Q6_K),
            token_embd: None,
            more_bits: None,
        };
        let f32m = |n: &str, s: &[u64]| info(n, s, GgmlType::F32);
        assert_eq!(
            planned_type(&plan, &f32m("blk.0.attn_q.weight", &[512, 512]), 8),
            (GgmlType::Q4_K, false)
        );
        assert_eq!(
            planned_type(&plan, &f32m("output.weight", &[512, 100]), 8),
            (GgmlType::Q6_K, false)
        );
        assert_eq!(
            planned_type(&plan, &f32m("token_embd.weight", &[512, 100]), 8),
            (GgmlType::Q4_K, false)
        );
        // 576-element rows: not whole 256-element super-blocks; Q8_0 fits.
        assert_eq!(
            planned_type(&plan, &f32m("blk.0.ffn_down.weight", &[576, 64]), 8),
            (GgmlType::Q8_0, true)
        );
        // 40-element rows: neither; F16.
        assert_eq!(
            planned_type(&plan, &f32m("blk.0.ffn_up.weight", &[40, 8]), 8),
            (GgmlType::F16, true)
        );
        assert_eq!(
            planned_type(&plan, &f32m("blk.0.attn_norm.weight", &[512]), 8),
            (GgmlType::F32, false)
        );
        assert_eq!(
            planned_type(&plan, &f32m("blk.0.ffn_gate_inp.weight", &[512, 8]), 8),
            (GgmlType::F32, false)
        );
    }

    #[test]
    fn the_k_mixes_give_more_bits_to_llama_cpps_layers() {
        // 32 layers: the first 4, the last 4, and 6, 9, .., 27 between.
        let chosen: Vec<usize> = (0..32).filter(|&i| use_more_bits(i, 32)).collect();
        assert_eq!(
            chosen,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        let plan = RequantizePlan::named("Q4_K_M").unwrap();
        assert_eq!(plan.file_type(), 15);
        assert_eq!(RequantizePlan::named("q5_k_m").unwrap().file_type(), 17);
        assert_eq!(RequantizePlan::named("q4_0").unwrap().file_type(), 2);
        assert!(RequantizePlan::named("q4_k_x").is_none());
        let m = |n: &str| info(n, &[512, 512], GgmlType::F16);
        let ty = |n: &str| planned_type(&plan, &m(n), 32).0;
        assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q6_K);
        assert_eq!(ty("blk.4.attn_v.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.6.ffn_down.weight"), GgmlType::Q6_K);
        assert_eq!(ty("blk.7.ffn_down.weight"), GgmlType::Q4_K);
        assert_eq!(ty("blk.0.attn_q.weight"), GgmlType::Q4_K);
        assert_eq!(ty("output.weight"), GgmlType::Q6_K);
        assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
    }

    #[test]
    fn a_small_model_round_trips_within_the_types_error() {
        // Two matrices (one of several chunks' worth of rows would take too long here: the
        // chunking is exercised by a row count that is not a multiple of the group), a norm.
        let (rows, cols) = (37u64, 256u64);
        let vals: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 0.2)
            .collect();
        let norm: Vec<f32> = (0..cols).map(|i| 1.0 + i as f32 / 1000.0).collect();
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let spec = |n: &str, s: &[u64]| TensorSpec {
            name: n.into(),
            shape: s.to_vec(),
            ggml_type: GgmlType::F32,
        };
        let file = write_to_vec(
            &Metadata::new(),
            &[
                (spec("blk.0.attn_q.weight", &[cols, rows]), bytes(&vals)),
                (spec("blk.0.attn_norm.weight", &[cols]), bytes(&norm)),
                (spec("output.weight", &[cols, rows]), bytes(&vals)),
            ],
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("m.gguf"), dir.path().join("m-q.gguf"));
        std::fs::write(&src, file).unwrap();
        let plan = RequantizePlan {
            weights: GgmlType::Q4_K,
            output: Some(GgmlType::Q8_0),
            token_embd: None,
            more_bits: None,
        };
        let mut calls = 0;
        let r = requantize_file(&src, &dst, &plan, |d, t| {
            assert!(d <= t);
            calls += 1;
        })
        .unwrap();
        assert!(calls >= 3);
        assert!(!dst.with_extension("gguf.part").exists());
        let out = GgufFile::open(&dst).unwrap();
        let types: Vec<GgmlType> = out.tensors().iter().map(|t| t.ggml_type).collect();
        assert_eq!(types, [GgmlType::Q4_K, GgmlType::F32, GgmlType::Q8_0]);
        assert_eq!(r.bytes_out, std::fs::metadata(&dst).unwrap().len());
        for (t, tol) in out.tensors().iter().zip([0.02f32, 0.0, 0.002]) {
            let mut got = vec![0f32; t.n_elements as usize];
            dequantize_par(t.ggml_type, out.tensor_data(t), &mut got).unwrap();
            let want = if t.shape.len() == 1 { &norm } else { &vals };
            let err = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= tol, "{}: max error {err} > {tol}", t.name);
        }
        assert_eq!(
            out.metadata().get(crate::model::names::keys::FILE_TYPE),
            Some(&Value::U32(crate::synth::file_type(GgmlType::Q4_K)))
        );
        // The same file as input and output is refused; an unsupported target too.
        assert!(matches!(
            requantize_file(&src, &src, &plan, |_, _| {}),
            Err(RequantizeError::SameFile(_))
        ));
        let bad = RequantizePlan {
            weights: GgmlType::Q8_K,
            ..plan
        };
        assert!(matches!(
            requantize_file(&src, &dst, &bad, |_, _| {}),
            Err(RequantizeError::TargetType(GgmlType::Q8_K))
        ));
    }
}
