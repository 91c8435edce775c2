//! The `rocmforge` command line.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod chat;
pub mod engine;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod models;
pub mod progress;
pub mod quantize;
pub mod run;
pub mod serve;
pub mod synth;
pub mod trace;
pub mod ttft;

/// `ROCMFORGE_KV_LIMIT`: [`Tuning::kv_limit`](crate::Tuning), bytes.
pub const KV_LIMIT_ENV: &str = "ROCMFORGE_KV_LIMIT";
/// `ROCMFORGE_NO_CUBLAS`: anything but empty or `0` clears
/// [`Tuning::vendor_gemm`](crate::Tuning).
pub const NO_CUBLAS_ENV: &str = "ROCMFORGE_NO_CUBLAS";
/// `ROCMFORGE_CPU_ISA`: `avx2`, `vnni` or `best`, [`Tuning::cpu_isa`](crate::Tuning).
pub const CPU_ISA_ENV: &str = "ROCMFORGE_CPU_ISA";

/// The tuning knobs the environment sets (docs/ENVIRONMENT.md), read here at the CLI's edge
/// so the library reads none: the runtime gets them as builder fields. An unset (or empty)
/// variable keeps the field's default; a malformed one is an error naming it.
pub fn tuning_from_env() -> Result<crate::Tuning, String> {
    tuning_from(|k| std::env::var(k).ok())
}

/// [`tuning_from_env`] over any lookup (tests pass a map).
pub fn tuning_from(var: impl Fn(&str) -> Option<String>) -> Result<crate::Tuning, String> {
    let set = |k: &str| var(k).filter(|v| !v.trim().is_empty());
    let mut t = crate::Tuning::default();
    if let Some(v) = set(KV_LIMIT_ENV) {
        let bytes = v
            .trim()
            .parse::<u64>()
            .map_err(|e| format!("{KV_LIMIT_ENV}: {v:?} is not a byte count: {e}"))?;
        t.kv_limit = Some(bytes);
    }
    if let Some(v) = set(NO_CUBLAS_ENV) {
        t.vendor_gemm = v.trim() == "0";
    }
    if let Some(v) = set(CPU_ISA_ENV) {
        t.cpu_isa = Some(v.parse().map_err(|e| format!("{CPU_ISA_ENV}: {e}"))?);
    }
    Ok(t)
}

/// `--version`: the crate version, the commit it was built from and the compiled backends.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("ROCMFORGE_GIT_COMMIT"),
    ")\nbackends: cpu, cuda (loaded at run time)",
    env!("ROCMFORGE_HIP_BACKEND"),
);

#[derive(Debug, Parser)]
#[command(
    name = "rocmforge",
    version,
    long_version = LONG_VERSION,
    about = "ROCmForge: streaming LLM inference over GGUF models"
)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug); `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Errors only on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The log filter the flags ask for; `serve` logs its ready and request lines by default.
    fn log_filter(&self) -> &'static str {
        match (self.quiet, self.verbose, &self.command) {
            (true, _, _) => "error",
            (false, 0, Command::Serve(_)) => "info",
            (false, 0, _) => "warn",
            (false, 1, _) => "info",
            _ => "debug",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a GGUF model's architecture, hyper-parameters, tokenizer and tensors.
    Inspect(inspect::InspectArgs),
    /// Write a random-weight llama GGUF for benchmarks and tests.
    Synth(synth::SynthArgs),
    /// Rewrite a GGUF with its weight matrices in another type (llama-quantize).
    Quantize(quantize::QuantizeArgs),
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
    /// The models found where `--model NAME.gguf` looks ($ROCMFORGE_MODELS, the data directory,
    /// ./models), with size, architecture and main tensor type.
    List {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Download a model from the Hugging Face Hub into the models directory (what `-m hf:...`
    /// does on first use) and print its local path.
    Pull {
        /// hf:OWNER/REPO/FILE.gguf (`HF_ENDPOINT` and `HF_TOKEN` are honoured).
        #[arg(value_parser = models::resolve)]
        model: std::path::PathBuf,
    },
    /// Print a shell completion script (`rocmforge completions bash > /etc/bash_completion.d/rocmforge`).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// The model file the command opens (`pull`'s included), to fetch before it runs.
    fn model_mut(&mut self) -> Option<&mut std::path::PathBuf> {
        match self {
            Command::Inspect(a) => Some(&mut a.model),
            Command::Run(a) => Some(&mut a.model.model),
            Command::Chat(a) => Some(&mut a.model.model),
            Command::Bench(a) => Some(&mut a.model),
            Command::Serve(a) => Some(&mut a.model),
            Command::Pull { model } => Some(model),
            Command::Quantize(a) => Some(&mut a.input),
            Command::Synth(_) | Command::Trace(_) | Command::List { .. } => None,
            Command::Completions { .. } => None,
        }
    }
}

/// Whether `-q` was given: progress bars stay hidden too.
pub fn quiet() -> bool {
    LOG_FILTER.get().is_some_and(|f| *f == "error")
}

pub fn run(mut cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let _ = LOG_FILTER.set(cli.log_filter());
    // A trace installs its own subscriber (with this log layer inside); everything else logs
    // through this one.
    if !wants_trace(&cli.command) {
        init_logging();
    }
    // An `hf:` model is downloaded (once) before the command opens it.
    if let Some(model) = cli.command.model_mut() {
        models::fetch_remote(model, !quiet())?;
    }
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Quantize(a) => quantize::run(a),
        Command::Trace(a) => trace::run(a),
        Command::Run(a) => run::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::List { json } => {
            let models = models::list();
            if json {
                println!("{}", serde_json::to_string(&models)?);
            } else if models.is_empty() {
                let dirs: Vec<String> = models::search_dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                println!(
                    "no models in {} (scripts/fetch-model.sh fetches the default one)",
                    dirs.join(", ")
                );
            } else {
                for m in &models {
                    println!(
                        "{:<60} {:>9.1} MiB  {:<10} {}",
                        m.path.display(),
                        m.bytes as f64 / (1u64 << 20) as f64,
                        m.architecture,
                        m.quant
                    );
                }
            }
            Ok(())
        }
        Command::Pull { model } => {
            println!("{}", model.display());
            Ok(())
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "rocmforge",
                &mut std::io::stdout(),
            );
            Ok(())
        }
    }
}

/// The log filter chosen by `-v`/`-q` (set once by `run`); `RUST_LOG` overrides it.
static LOG_FILTER: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

fn wants_trace(c: &Command) -> bool {
    match c {
        Command::Run(a) => a.engine.trace.is_some(),
        Command::Chat(a) => a.engine.trace.is_some(),
        Command::Bench(a) => a.engine.trace.is_some(),
        _ => false,
    }
}

/// Log lines to stderr at the level the flags chose (or `RUST_LOG`), as a layer that a trace
/// subscriber can carry too.
pub fn log_layer<S>() -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(LOG_FILTER.get().copied().unwrap_or("warn")));
    tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter)
}

/// Installs the log layer as the process-wide subscriber; keeps one an embedding program set.
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let _ = tracing_subscriber::registry().with(log_layer()).try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(pairs: &[(&str, &str)]) -> Result<crate::Tuning, String> {
        let m: std::collections::HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tuning_from(|k| m.get(k).cloned())
    }

    #[test]
    fn the_environment_sets_the_builder_fields() {
        assert_eq!(from(&[]), Ok(crate::Tuning::default()));
        let t = from(&[
            (KV_LIMIT_ENV, "1048576"),
            (NO_CUBLAS_ENV, "1"),
            (CPU_ISA_ENV, "avx2"),
        ])
        .expect("valid");
        assert_eq!(t.kv_limit, Some(1 << 20));
        assert!(!t.vendor_gemm);
        assert_eq!(t.cpu_isa, Some(rocmforge::quant::CpuIsa::Avx2));
        // `0` and empty keep cuBLAS, as before.
        assert!(from(&[(NO_CUBLAS_ENV, "0")]).expect("valid").vendor_gemm);
        assert!(from(&[(NO_CUBLAS_ENV, "")]).expect("valid").vendor_gemm);
        let e = from(&[(KV_LIMIT_ENV, "1 MiB")]).expect_err("not a number");
        assert!(e.contains(KV_LIMIT_ENV), "{e}");
        let e = from(&[(CPU_ISA_ENV, "sse2")]).expect_err("unknown");
        assert!(e.contains(CPU_ISA_ENV), "{e}");
    }
}
