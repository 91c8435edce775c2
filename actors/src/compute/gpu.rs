//! The GPU `ModelCompute`: the llama forward pass run layer by layer over the device regions the
//! pipeline made resident, through the core crate's vendor-neutral `LayeredForward`
//! (`GpuLayered<D>`: the same code on CUDA and HIP). Before a unit's work the compute stream
//! waits on the unit's upload event on the device (the host never blocks on uploads); after it,
//! the unit's fence is recorded so evicting it waits for the kernels that read it.
//!
//! Activations stay on the device: the `Hidden` passed between steps only carries the token
//! count. Logits come back to the host for the Inference actor's sampler.

use crate::compute::llama::{token_bytes_with, tokenize_with};
use crate::compute::{BatchSeq, ComputeFactory, Hidden, ModelCompute, RowLogits, SequenceState};
use crate::error::{Result, RuntimeError};
use crate::pipeline::backend::WeightBackend;
use crate::pipeline::gpu::{GpuBackend, GpuConfig, GpuReady, GpuRegion};
use crate::pipeline::residency::{LayerMemory, ResidentLayer};
use rocmforge::backend::gpu::{GpuLayered, KernelDevice, LayeredOptions};
use rocmforge::backend::{
    view, Backend, BackendError, BackendKind, ComputeDevice, DeviceBuffer, DeviceStream,
    DeviceTensor, Fallback, LayerTensors, LayeredForward,
};
use rocmforge::gguf::GgufFile;
use rocmforge::model::{
    KvCache, KvPoolStats, Model, Precision, Role, Scratch, Sequence, SequenceConfig, SharedKvPool,
    TensorRef,
};
use rocmforge::tokenizer::Tokenizer;
use std::sync::Arc;

/// One sequence: its block table in the device's KV pool and the position of its next token;
/// with layers computed on the host, the host's sequence for those layers' KV cache (kept at
/// `pos`).
struct GpuSeq {
    kv: KvCache,
    pos: usize,
    host: Option<Sequence>,
}

impl GpuSeq {
    fn advance(&mut self, n: usize) -> Result<()> {
        self.pos += n;
        if let Some(h) = &mut self.host {
            h.advance(n).map_err(|e| err(None)(e.to_string()))?;
        }
        Ok(())
    }
}

/// Layers the GPU compute runs on the host from the mapped file (`RuntimeBuilder::host_layers`):
/// the residual stream comes to the host before the first of a run of them and goes back before
/// the next device work.
struct HostLayers {
    /// Per layer: computed on the host.
    on_host: Vec<bool>,
    seq_cfg: SequenceConfig,
    scratch: Scratch,
    /// The step's residual stream while it is on the host (the device's copy is stale).
    hidden: Option<Vec<f32>>,
}

pub struct GpuCompute<F: LayeredForward> {
    fwd: F,
    model: Model,
    tokenizer: Option<Tokenizer>,
    host: Option<HostLayers>,
    /// Whether idle time opens the vendor GEMM (`GpuPipelineOptions::idle_gemm_open`).
    idle_gemm_open: bool,
    /// Whether prompts' full KV blocks are offered to the pool's prefix cache for new
    /// sequences that start alike (`GpuPipelineOptions::prefix_cache_bytes` 0: off). Off
    /// with host layers, whose host KV cache is not shared.
    prefix_cache: bool,
    /// The device KV pool's bookkeeping, once it exists.
    pool: Option<SharedKvPool>,
}

fn err(layer: Option<usize>) -> impl Fn(String) -> RuntimeError {
    move |message| RuntimeError::Compute { layer, message }
}

impl<F> GpuCompute<F>
where
    F: LayeredForward,
    F::Device: 'static,
{
    pub fn new(fwd: F, file: &GgufFile) -> Result<Self> {
        let model = Model::from_file(file.clone()).map_err(|e| err(None)(e.to_string()))?;
        Ok(Self {
            fwd,
            model,
            tokenizer: Tokenizer::from_metadata(file.metadata()).ok(),
            host: None,
            idle_gemm_open: true,
            prefix_cache: false,
            pool: None,
        })
    }

    /// Keeps prompts' full KV blocks in the pool for new sequences whose prompt starts alike
    /// (`bytes` 0: no prefix cache; otherwise cached blocks use the pool's free blocks and go
    /// first when it runs short). Without effect with host layers.
    pub fn with_prefix_cache(mut self, bytes: u64) -> Self {
        self.prefix_cache = bytes > 0;
        self
    }

    /// The KV pool's bookkeeping (made now with the default size if no sequence made it).
    fn pool(&mut self) -> Result<SharedKvPool> {
        if let Some(p) = &self.pool {
            return Ok(p.clone());
        }
        let p = match self.fwd.kv_pool() {
            Some(p) => p,
            None => self
                .fwd
                .configure_kv(None)
                .map_err(|e| err(None)(e.to_string()))?,
        };
        self.pool = Some(p.clone());
        Ok(p)
    }

    /// Computes `layers` on the host (the CPU's forward pass over the mapped file, in
    /// `precision`), the others on the device. The runtime's plan must hold no device
    /// weights for them (`LoadPlan::place_on_host`).
    pub fn with_host_layers(mut self, layers: &[usize], precision: Precision) -> Result<Self> {
        let n = self.model.hparams().n_layer;
        if let Some(&l) = layers.iter().find(|&&l| l >= n) {
            return Err(RuntimeError::Config(format!(
                "host layer {l} of a model of {n} layers"
            )));
        }
        if layers.is_empty() {
            self.host = None;
            return Ok(self);
        }
        let mut on_host = vec![false; n];
        for &l in layers {
            on_host[l] = true;
        }
        self.host = Some(HostLayers {
            on_host,
            seq_cfg: SequenceConfig {
                ctx: Some(self.fwd.context_len()),
                precision,
                kv_type: None,
            },
            scratch: Scratch::default(),
            hidden: None,
        });
        Ok(self)
    }

    fn on_host(&self, layer: usize) -> bool {
        self.host
            .as_ref()
            .is_some_and(|h| h.on_host.get(layer).copied().unwrap_or(false))
    }

    /// Puts the residual stream back on the device if host layers left it on the host.
    fn hidden_to_device(&mut self) -> Result<()> {
        if let Some(h) = self.host.as_mut().and_then(|h| h.hidden.take()) {
            self.fwd
                .hidden_from_host(&h)
                .map_err(|e| err(None)(e.to_string()))?;
        }
        Ok(())
    }

    /// Layer `layer` on the host over the step's rows: the CPU's forward pass on the layer's
    /// weights in the mapped file, with each sequence's host KV cache.
    fn host_layer(&mut self, layer: usize, batch: &mut [BatchSeq<'_>]) -> Result<()> {
        let mut hidden = match self.host.as_mut().and_then(|h| h.hidden.take()) {
            Some(h) => h,
            None => self
                .fwd
                .hidden_to_host()
                .map_err(|e| err(Some(layer))(e.to_string()))?,
        };
        let rows: Vec<usize> = batch.iter().map(|b| b.rows).collect();
        let mut seqs = Vec::with_capacity(batch.len());
        for b in batch.iter_mut() {
            let seq = seq_mut(b.seq)?;
            seqs.push(
                seq.host.as_mut().ok_or_else(|| {
                    err(Some(layer))("a sequence without its host KV cache".into())
                })?,
            );
        }
        let host = self
            .host
            .as_mut()
            .ok_or_else(|| err(Some(layer))("no host layers".into()))?;
        let w = self.model.layer_weights(layer);
        self.model
            .forward_layer_batch(layer, &w, &mut seqs, &rows, &mut hidden, &mut host.scratch)
            .map_err(|e| err(Some(layer))(e.to_string()))?;
        host.hidden = Some(hidden);
        Ok(())
    }

    /// The step's sequences' row counts and positions, and their device KV caches; the first
    /// layer also tells the device which rows belong to which sequence.
    fn step_kvs<'b>(
        &mut self,
        layer: usize,
        batch: &'b mut [BatchSeq<'_>],
    ) -> Result<Vec<&'b mut KvCache>> {
        let mut parts = Vec::with_capacity(batch.len());
        let mut kvs = Vec::with_capacity(batch.len());
        for b in batch.iter_mut() {
            let seq = seq_mut(b.seq)?;
            parts.push((b.rows, seq.pos));
            kvs.push(&mut seq.kv);
        }
        if layer == 0 {
            self.fwd
                .set_segments(&parts)
                .map_err(|e| err(Some(0))(e.to_string()))?;
        }
        Ok(kvs)
    }

    /// Orders the compute stream after `unit`'s upload (on the device) and returns its region.
    fn enter<'a>(&self, unit: &'a ResidentLayer) -> Result<&'a GpuRegion<F::Device>> {
        let not_gpu =
            || err(unit.layer)("weights are not in this GPU backend's device memory".to_string());
        let LayerMemory::Device { region, ready } = &unit.memory else {
            return Err(not_gpu());
        };
        let region = region
            .as_any()
            .downcast_ref::<GpuRegion<F::Device>>()
            .ok_or_else(not_gpu)?;
        let ready = ready
            .as_any()
            .downcast_ref::<GpuReady<F::Device>>()
            .ok_or_else(not_gpu)?;
        self.fwd.stream().wait(&ready.event)?;
        Ok(region)
    }

    /// Layer `layer` of the step over the resident unit `weights`, with each sequence's KV
    /// cache (`kvs` in the step's sequence order).
    fn run_layer(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        kvs: &mut [&mut KvCache],
    ) -> Result<()> {
        let refs = self
            .model
            .layout()
            .layers
            .get(layer)
            .ok_or_else(|| err(Some(layer))("no such layer".into()))?;
        let region = self.enter(weights)?;
        let w: LayerTensors = refs.try_map(|_, r| tensor(weights, region, r))?;
        self.fwd
            .layer_batch(layer, &w, kvs)
            .map_err(|e| err(Some(layer))(e.to_string()))?;
        self.leave(region)
    }

    /// `run_layer` up to the router of a layer whose experts are units of their own (the
    /// stacked experts the unit no longer holds are empty tensors, never read).
    fn run_layer_routed(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        kvs: &mut [&mut KvCache],
    ) -> Result<Vec<usize>> {
        let refs = self
            .model
            .layout()
            .layers
            .get(layer)
            .ok_or_else(|| err(Some(layer))("no such layer".into()))?;
        let region = self.enter(weights)?;
        let w: LayerTensors = refs.try_map(|role, r| match role {
            Role::Gate | Role::Up | Role::Down if weights.tensor(&r.name).is_none() => {
                let empty = view(region.buffer(), 0, 0)?;
                Ok(DeviceTensor::new(empty, r.ty, r.rows, r.cols))
            }
            _ => tensor(weights, region, r),
        })?;
        let chosen = self
            .fwd
            .layer_routed(layer, &w, kvs)
            .map_err(|e| err(Some(layer))(e.to_string()))?;
        self.leave(region)?;
        Ok(chosen)
    }

    /// After the unit's work: eviction of the region waits for it.
    fn leave(&self, region: &GpuRegion<F::Device>) -> Result<()> {
        region.fence_after(self.fwd.stream())
    }
}

/// Tensor `t` of `unit` inside `region`, with the shape the pipeline recorded.
fn tensor<'a, D: ComputeDevice>(
    unit: &ResidentLayer,
    region: &'a GpuRegion<D>,
    t: &TensorRef,
) -> Result<DeviceTensor<'a>> {
    let i = unit
        .tensors
        .iter()
        .position(|s| s.name == t.name)
        .ok_or_else(|| RuntimeError::MissingTensor {
            layer: unit.layer.map_or("global".into(), |l| l.to_string()),
            tensor: t.name.clone(),
        })?;
    let slot = &unit.tensors[i];
    let (cols, rows) = unit.dims.get(i).copied().unwrap_or((0, 0));
    let (mut off, mut len, mut rows) = (slot.dev_offset, slot.dev_len, rows);
    if (t.cols as u64, t.rows as u64) != (cols, rows) {
        // A block of rows of a fused tensor (Phi-3's `attn_qkv`, `ffn_up`): its bytes inside
        // the tensor's, which the device holds in the file's format (whole quant blocks per
        // row, so the block is itself a matrix of that type).
        let whole = t.ty.row_bytes(cols).and_then(|rb| rb.checked_mul(rows));
        if slot.ty != t.ty || whole != Some(slot.dev_len) {
            return Err(err(unit.layer)(format!(
                "rows {}+{} of {}: the device holds the tensor as {} in {} B, not the file's {}",
                t.offset, t.rows, t.name, slot.ty, slot.dev_len, t.ty
            )));
        }
        off = slot.dev_offset.saturating_add(t.offset as u64);
        len = t.range.len() as u64;
        rows = t.rows as u64;
    }
    let bytes = usize::try_from(off)
        .ok()
        .zip(usize::try_from(len).ok())
        .filter(|_| off.saturating_add(len) <= slot.dev_offset.saturating_add(slot.dev_len))
        .and_then(|(off, len)| view(region.buffer(), off, len).ok())
        .ok_or_else(|| {
            err(unit.layer)(format!(
                "tensor {} at {}+{} is not inside its region of {} B",
                t.name,
                off,
                len,
                region.buffer().len_bytes()
            ))
        })?;
    Ok(DeviceTensor::new(
        bytes,
        slot.ty,
        rows as usize,
        cols as usize,
    ))
}

/// The pool's bookkeeping, locked (a panic elsewhere leaves it consistent: see
/// `rocmforge::model::paged`).
fn lock_pool(p: &SharedKvPool) -> std::sync::MutexGuard<'_, rocmforge::model::KvPool> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn seq_mut(seq: &mut SequenceState) -> Result<&mut GpuSeq> {
    seq.downcast_mut::<GpuSeq>()
        .ok_or_else(|| err(None)("sequence state of another compute".into()))
}

impl<F> ModelCompute for GpuCompute<F>
where
    F: LayeredForward,
    F::Device: 'static,
{
    fn n_layers(&self) -> usize {
        self.model.hparams().n_layer
    }

    fn idle(&mut self) {
        if self.idle_gemm_open {
            self.fwd.idle();
        }
    }

    fn is_end_of_generation(&self, token: u32) -> bool {
        self.tokenizer.as_ref().is_some_and(|t| t.is_eog(token))
    }

    fn context_len(&self) -> Option<usize> {
        Some(self.fwd.context_len())
    }

    fn new_sequence(&mut self) -> Result<SequenceState> {
        // The pool first (made with the default size if no `configure_batching` made it).
        self.pool()?;
        let kv = self.fwd.new_kv().map_err(|e| err(None)(e.to_string()))?;
        let host = match &self.host {
            Some(h) => Some(
                self.model
                    .new_sequence(h.seq_cfg)
                    .map_err(|e| err(None)(e.to_string()))?,
            ),
            None => None,
        };
        Ok(Box::new(GpuSeq { kv, pos: 0, host }))
    }

    fn resume(&mut self, seq: &mut SequenceState, keep: usize) -> Result<bool> {
        // The KV past `keep` is overwritten by the next tokens and never read before that;
        // a block the prefix cache or another sequence shares is copied first (`own_from`).
        let seq = seq_mut(seq)?;
        seq.pos = seq.pos.min(keep);
        if let Some(h) = &mut seq.host {
            // The host cache may keep fewer (shared prefix blocks): both restart from there.
            seq.pos = h.truncate(seq.pos);
        }
        let owned = seq.kv.own_from(seq.pos);
        if owned < seq.pos {
            seq.pos = owned;
            if let Some(h) = &mut seq.host {
                seq.pos = h.truncate(seq.pos);
            }
        }
        Ok(true)
    }

    fn configure_batching(&mut self, limits: crate::compute::BatchLimits) -> Result<()> {
        let pool = self
            .fwd
            .configure_kv(limits.kv_budget)
            .map_err(|e| err(None)(e.to_string()))?;
        let st = lock_pool(&pool).stats();
        tracing::info!(
            blocks = st.blocks_total,
            block_tokens = st.block_tokens,
            bytes = st.blocks_total as u64 * st.block_bytes,
            "GPU KV pool"
        );
        self.pool = Some(pool);
        Ok(())
    }

    fn kv_stats(&self) -> Option<KvPoolStats> {
        self.pool.as_ref().map(|p| lock_pool(p).stats())
    }

    fn reserve(&mut self, seq: &mut SequenceState, tokens: usize) -> Result<()> {
        seq_mut(seq)?
            .kv
            .reserve(tokens)
            .map_err(|e| crate::compute::kv_full_or(e, |e| err(None)(e.to_string())))
    }

    fn adopt_prefix(&mut self, seq: &mut SequenceState, prompt: &[u32]) -> usize {
        if self.host.is_some() || !self.prefix_cache {
            return 0;
        }
        let Ok(seq) = seq_mut(seq) else {
            return 0;
        };
        if seq.pos != 0 {
            return 0;
        }
        // Whole cached blocks, shared (nothing copied): the sequence writes from the next
        // block on.
        seq.pos = seq.kv.adopt_prefix(prompt);
        seq.pos
    }

    fn publish_prefix(&mut self, seq: &mut SequenceState, tokens: &[u32]) {
        if self.host.is_some() || !self.prefix_cache {
            return;
        }
        let Ok(seq) = seq_mut(seq) else {
            return;
        };
        // The positions the cache holds for these tokens (all of them after a prompt).
        let n = tokens.len().min(seq.pos);
        seq.kv.publish_prefix(&tokens[..n]);
    }

    fn evict_cached(&mut self, blocks: usize) -> usize {
        self.pool
            .as_ref()
            .map_or(0, |p| lock_pool(p).prefix_evict(blocks))
    }

    fn release_unused(&mut self, seq: &mut SequenceState) {
        if let Ok(s) = seq_mut(seq) {
            s.kv.release_after(s.pos);
        }
    }

    fn embed(&mut self, global: &ResidentLayer, tokens: &[u32]) -> Result<Hidden> {
        if let Some(h) = &mut self.host {
            h.hidden = None;
        }
        let region = self.enter(global)?;
        let table = tensor(global, region, &self.model.layout().token_embd)?;
        // Positions come with the first layer, which knows the step's sequences.
        self.fwd
            .embed_rows(&table, tokens)
            .map_err(|e| err(None)(e.to_string()))?;
        self.leave(region)?;
        Ok(Hidden {
            data: Vec::new(),
            n_tokens: tokens.len(),
        })
    }

    fn max_batch_sequences(&self) -> usize {
        self.fwd.max_sequences()
    }

    fn layer(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &mut Hidden,
    ) -> Result<()> {
        let rows = hidden.n_tokens;
        let mut one = [BatchSeq {
            seq,
            rows,
            wants_logits: true,
            greedy: false,
        }];
        self.layer_batch(layer, weights, &mut one, hidden)
    }

    fn layer_batch(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        _hidden: &mut Hidden,
    ) -> Result<()> {
        if self.on_host(layer) {
            // The device still learns the step's rows at the first layer.
            self.step_kvs(layer, batch)?;
            return self.host_layer(layer, batch);
        }
        self.hidden_to_device()?;
        let mut kvs = self.step_kvs(layer, batch)?;
        self.run_layer(layer, weights, &mut kvs)
    }

    fn layer_routed(
        &mut self,
        layer: usize,
        weights: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        _hidden: &mut Hidden,
    ) -> Result<Vec<usize>> {
        self.hidden_to_device()?;
        let mut kvs = self.step_kvs(layer, batch)?;
        self.run_layer_routed(layer, weights, &mut kvs)
    }

    fn expert_batch(&mut self, layer: usize, expert: usize, weights: &ResidentLayer) -> Result<()> {
        let refs = self
            .model
            .layout()
            .layers
            .get(layer)
            .ok_or_else(|| err(Some(layer))("no such layer".into()))?;
        let region = self.enter(weights)?;
        // The expert's rows of each stacked tensor, whole in its unit.
        let one = |r: &TensorRef| {
            let i = weights
                .tensors
                .iter()
                .position(|s| s.name == r.name)
                .ok_or_else(|| RuntimeError::MissingTensor {
                    layer: format!("{layer} expert {expert}"),
                    tensor: r.name.clone(),
                })?;
            let (slot, (cols, rows)) = (&weights.tensors[i], weights.dims[i]);
            let bytes = view(
                region.buffer(),
                slot.dev_offset as usize,
                slot.dev_len as usize,
            )?;
            Ok::<_, RuntimeError>(DeviceTensor::new(
                bytes,
                slot.ty,
                rows as usize,
                cols as usize,
            ))
        };
        let (g, u, d) = (one(&refs.w_gate)?, one(&refs.w_up)?, one(&refs.w_down)?);
        self.fwd
            .expert(layer, expert, [&g, &u, &d])
            .map_err(|e| err(Some(layer))(e.to_string()))?;
        self.leave(region)
    }

    fn layer_finish(&mut self, layer: usize, _hidden: &mut Hidden) -> Result<()> {
        self.hidden_to_device()?;
        self.fwd
            .layer_finish(layer)
            .map_err(|e| err(Some(layer))(e.to_string()))
    }

    fn output_batch(
        &mut self,
        global: &ResidentLayer,
        batch: &mut [BatchSeq<'_>],
        _hidden: &Hidden,
    ) -> Result<Vec<RowLogits>> {
        let mut rows = Vec::new();
        let mut greedy = Vec::new();
        // The final soft-cap (Gemma) is applied on the host and can make two maxima equal: its
        // models' greedy tokens come from the capped logits there.
        let device_argmax = !self.model.has_final_softcap();
        let mut first = 0;
        for b in batch.iter() {
            if b.wants_logits {
                rows.push(first + b.rows - 1);
                greedy.push(b.greedy && device_argmax);
            }
            first += b.rows;
        }
        self.hidden_to_device()?;
        let region = self.enter(global)?;
        let layout = self.model.layout();
        let norm = tensor(global, region, &layout.output_norm)?;
        let head = tensor(global, region, layout.head())?;
        let mut logits = self
            .fwd
            .output_rows(&norm, &head, &rows, &greedy)
            .map_err(|e| err(None)(e.to_string()))?;
        self.leave(region)?;
        // The family's final soft-cap (Gemma), on the host as the CPU applies it.
        for l in &mut logits {
            if let RowLogits::Full(l) = l {
                self.model.finish_logits(l);
            }
        }
        for b in batch.iter_mut() {
            seq_mut(b.seq)?.advance(b.rows)?;
        }
        Ok(logits)
    }

    fn output(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Vec<f32>> {
        self.hidden_to_device()?;
        let seq = seq_mut(seq)?;
        let region = self.enter(global)?;
        let layout = self.model.layout();
        let norm = tensor(global, region, &layout.output_norm)?;
        let head = tensor(global, region, layout.head())?;
        let mut logits = self
            .fwd
            .output(&norm, &head)
            .map_err(|e| err(None)(e.to_string()))?;
        self.leave(region)?;
        self.model.finish_logits(&mut logits);
        seq.advance(hidden.n_tokens)?;
        Ok(logits)
    }

    fn final_hidden(
        &mut self,
        global: &ResidentLayer,
        seq: &mut SequenceState,
        hidden: &Hidden,
    ) -> Result<Hidden> {
        self.hidden_to_device()?;
        let seq = seq_mut(seq)?;
        let region = self.enter(global)?;
        let norm = tensor(global, region, &self.model.layout().output_norm)?;
        let data = self
            .fwd
            .final_hidden(&norm)
            .map_err(|e| err(None)(e.to_string()))?;
        self.leave(region)?;
        seq.advance(hidden.n_tokens)?;
        Ok(Hidden {
            data,
            n_tokens: hidden.n_tokens,
        })
    }

    fn tokenize(&self, text: &str) -> Option<Result<Vec<u32>>> {
        tokenize_with(self.tokenizer.as_ref(), text)
    }

    fn token_bytes(&self, token: u32) -> Vec<u8> {
        token_bytes_with(self.tokenizer.as_ref(), token)
    }
}

/// Settings of the GPU pipeline (`open_pipeline`).
#[derive(Debug, Clone, Copy)]
pub struct GpuPipelineOptions {
    /// KV cache capacity per sequence, in tokens.
    pub ctx: usize,
    /// Most tokens per step (decode tokens and prompt chunks together).
    pub max_batch: usize,
    /// Most sequences per step (continuous batching); each has its own KV cache of `ctx`
    /// tokens, allocated when it starts.
    pub max_seqs: usize,
    pub copy_streams: usize,
    /// Device bytes left free beyond KV cache and activations (driver, fragmentation).
    pub margin_bytes: u64,
    /// Prefill GEMMs through the vendor library (cuBLAS) when it loads; `false`: always the
    /// portable kernel (`LayeredOptions::use_blas`; the CLI's `ROCMFORGE_NO_CUBLAS=1`).
    pub vendor_gemm: bool,
    /// `Fast` (default): decode's matrix-vector products take activations quantized to 8 bits
    /// (integer dot products, as the CPU's fast precision); `Exact`: f32 activations
    /// (`LayeredOptions::q8_activations`; the CLI's `--precision`).
    pub precision: Precision,
    /// Opens the vendor GEMM (cuBLAS: ~0.15 s of library loading) when the runtime has nothing
    /// to do (default `true`), so a server's first long prompt does not wait for it; `false`
    /// leaves it to the first prompt that needs a GEMM. A one-shot command (`run`) turns it
    /// off: its request arrives as the runtime starts and it exits right after the answer,
    /// while the loading's driver calls would compete with both.
    pub idle_gemm_open: bool,
    /// The prefix cache (prompts' full KV blocks kept in the pool for new sequences that start
    /// alike, shared rather than computed again): 0 turns it off; otherwise these bytes are
    /// kept free beside the weights (the default weight budget leaves them to the KV pool,
    /// where cached blocks live until the pool runs short and frees them, least recently
    /// used first).
    pub prefix_cache_bytes: u64,
}

impl Default for GpuPipelineOptions {
    fn default() -> Self {
        Self {
            ctx: 4096,
            max_batch: 512,
            max_seqs: crate::pipeline::batch::DEFAULT_MAX_NUM_SEQS,
            copy_streams: 2,
            margin_bytes: 512 << 20,
            vendor_gemm: true,
            precision: Precision::Fast,
            idle_gemm_open: true,
            prefix_cache_bytes: DEFAULT_PREFIX_CACHE_BYTES,
        }
    }
}

/// [`GpuPipelineOptions::prefix_cache_bytes`]' default: 512 MiB (~4,000 positions of an
/// 8B-shape model with 8 KV heads, ~23,000 of SmolLM2).
pub const DEFAULT_PREFIX_CACHE_BYTES: u64 = 512 << 20;

/// A weight backend and the matching compute for the pipelined runtime.
pub struct PipelineParts {
    pub backend: Arc<dyn WeightBackend>,
    pub compute: ComputeFactory,
    /// The backend that opened (`auto` may have fallen back to the CPU).
    pub kind: BackendKind,
    /// Why `auto` skipped each GPU backend.
    pub fallback: Vec<BackendError>,
}

/// Opens `kind` for the pipelined runtime over `file`: `None` for the CPU (the runtime's
/// defaults), the GPU backend and compute otherwise: `GpuBackend<D>` and `GpuLayered<D>` for
/// CUDA and HIP alike. `cuda`/`hip` fail with the reason (no driver, not compiled); `auto`
/// falls back to the CPU.
pub fn open_pipeline(
    kind: BackendKind,
    file: &GgufFile,
    opt: GpuPipelineOptions,
) -> Result<Option<PipelineParts>> {
    open_pipeline_on(Backend::open(kind)?, file, opt, None)
}

/// Host memory for the staging ring, faulted in while the driver initialised (see
/// [`open_pipeline_on`]): `slots` slots of `slot_bytes`.
pub struct EarlyStaging {
    pub region: rocmforge::backend::host::HostRegion,
    pub slots: usize,
    pub slot_bytes: usize,
}

/// [`open_pipeline`] on a device opened already (`Backend::open`), so a caller can initialise
/// the driver (~0.2 s for CUDA) on one thread while it parses the model on another, and fault
/// in the staging ring's host memory on a third (`staging`: registered here, first thing).
pub fn open_pipeline_on(
    (backend, fallback): (Backend, Fallback),
    file: &GgufFile,
    opt: GpuPipelineOptions,
    staging: Option<EarlyStaging>,
) -> Result<Option<PipelineParts>> {
    let model = Model::from_file(file.clone()).map_err(|e| err(None)(e.to_string()))?;
    let lopt = LayeredOptions {
        ctx: opt.ctx,
        max_batch: opt.max_batch,
        use_blas: opt.vendor_gemm,
        max_seqs: opt.max_seqs,
        q8_activations: opt.precision == Precision::Fast,
    };
    // The compute's KV cache and activations are allocated after the budget is set, so the
    // budget's default (free memory minus this) leaves room for them.
    let reserve = lopt.reserve_bytes(model.hparams(), model.n_vocab()) as u64
        + opt.margin_bytes
        + opt.prefix_cache_bytes;
    let gcfg = |name| GpuConfig {
        name,
        copy_streams: opt.copy_streams,
        reserve_bytes: reserve,
    };
    let kind = backend.kind();
    let (backend, compute) = match backend {
        Backend::Cpu => return Ok(None),
        Backend::Cuda(dev) => gpu_parts(dev, gcfg("cuda"), lopt, staging, opt)?,
        Backend::Hip(dev) => hip_parts(dev, gcfg("hip"), lopt, staging, opt)?,
    };
    Ok(Some(PipelineParts {
        backend,
        compute,
        kind,
        fallback: fallback.reasons,
    }))
}

/// The weight backend and the compute factory on device `dev`: the same generic code for every
/// vendor (issue 7 item 4).
fn gpu_parts<D: KernelDevice>(
    dev: Arc<D>,
    cfg: GpuConfig,
    lopt: LayeredOptions,
    staging: Option<EarlyStaging>,
    opt: GpuPipelineOptions,
) -> Result<(Arc<dyn WeightBackend>, ComputeFactory)> {
    let gb = GpuBackend::new(dev.clone(), cfg)?;
    if let Some(s) = staging {
        let _s = tracing::info_span!("register_staging", bytes = s.region.len()).entered();
        if let Err(e) = gb.prepare_staging(s.region, s.slots, s.slot_bytes) {
            // The runtime allocates its ring itself then.
            tracing::info!(error = %e, "early staging ring not registered");
        }
    }
    // After the registration: module loads and the ring's registration contend for the driver.
    rocmforge::backend::gpu::preload_kernels(dev.clone());
    let wb: Arc<dyn WeightBackend> = Arc::new(gb);
    // The device's KV cache is sized by `lopt`; of `ComputeSettings` only the host layers apply.
    let factory: ComputeFactory = Arc::new(move |file: &GgufFile, settings| {
        let model = Model::from_file(file.clone()).map_err(|e| err(None)(e.to_string()))?;
        let fwd =
            GpuLayered::new(dev.clone(), &model, lopt).map_err(|e| err(None)(e.to_string()))?;
        let n = model.hparams().n_layer;
        let host: Vec<usize> = (n.saturating_sub(settings.host_layers)..n).collect();
        let precision = if lopt.q8_activations {
            Precision::Fast
        } else {
            Precision::Exact
        };
        let mut compute = GpuCompute::new(fwd, file)?
            .with_host_layers(&host, precision)?
            .with_prefix_cache(opt.prefix_cache_bytes);
        compute.idle_gemm_open = opt.idle_gemm_open;
        Ok(Box::new(compute) as Box<dyn ModelCompute>)
    });
    Ok((wb, factory))
}

#[cfg(feature = "hip")]
fn hip_parts(
    dev: Arc<rocmforge::backend::hip::HipDevice>,
    cfg: GpuConfig,
    lopt: LayeredOptions,
    staging: Option<EarlyStaging>,
    opt: GpuPipelineOptions,
) -> Result<(Arc<dyn WeightBackend>, ComputeFactory)> {
    // Not run on AMD hardware yet (docs/HIP.md): the code is CUDA's, checked on an H100.
    gpu_parts(dev, cfg, lopt, staging, opt)
}

#[cfg(not(feature = "hip"))]
fn hip_parts(
    _dev: Arc<rocmforge::backend::hip::HipDevice>,
    _cfg: GpuConfig,
    _lopt: LayeredOptions,
    _staging: Option<EarlyStaging>,
    _opt: GpuPipelineOptions,
) -> Result<(Arc<dyn WeightBackend>, ComputeFactory)> {
    // Unreachable in practice: without the feature `Backend::open` never yields HIP.
    Err(BackendError::NotCompiled {
        backend: "HIP",
        feature: "hip",
    }
    .into())
}

// The no-device path only: a HIP GPU run (features `hip` and `gpu-tests`) expects a device.
#[cfg(all(test, not(all(feature = "hip", feature = "gpu-tests"))))]
mod tests {
    use super::*;

    fn empty_gguf() -> (tempfile::TempDir, GgufFile) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        let bytes =
            rocmforge::gguf::write_to_vec(&rocmforge::gguf::Metadata::new(), &[]).expect("gguf");
        std::fs::write(&path, bytes).expect("write");
        let file = GgufFile::open(&path).expect("open");
        (dir, file)
    }

    /// `hip` without the feature says how to enable it; with the feature and no AMD GPU it is
    /// "no HIP device" (the device is opened before the file is read, so any file will do).
    /// Fails where a HIP device opens (it would check nothing); see the module's cfg.
    #[test]
    fn hip_pipeline_without_a_device_is_a_typed_error() {
        let (_dir, file) = empty_gguf();
        let r = open_pipeline(BackendKind::Hip, &file, GpuPipelineOptions::default());
        let Err(e) = r else {
            panic!("a HIP device opened here, so the no-device path cannot be checked");
        };
        let expected = if cfg!(feature = "hip") {
            matches!(
                e,
                RuntimeError::Device(BackendError::NoDevice { backend: "HIP", .. })
            )
        } else {
            matches!(
                e,
                RuntimeError::Device(BackendError::NotCompiled { backend: "HIP", .. })
            )
        };
        assert!(expected, "{e}");
    }
}
