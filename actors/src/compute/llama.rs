//! The real compute: the core crate's llama-family CPU forward pass (`rocmforge::model`: llama,
//! mistral, qwen2, qwen3, gemma3, phi3, qwen3moe, Mixtral as llama with experts) run over the
//! weights the pipeline made resident, plus the GGUF tokenizer. The family's embedding scale and
//! final logit cap come from `Model` (`scale_embeddings`, `finish_logits`), applied here where
//! this compute does the lookup and the head itself.
//!
//! Per-layer weights come from the resident unit (the host arena in `read` mode, the file map in
//! `mmap` mode), never from the model's own map, so the budget is what really bounds memory.
//! The embedding lookup is the exception by design: it needs only the prompt's rows, so it
//! `pread`s them from the file (`embed_from_file`) instead of waiting for the whole table; that
//! lets layer 0 start first and lets a budget smaller than the table (streamed head) work.

use crate::compute::layer_refs;
use crate::compute::{
    BatchLimits, BatchSeq, ComputeFactory, ComputeSettings, Hidden, KvPoolStats, ModelCompute,
    RowLogits, SequenceState,
};
use crate::error::{Result, RuntimeError};
use crate::pipeline::residency::ResidentLayer;
use rocmforge::gguf::GgufFile;
use rocmforge::model::moe::ExpertWeights;
use rocmforge::model::{
    bytes_per_token, KvLimit, KvPool, Precision, Scratch, SharedKvPool, DEFAULT_BLOCK_TOKENS,
};
use rocmforge::model::{
    ops, LayerWeights, Model, Role, Sequence, SequenceConfig, TensorRef, WeightView,
};
use rocmforge::tokenizer::Tokenizer;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

pub struct LlamaCompute {
    model: Model,
    tokenizer: Option<Tokenizer>,
    seq_cfg: SequenceConfig,
    norm_w: Vec<f32>,
    xn: Vec<f32>,
    /// The model file, for embedding rows (`embed_from_file`); opened with random-access advice
    /// so a cold lookup reads the rows, not a readahead window around each.
    file: std::fs::File,
    path: std::path::PathBuf,
    /// The runtime's view of the model file (`attach_source`): reads check that the file is
    /// still the one loaded and follow reloads. `None`: `file` as opened.
    source: Option<crate::pipeline::source::SourceFile>,
    row_buf: Vec<u8>,
    /// Set by `output_prepare` for the chunks of a streamed head.
    precision: Precision,
    /// The KV blocks every sequence draws from (`configure_batching`); `None` before: each
    /// sequence then has a pool of its own, sized for its whole context.
    pool: Option<SharedKvPool>,
    /// Scratch space of batched steps (a sequence alone uses its own).
    scratch: Scratch,
    /// Concatenated hidden rows of the sequences wanting logits (`output_batch`).
    last_rows: Vec<f32>,
    /// The configured KV limit (`ComputeSettings::kv_limit`), for the shared pool's default.
    kv_limit: Option<u64>,
}

/// `ModelCompute::tokenize` for a compute holding an optional GGUF tokenizer (CPU and GPU).
pub(crate) fn tokenize_with(t: Option<&Tokenizer>, text: &str) -> Option<Result<Vec<u32>>> {
    Some(
        t?.encode(text, true, true)
            .map_err(|e| RuntimeError::BadRequest(e.to_string())),
    )
}

/// `ModelCompute::token_bytes` for a compute holding an optional GGUF tokenizer: control
/// tokens (end of turn, end of text) show no text.
pub(crate) fn token_bytes_with(t: Option<&Tokenizer>, token: u32) -> Vec<u8> {
    t.and_then(|t| t.piece_bytes(token, false))
        .map(<[u8]>::to_vec)
        .unwrap_or_default()
}

fn err(layer: Option<usize>) -> impl Fn(rocmforge::model::ModelError) -> RuntimeError {
    move |e| RuntimeError::Compute {
        layer,
        message: e.to_string(),
    }
}

impl LlamaCompute {
    /// Opens the model and sizes the context against the KV limit (`settings.kv_limit`, else
    /// the host's) before any sequence exists: a context that does not fit is capped with a
    /// warning, one that cannot fit at all fails here (the runtime does not start) rather than
    /// aborting at the first request.
    pub fn new(
        file: &GgufFile,
        mut seq_cfg: SequenceConfig,
        settings: &ComputeSettings,
    ) -> Result<Self> {
        let model = Model::from_file(file.clone()).map_err(err(None))?;
        let limit = KvLimit::configured_or_host(settings.kv_limit);
        let fit = seq_cfg
            .fit_context(model.hparams(), limit.as_ref())
            .map_err(err(None))?;
        if fit.capped() {
            tracing::warn!(
                requested = fit.requested,
                ctx = fit.ctx,
                kv_bytes = fit.bytes as u64,
                limit = limit.as_ref().map(|l| l.from.as_str()),
                "the context does not fit the KV limit: capped"
            );
        }
        seq_cfg.ctx = Some(fit.ctx);
        // A model without tokenizer metadata still runs on token ids.
        let tokenizer = Tokenizer::from_metadata(file.metadata()).ok();
        let path = file.path().to_path_buf();
        let handle = std::fs::File::open(&path).map_err(|source| RuntimeError::Open {
            path: path.clone(),
            source,
        })?;
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: a plain advisory syscall on a descriptor we own; failure is harmless.
            unsafe { libc::posix_fadvise(handle.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
        }
        Ok(Self {
            model,
            tokenizer,
            seq_cfg,
            norm_w: Vec::new(),
            xn: Vec::new(),
            file: handle,
            path,
            source: None,
            row_buf: Vec::new(),
            precision: Precision::default(),
            pool: None,
            scratch: Scratch::default(),
            last_rows: Vec::new(),
            kv_limit: settings.kv_limit,
        })
    }

    /// Advances every sequence of `batch` by its rows and puts the final-normed last row of
    /// each that wants logits into `self.xn` (`[n, d]`); returns `n`.
    fn final_norm_batch(
        &mut self,
        global: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &Hidden,
    ) -> Result<usize> {
        let hp = self.model.hparams();
        let d = hp.n_embd;
        let total: usize = batch.iter().map(|b| b.rows).sum();
        if hidden.data.len() != total * d {
            return Err(RuntimeError::Compute {
                layer: None,
                message: format!(
                    "{} hidden values for {total} rows of {d}",
                    hidden.data.len()
                ),
            });
        }
        self.last_rows.clear();
        let mut end = 0;
        for b in batch.iter_mut() {
            let seq = seq_mut(b.seq)?;
            seq.advance(b.rows).map_err(err(None))?;
            self.precision = seq.precision();
            end += b.rows;
            if b.wants_logits && b.rows > 0 {
                self.last_rows
                    .extend_from_slice(&hidden.data[(end - 1) * d..end * d]);
            }
        }
        let n = self.last_rows.len() / d;
        let layout = self.model.layout();
        self.norm_w.resize(d, 0.0);
        ops::dequantize(
            &view(global, &layout.output_norm)?,
            &layout.output_norm.name,
            &mut self.norm_w,
        )
        .map_err(err(None))?;
        self.xn.resize(n * d, 0.0);
        for (x, y) in self
            .last_rows
            .chunks_exact(d)
            .zip(self.xn.chunks_exact_mut(d))
        {
            ops::rms_norm(x, &self.norm_w, hp.rms_eps, y);
        }
        Ok(n)
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        let vocab = self.model.n_vocab();
        match tokens.iter().find(|&&t| t as usize >= vocab) {
            Some(&t) => Err(RuntimeError::BadRequest(format!(
                "token {t} outside the vocabulary of {vocab}"
            ))),
            None => Ok(()),
        }
    }

    /// The final norm of the last position into `self.xn`; advances the sequence.
    fn final_norm(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<()> {
        let seq = seq_mut(seq)?;
        seq.advance(hidden.n_tokens).map_err(err(None))?;
        self.precision = seq.precision();
        let hp = self.model.hparams();
        let d = hp.n_embd;
        let last = hidden
            .data
            .get(hidden.data.len().saturating_sub(d)..)
            .filter(|l| l.len() == d)
            .ok_or(RuntimeError::Compute {
                layer: None,
                message: "no hidden state".into(),
            })?;
        let layout = self.model.layout();
        self.norm_w.resize(d, 0.0);
        ops::dequantize(
            &view(global, &layout.output_norm)?,
            &layout.output_norm.name,
            &mut self.norm_w,
        )
        .map_err(err(None))?;
        self.xn.resize(d, 0.0);
        ops::rms_norm(last, &self.norm_w, hp.rms_eps, &mut self.xn);
        Ok(())
    }

    /// The output head over the `n` normed rows in `self.xn`, with the family's final
    /// soft-cap: `[n, n_vocab]`.
    fn head_logits(&self, global: &ResidentLayer, n: usize) -> Result<Vec<f32>> {
        let head = self.model.layout().head();
        let mut logits = vec![0f32; n * self.model.n_vocab()];
        ops::linear(
            &view(global, head)?,
            &head.name,
            &self.xn,
            n,
            &mut logits,
            self.precision,
        )
        .map_err(err(None))?;
        self.model.finish_logits(&mut logits);
        Ok(logits)
    }

    /// `[n, n_vocab]` logits as one vector per row; one row keeps its vector (a decode step
    /// of one sequence copies nothing).
    fn split_logits(&self, logits: Vec<f32>, n: usize) -> Vec<Vec<f32>> {
        if n == 1 {
            return vec![logits];
        }
        let vocab = self.model.n_vocab();
        logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect()
    }

    /// The factory the runtime uses by default.
    pub fn factory(seq_cfg: SequenceConfig) -> ComputeFactory {
        Arc::new(move |file: &GgufFile, settings: &ComputeSettings| {
            Ok(Box::new(LlamaCompute::new(file, seq_cfg, settings)?) as Box<dyn ModelCompute>)
        })
    }
}

/// A view of `t` inside a resident unit.
fn view<'a>(unit: &'a ResidentLayer, t: &TensorRef) -> Result<WeightView<'a>> {
    let w = unit.require(&t.name)?;
    Ok(t.view_of(w.data))
}

/// Layer `layer`'s weights as views into its resident unit. `routed`: the layer's part up to
/// the router when its experts are units of their own; the stacked expert tensors the unit no
/// longer holds are empty views (never read).
fn unit_weights<'a>(
    model: &Model,
    layer: usize,
    unit: &'a ResidentLayer,
    routed: bool,
) -> Result<LayerWeights<'a>> {
    layer_refs(model, layer)?.try_map(|role, t| match role {
        Role::Gate | Role::Up | Role::Down if routed && unit.tensor(&t.name).is_none() => {
            Ok(t.view_of(&[]))
        }
        _ => view(unit, t),
    })
}

/// Expert `expert`'s gate, up and down matrices in its unit (its rows of the stacked tensors).
fn expert_views<'a>(
    model: &Model,
    layer: usize,
    unit: &'a ResidentLayer,
) -> Result<[WeightView<'a>; 3]> {
    let refs = layer_refs(model, layer)?;
    let one = |t: &TensorRef| {
        let w = unit.require(&t.name)?;
        Ok::<_, RuntimeError>(WeightView {
            ty: w.ty,
            rows: w.rows as usize,
            cols: w.cols as usize,
            data: w.data,
        })
    };
    Ok([one(&refs.w_gate)?, one(&refs.w_up)?, one(&refs.w_down)?])
}

fn seq_mut(seq: &mut SequenceState) -> Result<&mut Sequence> {
    seq.downcast_mut::<Sequence>().ok_or(RuntimeError::Compute {
        layer: None,
        message: "sequence state of another compute".into(),
    })
}

impl LlamaCompute {
    /// `layer` over the batch's rows: the whole layer, or (`routed`) the layer up to its
    /// router when its experts are units of their own; then the experts it chose (empty for
    /// the whole layer).
    fn forward_batch(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &mut Hidden,
        routed: bool,
    ) -> Result<Vec<usize>> {
        let w = unit_weights(&self.model, layer, weights, routed)?;
        let rows: Vec<usize> = batch.iter().map(|b| b.rows).collect();
        let mut seqs = batch
            .iter_mut()
            .map(|b| seq_mut(b.seq))
            .collect::<Result<Vec<_>>>()?;
        let (m, h, s) = (&self.model, &mut hidden.data, &mut self.scratch);
        let r = if routed {
            m.forward_layer_batch_routed(layer, &w, &mut seqs, &rows, h, s)
        } else {
            m.forward_layer_batch(layer, &w, &mut seqs, &rows, h, s)
                .map(|()| Vec::new())
        };
        r.map_err(err(Some(layer)))
    }
}

impl ModelCompute for LlamaCompute {
    fn n_layers(&self) -> usize {
        self.model.hparams().n_layer
    }

    fn host_parallel(&self) -> bool {
        true
    }

    fn is_end_of_generation(&self, token: u32) -> bool {
        self.tokenizer.as_ref().is_some_and(|t| t.is_eog(token))
    }

    fn context_len(&self) -> Option<usize> {
        Some(self.seq_cfg.context_len(self.model.hparams()))
    }

    fn new_sequence(&mut self) -> Result<SequenceState> {
        let seq = match &self.pool {
            Some(pool) => self.model.new_sequence_in(self.seq_cfg, pool.clone()),
            None => self.model.new_sequence(self.seq_cfg),
        };
        Ok(Box::new(seq.map_err(err(None))?))
    }

    /// A kept block shared with the prefix cache is copied before it is written again; with
    /// no block free for that copy, the sequence cannot keep `keep` tokens and a new one
    /// starts instead.
    fn resume(&mut self, seq: &mut SequenceState, keep: usize) -> Result<bool> {
        Ok(seq_mut(seq)?.truncate(keep) == keep)
    }

    fn embed(&mut self, global: &ResidentLayer, tokens: &[u32]) -> Result<Hidden> {
        self.check_tokens(tokens)?;
        let d = self.model.hparams().n_embd;
        let te = &self.model.layout().token_embd;
        let w = view(global, te)?;
        let mut data = vec![0f32; tokens.len() * d];
        for (&tok, row) in tokens.iter().zip(data.chunks_exact_mut(d)) {
            ops::dequantize_row(&w, tok as usize, &te.name, row).map_err(err(None))?;
        }
        self.model.scale_embeddings(&mut data);
        Ok(Hidden {
            data,
            n_tokens: tokens.len(),
        })
    }

    fn embed_from_file(&mut self, tokens: &[u32]) -> Option<Result<Hidden>> {
        Some(self.check_tokens(tokens).and_then(|()| {
            let d = self.model.hparams().n_embd;
            let te = &self.model.layout().token_embd;
            if let Some(&t) = tokens.iter().find(|&&t| t as usize >= te.rows) {
                return Err(RuntimeError::BadRequest(format!(
                    "token {t} outside the {} rows of {}",
                    te.rows, te.name
                )));
            }
            let row_bytes = te.ty.row_bytes(te.cols as u64).unwrap_or(0) as usize;
            self.row_buf.resize(row_bytes, 0);
            // Checked (one `fstat`): rows of a changed file are an error, not another model's.
            let file: &std::fs::File = match &mut self.source {
                Some(s) => s.get()?,
                None => &self.file,
            };
            // Queue every row's read at once (asynchronous readahead), then copy them out: a cold
            // lookup costs about one disk round trip instead of one per prompt token, which
            // matters while the readers keep the disk queue full. One row (a decode step) is read
            // at once: the advice would only add a system call.
            if tokens.len() > 1 {
                use std::os::unix::io::AsRawFd;
                let mut rows: Vec<u32> = tokens.to_vec();
                rows.sort_unstable();
                rows.dedup();
                for &tok in &rows {
                    let offset = te.range.start + tok as usize * row_bytes;
                    // SAFETY: an advisory syscall on a descriptor we own; it reads no user
                    // memory, and a failure only means no readahead.
                    unsafe {
                        libc::posix_fadvise(
                            file.as_raw_fd(),
                            offset as libc::off_t,
                            row_bytes as libc::off_t,
                            libc::POSIX_FADV_WILLNEED,
                        )
                    };
                }
            }
            let mut data = vec![0f32; tokens.len() * d];
            for (&tok, row) in tokens.iter().zip(data.chunks_exact_mut(d)) {
                let offset = (te.range.start + tok as usize * row_bytes) as u64;
                file.read_exact_at(&mut self.row_buf, offset)
                    .map_err(|source| RuntimeError::Read {
                        path: self.path.clone(),
                        offset,
                        len: row_bytes,
                        source,
                    })?;
                let w = WeightView {
                    ty: te.ty,
                    rows: 1,
                    cols: te.cols,
                    data: &self.row_buf,
                };
                ops::dequantize_row(&w, 0, &te.name, row).map_err(err(None))?;
            }
            self.model.scale_embeddings(&mut data);
            Ok(Hidden {
                data,
                n_tokens: tokens.len(),
            })
        }))
    }

    fn attach_source(&mut self, source: std::sync::Arc<crate::pipeline::source::ModelSource>) {
        self.source = Some(crate::pipeline::source::SourceFile::new(source));
    }

    fn layer(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &mut Hidden,
    ) -> Result<()> {
        let w = unit_weights(&self.model, layer, weights, false)?;
        self.model
            .forward_layer(layer, &w, seq_mut(seq)?, &mut hidden.data)
            .map_err(err(Some(layer)))
    }

    fn output(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Vec<f32>> {
        self.final_norm(global, seq, hidden)?;
        self.head_logits(global, 1)
    }

    fn final_hidden(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Hidden> {
        seq_mut(seq)?.advance(hidden.n_tokens).map_err(err(None))?;
        let hp = self.model.hparams();
        let d = hp.n_embd;
        if hidden.data.len() != hidden.n_tokens * d {
            return Err(RuntimeError::Compute {
                layer: None,
                message: format!(
                    "{} hidden values for {} positions of {d}",
                    hidden.data.len(),
                    hidden.n_tokens
                ),
            });
        }
        let out_norm = &self.model.layout().output_norm;
        self.norm_w.resize(d, 0.0);
        ops::dequantize(&view(global, out_norm)?, &out_norm.name, &mut self.norm_w)
            .map_err(err(None))?;
        let mut data = vec![0f32; hidden.data.len()];
        for (x, y) in hidden.data.chunks_exact(d).zip(data.chunks_exact_mut(d)) {
            ops::rms_norm(x, &self.norm_w, hp.rms_eps, y);
        }
        Ok(Hidden {
            data,
            n_tokens: hidden.n_tokens,
        })
    }

    fn streams_output_head(&self) -> bool {
        true
    }

    fn output_prepare(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<()> {
        self.final_norm(global, seq, hidden)
    }

    fn output_rows(&mut self, chunk: &ResidentLayer, logits: &mut [f32]) -> Result<()> {
        let head = self.model.layout().head();
        let w = chunk.require(&head.name)?;
        if w.rows as usize != logits.len() || w.cols as usize != self.xn.len() {
            return Err(RuntimeError::Compute {
                layer: None,
                message: format!(
                    "head chunk of {} x {} for {} logits and a hidden state of {}",
                    w.rows,
                    w.cols,
                    logits.len(),
                    self.xn.len()
                ),
            });
        }
        let w = WeightView {
            ty: w.ty,
            rows: w.rows as usize,
            cols: w.cols as usize,
            data: w.data,
        };
        ops::linear(&w, &head.name, &self.xn, 1, logits, self.precision).map_err(err(None))?;
        self.model.finish_logits(logits);
        Ok(())
    }

    fn max_batch_sequences(&self) -> usize {
        usize::MAX
    }

    /// One pool for every sequence: the budget given, else room for `max_num_seqs` whole
    /// contexts capped by the KV limit (at least one context: `new` checked it fits).
    fn configure_batching(&mut self, limits: BatchLimits) -> Result<()> {
        let hp = self.model.hparams();
        let ty = self.seq_cfg.kv_type_or_default();
        let ctx_bytes = bytes_per_token(hp, ty) * self.seq_cfg.context_len(hp) as u128;
        let budget = match limits.kv_budget {
            Some(b) => b as u128,
            None => {
                let all = ctx_bytes * limits.max_num_seqs.max(1) as u128;
                let host = KvLimit::configured_or_host(self.kv_limit);
                host.map_or(all, |l| all.min(l.bytes as u128))
                    .max(ctx_bytes)
            }
        };
        let budget = budget.min(u64::MAX as u128) as u64;
        let pool = KvPool::with_budget(hp, ty, DEFAULT_BLOCK_TOKENS, budget).map_err(err(None))?;
        tracing::info!(
            blocks = pool.stats().blocks_total,
            block_tokens = pool.block_tokens(),
            bytes = budget,
            "KV pool"
        );
        self.pool = Some(pool.shared());
        Ok(())
    }

    fn kv_stats(&self) -> Option<KvPoolStats> {
        self.pool
            .as_ref()
            .map(|p| rocmforge::model::lock_kv_pool(p).stats())
    }

    fn reserve(&mut self, seq: &mut SequenceState, tokens: usize) -> Result<()> {
        seq_mut(seq)?
            .reserve(tokens)
            .map_err(|e| crate::compute::kv_full_or(e, err(None)))
    }

    fn adopt_prefix(&mut self, seq: &mut SequenceState, prompt: &[u32]) -> usize {
        seq_mut(seq).map_or(0, |s| s.adopt_prefix(prompt))
    }

    fn publish_prefix(&mut self, seq: &mut SequenceState, tokens: &[u32]) {
        if let Ok(s) = seq_mut(seq) {
            s.publish_prefix(tokens);
        }
    }

    fn evict_cached(&mut self, blocks: usize) -> usize {
        self.pool.as_ref().map_or(0, |p| {
            rocmforge::model::lock_kv_pool(p).prefix_evict(blocks)
        })
    }

    fn release_unused(&mut self, seq: &mut SequenceState) {
        if let Ok(s) = seq_mut(seq) {
            s.release_unused();
        }
    }

    fn layer_batch(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &mut Hidden,
    ) -> Result<()> {
        self.forward_batch(layer, weights, batch, hidden, false)
            .map(|_| ())
    }

    fn layer_routed(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &mut Hidden,
    ) -> Result<Vec<usize>> {
        self.forward_batch(layer, weights, batch, hidden, true)
    }

    fn expert_batch(&mut self, layer: usize, expert: usize, weights: &ResidentLayer) -> Result<()> {
        let [gate, up, down] = expert_views(&self.model, layer, weights)?;
        let w = ExpertWeights {
            gate: &gate,
            up: &up,
            down: &down,
        };
        self.model
            .forward_expert(layer, expert, &w, &mut self.scratch)
            .map_err(err(Some(layer)))
    }

    fn layer_finish(&mut self, layer: usize, hidden: &mut Hidden) -> Result<()> {
        self.model
            .forward_layer_finish(&mut hidden.data, &self.scratch)
            .map_err(err(Some(layer)))
    }

    fn output_batch(
        &mut self,
        global: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &Hidden,
    ) -> Result<Vec<RowLogits>> {
        let n = self.final_norm_batch(global, batch, hidden)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let logits = self.head_logits(global, n)?;
        Ok(self
            .split_logits(logits, n)
            .into_iter()
            .map(RowLogits::Full)
            .collect())
    }

    fn output_prepare_batch(
        &mut self,
        global: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        hidden: &Hidden,
    ) -> Result<usize> {
        self.final_norm_batch(global, batch, hidden)
    }

    fn output_rows_batch(
        &mut self,
        chunk: &ResidentLayer,
        n: usize,
        logits: &mut [f32],
    ) -> Result<()> {
        let head = self.model.layout().head();
        let w = chunk.require(&head.name)?;
        let d = self.model.hparams().n_embd;
        if w.cols as usize != d || logits.len() != n * w.rows as usize || self.xn.len() != n * d {
            return Err(RuntimeError::Compute {
                layer: None,
                message: format!(
                    "head chunk of {} x {} for {} logits of {n} rows",
                    w.rows,
                    w.cols,
                    logits.len(),
                ),
            });
        }
        if n == 0 {
            return Ok(());
        }
        let w = WeightView {
            ty: w.ty,
            rows: w.rows as usize,
            cols: w.cols as usize,
            data: w.data,
        };
        ops::linear(&w, &head.name, &self.xn, n, logits, self.precision).map_err(err(None))?;
        self.model.finish_logits(logits);
        Ok(())
    }

    fn tokenize(&self, text: &str) -> Option<Result<Vec<u32>>> {
        tokenize_with(self.tokenizer.as_ref(), text)
    }

    fn token_bytes(&self, token: u32) -> Vec<u8> {
        token_bytes_with(self.tokenizer.as_ref(), token)
    }
}
