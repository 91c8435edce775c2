//! Serde types that cross the runtime's boundary: requests, token events, hints, stats.
//!
//! The serving layer sends these as `bincode` over the control socket and as JSON over HTTP, so
//! they hold plain data only (no handles, no channels).

use serde::{Deserialize, Serialize};

/// How the DiskReader gets bytes off the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ReadMode {
    /// Memory-map the file; prefetch is `madvise(WILLNEED)` plus touching each page, eviction
    /// `madvise(DONTNEED)`. On a backend that computes from host memory (CPU) this is zero-copy.
    #[default]
    Mmap,
    /// `pread` into the staging ring (buffered, through the page cache). The device arena holds at
    /// most the budget, so a model larger than RAM runs from disk.
    Read,
    /// Like `Read` but opened with `O_DIRECT` (bypassing the page cache) where the filesystem
    /// allows it; falls back to buffered reads otherwise (reported in `Stats::direct_io`).
    Direct,
}

impl std::str::FromStr for ReadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmap" => Ok(Self::Mmap),
            "read" => Ok(Self::Read),
            "direct" => Ok(Self::Direct),
            _ => Err(format!("unknown read mode {s:?} (mmap, read, direct)")),
        }
    }
}

/// Memory budget for layer weights on the device.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub enum MemoryBudget {
    /// Everything resident.
    #[default]
    Unlimited,
    Bytes(u64),
    /// A fraction of the model's tensor bytes (0 < f <= 1); handy for tests and benches.
    FractionOfWeights(f64),
}

impl std::str::FromStr for MemoryBudget {
    type Err = String;
    /// `2GiB`, `512MiB`, `1000000`, `40%` (of the weights), `unlimited`.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("unlimited") {
            return Ok(Self::Unlimited);
        }
        if let Some(p) = s.strip_suffix('%') {
            let f: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("bad percentage {s:?}"))?;
            if !(f > 0.0 && f <= 100.0) {
                return Err(format!("percentage {s:?} outside (0, 100]"));
            }
            return Ok(Self::FractionOfWeights(f / 100.0));
        }
        let units: [(&str, u64); 7] = [
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("GB", 1_000_000_000),
            ("MB", 1_000_000),
            ("KB", 1_000),
            ("B", 1),
        ];
        for (suffix, mult) in units {
            if let Some(n) = s.strip_suffix(suffix) {
                let v: f64 = n.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
                if !(v.is_finite() && v >= 0.0) {
                    return Err(format!("bad size {s:?}"));
                }
                return Ok(Self::Bytes((v * mult as f64) as u64));
            }
        }
        s.parse::<u64>()
            .map(Self::Bytes)
            .map_err(|_| format!("bad memory budget {s:?} (e.g. 2GiB, 40%, unlimited)"))
    }
}

/// Sampling settings of one request: the core crate's type, so the CLI, the server and the
/// embedding API share one set of fields and one set of defaults (llama.cpp's: temperature 0.8,
/// top-k 40, top-p 0.95, min-p 0.05, no seed = a fresh random one).
pub use rocmforge::grammar::Constraint;
pub use rocmforge::sample::{SamplingParams, TokenLogprobs, MAX_TOP_LOGPROBS};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: Prompt,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Stop at any of the model's end-of-generation tokens (eos, eot, `<|im_end|>`, ...).
    pub stop_at_eos: bool,
    /// A conversation whose KV cache the runtime keeps between requests: the next request of
    /// the session prefills only what follows the prefix it shares with the last one
    /// (`RuntimeHandle::new_session`).
    #[serde(default)]
    pub session: Option<SessionId>,
    /// The session's last request: its sequence is freed afterwards instead of kept.
    #[serde(default)]
    pub end_session: bool,
    /// Log-probabilities with every token (`TokenEvent::logprobs`): `Some(n)` gives the chosen
    /// token's and the `n` most likely ones' (at most `MAX_TOP_LOGPROBS`); `None`: none.
    #[serde(default)]
    pub logprobs: Option<usize>,
    /// What the output must be (a JSON object, or a document valid under a JSON schema): a
    /// token mask applied to the logits before every sampling step (`rocmforge::grammar`).
    #[serde(default)]
    pub constraint: Option<Constraint>,
}

/// How an embedding is made from the hidden states of a prompt's positions (GGUF's
/// `{arch}.pooling_type`: 1 mean, 2 CLS, 3 last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pooling {
    /// The average over the positions (what a decoder LM without pooling metadata gets).
    Mean,
    /// The first position (BERT-style CLS token).
    First,
    /// The last position (decoder embedding models such as e5-mistral, Qwen3-Embedding).
    Last,
}

impl Pooling {
    /// From GGUF's `pooling_type`; `None` for the types with no single vector (0 none, 4 rank)
    /// and unknown ones.
    pub fn from_gguf(t: u64) -> Option<Self> {
        match t {
            1 => Some(Self::Mean),
            2 => Some(Self::First),
            3 => Some(Self::Last),
            _ => None,
        }
    }

    /// Pools `rows` (`[n, width]`, row-major) into one L2-normalized vector of `width`;
    /// `None` when `rows` is empty or not `n` whole rows.
    pub fn pool(self, rows: &[f32], n: usize) -> Option<Vec<f32>> {
        if n == 0 || rows.is_empty() || !rows.len().is_multiple_of(n) {
            return None;
        }
        let width = rows.len() / n;
        let mut v: Vec<f32> = match self {
            Self::First => rows[..width].to_vec(),
            Self::Last => rows[rows.len() - width..].to_vec(),
            Self::Mean => {
                let mut sum = vec![0f64; width];
                for r in rows.chunks_exact(width) {
                    for (s, &x) in sum.iter_mut().zip(r) {
                        *s += f64::from(x);
                    }
                }
                sum.iter().map(|&s| (s / n as f64) as f32).collect()
            }
        };
        let norm = v
            .iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt();
        // An all-zero state stays zero rather than becoming NaN.
        if norm > 0.0 {
            for x in &mut v {
                *x = (f64::from(*x) / norm) as f32;
            }
        }
        Some(v)
    }
}

/// Names a conversation whose sequence the runtime keeps between requests (a bounded number
/// of them, least recently used evicted first; an evicted session simply prefills again).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SessionId(pub u64);

impl GenerateRequest {
    /// A greedy request for `tokens` (tests and tools want the same tokens every time).
    pub fn tokens(tokens: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt: Prompt::Tokens(tokens),
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop_at_eos: true,
            session: None,
            end_session: false,
            logprobs: None,
            constraint: None,
        }
    }

    /// A greedy request for `text` (tokenized by the runtime, special-token text included).
    pub fn text(text: impl Into<String>, max_tokens: usize) -> Self {
        Self {
            prompt: Prompt::Text(text.into()),
            max_tokens,
            sampling: SamplingParams::greedy(),
            stop_at_eos: true,
            session: None,
            end_session: false,
            logprobs: None,
            constraint: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenEvent {
    /// 0-based index among generated tokens.
    pub index: usize,
    pub token: u32,
    /// Decoded text piece: empty for a control token (end of turn, end of text) and when the
    /// runtime has no tokenizer.
    pub text: String,
    /// When the request asked for them (`GenerateRequest::logprobs`).
    #[serde(default)]
    pub logprobs: Option<TokenLogprobs>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    MaxTokens,
    /// An end-of-generation token (end of text, end of turn, ...).
    EndOfSequence,
    /// The sequence filled the context: a normal finish, like `MaxTokens` (OpenAI's "length").
    ContextFull,
}

/// Advice to the scheduler. Hints never break the memory budget: one that cannot be honoured is
/// answered with `RuntimeError::HintRejected`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hint {
    /// Load these layers now if they are not resident (a no-op for resident ones).
    Prefetch { layers: Vec<usize> },
    /// Keep these layers resident until released.
    Pin { layers: Vec<usize> },
    /// Undo `Pin`: the layers go back to the scheduler's policy.
    Release { layers: Vec<usize> },
    /// Bring the planned resident set and the first prefetch window in now.
    WarmUp,
}

/// Pipeline stages, in data-flow order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stage {
    Read,
    Transcode,
    Upload,
    Schedule,
    Compute,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::Read,
        Stage::Transcode,
        Stage::Upload,
        Stage::Schedule,
        Stage::Compute,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Stage::Read => "read",
            Stage::Transcode => "transcode",
            Stage::Upload => "upload",
            Stage::Schedule => "schedule",
            Stage::Compute => "compute",
        }
    }
}

/// Bytes done per loading stage since start (they grow again when streamed layers are reloaded).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadProgress {
    /// Bytes of the initial load (resident set plus first window).
    pub initial_bytes: u64,
    pub read_bytes: u64,
    pub transcoded_bytes: u64,
    pub uploaded_bytes: u64,
    /// True once the initial load is resident.
    pub initial_done: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StageBusy {
    pub stage: String,
    /// Time spent working (not waiting on a channel), summed over the stage's threads.
    pub busy_ns: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub budget_bytes: u64,
    pub total_weight_bytes: u64,
    /// Bytes reserved by the scheduler: resident plus in flight.
    pub resident_bytes: u64,
    pub peak_resident_bytes: u64,
    /// Bytes currently allocated in the backend's weight memory (host arena on the CPU).
    pub allocated_bytes: u64,
    pub peak_allocated_bytes: u64,
    /// Layer waits that found the layer ready.
    pub hits: u64,
    /// Layer waits that had to wait for a load.
    pub misses: u64,
    pub evictions: u64,
    /// Loads per unit: index `n_layers` is the global group (embeddings, output).
    pub loads_per_layer: Vec<u64>,
    /// Which units are resident now (same indexing).
    pub resident_layers: Vec<bool>,
    pub pinned_layers: Vec<usize>,
    /// Layers the plan keeps resident (besides pins).
    pub fixed_layers: Vec<usize>,
    pub prefetch_window: usize,
    pub hint_noops: u64,
    pub stage_busy: Vec<StageBusy>,
    pub kv_slots_in_use: usize,
    pub requests_done: u64,
    /// Prompt tokens a session's kept KV cache spared from prefill.
    #[serde(default)]
    pub prompt_tokens_cached: u64,
    pub direct_io: bool,
    /// Sequences in the running set (continuous batching).
    #[serde(default)]
    pub running_seqs: usize,
    /// Requests queued for a place in the running set.
    #[serde(default)]
    pub waiting_seqs: usize,
    /// Blocks of the paged KV pool (0: a compute without one), used now, and positions per
    /// block.
    #[serde(default)]
    pub kv_blocks_total: usize,
    #[serde(default)]
    pub kv_blocks_used: usize,
    /// Blocks only the prefix cache holds (given back when the pool runs short).
    #[serde(default)]
    pub kv_blocks_cached: usize,
    /// Prompt tokens whose KV came from the prefix cache (shared with earlier requests).
    #[serde(default)]
    pub prefix_cache_hit_tokens: u64,
    #[serde(default)]
    pub kv_block_tokens: usize,
    /// Steps by sequences carried: counts per bucket of `pipeline::batch::BATCH_BUCKETS`
    /// (at most 1, 2, 4, ... sequences), the last one for more.
    #[serde(default)]
    pub batch_steps: Vec<u64>,
    /// Tokens carried by all steps (decode tokens and prompt chunks).
    #[serde(default)]
    pub batch_step_tokens: u64,
    /// Sequences carried by all steps (the histogram's sum).
    #[serde(default)]
    pub batch_step_sequences: u64,
}

/// Whether the model can be served from its file (`RuntimeHandle::model_health`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelHealth {
    /// Units (layers, the global tensors, head chunks) whose last load failed and that have not
    /// loaded since: requests that need them fail until a load succeeds.
    pub units_failed: usize,
    /// Loads that failed since start (each failed attempt of a unit once).
    pub load_failures: u64,
    /// The most recent load failure, in words.
    pub last_failure: Option<String>,
    /// The file at the model's path is not the one loaded (truncated, rewritten, replaced), in
    /// words; `None` while it is. Weights already resident still serve; reads are refused.
    pub file_changed: Option<String>,
}

impl ModelHealth {
    /// True when every unit can be loaded as far as the runtime knows.
    pub fn is_ok(&self) -> bool {
        self.units_failed == 0
    }
}

impl Stats {
    pub fn busy_ns(&self, stage: Stage) -> u64 {
        self.stage_busy
            .iter()
            .find(|s| s.stage == stage.name())
            .map(|s| s.busy_ns)
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_parsing() {
        assert_eq!("2GiB".parse(), Ok(MemoryBudget::Bytes(2 << 30)));
        assert_eq!("512 MiB".parse(), Ok(MemoryBudget::Bytes(512 << 20)));
        assert_eq!("40%".parse(), Ok(MemoryBudget::FractionOfWeights(0.4)));
        assert_eq!("1000".parse(), Ok(MemoryBudget::Bytes(1000)));
        assert!("0%".parse::<MemoryBudget>().is_err());
        assert!("lots".parse::<MemoryBudget>().is_err());
    }

    #[test]
    fn hints_roundtrip_bincode() {
        let h = Hint::Pin { layers: vec![3, 7] };
        let bytes = bincode::serialize(&h).unwrap();
        assert_eq!(bincode::deserialize::<Hint>(&bytes).unwrap(), h);
    }
}
