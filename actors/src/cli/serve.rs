//! `rocmforge serve`: the OpenAI-compatible HTTP server (see docs/SERVING.md).

use crate::messages::{MemoryBudget, ReadMode};
use crate::serve::{run_until_signal, ServeConfig};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// GGUF model to serve.
    #[arg(long, short = 'm', default_value = super::models::DEFAULT_MODEL_FILE, value_parser = super::models::resolve)]
    pub model: PathBuf,
    /// The model id clients send (default: the file name without `.gguf`).
    #[arg(long)]
    pub model_name: Option<String>,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port; the chosen address is printed as `listening on http://...`.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Unix socket for hints, stats and load progress (bincode frames).
    #[arg(long)]
    pub control_socket: Option<PathBuf>,
    /// Requests queued for a place in the running set before answering 429.
    #[arg(long, default_value_t = 64)]
    pub queue_capacity: usize,
    /// Sequences decoding at once (continuous batching); more requests wait in the queue.
    #[arg(long, default_value_t = crate::pipeline::batch::DEFAULT_MAX_NUM_SEQS)]
    pub max_num_seqs: usize,
    /// Tokens one step carries (decode tokens plus prompt chunks): a longer prompt is read in
    /// chunks of this size, so decoding clients wait at most one chunk.
    #[arg(long, default_value_t = crate::pipeline::batch::DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,
    /// Bytes of KV cache all sequences share (`512MiB`, `2GiB`); default: room for
    /// max-num-seqs whole contexts, capped at half the memory available.
    #[arg(long, value_parser = kv_bytes)]
    pub kv_budget: Option<u64>,
    /// GPU backends: the prefix cache, prompts' key and value blocks that later prompts
    /// starting alike share instead of computing. `0` turns it off; a size (`512MiB`, `2GiB`)
    /// turns it on and keeps that much device memory free beside the weights for the KV pool,
    /// where cached blocks stay until the pool runs short (the CPU's pool does the same within
    /// `--kv-budget`).
    #[arg(long, value_parser = prefix_bytes, default_value = "512MiB")]
    pub gpu_prefix_cache: u64,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 2 << 20)]
    pub body_limit: usize,
    /// Context length per request (default 4096, capped by the model's).
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Weight memory budget: `2GiB`, `40%`, `unlimited`.
    #[arg(long, default_value = "unlimited")]
    pub memory_budget: MemoryBudget,
    /// How weights come off disk: mmap, read, direct (default: read, into memory the process
    /// owns, so a model file changed under the server cannot crash it; mmap is zero-copy but
    /// dies with SIGBUS if the file is truncated while serving).
    #[arg(long)]
    pub read_mode: Option<ReadMode>,
    #[arg(long, default_value_t = 2)]
    pub prefetch_depth: usize,
    /// GPU backends: compute the model's last N layers on the CPU from host memory (decode
    /// under a tight `--memory-budget`; prompts then run those layers on the CPU too); `fit`:
    /// as many as it takes for the GPU's part to fit the budget.
    #[arg(long, default_value = "0")]
    pub cpu_layers: crate::HostLayers,
    /// Seconds in-flight requests get to finish after SIGINT/SIGTERM before they are cancelled.
    #[arg(long, default_value_t = 10.0)]
    pub shutdown_deadline: f64,
    /// Report ready without pushing a warm-up token through the model first.
    #[arg(long)]
    pub no_warm_up: bool,
    /// cpu, cuda, hip or auto (a GPU when one opens, else the CPU).
    #[arg(long, default_value = "auto")]
    pub backend: rocmforge::backend::BackendKind,
    /// Open HTTP connections at once (503 beyond); lowered to fit the open-file limit.
    #[arg(long, default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a client gets to send a request head; also the keep-alive idle timeout.
    #[arg(long, default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client gets to send a request body (408 beyond).
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Seconds a response write may wait for a client that reads nothing; then the connection
    /// is closed and its request cancelled.
    #[arg(long, default_value_t = 30.0)]
    pub write_timeout: f64,
    /// A Jinja file to use instead of the model's chat template.
    #[arg(long)]
    pub chat_template_file: Option<PathBuf>,
    /// Most messages in one chat request (400 beyond).
    #[arg(long, default_value_t = 2048)]
    pub max_messages: usize,
    /// Seconds to render and tokenize one chat prompt (400 beyond).
    #[arg(long, default_value_t = 5.0)]
    pub template_timeout: f64,
    /// Most bytes of a rendered chat prompt or a completion prompt (400 beyond).
    #[arg(long, default_value_t = 4 << 20)]
    pub max_prompt_bytes: usize,
}

/// A byte count as `--memory-budget` writes one (`512MiB`, `2GiB`, `1000000`).
fn kv_bytes(s: &str) -> Result<u64, String> {
    match s.parse::<MemoryBudget>()? {
        MemoryBudget::Bytes(b) if b > 0 => Ok(b),
        _ => Err(format!(
            "bad KV budget {s:?}: a size such as 512MiB or 2GiB"
        )),
    }
}

/// `--gpu-prefix-cache`: a size as `--kv-budget` takes, or `0` (off).
fn prefix_bytes(s: &str) -> Result<u64, String> {
    if s.trim() == "0" {
        return Ok(0);
    }
    match s.parse::<MemoryBudget>()? {
        MemoryBudget::Bytes(b) => Ok(b),
        _ => Err(format!(
            "bad prefix cache size {s:?}: a size such as 512MiB or 2GiB, or 0 (off)"
        )),
    }
}

fn seconds(flag: &str, v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|e| format!("{flag} {v}: {e}"))
}

pub fn run(a: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = seconds("--shutdown-deadline", a.shutdown_deadline)?;
    let chat_template = match &a.chat_template_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("--chat-template-file {}: {e}", p.display()))?,
        ),
        None => None,
    };
    let defaults = ServeConfig::new(&a.model);
    let cfg = ServeConfig {
        model: a.model,
        model_name: a.model_name,
        host: a.host,
        port: a.port,
        control_socket: a.control_socket,
        queue_capacity: a.queue_capacity,
        batch: crate::pipeline::batch::BatchOptions {
            max_num_seqs: a.max_num_seqs,
            max_batch_tokens: a.max_batch_tokens,
            kv_budget: a.kv_budget,
        },
        body_limit: a.body_limit,
        ctx: a.ctx,
        memory_budget: a.memory_budget,
        read_mode: a.read_mode,
        prefetch_depth: a.prefetch_depth,
        cpu_layers: a.cpu_layers,
        gpu_prefix_cache_bytes: a.gpu_prefix_cache,
        warm_up: !a.no_warm_up,
        backend: a.backend,
        max_connections: a.max_connections,
        header_timeout: seconds("--header-timeout", a.header_timeout)?,
        body_timeout: seconds("--body-timeout", a.body_timeout)?,
        write_timeout: seconds("--write-timeout", a.write_timeout)?,
        chat_template,
        max_messages: a.max_messages,
        template_fuel: defaults.template_fuel,
        template_timeout: seconds("--template-timeout", a.template_timeout)?,
        max_prompt_bytes: a.max_prompt_bytes,
        tuning: super::tuning_from_env()?,
    };
    super::init_logging();
    run_until_signal(cfg, deadline)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::prefix_bytes;

    #[test]
    fn gpu_prefix_cache_takes_a_size_or_zero() {
        assert_eq!(prefix_bytes("0"), Ok(0));
        assert_eq!(prefix_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(prefix_bytes("2GiB"), Ok(2 << 30));
        assert!(prefix_bytes("50%").is_err());
        assert!(prefix_bytes("lots").is_err());
    }
}
