//! The `rocmforge` command line.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod chat;
pub mod engine;
pub mod generate;
pub mod gpu;
pub mod inspect;
pub mod progress;
pub mod run;
pub mod serve;
pub mod synth;
pub mod trace;
pub mod ttft;

/// Default model location (fetched by scripts/fetch-model.sh).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Debug, Parser)]
#[command(
    name = "rocmforge",
    version,
    about = "ROCmForge: streaming LLM inference over GGUF models"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a GGUF model's architecture, hyper-parameters, tokenizer and tensors.
    Inspect(inspect::InspectArgs),
    /// Write a random-weight llama GGUF for benchmarks and tests.
    Synth(synth::SynthArgs),
    /// Pipeline traces: `trace view out.json --svg out.svg` draws the actors' timeline.
    Trace(trace::TraceArgs),
    /// Generate text from a prompt (CPU or CUDA), streaming it to stdout.
    Run(run::RunArgs),
    /// Interactive chat using the model's chat template.
    Chat(chat::ChatArgs),
    /// Prompt-processing and decode throughput (llama-bench style).
    Bench(bench::BenchArgs),
    /// Serve the model over an OpenAI-compatible HTTP API (and a control socket).
    Serve(serve::ServeArgs),
}

pub fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Trace(a) => trace::run(a),
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
    }
}
