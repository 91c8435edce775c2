//! `rocmforge synth`: writes a random-weight llama GGUF (see `rocmforge::synth`).

use clap::Args;
use rocmforge::quant::GgmlType;
use rocmforge::synth::{tokenizer_from, write_synth_file, Preset, SynthConfig, SynthError};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Model shape: tiny (4 layers, 256 wide), 1b, 8b or 70b (llama-3 shapes).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Weight type: f16, q8_0, q4_0, q4_1, q5_0, q5_1, q3_k, q4_k, q5_k or q6_k.
    #[arg(long, default_value = "q4_0")]
    pub qtype: String,
    /// Seed of the weights; the same seed gives the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output GGUF file.
    #[arg(long)]
    pub out: PathBuf,
    /// Copy every `tokenizer.*` key from this GGUF (the vocabulary size follows it).
    #[arg(long)]
    pub tokenizer_from: Option<PathBuf>,
}

pub fn run(a: SynthArgs) -> Result<(), Box<dyn std::error::Error>> {
    let preset = Preset::from_name(&a.preset)?;
    let qtype = GgmlType::from_name(&a.qtype)
        .ok_or_else(|| SynthError::UnsupportedType(a.qtype.clone()))?;
    let tokenizer = a
        .tokenizer_from
        .as_deref()
        .map(tokenizer_from)
        .transpose()?;
    let cfg = SynthConfig {
        preset,
        qtype,
        seed: a.seed,
        tokenizer,
    };
    let t0 = Instant::now();
    let r = write_synth_file(&a.out, &cfg)?;
    let secs = t0.elapsed().as_secs_f64();
    let len = std::fs::metadata(&a.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {}: {preset:?} {qtype}, {} tensors, vocab {}, {:.2} GB in {secs:.1} s ({:.2} GB/s)",
        a.out.display(),
        r.n_tensors,
        r.n_vocab,
        len as f64 / 1e9,
        len as f64 / 1e9 / secs.max(1e-9)
    );
    Ok(())
}
