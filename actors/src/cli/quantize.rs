//! `rocmforge quantize`: a GGUF rewritten with its weight matrices in another type
//! (`rocmforge::requantize`; llama.cpp's `llama-quantize`), with a progress bar.

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rocmforge::quant::GgmlType;
use rocmforge::requantize::{requantize_file, RequantizePlan};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// Source GGUF (any type the CPU reads).
    #[arg(value_parser = super::models::resolve)]
    pub input: PathBuf,
    /// Output GGUF (written as OUTPUT.part, renamed when complete).
    pub output: PathBuf,
    /// Type of the weight matrices: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k,
    /// f16, bf16 or f32, or the mixes q4_k_m / q5_k_m (llama.cpp's: some layers' attn_v and
    /// ffn_down, and the output head, in q6_k). Norms and biases keep theirs; a matrix whose
    /// rows are not whole blocks of it takes q8_0 (or f16).
    #[arg(long = "type")]
    pub qtype: String,
    /// Type of the output head (`output.weight`), if not `--type`'s (llama.cpp's K mixes keep it
    /// at q6_k).
    #[arg(long)]
    pub output_tensor_type: Option<String>,
    /// Type of the token embeddings, if not `--type`'s.
    #[arg(long)]
    pub token_embedding_type: Option<String>,
}

const TYPES: &str = "q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k, q6_k, f16, bf16, f32";

fn parse_type(name: &str) -> Result<GgmlType, String> {
    GgmlType::from_name(name).ok_or_else(|| format!("unknown type {name:?} ({TYPES})"))
}

pub fn run(a: QuantizeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let named = RequantizePlan::named(&a.qtype)
        .ok_or_else(|| format!("unknown type {:?} ({TYPES}, q4_k_m, q5_k_m)", a.qtype))?;
    let plan = RequantizePlan {
        output: match a.output_tensor_type.as_deref() {
            Some(t) => Some(parse_type(t)?),
            None => named.output,
        },
        token_embd: a
            .token_embedding_type
            .as_deref()
            .map(parse_type)
            .transpose()?,
        ..named
    };
    let target = if super::quiet() {
        ProgressDrawTarget::hidden()
    } else {
        ProgressDrawTarget::stderr()
    };
    let bar = ProgressBar::with_draw_target(Some(1), target);
    bar.set_style(
        ProgressStyle::with_template(
            "quantize [{bar:40}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let t0 = Instant::now();
    let report = requantize_file(&a.input, &a.output, &plan, |done, total| {
        bar.set_length(total.max(1));
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let mut counts: Vec<(String, usize)> = Vec::new();
    for c in &report.tensors {
        let key = if c.from == c.to {
            format!("{} kept", c.to)
        } else {
            format!("{} -> {}", c.from, c.to)
        };
        match counts.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => counts.push((key, 1)),
        }
    }
    let fell_back = report.tensors.iter().filter(|c| c.fell_back).count();
    println!(
        "wrote {}: {} tensors ({}), {:.1} MB -> {:.1} MB in {:.1} s",
        a.output.display(),
        report.tensors.len(),
        counts
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", "),
        report.bytes_in as f64 / 1e6,
        report.bytes_out as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    if fell_back > 0 {
        println!(
            "note: {fell_back} matrices have rows that are not whole {} blocks and took q8_0 or f16",
            plan.weights
        );
    }
    Ok(())
}
