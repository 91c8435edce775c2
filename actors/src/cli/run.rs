//! `rocmforge run`: generate text from a prompt on the CPU, streaming it to stdout.

use clap::Args;
use rocmforge::model::{self, Model, ModelError, Precision, SequenceConfig, StopReason};
use rocmforge::sample::{Sampler, SamplingParams, StopStrings};
use rocmforge::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
use serde::Serialize;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

/// Errors of the generation commands, each naming what the user gave.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("give a prompt with --prompt or --prompt-file")]
    NoPrompt,
    #[error("cannot read prompt file {path}: {source}")]
    PromptIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("prompt file {path} is not valid UTF-8 (first bad byte at offset {offset})")]
    PromptUtf8 { path: PathBuf, offset: usize },
    #[error("model {path}: {source}")]
    Model {
        path: PathBuf,
        #[source]
        source: ModelError,
    },
    #[error("tokenizer of {path}: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: TokenizerError,
    },
    #[error(transparent)]
    Run(#[from] ModelError),
    #[error(transparent)]
    Text(#[from] TokenizerError),
    #[error("cannot build a pool of {threads} threads: {reason}")]
    Threads { threads: usize, reason: String },
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
}

/// Options shared by `run` and `chat`: model, context, precision, threads, sampling.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Path to a GGUF model.
    #[arg(long, short = 'm', default_value = super::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Context length in tokens (capped by the model's).
    #[arg(long, default_value_t = model::DEFAULT_CTX)]
    pub ctx: usize,
    /// `exact` (f32 activations, exact weights, f32 KV: the oracle) or `fast`.
    #[arg(long, default_value = "fast")]
    pub precision: Precision,
    /// Worker threads (default: all cores).
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
}

/// Sampling flags of `run`, `chat` and `bench`; the defaults are `SamplingParams::default()`'s
/// (a test checks they agree), the same as the server's and the embedding API's.
#[derive(Debug, Args, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    pub temp: f32,
    /// RNG seed; without one a random seed is drawn (and reported by --json and -v).
    #[arg(long, short = 's')]
    pub seed: Option<u64>,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
}

impl SamplingArgs {
    /// The sampling parameters, with the seed drawn now when none was given, so the caller can
    /// report it.
    pub fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: Some(self.seed.unwrap_or_else(rand::random)),
            stop: self.stop.clone(),
            ..SamplingParams::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt text (special-token text such as `<|im_start|>` becomes that token).
    #[arg(long, short = 'p')]
    pub prompt: Option<String>,
    /// Read the prompt from a file (UTF-8).
    #[arg(long, conflicts_with = "prompt")]
    pub prompt_file: Option<PathBuf>,
    /// Tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda, hip or auto (CUDA when a driver and device are present, else HIP, else the
    /// CPU). HIP runs through the pipelined runtime (as with --pipeline).
    #[arg(long, default_value = "auto")]
    pub backend: rocmforge::backend::BackendKind,
    #[command(flatten)]
    pub pipeline: super::pipelined::PipelineArgs,
}

/// A loaded model with its tokenizer and the pool it runs on.
pub struct Loaded {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub pool: rayon::ThreadPool,
    pub load_ms: f64,
}

pub fn build_pool(threads: Option<usize>) -> Result<rayon::ThreadPool, GenError> {
    let n = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| GenError::Threads {
            threads: n,
            reason: e.to_string(),
        })
}

pub fn load(a: &ModelArgs) -> Result<Loaded, GenError> {
    let t0 = Instant::now();
    let model = Model::open(&a.model).map_err(|source| GenError::Model {
        path: a.model.clone(),
        source,
    })?;
    let tokenizer = Tokenizer::from_metadata(model.file().metadata()).map_err(|source| {
        GenError::Tokenizer {
            path: a.model.clone(),
            source,
        }
    })?;
    let pool = build_pool(a.threads)?;
    Ok(Loaded {
        model,
        tokenizer,
        pool,
        load_ms: t0.elapsed().as_secs_f64() * 1e3,
    })
}

pub(crate) fn read_prompt(a: &RunArgs) -> Result<String, GenError> {
    match (&a.prompt, &a.prompt_file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(path)) => {
            let bytes = std::fs::read(path).map_err(|source| GenError::PromptIo {
                path: path.clone(),
                source,
            })?;
            String::from_utf8(bytes).map_err(|e| GenError::PromptUtf8 {
                path: path.clone(),
                offset: e.utf8_error().valid_up_to(),
            })
        }
        (None, None) => Err(GenError::NoPrompt),
    }
}

#[derive(Serialize)]
struct JsonTimings {
    load_ms: f64,
    #[serde(flatten)]
    gen: model::Timings,
}

#[derive(Serialize)]
struct JsonOutput<'a> {
    seed: u64,
    prompt_ids: &'a [u32],
    ids: &'a [u32],
    text: &'a str,
    stop_reason: StopReason,
    timings: JsonTimings,
}

/// Streams decoded text, holding back a tail that might begin a stop string.
pub struct TextSink<'t> {
    decoder: StreamDecoder<'t>,
    stops: StopStrings,
    /// All text so far, and how much of it was emitted.
    pub text: String,
    emitted: usize,
    stopped: bool,
}

impl<'t> TextSink<'t> {
    pub fn new(tok: &'t Tokenizer, stops: &[String]) -> Self {
        Self {
            decoder: StreamDecoder::new(tok),
            stops: StopStrings::new(stops),
            text: String::new(),
            emitted: 0,
            stopped: false,
        }
    }

    /// Adds a token; returns the text now safe to show and whether a stop string was hit.
    pub fn push(&mut self, id: u32) -> Result<(&str, bool), GenError> {
        let piece = self.decoder.push(id)?;
        self.text.push_str(&piece);
        let end = match self.stops.find(&self.text) {
            Some(at) => {
                self.text.truncate(at);
                self.stopped = true;
                at
            }
            None => self.stops.safe_len(&self.text),
        };
        let start = self.emitted.min(end);
        self.emitted = end.max(self.emitted);
        Ok((&self.text[start..end], self.stopped))
    }

    /// The text not yet shown (at the end of generation).
    pub fn finish(&mut self) -> &str {
        let start = self.emitted;
        self.emitted = self.text.len();
        &self.text[start..]
    }
}

pub fn run(a: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let prompt = read_prompt(&a)?;
    if a.pipeline.wanted() || super::gpu::routes_to_pipeline(a.backend) {
        return super::pipelined::run(&a, &prompt);
    }
    let early = super::gpu::open_early(a.backend, &a.model.model);
    if let Some(dev) = super::gpu::select(a.backend)? {
        return super::gpu::run(&a, &prompt, dev, early);
    }
    // `auto` fell back to the CPU: stop the GPU path's start-up work (the early reader would
    // otherwise go on reading the file beside the CPU run).
    drop(early);
    let loaded = load(&a.model)?;
    let Loaded {
        model,
        tokenizer: tok,
        pool,
        load_ms,
    } = &loaded;
    let prompt_ids = tok.encode(&prompt, true, true).map_err(GenError::from)?;
    let mut seq = model
        .new_sequence(SequenceConfig {
            ctx: Some(a.model.ctx),
            precision: a.model.precision,
            kv_type: None,
        })
        .map_err(GenError::from)?;
    if prompt_ids.is_empty() {
        return Err(GenError::Run(ModelError::EmptyPrompt).into());
    }
    // Leave room for at least one generated token.
    seq.check_room(prompt_ids.len() + 1)
        .map_err(GenError::from)?;
    let mut sampler = Sampler::new(a.sampling.params());
    let mut sink = TextSink::new(tok, &a.sampling.stop);
    // `Stdout`, not a lock: the callback runs inside the pool and must be `Send`.
    let mut out = std::io::stdout();
    let mut io_err = None;
    let generation = pool.install(|| {
        model::generate(
            model,
            &mut seq,
            &mut sampler,
            &prompt_ids,
            a.n_predict,
            |id| tok.is_eog(id),
            |id| {
                let (piece, stop) = match sink.push(id) {
                    Ok(x) => x,
                    Err(e) => {
                        io_err = Some(e);
                        return ControlFlow::Break(());
                    }
                };
                if !a.json && !piece.is_empty() {
                    // Flush per token: the user watches the text appear.
                    if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                        io_err = Some(e.into());
                        return ControlFlow::Break(());
                    }
                }
                if stop {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        )
    });
    if let Some(e) = io_err {
        return Err(e.into());
    }
    let generation = generation.map_err(GenError::from)?;
    let tail = sink.finish().to_string();
    let t = &generation.timings;
    if a.json {
        let j = JsonOutput {
            seed: sampler.seed(),
            prompt_ids: &prompt_ids,
            ids: &generation.ids,
            text: &sink.text,
            stop_reason: generation.stop_reason,
            timings: JsonTimings {
                load_ms: *load_ms,
                gen: t.clone(),
            },
        };
        serde_json::to_writer(&mut out, &j)?;
        writeln!(out)?;
    } else {
        write!(out, "{tail}")?;
        writeln!(out)?;
        out.flush()?;
        eprintln!(
            "load: {load_ms:.0} ms | prompt: {} tokens in {:.1} ms ({:.1} tok/s) | decode: {} tokens in {:.1} ms ({:.1} tok/s) | stop: {:?}",
            t.prompt_tokens,
            t.prompt_ms,
            t.prompt_tokens_per_second,
            t.decode_tokens,
            t.decode_ms,
            t.decode_tokens_per_second,
            generation.stop_reason,
        );
    }
    Ok(())
}
