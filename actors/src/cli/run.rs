//! `rocmforge run`: generate text from a prompt on the CPU, streaming it to stdout.

use clap::Args;
use rocmforge::model::{self, ModelError, Precision};
use rocmforge::sample::{SamplingParams, StopStrings};
use rocmforge::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};
use std::path::PathBuf;

/// Errors of the generation commands, each naming what the user gave.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("give a prompt with --prompt or --prompt-file")]
    NoPrompt,
    /// Ctrl-C during a reply (`chat` stops the reply and keeps the session).
    #[error("stopped")]
    Interrupted,
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
    #[error("cannot read grammar file {path}: {source}")]
    GrammarIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--json-schema {given}: {reason}")]
    JsonSchema { given: String, reason: String },
}

/// Options shared by `run` and `chat`: model, context, precision, threads, sampling.
#[derive(Debug, Args, Clone)]
pub struct ModelArgs {
    /// Path to a GGUF model.
    #[arg(long, short = 'm', default_value = super::models::DEFAULT_MODEL_FILE, value_parser = super::models::resolve)]
    pub model: PathBuf,
    /// Context length in tokens (capped by the model's).
    #[arg(long, default_value_t = model::DEFAULT_CTX)]
    pub ctx: usize,
    /// `exact` (f32 activations, exact weights, f32 KV: the oracle; on a GPU f32 activations with
    /// its f16 KV) or `fast` (activations quantized to 8 bits for the products, f16 KV).
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
    /// Constrain the output to a grammar file: GBNF (llama.cpp's format) or llguidance's
    /// Lark syntax when it starts with `%llguidance` (the server's `grammar` field).
    #[arg(long, value_name = "FILE", group = "constraint")]
    pub grammar: Option<PathBuf>,
    /// Constrain the output to a JSON document valid under this schema (a file, or the JSON
    /// itself); the server's `response_format` `json_schema`.
    #[arg(long, value_name = "FILE|JSON", group = "constraint")]
    pub json_schema: Option<String>,
    /// Constrain the output to a JSON object (the server's `response_format` `json_object`;
    /// `--json` is the output format).
    #[arg(long, group = "constraint")]
    pub json_object: bool,
    /// cpu, cuda, hip or auto (CUDA when a driver and device are present, else HIP, else the
    /// CPU).
    #[arg(long, default_value = "auto")]
    pub backend: rocmforge::backend::BackendKind,
    #[command(flatten)]
    pub engine: super::engine::EngineArgs,
    /// Accepted for old scripts: every run goes through the runtime's actors.
    #[arg(long, hide = true)]
    pub pipeline: bool,
}

impl RunArgs {
    /// The constraint the flags ask for, built as the server builds it from a request.
    pub fn constraint(&self) -> Result<Option<crate::messages::Constraint>, GenError> {
        use crate::messages::Constraint;
        if let Some(path) = &self.grammar {
            let text = std::fs::read_to_string(path).map_err(|source| GenError::GrammarIo {
                path: path.clone(),
                source,
            })?;
            return Ok(Some(Constraint::Grammar(text)));
        }
        if let Some(given) = &self.json_schema {
            // JSON when it parses as a schema (an object or a boolean), else a file's path.
            let text = match serde_json::from_str::<serde_json::Value>(given) {
                Ok(v) if v.is_object() || v.is_boolean() => given.clone(),
                _ => std::fs::read_to_string(given).map_err(|e| GenError::JsonSchema {
                    given: given.clone(),
                    reason: format!("neither a JSON schema nor a readable file ({e})"),
                })?,
            };
            let schema: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| GenError::JsonSchema {
                    given: given.clone(),
                    reason: format!("not JSON: {e}"),
                })?;
            if !(schema.is_object() || schema.is_boolean()) {
                return Err(GenError::JsonSchema {
                    given: given.clone(),
                    reason: "a JSON schema is an object (or a boolean)".into(),
                });
            }
            return Ok(Some(Constraint::JsonSchema(schema)));
        }
        Ok(self.json_object.then_some(Constraint::JsonObject))
    }
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
    super::generate::run(&a, &prompt)
}
