//! The llama-family forward pass on CUDA: weights stay quantized in device memory (one
//! allocation per layer), decode runs the mmvq kernels, prefill runs cuBLAS f16 GEMMs over
//! dequantized weight tiles (the portable `gemm.cu` kernel when cuBLAS is absent), the KV cache
//! is f16 and sampling happens on the device (only the token id comes back) whenever the sampler
//! settings allow it.
//!
//! Loading goes through the pinned ring (`upload.rs`); the compute stream waits on each upload
//! on the device, so the first forward is queued while weights are still copying. With a weight
//! budget below the model, a prefix of layers stays resident and the rest stream through two
//! device slots per forward (a slot is overwritten only after the compute that read it ended).
//!
//! The layer itself is the vendor-neutral `backend::gpu::layer::run_layer`, shared with
//! `GpuLayered` (`pipeline.rs`: `CudaLayered`), which runs the same pass step by step over weights
//! the pipelined runtime's actors keep resident. Only loading and streaming are CUDA-specific here.

mod load;
pub mod pipeline;

pub use crate::backend::gpu::layer::GEMM_MIN_TOKENS;
use crate::backend::gpu::layer::{run_layer, Gemm, LayerCtx, LayerViews, Scratch};
pub use crate::backend::gpu::GpuForwardError;
use crate::backend::gpu::{view, GemmF16, PortableGemm, View};

use super::memory::DeviceBuf;
use super::stream::{Event, Stream};
use super::upload::{DevRange, LoadingRing, PinnedRing, RingConfig, UploadItem, UploadStats};
use super::CudaDevice;
use crate::backend::error::BackendError;
use crate::backend::gpu::ops::{GpuOps, KvLayout, QMatrix, SampleParams};
use crate::backend::{ComputeDevice, DeviceBuffer, DeviceStream};
use crate::model::{
    Generation, HParams, Model, ModelError, RopeScaling, StopReason, Timings, WeightView,
};
use crate::quant::GgmlType;
use crate::sample::Sampler;
use half::f16;
use load::LoadGroup;
use rand::{Rng, SeedableRng};
use std::ops::{ControlFlow, Range};
use std::sync::Arc;
use std::time::Instant;

/// The forward passes' error under its CUDA name (one type for every vendor).
pub type CudaForwardError = GpuForwardError;

type Result<T> = std::result::Result<T, CudaForwardError>;

/// Options of [`CudaModel::load`].
#[derive(Debug, Clone, Copy)]
pub struct CudaOptions {
    /// KV cache capacity in tokens.
    pub ctx: usize,
    /// Tokens per prefill batch (scratch buffers are sized for it).
    pub max_batch: usize,
    /// Device bytes for weights; `None`: free memory minus KV cache, workspace and a margin.
    pub weight_budget: Option<usize>,
    pub ring: RingConfig,
    /// Use cuBLAS for prefill when available (off, or cuBLAS absent: batches of
    /// [`GEMM_MIN_TOKENS`] or more run the portable `gemm.cu` kernel, and the libraries are
    /// never loaded).
    pub use_blas: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        Self {
            ctx: 4096,
            max_batch: 512,
            weight_budget: None,
            ring: RingConfig::default(),
            use_blas: true,
        }
    }
}

const ALIGN: usize = 256;
fn align(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// One matrix: shape, offset in its layer's device region, byte range in the file.
#[derive(Debug, Clone)]
struct Mat {
    m: QMatrix,
    off: usize,
    src: Range<usize>,
}

impl Mat {
    fn bytes(&self) -> usize {
        self.src.len()
    }
}

/// Per-layer plan: 7 matrices (q, k, v, o, gate, up, down) in one region; norms/biases as f32
/// at offsets of the always-resident `smalls` buffer.
#[derive(Debug, Clone)]
struct LayerPlan {
    mats: [Mat; 7],
    bytes: usize,
    attn_norm: usize,
    ffn_norm: usize,
    bias: [Option<usize>; 3],
}

enum Place {
    Resident(DeviceBuf),
    Streamed,
}

/// Timings and sizes of [`CudaModel::load`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LoadReport {
    pub weight_bytes: u64,
    pub resident_layers: usize,
    pub streamed_layers: usize,
    /// Device bytes holding weights (globals + resident layers + streaming slots).
    pub device_weight_bytes: usize,
    pub budget: usize,
    /// Host time until `load` returned (the uploads go on on the loader thread; its queueing
    /// time is `upload.queued_s`).
    pub queue_s: f64,
    /// Of `queue_s`: until the loader thread started (planning, norm conversion and every
    /// device allocation come first; the ring itself is in `upload.ring_alloc_s`, zero here
    /// when it was built beforehand).
    pub prep_s: f64,
    /// Of `prep_s`: planning and the budget query before the first allocation.
    pub plan_s: f64,
    /// Of `queue_s`: device allocations (all made before the loader starts).
    pub alloc_s: f64,
    /// Until the last copy completed.
    pub resident_s: f64,
    pub upload: UploadStats,
    pub blas: Option<String>,
}

pub struct CudaModel {
    dev: Arc<CudaDevice>,
    hp: HParams,
    /// The mapped file the weights come from (streamed layers re-read it every forward).
    model: Arc<Model>,
    stream: Stream,
    /// Dropped before the device memory below: it stops and drains the loader.
    ring: LoadingRing,
    ready: Vec<Event>,
    slot_free: [Event; 2],
    slots: Vec<DeviceBuf>,
    globals: DeviceBuf,
    embd: (QMatrix, usize),
    head: (QMatrix, usize),
    output_norm: usize,
    smalls: DeviceBuf,
    plans: Vec<LayerPlan>,
    places: Vec<Place>,
    kv: DeviceBuf,
    kv_layout: KvLayout,
    s: Scratch<DeviceBuf>,
    /// Created at the first GEMM (see `load::LazyBlas`).
    blas: load::LazyBlas,
    max_batch: usize,
    tile_rows_bytes: usize,
    pos: usize,
    freq_scale: f32,
    pub report: LoadReport,
}

fn qmat(v: &WeightView) -> QMatrix {
    QMatrix {
        qtype: v.ty,
        nrows: v.rows,
        ncols: v.cols,
    }
}

fn to_f32(v: &WeightView, name: &str) -> Result<Vec<f32>> {
    let mut out = vec![0f32; v.rows * v.cols];
    crate::model::ops::dequantize(v, &name, &mut out)?;
    Ok(out)
}

impl CudaModel {
    /// Blocks until every resident weight is on the device (for load measurements).
    pub fn wait_resident(&mut self, since: Instant) -> Result<()> {
        let ring = self.ring.ring(&self.stream)?;
        ring.drain()?;
        self.report.resident_s = since.elapsed().as_secs_f64();
        self.report.upload = ring.stats;
        Ok(())
    }

    pub fn hparams(&self) -> &HParams {
        &self.hp
    }

    pub fn n_vocab(&self) -> usize {
        self.model.n_vocab()
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn ctx(&self) -> usize {
        self.kv_layout.seq_cap
    }

    /// Forgets the cached sequence (the KV cache is overwritten from position 0).
    pub fn reset(&mut self) {
        self.pos = 0;
    }

    /// The device region of layer `l`'s matrices, uploading it first when streamed.
    fn layer_region(&mut self, l: usize, streamed_idx: &mut usize) -> Result<View> {
        self.wait_loaded(LoadGroup::Layer(l))?;
        match &self.places[l] {
            Place::Resident(b) => Ok(View {
                ptr: b.device_ptr(),
                len: b.len_bytes(),
            }),
            Place::Streamed => {
                let si = *streamed_idx % 2;
                *streamed_idx += 1;
                let slot = View {
                    ptr: self.slots[si].device_ptr(),
                    len: self.slots[si].len_bytes(),
                };
                // The copy must not start before the last compute reading this slot ended.
                let ring = self.ring.ring(&self.stream)?;
                ring.wait_for(&self.slot_free[si])?;
                let bytes = self.model.file().bytes();
                let dst = DevRange {
                    ptr: slot.ptr,
                    len: slot.len,
                };
                let items: Vec<UploadItem> = self.plans[l]
                    .mats
                    .iter()
                    .map(|m| UploadItem {
                        src: m.src.clone(),
                        dst,
                        dst_off: m.off,
                    })
                    .collect();
                ring.upload_many(bytes, &items)?;
                ring.mark_ready(&self.stream, &self.ready)?;
                Ok(slot)
            }
        }
    }

    /// Runs `tokens` through the model at positions `pos..`, leaving the last position's
    /// logits in device memory.
    fn forward_batch(&mut self, tokens: &[u32]) -> Result<()> {
        let n = tokens.len();
        let hp = self.hp.clone();
        let vocab = self.n_vocab();
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::TokenOutOfRange { token: t, vocab }.into());
        }
        if self.pos + n > self.ctx() {
            return Err(ModelError::ContextOverflow {
                needed: self.pos + n,
                ctx: self.ctx(),
            }
            .into());
        }
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let pos: Vec<i32> = (0..n).map(|i| (self.pos + i) as i32).collect();
        // `ids` and `pos` are rewritten with synchronous copies, which do not wait for the
        // compute stream: the previous batch's kernels (rope reads `pos` in every layer) must
        // have finished first. A prompt longer than `max_batch` queues batches back to back,
        // and without this wait the second batch's positions raced the first batch's layers
        // (seen on the H100 as run-to-run differences on a 66-token prompt with batches of 64).
        // Decode steps already end with a synchronize, so this costs them nothing.
        self.stream.synchronize()?;
        self.s.ids.write(0, &ids)?;
        self.s.pos.write(0, &pos)?;
        self.wait_loaded(LoadGroup::Embedding)?;
        let dev = Arc::clone(&self.dev);
        let st = &self.stream;
        let d = hp.n_embd;
        let g = View {
            ptr: self.globals.device_ptr(),
            len: self.globals.len_bytes(),
        };
        let embd = view(
            &g,
            self.embd.1,
            self.embd
                .0
                .qtype
                .row_bytes(self.embd.0.ncols as u64)
                .unwrap_or(0) as usize
                * self.embd.0.nrows,
        )?;
        dev.get_rows(
            st,
            &embd,
            self.embd.0,
            &self.s.ids,
            n,
            &self.s.hidden,
            &self.s.status,
        )?;
        let sm = View {
            ptr: self.smalls.device_ptr(),
            len: self.smalls.len_bytes(),
        };
        let kv = View {
            ptr: self.kv.device_ptr(),
            len: self.kv.len_bytes(),
        };
        let mut streamed = 0usize;
        // Batches that reach the GEMM threshold use cuBLAS, or this kernel when it is absent.
        let mut portable = PortableGemm;
        for l in 0..hp.n_layer {
            let region = self.layer_region(l, &mut streamed)?;
            let plan = &self.plans[l];
            let mat = |i: usize| -> Result<(View, QMatrix)> {
                let m = &plan.mats[i];
                Ok((view(&region, m.off, m.bytes())?, m.m))
            };
            let bias = |i: usize| -> Result<Option<View>> {
                plan.bias[i]
                    .map(|off| view(&sm, off, plan.mats[i].m.nrows * 4))
                    .transpose()
            };
            let w = LayerViews {
                mats: [
                    mat(0)?,
                    mat(1)?,
                    mat(2)?,
                    mat(3)?,
                    mat(4)?,
                    mat(5)?,
                    mat(6)?,
                ],
                attn_norm: view(&sm, plan.attn_norm, d * 4)?,
                ffn_norm: view(&sm, plan.ffn_norm, d * 4)?,
                bias: [bias(0)?, bias(1)?, bias(2)?],
            };
            let mut cx = LayerCtx {
                dev: &*dev,
                stream: &self.stream,
                s: &self.s,
                gemm: Gemm {
                    // cuBLAS is joined (created on its own thread) only by a batch that uses it.
                    engine: if n >= GEMM_MIN_TOKENS {
                        match self.blas.get(&self.stream) {
                            Some(b) => Some(b as &mut dyn GemmF16<CudaDevice>),
                            None => Some(&mut portable),
                        }
                    } else {
                        None
                    },
                    tile_rows_bytes: self.tile_rows_bytes,
                },
                hp: &hp,
                kv,
                kv_layout: self.kv_layout,
                pos: self.pos,
                n,
                freq_scale: self.freq_scale,
            };
            run_layer(&mut cx, l, &w)?;
            if matches!(self.places[l], Place::Streamed) {
                self.stream.record(&self.slot_free[(streamed - 1) % 2])?;
            }
        }
        let v = |b: &DeviceBuf, floats: usize| View {
            ptr: b.device_ptr(),
            len: floats * 4,
        };
        let (hidden, xn) = (v(&self.s.hidden, n * d), v(&self.s.xn, n * d));
        // Output head on the last position (the output norm travels with it).
        self.wait_loaded(LoadGroup::Head)?;
        let last = view(&hidden, (n - 1) * d * 4, d * 4)?;
        let xn0 = view(&xn, 0, d * 4)?;
        dev.rmsnorm(
            &self.stream,
            &last,
            &view(&sm, self.output_norm, d * 4)?,
            &xn0,
            1,
            d,
            hp.rms_eps,
        )?;
        let hb = self
            .head
            .0
            .qtype
            .row_bytes(self.head.0.ncols as u64)
            .unwrap_or(0) as usize
            * self.head.0.nrows;
        let head = view(&g, self.head.1, hb)?;
        dev.mmvq(&self.stream, &head, self.head.0, &xn0, &self.s.logits)?;
        self.pos += n;
        Ok(())
    }

    /// Runs `tokens` (prefill in batches of `max_batch`) and returns the last logits (copied
    /// back: for tests and host-side sampling).
    pub fn forward_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward_tokens(tokens)?;
        self.stream.synchronize()?;
        Ok(self.s.logits.to_vec::<f32>(self.n_vocab())?)
    }

    fn forward_tokens(&mut self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(ModelError::EmptyPrompt.into());
        }
        for c in tokens.chunks(self.max_batch) {
            self.forward_batch(c)?;
        }
        Ok(())
    }

    /// Picks the next token on the device (greedy, or temperature + top-k + top-p with `u`).
    fn sample_device(&mut self, temperature: f32, top_k: usize, top_p: f32, u: f32) -> Result<u32> {
        let n = self.n_vocab();
        if temperature <= 0.0 {
            self.dev
                .argmax(&self.stream, &self.s.logits, n, &self.s.tok)?;
        } else {
            let top_k = if top_k == 0 {
                crate::backend::gpu::ops::SAMPLE_MAX_TOPK
            } else {
                top_k
            };
            let sp = SampleParams {
                top_k,
                top_p,
                temperature,
                u,
            };
            self.dev
                .sample(&self.stream, &self.s.logits, n, sp, &self.s.tok)?;
        }
        self.stream.synchronize()?;
        let t = self.s.tok.to_vec::<i32>(1)?[0];
        u32::try_from(t).map_err(|_| {
            BackendError::KernelReported {
                kernel: "sample".into(),
                what: format!("token {t}"),
            }
            .into()
        })
    }

    /// Prefills the part of `context` past `pos()` and decodes up to `max_new` tokens, like
    /// `model::generate`. Sampling runs on the device when the sampler's settings allow it
    /// (no penalties, no min-p unless greedy); otherwise logits come back to the host sampler.
    pub fn generate(
        &mut self,
        sampler: &mut Sampler,
        context: &[u32],
        max_new: usize,
        is_eog: impl Fn(u32) -> bool,
        mut on_token: impl FnMut(u32) -> ControlFlow<()>,
    ) -> Result<Generation> {
        let prompt = context.get(self.pos..).unwrap_or(&[]).to_vec();
        if prompt.is_empty() {
            return Err(ModelError::EmptyPrompt.into());
        }
        let p = sampler.params().clone();
        let neutral =
            p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0;
        let on_device = neutral && (p.temperature <= 0.0 || p.min_p <= 0.0);
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(sampler.seed());
        let mut all = context.to_vec();
        // `max_new` comes from a user: bound the allocation by the context, not by it.
        let mut ids = Vec::with_capacity(max_new.min(self.ctx().saturating_sub(self.pos)));
        let mut timings = Timings {
            prompt_tokens: prompt.len(),
            ..Timings::default()
        };
        let mut pick = |me: &mut Self, all: &[u32]| -> Result<u32> {
            if on_device {
                let u: f32 = rng.gen::<f32>().min(0.999_999);
                me.sample_device(p.temperature, p.top_k, p.top_p, u)
            } else {
                me.stream.synchronize()?;
                let logits = me.s.logits.to_vec::<f32>(me.n_vocab())?;
                Ok(sampler.sample(&logits, all))
            }
        };
        let t0 = Instant::now();
        self.forward_tokens(&prompt)?;
        if max_new == 0 {
            self.stream.synchronize()?;
            timings.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
            return Ok(Generation::finish(ids, StopReason::Length, timings));
        }
        let mut next = pick(self, &all)?;
        timings.prompt_ms = t0.elapsed().as_secs_f64() * 1e3;
        let t1 = Instant::now();
        let stop = loop {
            ids.push(next);
            all.push(next);
            if is_eog(next) {
                break StopReason::Eog;
            }
            if on_token(next).is_break() {
                break StopReason::Callback;
            }
            if ids.len() >= max_new {
                break StopReason::Length;
            }
            if self.pos >= self.ctx() {
                break StopReason::Context;
            }
            self.forward_batch(&[next])?;
            timings.decode_tokens += 1;
            next = pick(self, &all)?;
        };
        timings.decode_ms = t1.elapsed().as_secs_f64() * 1e3;
        Ok(Generation::finish(ids, stop, timings))
    }

    /// `n` decode steps from the current position with greedy device sampling (bench `tg`).
    pub fn decode_steps(&mut self, first: u32, n: usize) -> Result<u32> {
        let mut t = first;
        for _ in 0..n {
            self.forward_batch(&[t])?;
            t = self.sample_device(0.0, 1, 1.0, 0.0)?;
        }
        Ok(t)
    }

    /// Prefill of `tokens` into the cache, waiting for the device (bench `pp`).
    pub fn prefill(&mut self, tokens: &[u32]) -> Result<()> {
        self.forward_tokens(tokens)?;
        self.stream.synchronize()?;
        Ok(())
    }
}

/// f16 helper kept for tests comparing the cache layout.
#[allow(dead_code)]
fn f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

#[allow(dead_code)]
fn is_quantized(t: GgmlType) -> bool {
    !matches!(t, GgmlType::F32 | GgmlType::F16)
}
