//! The serving layer: an OpenAI-compatible HTTP API (axum), a Unix control socket speaking
//! bincode frames of the runtime's message types, and Prometheus metrics. All of it is a thin
//! layer over the embedding API (`RuntimeHandle`).
//!
//! # Layout
//! - `mod.rs` — `ServeConfig`, `Server` (start, readiness, graceful shutdown).
//! - `connections.rs` — the accept loop: connection limit, header/idle timeouts, draining.
//! - `handlers.rs` — the router and the HTTP endpoints (body limits and timeouts, request log).
//! - `prompt.rs` — chat messages to prompt tokens: the template under limits, off the async
//!   threads, and client text kept out of the control tokens.
//! - `openai.rs` — request/response bodies and parameter checks.
//! - `embeddings.rs` — `/v1/embeddings`: pooled, normalized hidden states.
//! - `tokens.rs` — `/tokenize` and `/detokenize` (llama.cpp server's shape).
//! - `reply.rs` — a generation's answer: one JSON body or a stream of chunks, `n` choices.
//! - `logprobs.rs` — log-probabilities in chat's and completions' shapes.
//! - `generation.rs` — one request's token stream as text pieces (stop strings, finish reason).
//! - `error.rs` — OpenAI-style error objects.
//! - `metrics.rs` — counters, histograms and the Prometheus text page.
//! - `promtext.rs` — a small Prometheus text-format parser (tests, load generator).
//! - `control.rs` — the control socket: frame format, server side, and a blocking client.
//! - `client.rs` — a minimal HTTP/1.1 client over loopback (tests, load generator).

pub mod client;
mod connections;
pub mod control;
mod echo;
mod embeddings;
pub mod error;
pub mod generation;
mod handlers;
mod logprobs;
pub mod metrics;
pub mod openai;
mod prompt;
pub mod promtext;
mod reply;
mod tokens;

use crate::compute::llama::LlamaCompute;
use crate::error::RuntimeError;
use crate::messages::{GenerateRequest, Hint, MemoryBudget, ReadMode};
use crate::runtime::{Runtime, RuntimeHandle};
use metrics::Metrics;
use rocmforge::backend::BackendKind;
use rocmforge::model::{HParams, KvLimit, SequenceConfig, DEFAULT_CTX};
use rocmforge::tokenizer::Tokenizer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The warm-up's second prompt on a device: past the step size from which prompts take the
/// GEMM path (33 rows on int8 tensor-core devices, 17 elsewhere), so the vendor GEMM is open
/// and has run before the first request.
const WARM_UP_PREFILL_TOKENS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("model {path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("serving: {0}")]
    Other(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: PathBuf,
    /// The `model` id clients must send; default: the file name without `.gguf`.
    pub model_name: Option<String>,
    pub host: String,
    /// 0 picks a free port (see `Server::local_addr`).
    pub port: u16,
    pub control_socket: Option<PathBuf>,
    /// Requests queued for a place in the running set; past it, 429 with `Retry-After`.
    pub queue_capacity: usize,
    /// Continuous batching: sequences running at once, tokens per step, the KV budget.
    pub batch: crate::pipeline::batch::BatchOptions,
    /// Largest request body; larger is a 413.
    pub body_limit: usize,
    /// Context length per request (default: the runtime's, capped by the model's).
    pub ctx: Option<usize>,
    pub memory_budget: MemoryBudget,
    /// `None`: `read` (`pread` into memory the process owns) on every backend, so a model file
    /// changed under the server is an error for the requests that need its bytes, never a
    /// SIGBUS (docs/SERVING.md, "The model file"). `mmap` serves zero-copy from the page cache
    /// and is only safe while nobody truncates or rewrites the file.
    pub read_mode: Option<ReadMode>,
    pub prefetch_depth: usize,
    /// GPU backends: the model's last layers computed on the CPU (`RuntimeBuilder::host_layers`).
    pub cpu_layers: crate::HostLayers,
    /// GPU backends: the prefix cache (0: off; otherwise device bytes kept free for the KV
    /// pool, where cached blocks live: `GpuPipelineOptions::prefix_cache_bytes`).
    pub gpu_prefix_cache_bytes: u64,
    /// Run one token through the model before reporting ready.
    pub warm_up: bool,
    /// Where the model runs: `cpu` (default), `cuda`, `hip`, or `auto` (a GPU when one opens).
    pub backend: BackendKind,
    /// Open HTTP connections at once; past it a new connection gets a 503 and is closed. Capped
    /// at start below the process's file-descriptor limit, so the listener never runs out of
    /// descriptors (which would lock out every client, including `/health`).
    pub max_connections: usize,
    /// Time a client gets to send a whole request head. hyper starts this timer whenever a
    /// connection waits for a request, so it is also the keep-alive idle timeout.
    pub header_timeout: Duration,
    /// Time a client gets to send a whole request body (408 past it).
    pub body_timeout: Duration,
    /// Time a response write may wait for a client that does not read (a stream nobody
    /// consumes); past it the connection is closed and its request cancelled.
    pub write_timeout: Duration,
    /// Chat template to use instead of the model's `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// Most messages in one chat request (400 beyond): templates loop over the messages, some
    /// of them quadratically.
    pub max_messages: usize,
    /// Template steps one render may take (minijinja fuel); a template past it is a 400.
    pub template_fuel: u64,
    /// Wall time for rendering and tokenizing one chat prompt; past it, a 400.
    pub template_timeout: Duration,
    /// Most bytes of a prompt (rendered chat or completion text), checked before tokenizing.
    pub max_prompt_bytes: usize,
    /// The runtime's tuning knobs (KV limit, vendor GEMM, CPU ISA); the CLI reads them from
    /// the environment.
    pub tuning: crate::Tuning,
}

impl ServeConfig {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            model_name: None,
            host: "127.0.0.1".into(),
            port: 8080,
            control_socket: None,
            queue_capacity: 64,
            batch: Default::default(),
            body_limit: 2 << 20,
            ctx: None,
            memory_budget: MemoryBudget::Unlimited,
            read_mode: None,
            prefetch_depth: 2,
            cpu_layers: crate::HostLayers::Count(0),
            gpu_prefix_cache_bytes: crate::compute::gpu::DEFAULT_PREFIX_CACHE_BYTES,
            warm_up: true,
            backend: BackendKind::Auto,
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            chat_template: None,
            max_messages: 2048,
            // SmolLM2's template takes ~20 steps a message: 2048 messages fit 25 times over,
            // and a render that uses it all still ends in well under a second.
            template_fuel: 1_000_000,
            template_timeout: Duration::from_secs(5),
            max_prompt_bytes: 4 << 20,
            tuning: crate::Tuning::default(),
        }
    }
}

/// What every handler sees.
pub(crate) struct AppState {
    pub runtime: RuntimeHandle,
    pub tokenizer: Tokenizer,
    pub model_name: String,
    pub ctx: usize,
    pub ready: AtomicBool,
    /// Woken when `ready` becomes true (`Server::wait_ready` waits on it).
    pub ready_changed: tokio::sync::Notify,
    pub metrics: Arc<Metrics>,
    pub queue_capacity: usize,
    pub body_limit: usize,
    pub body_timeout: Duration,
    pub max_prompt_bytes: usize,
    pub chat: prompt::ChatPrompter,
    pub next_id: AtomicU64,
    /// How `/v1/embeddings` pools hidden states (the model's metadata, else mean).
    pub pooling: crate::messages::Pooling,
    /// Checks `response_format` schemas before a generation starts; built at the first one.
    pub grammar: std::sync::OnceLock<Result<rocmforge::grammar::GrammarCompiler, String>>,
}

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: CancellationToken,
    /// Cancelled when the shutdown deadline passes: connections still open are dropped.
    kill: CancellationToken,
    http: JoinHandle<()>,
    control: Option<(JoinHandle<()>, PathBuf)>,
    warm: JoinHandle<()>,
}

impl Server {
    /// Opens the model, starts the runtime (loading continues in the background), binds the
    /// listener(s) and starts serving. `/health` answers 503 until loaded and warmed.
    pub async fn start(cfg: ServeConfig) -> Result<Server, ServeError> {
        let path = cfg.model.clone();
        let model_err = |m: String| ServeError::Model {
            path: path.clone(),
            message: m,
        };
        let file =
            rocmforge::gguf::GgufFile::open(&cfg.model).map_err(|e| model_err(e.to_string()))?;
        let tokenizer =
            Tokenizer::from_metadata(file.metadata()).map_err(|e| model_err(e.to_string()))?;
        let hp = HParams::try_from(file.metadata()).map_err(|e| model_err(e.to_string()))?;
        let (pooling, pooling_why) = embeddings::model_pooling(file.metadata());
        tracing::info!("embeddings pool {pooling:?} ({pooling_why})");
        let mut ctx = cfg.ctx.unwrap_or(DEFAULT_CTX).min(hp.n_ctx_train);
        if cfg.backend == BackendKind::Cpu {
            // The host holds the KV: sized before listening, as LlamaCompute will (which
            // warns when it caps), so the context the handlers enforce is the one that fits.
            let limit = KvLimit::configured_or_host(cfg.tuning.kv_limit);
            let seq = SequenceConfig {
                ctx: Some(ctx),
                ..SequenceConfig::default()
            };
            ctx = seq
                .fit_context(&hp, limit.as_ref())
                .map_err(|e| model_err(e.to_string()))?
                .ctx;
        }
        drop(file);
        let seq_cfg = SequenceConfig {
            ctx: Some(ctx),
            ..SequenceConfig::default()
        };
        let mut builder = Runtime::builder()
            .model(&cfg.model)
            .memory_budget(cfg.memory_budget)
            .prefetch_depth(cfg.prefetch_depth)
            .host_layers_as(cfg.cpu_layers)
            .queue_capacity(cfg.queue_capacity)
            .max_num_seqs(cfg.batch.max_num_seqs)
            .max_batch_tokens(cfg.batch.max_batch_tokens)
            .tuning(cfg.tuning);
        if let Some(b) = cfg.batch.kv_budget {
            builder = builder.kv_budget(b);
        }
        builder = builder.read_mode(cfg.read_mode.unwrap_or(ReadMode::Read));
        let builder = match cfg.backend {
            BackendKind::Cpu => builder.compute(LlamaCompute::factory(seq_cfg)),
            // A GPU brings its weight backend and compute; `auto` without one runs the CPU
            // defaults (see `RuntimeBuilder::device`).
            kind => builder.device_with(
                kind,
                crate::compute::gpu::GpuPipelineOptions {
                    ctx,
                    // The GPU's step buffers are sized for the batching options.
                    max_batch: cfg.batch.max_batch_tokens.max(1),
                    max_seqs: cfg.batch.max_num_seqs.max(1),
                    prefix_cache_bytes: cfg.gpu_prefix_cache_bytes,
                    ..Default::default()
                },
            ),
        };
        // Opening the model and starting threads blocks.
        let runtime = tokio::task::spawn_blocking(move || builder.build())
            .await
            .map_err(|e| ServeError::Other(format!("runtime start: {e}")))??;
        let model_name = cfg.model_name.clone().unwrap_or_else(|| {
            cfg.model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        });
        let chat = prompt::ChatPrompter::new(&tokenizer, &cfg);
        if let Some(e) = chat.template_error() {
            // Chat requests answer 500 with this; completions still work.
            tracing::warn!("chat template unusable: {e}");
        }
        let state = Arc::new(AppState {
            runtime: runtime.clone(),
            tokenizer,
            model_name,
            ctx,
            ready: AtomicBool::new(false),
            ready_changed: tokio::sync::Notify::new(),
            metrics: Arc::new(Metrics::default()),
            queue_capacity: cfg.queue_capacity,
            body_limit: cfg.body_limit,
            body_timeout: cfg.body_timeout,
            max_prompt_bytes: cfg.max_prompt_bytes,
            chat,
            next_id: AtomicU64::new(1),
            pooling,
            grammar: std::sync::OnceLock::new(),
        });
        let stop = CancellationToken::new();
        let kill = CancellationToken::new();

        let listener = tokio::net::TcpListener::bind((cfg.host.as_str(), cfg.port))
            .await
            .map_err(io_err(format!("binding {}:{}", cfg.host, cfg.port)))?;
        let addr = listener
            .local_addr()
            .map_err(io_err("reading the bound address"))?;
        let control = match &cfg.control_socket {
            Some(p) => {
                // A stale socket file from a previous run would make bind fail.
                if p.exists() {
                    std::fs::remove_file(p).map_err(io_err(format!("removing {}", p.display())))?;
                }
                let l = tokio::net::UnixListener::bind(p)
                    .map_err(io_err(format!("binding control socket {}", p.display())))?;
                let h = tokio::spawn(control::serve(l, runtime.clone(), stop.clone()));
                Some((h, p.clone()))
            }
            None => None,
        };

        let router = handlers::router(state.clone());
        let limits = connections::Limits {
            max_connections: connections::fd_capped(cfg.max_connections),
            header_timeout: cfg.header_timeout,
            write_timeout: cfg.write_timeout,
        };
        let http = tokio::spawn(connections::serve(
            listener,
            router,
            limits,
            stop.clone(),
            kill.clone(),
        ));

        let warm_state = state.clone();
        let warm_up = cfg.warm_up;
        let ready_line = format!(
            "ready on http://{addr}: model {} ({}), backend {}, memory budget {:?}, \
             {} connections, queue {}",
            state.model_name,
            cfg.model.display(),
            cfg.backend,
            cfg.memory_budget,
            limits.max_connections,
            cfg.queue_capacity
        );
        let warm = tokio::task::spawn_blocking(move || {
            let rt = &warm_state.runtime;
            // Waits as long as loading takes; shutdown ends the wait with an error.
            let loaded = loop {
                match rt.wait_loaded(Duration::from_millis(200)) {
                    Ok(()) => break true,
                    Err(RuntimeError::ShutDown) => break false,
                    Err(_) => continue,
                }
            };
            if !loaded {
                return;
            }
            if warm_up {
                let _ = rt.hint(Hint::WarmUp);
                // One token through every layer: first-touch page faults and lazy
                // initialisation happen here rather than in the first user's request. On a
                // device, then a prompt long enough for the prefill path too (the vendor
                // GEMM's opening and its first launches: ~80 ms of the first request's time
                // to first token on the H100 otherwise).
                let bos = warm_state.tokenizer.bos_id().unwrap_or(0);
                let mut lengths = vec![1];
                if rt.computes_on_device() {
                    lengths.push(WARM_UP_PREFILL_TOKENS.min(warm_state.ctx.saturating_sub(1)));
                }
                for n in lengths.into_iter().filter(|&n| n > 0) {
                    let mut req = GenerateRequest::tokens(vec![bos; n], 1);
                    req.stop_at_eos = false;
                    if let Err(e) = rt.generate(req).collect_tokens() {
                        tracing::warn!("warm-up request of {n} tokens failed: {e}");
                        break;
                    }
                }
            }
            warm_state.ready.store(true, Ordering::Release);
            warm_state.ready_changed.notify_waiters();
            tracing::info!("model loaded and warmed in {:?}", rt.since_open());
            tracing::info!("{ready_line}");
        });

        Ok(Server {
            addr,
            state,
            stop,
            kill,
            http,
            control,
            warm,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn runtime(&self) -> &RuntimeHandle {
        &self.state.runtime
    }

    pub fn model_name(&self) -> &str {
        &self.state.model_name
    }

    pub fn is_ready(&self) -> bool {
        self.state.ready.load(Ordering::Acquire)
    }

    /// Waits until `/health` would answer 200.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), ServeError> {
        let until = tokio::time::Instant::now() + timeout;
        loop {
            // Registered before the look at the flag, so a store in between is not missed.
            let changed = self.state.ready_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.is_ready() {
                return Ok(());
            }
            if tokio::time::timeout_at(until, changed).await.is_err() {
                return Err(ServeError::Other(format!(
                    "model not ready after {timeout:?}"
                )));
            }
        }
    }

    /// Graceful shutdown: stop accepting, let in-flight requests finish for up to `deadline`,
    /// then cancel the rest (their streams end with an error event) and free the runtime.
    pub async fn shutdown(self, deadline: Duration) -> Result<(), ServeError> {
        self.stop.cancel();
        let mut http = self.http;
        let finished = tokio::time::timeout(deadline, &mut http).await.is_ok();
        let rt = self.state.runtime.clone();
        let stopped = tokio::task::spawn_blocking(move || rt.shutdown());
        if !finished {
            tracing::warn!("in-flight requests still running after {deadline:?}: cancelling");
            // Dropping the connections drops their requests, which cancels them in the
            // runtime; a connection task that still does not end is aborted.
            self.kill.cancel();
            if tokio::time::timeout(Duration::from_secs(5), &mut http)
                .await
                .is_err()
            {
                http.abort();
            }
        }
        let r = stopped
            .await
            .map_err(|e| ServeError::Other(format!("runtime shutdown: {e}")))?;
        let _ = self.warm.await;
        if let Some((h, p)) = self.control {
            let _ = h.await;
            let _ = std::fs::remove_file(p);
        }
        r.map_err(ServeError::from)
    }
}

/// The `rocmforge serve` entry point: serves until SIGINT or SIGTERM, then shuts down within
/// `deadline`.
pub fn run_until_signal(cfg: ServeConfig, deadline: Duration) -> Result<(), ServeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(io_err("starting the tokio runtime"))?;
    rt.block_on(async move {
        let server = Server::start(cfg).await?;
        // The line tests and scripts wait for (the port may have been 0).
        println!("listening on http://{}", server.local_addr());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(io_err("installing the SIGTERM handler"))?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map_err(io_err("waiting for SIGINT"))?,
            _ = term.recv() => {}
        }
        tracing::info!("shutting down (deadline {deadline:?})");
        server.shutdown(deadline).await
    })?;
    // A chat render still running on a blocking thread ends by its fuel; it must not keep the
    // process alive after the server has shut down.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(())
}
