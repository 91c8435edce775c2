//! Random-weight llama GGUF files for benchmarks and tests (`rocmforge synth`).
//!
//! Weights are generated directly as valid quant blocks (random quants, with scales chosen so the
//! dequantized weights have mean ~0 and std ~`WEIGHT_STD`), never by quantizing floats: that keeps
//! generation at memory speed so an 8B-shape file writes at disk speed. Every tensor is cut into
//! fixed chunks, each with its own ChaCha stream derived from (seed, tensor, chunk), generated on
//! Rayon and streamed through `GgufWriter` in order: the output depends only on the seed, never on
//! the thread count, and memory stays at two batches whatever the model size.
//!
//! Token embedding and output head use the same type as the other weights (every preset's row
//! length is a multiple of 256, so every listed type fits); norms are F32 ones.

use crate::gguf::{Array, ArrayItems};
use crate::gguf::{GgufError, GgufFile, GgufWriter, Metadata, TensorSpec, Value, ValueType};
use crate::model::names::{arch_key, keys, tensor_name, ArchKey, TensorKind};
use crate::quant::blocks::to_f16;
use crate::quant::GgmlType;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Target standard deviation of the dequantized weights.
pub const WEIGHT_STD: f32 = 0.02;
const ARCH: &str = "llama";
/// Bytes generated per task (rounded down to whole blocks).
const CHUNK_BYTES: usize = 4 << 20;
/// Chunks generated per batch; one batch is written while the next is generated.
const BATCH_CHUNKS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("unknown preset {0:?} (expected tiny, 1b, 8b or 70b)")]
    UnknownPreset(String),
    #[error("synth cannot generate weights of type {0} (supported: {SUPPORTED_NAMES})")]
    UnsupportedType(String),
    #[error("tokenizer source {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("cannot create {path}: {source}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] GgufError),
}

const SUPPORTED_NAMES: &str = "f16, q8_0, q4_0, q4_1, q5_0, q5_1, q3_k, q4_k, q5_k, q6_k";

/// Weight types synth can generate.
pub const SUPPORTED: [GgmlType; 10] = [
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Tiny,
    B1,
    B8,
    B70,
}

/// Model shape of a preset. `n_vocab` applies when no tokenizer is copied from a file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_base: f32,
}

impl Preset {
    pub fn from_name(s: &str) -> Result<Self, SynthError> {
        match s.to_ascii_lowercase().as_str() {
            "tiny" => Ok(Self::Tiny),
            "1b" => Ok(Self::B1),
            "8b" => Ok(Self::B8),
            "70b" => Ok(Self::B70),
            _ => Err(SynthError::UnknownPreset(s.to_string())),
        }
    }

    /// Llama-3 shapes for 1b/8b/70b (vocabulary 128256); tiny uses the built-in byte vocabulary.
    pub fn shape(self) -> Shape {
        let (n_layer, n_embd, n_ff, n_head, n_head_kv, n_vocab, n_ctx, rope_base) = match self {
            Self::Tiny => (4, 256, 768, 4, 2, BUILTIN_BASE_VOCAB, 2048, 10000.0),
            Self::B1 => (16, 2048, 8192, 32, 8, 128256, 8192, 500000.0),
            Self::B8 => (32, 4096, 14336, 32, 8, 128256, 8192, 500000.0),
            Self::B70 => (80, 8192, 28672, 64, 8, 128256, 8192, 500000.0),
        };
        Shape {
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_head_kv,
            n_vocab,
            n_ctx,
            rope_base,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct SynthConfig {
    pub preset: Preset,
    pub qtype: GgmlType,
    pub seed: u64,
    /// `tokenizer.*` keys to copy (from `tokenizer_from`); `None` for the built-in vocabulary.
    pub tokenizer: Option<Metadata>,
}

/// llama.cpp's `general.file_type` (`llama_ftype`) for a weight type (0 where it has none).
pub fn file_type(t: GgmlType) -> u32 {
    match t {
        GgmlType::F16 => 1,
        GgmlType::Q4_0 => 2,
        GgmlType::Q4_1 => 3,
        GgmlType::Q8_0 => 7,
        GgmlType::Q5_0 => 8,
        GgmlType::Q5_1 => 9,
        GgmlType::Q3_K => 11, // Q3_K_S: every weight Q3_K
        GgmlType::Q4_K => 14, // Q4_K_S: every weight Q4_K
        GgmlType::Q5_K => 16, // Q5_K_S
        GgmlType::Q6_K => 18,
        _ => 0,
    }
}

/// Copies every `tokenizer.*` key of a GGUF file.
pub fn tokenizer_from(path: &Path) -> Result<Metadata, SynthError> {
    let f = GgufFile::open(path)?;
    let mut m = Metadata::new();
    for (k, v) in f.metadata().iter() {
        if k.starts_with("tokenizer.") {
            m.insert(k, v.clone());
        }
    }
    let n = m.get_str_array(keys::TOK_TOKENS)?.map_or(0, |t| t.len());
    if n == 0 {
        return Err(SynthError::Tokenizer {
            path: path.to_path_buf(),
            reason: format!("no {} array", keys::TOK_TOKENS),
        });
    }
    Ok(m)
}

/// 256 byte tokens, then bos/eos: the base of the built-in vocabulary.
const BUILTIN_BASE_VOCAB: usize = 258;

/// GPT-2's byte-to-unicode map: printable bytes stand for themselves, the others are shifted to
/// U+0100.., so every byte token is a visible string (what byte-level BPE vocabularies store).
fn byte_token(b: u8) -> String {
    let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable {
        char::from(b).to_string()
    } else {
        let n = (0..b)
            .filter(|&x| !matches!(x, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF))
            .count() as u32;
        char::from_u32(256 + n).map_or_else(String::new, |c| c.to_string())
    }
}

/// A byte-level BPE vocabulary (`gpt2` model, `default` pre-tokenizer, no merges): ids 0..256
/// are the bytes, 256 is bos, 257 eos, then unused filler tokens up to `n_vocab` so the embedding
/// has the preset's real size.
pub fn builtin_tokenizer(n_vocab: usize) -> Metadata {
    let n_vocab = n_vocab.max(BUILTIN_BASE_VOCAB);
    let mut tokens: Vec<String> = (0..=255u8).map(byte_token).collect();
    tokens.push("<|begin_of_text|>".into());
    tokens.push("<|end_of_text|>".into());
    // Token types as llama.cpp numbers them: 1 normal, 3 control, 5 unused.
    let mut types = vec![1i32; 256];
    types.extend([3, 3]);
    for i in BUILTIN_BASE_VOCAB..n_vocab {
        tokens.push(format!("<|reserved_{}|>", i - BUILTIN_BASE_VOCAB));
        types.push(5);
    }
    let mut m = Metadata::new();
    m.insert(keys::TOK_MODEL, Value::String("gpt2".into()));
    m.insert(keys::TOK_PRE, Value::String("default".into()));
    m.insert(
        keys::TOK_TOKENS,
        Value::Array(Array {
            elem: ValueType::String,
            items: ArrayItems::String(tokens),
        }),
    );
    m.insert(
        keys::TOK_TYPES,
        Value::Array(Array {
            elem: ValueType::I32,
            items: ArrayItems::I32(types),
        }),
    );
    m.insert(
        keys::TOK_MERGES,
        Value::Array(Array {
            elem: ValueType::String,
            items: ArrayItems::String(Vec::new()),
        }),
    );
    m.insert(keys::TOK_BOS, Value::U32(256));
    m.insert(keys::TOK_EOS, Value::U32(257));
    m.insert(keys::TOK_PAD, Value::U32(257));
    m.insert(keys::TOK_ADD_BOS, Value::Bool(true));
    m
}

/// The full metadata and tensor list of a config, and the vocabulary size used.
pub fn plan(cfg: &SynthConfig) -> Result<(Metadata, Vec<TensorSpec>), SynthError> {
    if !SUPPORTED.contains(&cfg.qtype) {
        return Err(SynthError::UnsupportedType(cfg.qtype.name().to_string()));
    }
    let s = cfg.preset.shape();
    let tok = match &cfg.tokenizer {
        Some(t) => t.clone(),
        None => builtin_tokenizer(s.n_vocab),
    };
    let n_vocab = tok.get_str_array(keys::TOK_TOKENS)?.map_or(0, |t| t.len());
    let head_dim = s.n_embd / s.n_head;
    let mut m = Metadata::new();
    let name = format!(
        "rocmforge synth {:?} {} seed {}",
        cfg.preset, cfg.qtype, cfg.seed
    );
    m.insert(keys::ARCHITECTURE, Value::String(ARCH.into()));
    m.insert(keys::NAME, Value::String(name));
    m.insert(keys::FILE_TYPE, Value::U32(file_type(cfg.qtype)));
    m.insert("general.quantization_version", Value::U32(2));
    let u = |k| arch_key(ARCH, k);
    m.insert(u(ArchKey::ContextLength), Value::U32(s.n_ctx as u32));
    m.insert(u(ArchKey::EmbeddingLength), Value::U32(s.n_embd as u32));
    m.insert(u(ArchKey::BlockCount), Value::U32(s.n_layer as u32));
    m.insert(u(ArchKey::FeedForwardLength), Value::U32(s.n_ff as u32));
    m.insert(u(ArchKey::HeadCount), Value::U32(s.n_head as u32));
    m.insert(u(ArchKey::HeadCountKv), Value::U32(s.n_head_kv as u32));
    m.insert(u(ArchKey::RmsEps), Value::F32(1e-5));
    m.insert(u(ArchKey::RopeFreqBase), Value::F32(s.rope_base));
    m.insert(u(ArchKey::RopeDimensionCount), Value::U32(head_dim as u32));
    m.insert(u(ArchKey::VocabSize), Value::U32(n_vocab as u32));
    for (k, v) in tok.iter() {
        m.insert(k, v.clone());
    }

    let (e, kv, ff, v) = (
        s.n_embd as u64,
        (s.n_head_kv * head_dim) as u64,
        s.n_ff as u64,
        n_vocab as u64,
    );
    let q = cfg.qtype;
    let spec = |kind, layer, shape: Vec<u64>, ty| TensorSpec {
        name: tensor_name(kind, layer),
        shape,
        ggml_type: ty,
    };
    let mut t = vec![spec(TensorKind::TokenEmbd, None, vec![e, v], q)];
    for l in 0..s.n_layer {
        let l = Some(l);
        for kind in TensorKind::LAYER {
            let (shape, ty) = match kind {
                TensorKind::AttnNorm | TensorKind::FfnNorm => (vec![e], GgmlType::F32),
                TensorKind::AttnQ | TensorKind::AttnOutput => (vec![e, e], q),
                TensorKind::AttnK | TensorKind::AttnV => (vec![e, kv], q),
                TensorKind::FfnGate | TensorKind::FfnUp => (vec![e, ff], q),
                TensorKind::FfnDown => (vec![ff, e], q),
                _ => continue,
            };
            t.push(spec(kind, l, shape, ty));
        }
    }
    t.push(spec(TensorKind::OutputNorm, None, vec![e], GgmlType::F32));
    t.push(spec(TensorKind::Output, None, vec![e, v], q));
    Ok((m, t))
}

/// Per-block generation parameters: the scale `d` that gives `WEIGHT_STD` for uniform quants.
fn scale_for(var_q: f64, mean_sq_scale: f64) -> f32 {
    (WEIGHT_STD as f64 / (var_q * mean_sq_scale).sqrt()) as f32
}

/// Mean of k^2 for k uniform in lo..=hi (sub-block scales).
fn mean_sq(lo: u32, hi: u32) -> f64 {
    (lo..=hi).map(|k| (k * k) as f64).sum::<f64>() / (hi - lo + 1) as f64
}

/// Overwrites random bytes `buf` (whole blocks of `ty`) into valid, well-scaled blocks.
fn shape_blocks(ty: GgmlType, buf: &mut [u8]) {
    let bb = ty.block_bytes() as usize;
    match ty {
        GgmlType::F32 => {
            for c in buf.chunks_exact_mut(4) {
                c.copy_from_slice(&1.0f32.to_le_bytes());
            }
        }
        GgmlType::F16 => {
            // Uniform in [-a, a] has std a/sqrt(3).
            let a = WEIGHT_STD * 3f32.sqrt();
            for c in buf.chunks_exact_mut(2) {
                let u = u16::from_le_bytes([c[0], c[1]]) as f32 / 65535.0;
                c.copy_from_slice(&to_f16((2.0 * u - 1.0) * a));
            }
        }
        // Symmetric types: a random sign on d cancels the -0.5 mean of the quants.
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
            let var = match ty {
                GgmlType::Q4_0 => 21.5, // E[(q-8)^2], q in 0..16
                GgmlType::Q5_0 => 85.5, // E[(q-16)^2], q in 0..32
                _ => 5461.5,            // E[q^2], q an i8
            };
            let d = scale_for(var, 1.0);
            for b in buf.chunks_exact_mut(bb) {
                let sign = if b[0] & 1 == 0 { d } else { -d };
                b[0..2].copy_from_slice(&to_f16(sign));
            }
        }
        // y = d*q + m with m = -mean(q)*d.
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            let (var, mean) = if ty == GgmlType::Q4_1 {
                (21.25, 7.5)
            } else {
                (85.25, 15.5)
            };
            let d = half::f16::from_f32(scale_for(var, 1.0)).to_f32();
            for b in buf.chunks_exact_mut(bb) {
                b[0..2].copy_from_slice(&to_f16(d));
                b[2..4].copy_from_slice(&to_f16(-mean * d));
            }
        }
        // y = d*sc*q - dmin*m with m = sc and dmin = mean(q)*d: centred sub-blocks.
        GgmlType::Q4_K | GgmlType::Q5_K => {
            let (var, mean) = if ty == GgmlType::Q4_K {
                (21.25, 7.5)
            } else {
                (85.25, 15.5)
            };
            let d = half::f16::from_f32(scale_for(var, mean_sq(32, 63))).to_f32();
            for b in buf.chunks_exact_mut(bb) {
                let mut sc = [0u8; 8];
                for (j, s) in sc.iter_mut().enumerate() {
                    *s = 32 + (b[4 + j] & 31);
                }
                b[0..2].copy_from_slice(&to_f16(d));
                b[2..4].copy_from_slice(&to_f16(mean * d));
                b[4..16].copy_from_slice(&pack_scale_min_k4(&sc, &sc));
            }
        }
        // y = d*sc*(q-32), sc an i8 of random sign (cancelling the -0.5 mean of q-32).
        GgmlType::Q6_K => {
            let d = scale_for(341.5, mean_sq(64, 127));
            for b in buf.chunks_exact_mut(bb) {
                for s in &mut b[192..208] {
                    let mag = 64 + (*s & 63) as i8;
                    let sc = if *s & 0x80 != 0 { -mag } else { mag };
                    *s = sc as u8;
                }
                b[208..210].copy_from_slice(&to_f16(d));
            }
        }
        // y = d*sc*(q-4), q-4 in -4..3 (E[(q-4)^2] = 5.5), sc a 6-bit scale less 32 of random
        // sign (magnitude 16..31).
        GgmlType::Q3_K => {
            let d = scale_for(5.5, mean_sq(16, 31));
            for b in buf.chunks_exact_mut(bb) {
                let mut sc = [0i8; 16];
                for (j, v) in sc.iter_mut().enumerate() {
                    let r = b[96 + j % 12] >> (j / 12);
                    let mag = 16 + (r & 15) as i8;
                    *v = if r & 0x10 != 0 { -mag } else { mag };
                }
                b[96..108].copy_from_slice(&crate::quant::blocks::pack_scale_q3k(&sc));
                b[108..110].copy_from_slice(&to_f16(d));
            }
        }
        // Not reachable: `plan` admits only SUPPORTED types and F32 norms.
        _ => {}
    }
}

/// Inverse of `quant::blocks::scale_min_k4`: packs 8 six-bit scales and mins into 12 bytes.
pub fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4);
    }
    q
}

/// SplitMix64 finaliser: decorrelates (seed, tensor, chunk) into one ChaCha seed.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
    z ^ (z >> 31)
}

fn fill_chunk(seed: u64, tensor: usize, chunk: usize, ty: GgmlType, buf: &mut [u8]) {
    let s = mix(mix(mix(seed) ^ tensor as u64) ^ chunk as u64);
    ChaCha8Rng::seed_from_u64(s).fill_bytes(buf);
    shape_blocks(ty, buf);
}

/// Summary of a written file.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub n_tensors: usize,
    pub n_vocab: usize,
    pub tensor_bytes: u64,
}

/// Writes a whole synthetic model to `w`.
pub fn write_synth<W: Write + Send>(w: W, cfg: &SynthConfig) -> Result<SynthReport, SynthError> {
    let (meta, specs) = plan(cfg)?;
    let n_vocab = meta.get_str_array(keys::TOK_TOKENS)?.map_or(0, |t| t.len());
    let mut gw = GgufWriter::new(w, &meta, &specs)?;
    let infos = gw.infos().to_vec();
    let mut tensor_bytes = 0u64;
    // Batches of chunks over the whole model, in order; batch i+1 is generated while i is written.
    let mut work: Vec<(usize, usize, usize)> = Vec::new(); // (tensor, chunk, bytes)
    for (ti, t) in infos.iter().enumerate() {
        let bb = t.ggml_type.block_bytes() as usize;
        let chunk = (CHUNK_BYTES / bb).max(1) * bb;
        let n = t.n_bytes as usize;
        tensor_bytes += t.n_bytes;
        if n == 0 {
            // A zero-byte tensor still takes its turn in the writer.
            work.push((ti, 0, 0));
        }
        for (ci, start) in (0..n).step_by(chunk).enumerate() {
            work.push((ti, ci, chunk.min(n - start)));
        }
    }
    let gen = |batch: &[(usize, usize, usize)]| -> Vec<Vec<u8>> {
        batch
            .par_iter()
            .map(|&(ti, ci, len)| {
                let mut buf = vec![0u8; len];
                fill_chunk(cfg.seed, ti, ci, infos[ti].ggml_type, &mut buf);
                buf
            })
            .collect()
    };
    let mut batches = work.chunks(BATCH_CHUNKS);
    let mut current = batches.next().map(gen);
    while let Some(bufs) = current.take() {
        let next_batch = batches.next();
        let (written, next) = rayon::join(
            || -> Result<(), GgufError> {
                for b in &bufs {
                    gw.write_tensor_part(b)?;
                }
                Ok(())
            },
            || next_batch.map(gen),
        );
        written?;
        current = next;
    }
    gw.finish()?;
    Ok(SynthReport {
        n_tensors: specs.len(),
        n_vocab,
        tensor_bytes,
    })
}

/// Writes a synthetic model to a file (buffered).
pub fn write_synth_file(path: &Path, cfg: &SynthConfig) -> Result<SynthReport, SynthError> {
    let f = std::fs::File::create(path).map_err(|source| SynthError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    let w = std::io::BufWriter::with_capacity(8 << 20, f);
    write_synth(w, cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::blocks::scale_min_k4;

    #[test]
    fn scale_min_packing_inverts_the_reader() {
        let sc = [0, 63, 17, 42, 33, 5, 63, 48];
        let m = [63, 0, 1, 62, 15, 16, 31, 32];
        let q = pack_scale_min_k4(&sc, &m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn byte_tokens_are_distinct_and_visible() {
        let toks: std::collections::HashSet<String> = (0..=255u8).map(byte_token).collect();
        assert_eq!(toks.len(), 256);
        assert_eq!(byte_token(b'a'), "a");
        assert_eq!(byte_token(b' '), "\u{120}"); // GPT-2's 'Ġ'
        assert_eq!(byte_token(b'\n'), "\u{10a}"); // 'Ċ'
    }
}
