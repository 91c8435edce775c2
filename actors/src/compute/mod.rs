//! The compute seam of the Inference actor: a model expressed as embed / per-layer / output
//! steps over resident weights, and the KV state of one sequence.
//!
//! A step may carry several sequences (continuous batching): `layer_batch` and
//! `output_batch` take the rows of every sequence in one `Hidden`, grouped per sequence
//! (`BatchSeq`). Their default implementations loop the per-sequence calls, so a compute that
//! only knows one sequence at a time still works; the CPU llama compute runs each weight
//! product once over all rows. `max_batch_sequences` says how many sequences a step may carry.
//!
//! `ChecksumCompute` is a stand-in model used to test the pipeline on synthetic files: every
//! layer folds a checksum of *all* its weight bytes into the hidden state and keeps a per-layer
//! running state (like a KV cache), so the generated tokens change if a single weight byte
//! arrives wrong, late or from the wrong layer — which is what the pipeline tests need.

pub mod gpu;
pub mod llama;

#[cfg(test)]
mod batch_tests;

use crate::error::{Result, RuntimeError};
use crate::pipeline::residency::ResidentLayer;
use std::any::Any;

/// Activations `[n_tokens, width]`, row-major.
#[derive(Debug, Clone, Default)]
pub struct Hidden {
    pub data: Vec<f32>,
    pub n_tokens: usize,
}

impl Hidden {
    /// Values per row (0 for a compute that keeps activations elsewhere, e.g. on a device).
    pub fn width(&self) -> usize {
        self.data.len().checked_div(self.n_tokens).unwrap_or(0)
    }

    /// Rows `first .. first + n` as a `Hidden` of their own (no values where there are none).
    pub fn rows(&self, first: usize, n: usize) -> Hidden {
        let w = self.width();
        Hidden {
            data: self
                .data
                .get(first * w..(first + n) * w)
                .unwrap_or(&[])
                .to_vec(),
            n_tokens: n,
        }
    }
}

/// Per-sequence state owned by the compute (KV cache and position), opaque to the runtime.
pub type SequenceState = Box<dyn Any + Send>;

/// One sequence's part of a batched step: its state, how many rows of the step's `Hidden`
/// are its tokens (consecutive, in batch order), and whether the step needs the logits of its
/// last row (a decode token, a prompt's last chunk) or only advances it (an earlier chunk).
pub struct BatchSeq<'a> {
    pub seq: &'a mut SequenceState,
    pub rows: usize,
    pub wants_logits: bool,
    /// Of the logits, only the greedy token is wanted (greedy sampling with no penalties, no
    /// grammar mask, no log-probabilities): a compute may answer [`RowLogits::Argmax`].
    pub greedy: bool,
}

pub use rocmforge::backend::RowLogits;

/// KV memory of a compute that pools it (see `ModelCompute::kv_stats`).
pub use rocmforge::model::KvPoolStats;

/// What the runtime asks of a compute's batching before the first request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Sequences running at once.
    pub max_num_seqs: usize,
    /// Bytes of KV cache shared by every sequence; `None`: the compute's default.
    pub kv_budget: Option<u64>,
}

/// A KV pool's refusal (`KvPoolFull`) as [`RuntimeError::KvFull`] (the request waits for
/// room), any other error through `other`.
pub(crate) fn kv_full_or(
    e: rocmforge::model::ModelError,
    other: impl FnOnce(rocmforge::model::ModelError) -> RuntimeError,
) -> RuntimeError {
    match e {
        rocmforge::model::ModelError::KvPoolFull {
            needed,
            free,
            total,
            ..
        } => RuntimeError::KvFull {
            needed,
            free,
            total,
        },
        e => other(e),
    }
}

pub trait ModelCompute: Send {
    fn n_layers(&self) -> usize;
    /// Called when the Inference actor has no request to serve: a moment for lazy set-up that
    /// would stall a request if done during it (the GPU opens its vendor GEMM here). Default:
    /// nothing.
    fn idle(&mut self) {}
    /// Whether a step's work runs in parallel loops on the Inference actor's thread pool (the
    /// CPU compute): the actor then keeps the pool's threads polling through each step
    /// instead of letting them sleep between loops. Default: no.
    fn host_parallel(&self) -> bool {
        false
    }
    /// Whether `token` ends generation (eos, eot, end of turn: the tokenizer's one set).
    fn is_end_of_generation(&self, token: u32) -> bool;
    /// Tokens one sequence holds (prompt and generated); `None`: unbounded.
    fn context_len(&self) -> Option<usize>;
    /// A new sequence (allocates its KV cache).
    fn new_sequence(&mut self) -> Result<SequenceState>;
    /// Continues a kept sequence (a chat session's next turn): drops its cached tokens past
    /// `keep` and makes it the sequence the next steps run on. `Ok(false)`: this compute cannot
    /// resume a sequence; the runtime starts a new one instead.
    fn resume(&mut self, seq: &mut SequenceState, keep: usize) -> Result<bool> {
        let _ = (seq, keep);
        Ok(false)
    }
    fn embed(&mut self, global: &ResidentLayer, tokens: &[u32]) -> Result<Hidden>;
    fn layer(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &mut Hidden,
    ) -> Result<()>;
    /// Logits of the last position; advances the sequence position by `hidden.n_tokens`.
    fn output(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Vec<f32>>;
    /// The final-normed hidden state of every position `[n_tokens, width]` (what the output
    /// head reads), for embeddings; advances the sequence position by `hidden.n_tokens`.
    fn final_hidden(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Hidden> {
        let _ = (global, seq, hidden);
        Err(RuntimeError::Unsupported(
            "final hidden states (embeddings) from this compute".into(),
        ))
    }
    /// Embeds without the global unit, reading the rows of `tokens` from the model file, so the
    /// first layer need not wait for the whole embedding table to load (and a budget smaller than
    /// the table works). `None`: not supported; the runtime then calls `embed` with the global
    /// unit.
    fn embed_from_file(&mut self, tokens: &[u32]) -> Option<Result<Hidden>> {
        let _ = tokens;
        None
    }
    /// The runtime's model file (accepted identity, reloads): a compute that reads the file
    /// itself (`embed_from_file`) should read through it, so a changed file is an error.
    fn attach_source(&mut self, source: std::sync::Arc<crate::pipeline::source::ModelSource>) {
        let _ = source;
    }
    /// True when the output head can come in row chunks (`output_prepare`, then `output_rows`
    /// per chunk), which budgets smaller than the head need. Such a compute must also embed
    /// from the file: in tied models the head is the embedding table.
    fn streams_output_head(&self) -> bool {
        false
    }
    /// Streamed head, step 1: what `output` does before the head (final norm of the last
    /// position; the global unit then holds only the small global tensors), and advancing the
    /// sequence position by `hidden.n_tokens`.
    fn output_prepare(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<()> {
        let _ = (global, seq, hidden);
        Err(no_streamed_head())
    }
    /// Streamed head, step 2: the logits of one chunk's rows (`logits.len()` is the chunk's row
    /// count) from the head chunk `chunk`.
    fn output_rows(&mut self, chunk: &ResidentLayer, logits: &mut [f32]) -> Result<()> {
        let _ = (chunk, logits);
        Err(no_streamed_head())
    }
    /// Sequences one step may carry. 1 (the default): the compute keeps per-step state outside
    /// the sequence (the GPU computes hold the hidden state on the device), so the runtime
    /// runs one sequence at a time, each prompt in one step.
    fn max_batch_sequences(&self) -> usize {
        1
    }
    /// Sets the compute's batching up (its KV pool) before the first sequence. Default:
    /// nothing to do.
    fn configure_batching(&mut self, limits: BatchLimits) -> Result<()> {
        let _ = limits;
        Ok(())
    }
    /// The KV pool's occupancy, for a compute that pools KV memory in blocks.
    fn kv_stats(&self) -> Option<KvPoolStats> {
        None
    }
    /// Takes the KV room of `seq`'s first `tokens` positions now, so it cannot run out later;
    /// `Err(RuntimeError::KvFull)` when the pool has too few free blocks (nothing is taken
    /// then). Default: nothing to reserve.
    fn reserve(&mut self, seq: &mut SequenceState, tokens: usize) -> Result<()> {
        let _ = (seq, tokens);
        Ok(())
    }
    /// Starts a new sequence `seq` from the longest prefix of `prompt` whose keys and values
    /// the compute has cached (the prefix cache); returns how many positions it got (at most
    /// `prompt.len() - 1`). Default: no cache, 0.
    fn adopt_prefix(&mut self, seq: &mut SequenceState, prompt: &[u32]) -> usize {
        let _ = (seq, prompt);
        0
    }
    /// Offers the KV of `seq`'s first positions (`tokens`) to the prefix cache. Default:
    /// nothing.
    fn publish_prefix(&mut self, seq: &mut SequenceState, tokens: &[u32]) {
        let _ = (seq, tokens);
    }
    /// Frees cached KV no sequence uses until `blocks` are free; returns how many it freed.
    fn evict_cached(&mut self, blocks: usize) -> usize {
        let _ = blocks;
        0
    }
    /// Gives back the KV room of `seq` past its cached tokens (a session kept between turns).
    fn release_unused(&mut self, seq: &mut SequenceState) {
        let _ = seq;
    }
    /// `layer` over the rows of several sequences (`hidden` holds `sum(rows)` rows, grouped
    /// per sequence in `batch` order). Default: `layer` on each sequence's rows in turn.
    fn layer_batch(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &mut Hidden,
    ) -> Result<()> {
        if let [one] = batch {
            return self.layer(layer, weights, one.seq, hidden);
        }
        let width = hidden.width();
        let mut first = 0;
        for b in batch.iter_mut() {
            let mut h = hidden.rows(first, b.rows);
            self.layer(layer, weights, b.seq, &mut h)?;
            if let Some(dst) = hidden.data.get_mut(first * width..(first + b.rows) * width) {
                dst.copy_from_slice(&h.data);
            }
            first += b.rows;
        }
        Ok(())
    }
    /// `layer_batch` for a mixture-of-experts layer whose experts are units of their own
    /// (`LoadPlan::experts_of`): the layer up to its router, from the layer's unit (which no
    /// longer holds the stacked experts); returns the experts the step's rows chose,
    /// ascending. Each then runs with `expert_batch` from its unit, and `layer_finish` ends
    /// the layer. Default: unsupported.
    fn layer_routed(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &mut Hidden,
    ) -> Result<Vec<usize>> {
        let _ = (weights, batch, hidden);
        Err(split_experts_unsupported(layer))
    }
    /// Expert `expert` of the routed layer on the rows sent to it, from its unit `weights`.
    fn expert_batch(&mut self, layer: usize, expert: usize, weights: &ResidentLayer) -> Result<()> {
        let _ = (expert, weights);
        Err(split_experts_unsupported(layer))
    }
    /// The end of a routed layer: the experts' sum added to `hidden`.
    fn layer_finish(&mut self, layer: usize, hidden: &mut Hidden) -> Result<()> {
        let _ = hidden;
        Err(split_experts_unsupported(layer))
    }
    /// The end of a batched step: advances every sequence by its rows and returns the logits
    /// of those that want them, in batch order (or, where `greedy` allows, only their greedy
    /// token). Default: `output` on each sequence, full logits.
    fn output_batch(
        &mut self,
        global: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &Hidden,
    ) -> Result<Vec<RowLogits>> {
        output_each(self, global, batch, hidden)
    }
    /// Streamed head over a batch, step 1 (see `output_prepare`): advances every sequence,
    /// keeps the normed last rows of those that want logits and returns how many they are.
    /// Default: one sequence only.
    fn output_prepare_batch(
        &mut self,
        global: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &Hidden,
    ) -> Result<usize> {
        match batch {
            [one] => {
                self.output_prepare(global, one.seq, hidden)?;
                Ok(one.wants_logits as usize)
            }
            _ => Err(RuntimeError::Unsupported(
                "a streamed output head over a batch of sequences from this compute".into(),
            )),
        }
    }
    /// Streamed head over a batch, step 2: `logits` is `[n, chunk rows]` for the `n` rows
    /// `output_prepare_batch` kept. Default: one row only.
    fn output_rows_batch(
        &mut self,
        chunk: &ResidentLayer,
        n: usize,
        logits: &mut [f32],
    ) -> Result<()> {
        match n {
            1 => self.output_rows(chunk, logits),
            0 => Ok(()),
            _ => Err(RuntimeError::Unsupported(
                "a streamed output head over a batch of sequences from this compute".into(),
            )),
        }
    }
    /// Text to tokens (`None` when the compute has no tokenizer).
    fn tokenize(&self, text: &str) -> Option<Result<Vec<u32>>>;
    /// The bytes a generated token shows a user (may be part of a UTF-8 character); empty for
    /// control tokens such as the end of a turn.
    fn token_bytes(&self, token: u32) -> Vec<u8>;
}

/// `ModelCompute::output_batch` by `output` on each sequence, full logits.
fn output_each<C: ModelCompute + ?Sized>(
    c: &mut C,
    global: &ResidentLayer,
    batch: &mut [BatchSeq<'_>],
    hidden: &Hidden,
) -> Result<Vec<RowLogits>> {
    if let [one] = batch {
        let logits = c.output(global, one.seq, hidden)?;
        return Ok(if one.wants_logits {
            vec![RowLogits::Full(logits)]
        } else {
            Vec::new()
        });
    }
    let mut first = 0;
    let mut out = Vec::new();
    for b in batch.iter_mut() {
        let h = hidden.rows(first, b.rows);
        let logits = c.output(global, b.seq, &h)?;
        if b.wants_logits {
            out.push(RowLogits::Full(logits));
        }
        first += b.rows;
    }
    Ok(out)
}

/// Where layer `layer`'s tensors are in the file, by role.
pub(crate) fn layer_refs(
    model: &rocmforge::model::Model,
    layer: usize,
) -> Result<&rocmforge::model::LayerSet<rocmforge::model::TensorRef>> {
    model
        .layout()
        .layers
        .get(layer)
        .ok_or_else(|| RuntimeError::Compute {
            layer: Some(layer),
            message: "no such layer".into(),
        })
}

fn split_experts_unsupported(layer: usize) -> RuntimeError {
    RuntimeError::Unsupported(format!(
        "layer {layer}: experts in units of their own (a memory budget below the model's size) \
         with this compute"
    ))
}

fn no_streamed_head() -> RuntimeError {
    RuntimeError::Compute {
        layer: None,
        message: "this compute needs the output head resident; it cannot take it in chunks".into(),
    }
}

/// What the runtime's builder hands every compute it builds (`RuntimeBuilder::kv_limit`):
/// a compute applies what concerns it (the host's KV limit means nothing to a GPU's KV cache).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ComputeSettings {
    /// Bytes one host sequence's KV cache (and attention scores) may take; `None`: half of
    /// the memory available (`KvLimit::host`).
    pub kv_limit: Option<u64>,
    /// A GPU compute runs the model's last `host_layers` layers on the host (the CPU's forward
    /// pass over the mapped file); the plan keeps no device weights for them
    /// (`RuntimeBuilder::host_layers`). Nothing to a CPU compute.
    pub host_layers: usize,
}

/// Builds a compute for an opened model (runs on the Inference thread at start).
pub type ComputeFactory = std::sync::Arc<
    dyn Fn(&rocmforge::gguf::GgufFile, &ComputeSettings) -> Result<Box<dyn ModelCompute>>
        + Send
        + Sync,
>;

const WIDTH: usize = 8;

/// See the module docs. `vocab` tokens; embeddings from the rows of `token_embd.weight`, logits
/// from the rows of the head (`output.weight`, or `token_embd.weight` when tied), each row
/// folded on its own so a head streamed in row chunks gives the same logits as a resident one.
pub struct ChecksumCompute {
    n_layers: usize,
    vocab: usize,
    /// Extra time per layer, to model a slow compute stage in tests.
    pub delay_per_layer: std::time::Duration,
    /// The file map and the embedding table's byte range in it (`embed_from_file`).
    table: Option<(std::sync::Arc<memmap2::Mmap>, std::ops::Range<usize>)>,
    head: String,
    /// Between `output_prepare` and `output_rows`: the last position and the global checksum.
    pending: Option<([f32; WIDTH], u64)>,
    /// The same for each sequence of a batch that wants logits (`output_prepare_batch`).
    pending_batch: Vec<([f32; WIDTH], u64)>,
}

struct ChecksumSeq {
    /// Per layer running state: what a KV cache is to a real model.
    kv: Vec<[f32; WIDTH]>,
    pos: usize,
}

const TOKEN_EMBD: &str = "token_embd.weight";

impl ChecksumCompute {
    pub fn new(n_layers: usize, vocab: usize) -> Self {
        Self {
            n_layers,
            vocab: vocab.max(2),
            delay_per_layer: std::time::Duration::ZERO,
            table: None,
            head: TOKEN_EMBD.to_string(),
            pending: None,
            pending_batch: Vec::new(),
        }
    }

    /// A factory reading the layer count from the file (`blk.N` tensors) and using `vocab`.
    pub fn factory(vocab: usize, delay_per_layer: std::time::Duration) -> ComputeFactory {
        std::sync::Arc::new(move |file, _settings| {
            let n = file
                .tensors()
                .iter()
                .filter_map(|t| t.layer())
                .max()
                .map(|m| m + 1)
                .unwrap_or(0);
            let mut c = ChecksumCompute::new(n, vocab);
            c.delay_per_layer = delay_per_layer;
            let find = |name: &str| file.tensors().iter().find(|t| t.name == name);
            c.table = find(TOKEN_EMBD).map(|t| (file.map(), file.tensor_range(t)));
            if find("output.weight").is_some() {
                c.head = "output.weight".into();
            }
            Ok(Box::new(c) as Box<dyn ModelCompute>)
        })
    }

    fn embed_rows(&self, table: &[u8], tokens: &[u32]) -> Hidden {
        let mut data = Vec::with_capacity(tokens.len() * WIDTH);
        for &t in tokens {
            let row = table.len() / self.vocab;
            let start = (t as usize % self.vocab) * row;
            let h = checksum(table.get(start..start + row).unwrap_or(&[])) ^ t as u64;
            for i in 0..WIDTH {
                data.push(unit_f32(h.rotate_left(8 * i as u32)));
            }
        }
        Hidden {
            data,
            n_tokens: tokens.len(),
        }
    }

    /// Normalises nothing (a checksum model) but does what `output` does before the head:
    /// advances the sequence, keeps the last position and folds the non-head global tensors.
    fn prepare(
        &self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<([f32; WIDTH], u64)> {
        let s = seq_mut(seq)?;
        s.pos += hidden.n_tokens;
        let mut last = [0f32; WIDTH];
        let row = hidden
            .data
            .chunks(WIDTH)
            .last()
            .ok_or(RuntimeError::Compute {
                layer: None,
                message: "no tokens".into(),
            })?;
        last[..row.len()].copy_from_slice(row);
        let g = (0..global.tensors.len())
            .filter(|&i| global.tensors[i].name != self.head)
            .filter_map(|i| global.tensor_bytes(i))
            .fold(0u64, |a, b| a.rotate_left(5) ^ checksum(b));
        Ok((last, g))
    }

    /// Logits of head rows `first_row..first_row + logits.len()` held in `head`.
    fn head_logits(
        (last, g): ([f32; WIDTH], u64),
        head: &[u8],
        first_row: usize,
        logits: &mut [f32],
    ) {
        let rb = head.len() / logits.len().max(1);
        for (k, y) in logits.iter_mut().enumerate() {
            let j = first_row + k;
            let row = checksum(head.get(k * rb..(k + 1) * rb).unwrap_or(&[]));
            *y = last
                .iter()
                .enumerate()
                .map(|(i, x)| {
                    x * unit_f32(
                        g ^ row ^ ((j * WIDTH + i) as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                    )
                })
                .sum();
        }
    }
}

/// Order-sensitive checksum of bytes, 8 at a time (fast enough to read every weight byte).
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h ^ u64::from_le_bytes(w))
            .wrapping_mul(0x0100_0000_01b3)
            .rotate_left(29);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn unit_f32(h: u64) -> f32 {
    ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn seq_mut(seq: &mut SequenceState) -> Result<&mut ChecksumSeq> {
    seq.downcast_mut::<ChecksumSeq>()
        .ok_or(RuntimeError::Compute {
            layer: None,
            message: "sequence state of another compute".into(),
        })
}

impl ModelCompute for ChecksumCompute {
    fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// Greedy rows get only their token, as a GPU compute answers them, so the runtime tests
    /// run the inference actor's path for [`RowLogits::Argmax`] (and the full one wherever a
    /// request asks for log-probabilities or samples).
    fn output_batch(
        &mut self,
        global: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &Hidden,
    ) -> Result<Vec<RowLogits>> {
        let greedy: Vec<bool> = batch
            .iter()
            .filter(|b| b.wants_logits)
            .map(|b| b.greedy)
            .collect();
        let out = output_each(self, global, batch, hidden)?;
        Ok(out
            .into_iter()
            .zip(greedy)
            .map(|(r, g)| if g { RowLogits::Argmax(r.argmax()) } else { r })
            .collect())
    }

    fn is_end_of_generation(&self, _token: u32) -> bool {
        false
    }

    fn context_len(&self) -> Option<usize> {
        None
    }

    fn new_sequence(&mut self) -> Result<SequenceState> {
        Ok(Box::new(ChecksumSeq {
            kv: vec![[0.0; WIDTH]; self.n_layers],
            pos: 0,
        }))
    }

    fn embed(&mut self, global: &ResidentLayer, tokens: &[u32]) -> Result<Hidden> {
        let table = global.tensor(TOKEN_EMBD).map(|w| w.data).unwrap_or(&[]);
        Ok(self.embed_rows(table, tokens))
    }

    fn embed_from_file(&mut self, tokens: &[u32]) -> Option<Result<Hidden>> {
        let (map, range) = self.table.as_ref()?;
        let table = map.get(range.clone()).unwrap_or(&[]);
        Some(Ok(self.embed_rows(table, tokens)))
    }

    fn streams_output_head(&self) -> bool {
        self.table.is_some()
    }

    fn output_prepare(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<()> {
        self.pending = Some(self.prepare(global, seq, hidden)?);
        Ok(())
    }

    fn max_batch_sequences(&self) -> usize {
        usize::MAX
    }

    fn output_prepare_batch(
        &mut self,
        global: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &Hidden,
    ) -> Result<usize> {
        let mut first = 0;
        self.pending_batch.clear();
        for b in batch.iter_mut() {
            let h = hidden.rows(first, b.rows);
            let p = self.prepare(global, b.seq, &h)?;
            if b.wants_logits {
                self.pending_batch.push(p);
            }
            first += b.rows;
        }
        Ok(self.pending_batch.len())
    }

    fn output_rows_batch(
        &mut self,
        chunk: &ResidentLayer,
        n: usize,
        logits: &mut [f32],
    ) -> Result<()> {
        if n != self.pending_batch.len() {
            return Err(RuntimeError::Compute {
                layer: None,
                message: "output_rows_batch of another batch than output_prepare_batch".into(),
            });
        }
        let per = logits.len() / n.max(1);
        for (i, p) in self.pending_batch.clone().into_iter().enumerate() {
            self.pending = Some(p);
            self.output_rows(chunk, &mut logits[i * per..(i + 1) * per])?;
        }
        Ok(())
    }

    fn output_rows(&mut self, chunk: &ResidentLayer, logits: &mut [f32]) -> Result<()> {
        let bad = |m: &str| RuntimeError::Compute {
            layer: None,
            message: m.to_string(),
        };
        let p = self
            .pending
            .ok_or_else(|| bad("output_rows before output_prepare"))?;
        let rows = chunk
            .tensors
            .first()
            .and_then(|t| t.rows.clone())
            .ok_or_else(|| bad("not a head chunk"))?;
        let head = chunk.require(&self.head)?;
        if (rows.end - rows.start) as usize != logits.len() {
            return Err(bad("head chunk rows and logits disagree"));
        }
        Self::head_logits(p, head.data, rows.start as usize, logits);
        Ok(())
    }

    fn layer(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &mut Hidden,
    ) -> Result<()> {
        if !self.delay_per_layer.is_zero() {
            std::thread::sleep(self.delay_per_layer);
        }
        let mut h = layer as u64;
        for i in 0..weights.tensors.len() {
            let b = weights.tensor_bytes(i).ok_or(RuntimeError::Compute {
                layer: Some(layer),
                message: "weights not host-visible".into(),
            })?;
            h = h.rotate_left(7) ^ checksum(b);
        }
        let w = unit_f32(h);
        let s = seq_mut(seq)?;
        let kv = s.kv.get_mut(layer).ok_or(RuntimeError::Compute {
            layer: Some(layer),
            message: "layer out of range".into(),
        })?;
        for row in hidden.data.chunks_mut(WIDTH) {
            for (i, x) in row.iter_mut().enumerate() {
                kv[i] = 0.9 * kv[i] + 0.1 * *x;
                *x = (*x * 1.7 + w * (i as f32 + 1.0) + kv[i]).sin();
            }
        }
        Ok(())
    }

    fn output(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Vec<f32>> {
        let p = self.prepare(global, seq, hidden)?;
        let head = global.tensor(&self.head).map(|w| w.data).unwrap_or(&[]);
        let mut logits = vec![0f32; self.vocab];
        Self::head_logits(p, head, 0, &mut logits);
        Ok(logits)
    }

    fn tokenize(&self, _text: &str) -> Option<Result<Vec<u32>>> {
        None
    }

    fn token_bytes(&self, _token: u32) -> Vec<u8> {
        Vec::new()
    }
}
