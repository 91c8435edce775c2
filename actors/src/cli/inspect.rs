//! `rocmforge inspect`: a model's header, hyper-parameters, tokenizer summary, tensors, per-layer
//! byte totals and a validation verdict (the loader's own checks; a problem exits non-zero);
//! `--dequant` dumps one tensor as little-endian f32.

use clap::Args;
use rocmforge::gguf::{GgufFile, Metadata, Value};
use rocmforge::model::names::{arch_key, keys, tensor_name, ArchKey, TensorKind};
use rocmforge::model::{KvLimit, Model, SequenceConfig};
use rocmforge::quant::dequantize_par;
use rocmforge::tokenizer::Tokenizer;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Path to a GGUF file.
    #[arg(default_value = super::models::DEFAULT_MODEL_FILE, value_parser = super::models::resolve)]
    pub model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Dequantize this tensor and write it to --out as little-endian f32.
    #[arg(long, requires = "out")]
    pub dequant: Option<String>,
    /// Output file of --dequant.
    #[arg(long, requires = "dequant")]
    pub out: Option<PathBuf>,
}

/// Hyper-parameter keys shown, in this order.
const HPARAMS: [ArchKey; 15] = [
    ArchKey::ContextLength,
    ArchKey::EmbeddingLength,
    ArchKey::BlockCount,
    ArchKey::FeedForwardLength,
    ArchKey::HeadCount,
    ArchKey::HeadCountKv,
    ArchKey::KeyLength,
    ArchKey::ValueLength,
    ArchKey::RmsEps,
    ArchKey::RopeFreqBase,
    ArchKey::RopeDimensionCount,
    ArchKey::RopeScalingType,
    ArchKey::RopeScalingFactor,
    ArchKey::RopeScalingOrigCtx,
    ArchKey::VocabSize,
];

#[derive(Debug, Serialize)]
pub struct Report {
    pub path: String,
    pub version: u32,
    pub architecture: Option<String>,
    pub name: Option<String>,
    pub file_bytes: u64,
    pub alignment: u64,
    pub data_offset: u64,
    pub metadata_keys: usize,
    /// Full key (`llama.block_count`) to value, for the keys present.
    pub hparams: BTreeMap<String, Value>,
    pub tokenizer: TokenizerSummary,
    pub tensors: Vec<TensorRow>,
    pub layers: Vec<LayerRow>,
    pub total_bytes: u64,
    pub validation: Validation,
}

#[derive(Debug, Serialize)]
pub struct TokenizerSummary {
    pub model: Option<String>,
    pub pre: Option<String>,
    pub vocab_size: usize,
    pub merges: usize,
    pub bos_id: Option<u64>,
    pub eos_id: Option<u64>,
    pub unk_id: Option<u64>,
    pub pad_id: Option<u64>,
    pub add_bos: Option<bool>,
    pub chat_template: bool,
}

#[derive(Debug, Serialize)]
pub struct TensorRow {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: String,
    pub shape: Vec<u64>,
    pub bytes: u64,
    /// Offset relative to the data section.
    pub offset: u64,
}

#[derive(Debug, Serialize)]
pub struct LayerRow {
    /// `null` for tensors outside any `blk.N.`.
    pub layer: Option<usize>,
    pub tensors: usize,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Validation {
    /// No problem below: `run` and `serve` would load this file.
    pub ok: bool,
    /// Errors of the checks loading runs (hyper-parameters, tensor shapes, vocabulary
    /// agreement, tokenizer, KV cache of the default context), in the loader's words.
    pub load: Vec<String>,
    /// Not errors, but worth knowing (a context capped to fit the KV limit).
    pub warnings: Vec<String>,
    /// The context `run` would use by default, fitted to this machine's KV limit.
    pub default_ctx: Option<usize>,
    /// `"name: TYPE"` for tensors whose type the compute paths cannot handle.
    pub unsupported_types: Vec<String>,
    /// Required llama tensors not in the file.
    pub missing: Vec<String>,
    /// Tensors that no llama role accounts for.
    pub unaccounted: Vec<String>,
}

fn tokenizer_summary(m: &Metadata) -> TokenizerSummary {
    // A key of the wrong type is reported as absent here; `validate` is about tensors.
    let s = |k| m.get_str(k).ok().flatten().map(str::to_string);
    let u = |k| m.get_u64(k).ok().flatten();
    let len = |k| m.get_array(k).ok().flatten().map_or(0, |a| a.items.len());
    TokenizerSummary {
        model: s(keys::TOK_MODEL),
        pre: s(keys::TOK_PRE),
        vocab_size: len(keys::TOK_TOKENS),
        merges: len(keys::TOK_MERGES),
        bos_id: u(keys::TOK_BOS),
        eos_id: u(keys::TOK_EOS),
        unk_id: u(keys::TOK_UNK),
        pad_id: u(keys::TOK_PAD),
        add_bos: m.get_bool(keys::TOK_ADD_BOS).ok().flatten(),
        chat_template: m.contains(keys::TOK_CHAT_TEMPLATE),
    }
}

/// Checks tensor types, that every llama layer is complete, and that no tensor is unexplained.
fn validate(f: &GgufFile, n_layer: usize) -> Validation {
    let unsupported_types: Vec<String> = f
        .tensors()
        .iter()
        .filter(|t| !t.ggml_type.is_supported())
        .map(|t| format!("{}: {}", t.name, t.ggml_type))
        .collect();
    let mut required = vec![
        tensor_name(TensorKind::TokenEmbd, None),
        tensor_name(TensorKind::OutputNorm, None),
    ];
    for l in 0..n_layer {
        required.extend(TensorKind::LAYER.iter().map(|&k| tensor_name(k, Some(l))));
    }
    let missing: Vec<String> = required
        .iter()
        .filter(|n| f.tensor(n).is_none())
        .cloned()
        .collect();
    // Optional roles: an untied head, Llama 3 RoPE factors, q/k/v biases (qwen2-style), QK-norm
    // (qwen3, gemma3) and Gemma's post-norms; whether the file's family needs them is the
    // model check's call (`Model::from_file`, reported beside this).
    let mut known: HashSet<String> = required.into_iter().collect();
    known.insert(tensor_name(TensorKind::Output, None));
    known.insert(tensor_name(TensorKind::RopeFreqs, None));
    for l in 0..n_layer {
        for k in [
            TensorKind::AttnQBias,
            TensorKind::AttnKBias,
            TensorKind::AttnVBias,
            TensorKind::AttnQNorm,
            TensorKind::AttnKNorm,
            TensorKind::AttnPostNorm,
            TensorKind::FfnPostNorm,
        ] {
            known.insert(tensor_name(k, Some(l)));
        }
    }
    let unaccounted: Vec<String> = f
        .tensors()
        .iter()
        .filter(|t| !known.contains(&t.name))
        .map(|t| t.name.clone())
        .collect();
    let load = load_checks(f);
    Validation {
        ok: unsupported_types.is_empty()
            && missing.is_empty()
            && unaccounted.is_empty()
            && load.problems.is_empty(),
        load: load.problems,
        warnings: load.warnings,
        default_ctx: load.default_ctx,
        unsupported_types,
        missing,
        unaccounted,
    }
}

struct LoadChecks {
    problems: Vec<String>,
    warnings: Vec<String>,
    default_ctx: Option<usize>,
}

/// The checks `run` and `serve` make before computing, through the same functions, so
/// `inspect` cannot call a file valid that loading rejects.
fn load_checks(f: &GgufFile) -> LoadChecks {
    let mut c = LoadChecks {
        problems: Vec::new(),
        warnings: Vec::new(),
        default_ctx: None,
    };
    // A model without tokenizer metadata runs on token ids in the embedding API, but `run`
    // and `serve` need text in and out.
    if let Err(e) = Tokenizer::from_metadata(f.metadata()) {
        c.problems.push(format!("tokenizer: {e}"));
    }
    // Hyper-parameters, every tensor's shape and type, vocabulary agreement.
    let model = match Model::from_file(f.clone()) {
        Ok(m) => m,
        Err(e) => {
            c.problems.push(format!("model: {e}"));
            return c;
        }
    };
    let limit = match super::tuning_from_env() {
        Ok(t) => KvLimit::configured_or_host(t.kv_limit),
        Err(e) => {
            c.problems.push(format!("KV limit: {e}"));
            return c;
        }
    };
    match SequenceConfig::default().fit_context(model.hparams(), limit.as_ref()) {
        Ok(fit) => {
            if fit.capped() {
                c.warnings.push(format!(
                    "the default context of {} tokens does not fit the KV limit ({}): \
                     capped to {}",
                    fit.requested,
                    limit.as_ref().map_or("none", |l| l.from.as_str()),
                    fit.ctx
                ));
            }
            c.default_ctx = Some(fit.ctx);
        }
        Err(e) => c.problems.push(format!("KV cache: {e}")),
    }
    c
}

pub fn report(f: &GgufFile) -> Report {
    let m = f.metadata();
    let arch = m.architecture().ok().map(str::to_string);
    let mut hparams = BTreeMap::new();
    if let Some(a) = &arch {
        for k in HPARAMS {
            let key = arch_key(a, k);
            if let Some(v) = m.get(&key) {
                hparams.insert(key, v.clone());
            }
        }
    }
    let n_layer = arch
        .as_deref()
        .and_then(|a| m.get_u64(&arch_key(a, ArchKey::BlockCount)).ok().flatten())
        .unwrap_or(0) as usize;
    let tensors = f
        .tensors()
        .iter()
        .map(|t| TensorRow {
            name: t.name.clone(),
            ty: t.ggml_type.name().to_string(),
            shape: t.shape.clone(),
            bytes: t.n_bytes,
            offset: t.offset,
        })
        .collect();
    let layers = f
        .layer_groups()
        .iter()
        .map(|g| LayerRow {
            layer: g.layer,
            tensors: g.tensors.len(),
            bytes: g.bytes,
        })
        .collect();
    Report {
        path: f.path().display().to_string(),
        version: f.version(),
        name: m.get_str(keys::NAME).ok().flatten().map(str::to_string),
        architecture: arch,
        file_bytes: f.file_len(),
        alignment: f.alignment(),
        data_offset: f.data_offset(),
        metadata_keys: m.len(),
        hparams,
        tokenizer: tokenizer_summary(m),
        tensors,
        layers,
        total_bytes: f.tensor_bytes(),
        validation: validate(f, n_layer),
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::F32(x) => format!("{x}"),
        Value::F64(x) => format!("{x}"),
        other => other
            .as_u64()
            .map(|x| x.to_string())
            .or_else(|| other.as_i64().map(|x| x.to_string()))
            .unwrap_or_else(|| other.type_name()),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".to_string(), |x| x.to_string())
}

fn print_table(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "file          {} ({} bytes, GGUF v{})",
        r.path, r.file_bytes, r.version
    )?;
    writeln!(out, "architecture  {}", opt(&r.architecture))?;
    writeln!(out, "name          {}", opt(&r.name))?;
    writeln!(
        out,
        "metadata      {} keys, alignment {}, data at {}",
        r.metadata_keys, r.alignment, r.data_offset
    )?;
    writeln!(out, "\nhyper-parameters")?;
    for (k, v) in &r.hparams {
        writeln!(out, "  {k:<44} {}", show(v))?;
    }
    let t = &r.tokenizer;
    writeln!(out, "\ntokenizer")?;
    writeln!(
        out,
        "  model {} / pre {}, vocab {}, merges {}",
        opt(&t.model),
        opt(&t.pre),
        t.vocab_size,
        t.merges
    )?;
    writeln!(
        out,
        "  bos {} eos {} unk {} pad {}, add_bos {}, chat template {}",
        opt(&t.bos_id),
        opt(&t.eos_id),
        opt(&t.unk_id),
        opt(&t.pad_id),
        opt(&t.add_bos),
        if t.chat_template { "yes" } else { "no" }
    )?;
    writeln!(
        out,
        "\n{:<36} {:<7} {:<22} {:>12} {:>12}",
        "tensor", "type", "shape", "bytes", "offset"
    )?;
    for row in &r.tensors {
        let shape = format!("{:?}", row.shape);
        writeln!(
            out,
            "{:<36} {:<7} {:<22} {:>12} {:>12}",
            row.name, row.ty, shape, row.bytes, row.offset
        )?;
    }
    writeln!(out, "\n{:<10} {:>8} {:>14}", "layer", "tensors", "bytes")?;
    for l in &r.layers {
        let name = l.layer.map_or("global".to_string(), |n| n.to_string());
        writeln!(out, "{name:<10} {:>8} {:>14}", l.tensors, l.bytes)?;
    }
    writeln!(
        out,
        "total      {:>8} {:>14} ({:.1} MiB)",
        r.tensors.len(),
        r.total_bytes,
        r.total_bytes as f64 / (1 << 20) as f64
    )?;
    let v = &r.validation;
    writeln!(
        out,
        "\nvalidation: {}",
        if v.ok { "OK" } else { "PROBLEMS" }
    )?;
    if let Some(ctx) = v.default_ctx {
        writeln!(out, "  default context: {ctx} tokens")?;
    }
    for (what, list) in [
        ("load", &v.load),
        ("warning", &v.warnings),
        ("unsupported type", &v.unsupported_types),
        ("missing", &v.missing),
        ("unaccounted", &v.unaccounted),
    ] {
        for x in list.iter().take(20) {
            writeln!(out, "  {what}: {x}")?;
        }
        if list.len() > 20 {
            writeln!(out, "  ... {} more {what}", list.len() - 20)?;
        }
    }
    Ok(())
}

fn dequant(f: &GgufFile, name: &str, out: &PathBuf) -> Result<(), Box<dyn std::error::Error>> {
    let t = f.require_tensor(name)?;
    let n = usize::try_from(t.n_elements)?;
    let mut y = vec![0f32; n];
    dequantize_par(t.ggml_type, f.tensor_data(t), &mut y).map_err(|e| e.in_tensor(name))?;
    let file =
        std::fs::File::create(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for chunk in y.chunks(1 << 16) {
        let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.write_all(&bytes)?;
    }
    w.flush()?;
    eprintln!(
        "wrote {name} ({}, shape {:?}, {n} f32) to {}",
        t.ggml_type,
        t.shape,
        out.display()
    );
    Ok(())
}

pub fn run(a: InspectArgs) -> Result<(), Box<dyn std::error::Error>> {
    let f = GgufFile::open(&a.model)?;
    if let (Some(name), Some(out)) = (&a.dequant, &a.out) {
        return dequant(&f, name, out);
    }
    let r = report(&f);
    let stdout = std::io::stdout();
    let mut lock = stdout.lock();
    if a.json {
        serde_json::to_writer_pretty(&mut lock, &r)?;
        writeln!(lock)?;
    } else {
        print_table(&r, &mut lock)?;
    }
    let v = &r.validation;
    if !v.ok {
        let n = v.load.len() + v.unsupported_types.len() + v.missing.len() + v.unaccounted.len();
        return Err(format!("{}: validation found {n} problem(s)", r.path).into());
    }
    Ok(())
}
