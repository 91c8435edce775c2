//! Loading a model onto the device: placement plan (resident prefix, streamed tail), device
//! allocations, and the resident uploads, which run on a loader thread through the pinned ring
//! ([`LoadingRing`]): `load` returns once memory is allocated, and the forward pass waits per
//! group (embedding table, each layer, output head) for exactly the weights it needs.
//!
//! Nothing on this path reads the mapping: F32 norms and biases (the usual case) travel with
//! their layer's matrices through the ring straight into the `smalls` buffer; only other norm
//! types are converted on the host. The cuBLAS handle is created on its own thread and joined
//! at the first prefill that uses it ([`LazyBlas`]).

use super::super::blas::Blas;
use super::super::upload::{LoadProgressWaiter, LoadingRing};
use super::*;
use crate::model::TensorRef;

/// The mapped model file as the loader thread's byte source.
struct ModelBytes(Arc<Model>);

impl AsRef<[u8]> for ModelBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.file().bytes()
    }
}

/// Layout of the `smalls` buffer: f32 vectors at aligned offsets. F32 tensors are copied there
/// verbatim by the ring (`direct`); others are converted into `host` now.
#[derive(Default)]
struct SmallPlan {
    host: Vec<f32>,
    /// Whether `host` holds any converted values (else it is only placeholders).
    converted: bool,
}

impl SmallPlan {
    /// Reserves `t`'s slot; returns its byte offset and, for an F32 tensor, the upload that
    /// fills it (`dst` is set once the buffer exists).
    fn add(&mut self, t: &TensorRef, file: &[u8]) -> Result<(usize, Option<UploadItem>)> {
        let off = self.host.len() * 4;
        let n = t.rows * t.cols;
        let direct = t.ty == GgmlType::F32 && t.range.len() == n * 4;
        if direct {
            self.host.resize(self.host.len() + n, 0.0);
        } else {
            self.host.extend(to_f32(&t.view(file), &t.name)?);
            self.converted = true;
        }
        self.host.resize(align(self.host.len() * 4) / 4, 0.0);
        let item = direct.then(|| UploadItem {
            src: t.range.clone(),
            dst: DevRange { ptr: 0, len: 0 },
            dst_off: off,
        });
        Ok((off, item))
    }

    fn bytes(&self) -> usize {
        self.host.len() * 4
    }
}

/// The cuBLAS handle, created on its own thread once the load is under way (it loads
/// libcublas/libcublasLt: ~0.1 s warm, several tenths from a cold disk) and joined at the first
/// GEMM, so a prompt of [`GEMM_MIN_TOKENS`] or more does not wait for it serially. Callers that
/// know no batch will reach the threshold (the `run` command with a short prompt) disable it
/// through `CudaOptions::use_blas` and never load the libraries.
pub(super) struct LazyBlas {
    /// The creating thread, until the first use joins it.
    pending: Option<std::thread::JoinHandle<std::result::Result<Blas, String>>>,
    /// `None` after the join: disabled, or creation failed (logged once); prefill then uses
    /// token-batched mmvq.
    ready: Option<Blas>,
}

impl LazyBlas {
    fn unavailable() -> Self {
        Self {
            pending: None,
            ready: None,
        }
    }

    /// Starts creating the handle once the loader queued its first layer: cuBLAS
    /// initialisation running while the loader makes its first driver calls stalled those
    /// (H100: slot waits 140-170 ms warm, the first copy queued only after 0.7 s cold), while
    /// started later it costs the loader nothing measurable.
    fn spawn(dev: &CudaDevice, after: Option<LoadProgressWaiter>) -> Self {
        let ctx = Arc::clone(&dev.ctx);
        let t = std::thread::Builder::new()
            .name("rf-cublas".into())
            .spawn(move || {
                if let Some(w) = after {
                    w.wait_queued(1);
                }
                super::super::bind(&ctx).map_err(|e| e.to_string())?;
                Blas::create()
            });
        match t {
            Ok(t) => Self {
                pending: Some(t),
                ready: None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "cuBLAS thread; prefill GEMMs use the portable kernel");
                Self::unavailable()
            }
        }
    }

    /// The handle, joined and bound to `stream` on the first call.
    pub(super) fn get(&mut self, stream: &Stream) -> Option<&mut Blas> {
        if let Some(t) = self.pending.take() {
            let made = t
                .join()
                .unwrap_or_else(|_| Err("the cuBLAS thread panicked".into()))
                .and_then(|mut b| b.set_stream(stream).map(|()| b));
            match made {
                Ok(b) => self.ready = Some(b),
                Err(why) => {
                    tracing::warn!(%why, "cuBLAS unavailable; prefill GEMMs use the portable kernel")
                }
            }
        }
        self.ready.as_mut()
    }
}

impl Drop for LazyBlas {
    fn drop(&mut self) {
        // A detached thread still inside libcublas while the process exits could run into the
        // library's static destructors: wait for it (it is done long before in practice).
        if let Some(t) = self.pending.take() {
            let _ = t.join();
        }
    }
}

impl CudaModel {
    /// Plans placement, allocates device memory and queues every resident upload. Returns
    /// before the copies finished: the first forward waits for them on the device.
    pub fn load(dev: Arc<CudaDevice>, model: Arc<Model>, opt: CudaOptions) -> Result<Self> {
        Self::load_with_ring(dev, model, opt, None)
    }

    /// [`CudaModel::load`] with a ring built beforehand (e.g. on another thread while kernels
    /// load and the model opens: pinning the slots is off the critical path then). `None`
    /// builds one from `opt.ring`.
    pub fn load_with_ring(
        dev: Arc<CudaDevice>,
        model: Arc<Model>,
        opt: CudaOptions,
        ring: Option<PinnedRing>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let hp = model.hparams().clone();
        let freq_scale = match hp.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
            RopeScaling::Yarn { .. } => {
                return Err(CudaForwardError::Unsupported("YaRN RoPE scaling".into()))
            }
        };
        if let Some(what) = hp.beyond_llama_graph() {
            return Err(CudaForwardError::Unsupported(what));
        }
        let layout = model.layout();
        if layout.rope_freqs.is_some() {
            return Err(CudaForwardError::Unsupported(
                "rope_freqs (Llama 3.1 frequency factors)".into(),
            ));
        }
        if hp.head_dim != hp.head_dim_v {
            return Err(CudaForwardError::Unsupported(
                "different K and V head widths".into(),
            ));
        }
        let bytes = model.file().bytes();
        let ctx = opt.ctx.min(hp.n_ctx_train).max(1);
        let b = opt.max_batch.max(1);

        // Small f32 vectors (norms, biases) in one resident buffer; F32 ones come through the
        // ring with their group (`*_smalls`), so no page of the mapping is touched here.
        let mut small = SmallPlan::default();
        let (output_norm, head_small) = small.add(&layout.output_norm, bytes)?;
        let mut plans = Vec::with_capacity(hp.n_layer);
        let mut layer_smalls: Vec<Vec<UploadItem>> = Vec::with_capacity(hp.n_layer);
        for r in &layout.layers {
            let mut items = Vec::new();
            let mut add = |t: &TensorRef| -> Result<usize> {
                let (off, item) = small.add(t, bytes)?;
                items.extend(item);
                Ok(off)
            };
            let attn_norm = add(&r.attn_norm)?;
            let ffn_norm = add(&r.ffn_norm)?;
            let mut bias = [None; 3];
            for (i, br) in [&r.bq, &r.bk, &r.bv].into_iter().enumerate() {
                if let Some(br) = br {
                    bias[i] = Some(add(br)?);
                }
            }
            layer_smalls.push(items);
            let mut off = 0;
            let mut mat = |t: &TensorRef| {
                let m = Mat {
                    m: QMatrix {
                        qtype: t.ty,
                        nrows: t.rows,
                        ncols: t.cols,
                    },
                    off,
                    src: t.range.clone(),
                };
                off += align(m.bytes());
                m
            };
            let mats = [
                mat(&r.wq),
                mat(&r.wk),
                mat(&r.wv),
                mat(&r.wo),
                mat(&r.w_gate),
                mat(&r.w_up),
                mat(&r.w_down),
            ];
            for m in &mats {
                if crate::backend::kernels::qtype_suffix(m.m.qtype).is_none() {
                    return Err(CudaForwardError::Unsupported(format!(
                        "weight type {}",
                        m.m.qtype
                    )));
                }
            }
            plans.push(LayerPlan {
                mats,
                bytes: off,
                attn_norm,
                ffn_norm,
                bias,
            });
        }

        // Globals: embedding table (+ output head when not tied).
        let embd_t = &layout.token_embd;
        let embd = (qmat(&embd_t.view(bytes)), 0usize);
        let mut gbytes = align(embd_t.range.len());
        let head = match &layout.output {
            Some(h) => {
                let hm = (qmat(&h.view(bytes)), gbytes);
                gbytes += align(h.range.len());
                hm
            }
            None => embd,
        };

        // Budget: resident prefix of layers, the rest through two slots.
        let kv_layout = KvLayout {
            n_kv_heads: hp.n_head_kv,
            head_dim: hp.head_dim,
            seq_cap: ctx,
        };
        let kv_bytes = kv_layout.bytes() * 2 * hp.n_layer;
        let max_cols = hp.n_embd.max(hp.n_ff).max(hp.q_dim());
        let tile_rows_bytes = 64 << 20;
        let (free, _) = dev.mem_info()?;
        let work =
            b * (hp.n_embd * 4 + 2 * hp.n_ff + 3 * hp.q_dim()) * 4 + (64 << 20) + b * max_cols * 2;
        let budget = opt
            .weight_budget
            .unwrap_or_else(|| free.saturating_sub(kv_bytes + work + (512 << 20)));
        let total: usize = gbytes + plans.iter().map(|p| p.bytes).sum::<usize>();
        let max_layer = plans.iter().map(|p| p.bytes).max().unwrap_or(0);
        let plan_s = t0.elapsed().as_secs_f64();
        let mut used = gbytes;
        let n_slots = if total <= budget { 0 } else { 2 };
        if n_slots > 0 && gbytes + 2 * max_layer > budget {
            return Err(CudaForwardError::BudgetTooSmall {
                budget,
                needed: gbytes + 2 * max_layer,
            });
        }
        used += n_slots * max_layer;
        let resident: Vec<bool> = plans
            .iter()
            .map(|p| {
                let fits = used + p.bytes <= budget;
                if fits {
                    used += p.bytes;
                }
                fits
            })
            .collect();
        // Declared before the loader: dropped after it (it copies into them).
        let mut places = Vec::with_capacity(hp.n_layer);
        // Every weight buffer is allocated before the loader starts (34 allocations of an 8B
        // model take ~2 ms), so its path holds no driver calls but copies and events; while
        // layers were allocated on this thread as the loader read, allocations and copy
        // queueing stalled each other by up to ~50 ms (H100, `...-v4-call1.txt`).
        let t_alloc = Instant::now();
        let globals = dev.alloc(gbytes, "global weights")?;
        let smalls = if small.converted {
            dev.upload(&small.host, "norms and biases")?
        } else {
            dev.alloc(small.bytes(), "norms and biases")?
        };
        for (l, &res) in resident.iter().enumerate() {
            places.push(if res {
                Place::Resident(dev.alloc(plans[l].bytes, "layer weights")?)
            } else {
                Place::Streamed
            });
        }
        let mut alloc_s = t_alloc.elapsed().as_secs_f64();

        let mut ring = match ring {
            Some(r) => r,
            None => PinnedRing::new(&dev, opt.ring)?,
        };
        // Positional reads of the file beat page faults of the mapping; if it cannot be opened
        // again (removed meanwhile?), the mapping still works.
        ring.set_source_file(std::fs::File::open(model.file().path()).ok());
        let n_copy = ring.copy_streams();
        // Groups in the order the forward pass needs them: embedding table, each resident
        // layer (its norms with it), output norm and head. Within a group, file order.
        let range = |b: &DeviceBuf| DevRange {
            ptr: b.device_ptr(),
            len: b.len_bytes(),
        };
        let (g, sm) = (range(&globals), range(&smalls));
        let mut groups: Vec<Vec<UploadItem>> = Vec::with_capacity(resident.len() + 2);
        groups.push(vec![UploadItem {
            src: embd_t.range.clone(),
            dst: g,
            dst_off: 0,
        }]);
        // Norms of streamed layers stay resident too: they travel with the last group (the
        // first streamed layer joins the loader before it runs).
        let mut late_smalls: Vec<UploadItem> = Vec::new();
        for (l, place) in places.iter().enumerate() {
            let smalls_l = layer_smalls[l].iter().map(|it| UploadItem {
                dst: sm,
                ..it.clone()
            });
            let Place::Resident(buf) = place else {
                late_smalls.extend(smalls_l);
                continue;
            };
            let dst = range(buf);
            let mut items: Vec<UploadItem> = plans[l]
                .mats
                .iter()
                .map(|m| UploadItem {
                    src: m.src.clone(),
                    dst,
                    dst_off: m.off,
                })
                .collect();
            items.extend(smalls_l);
            items.sort_by_key(|it| it.src.start);
            groups.push(items);
        }
        let mut head_items: Vec<UploadItem> = head_small
            .iter()
            .map(|it| UploadItem {
                dst: sm,
                ..it.clone()
            })
            .collect();
        head_items.append(&mut late_smalls);
        if let Some(h) = &layout.output {
            head_items.push(UploadItem {
                src: h.range.clone(),
                dst: g,
                dst_off: head.1,
            });
        }
        head_items.sort_by_key(|it| it.src.start);
        groups.push(head_items);
        // The remaining allocations (stream, events, streaming slots, KV cache, scratch; ~1 ms)
        // also come before the loader starts, for the same reason.
        let t_alloc = Instant::now();
        let stream = dev.new_stream()?;
        let ready = (0..n_copy)
            .map(|_| dev.new_event(false))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let slot_free = [dev.new_event(false)?, dev.new_event(false)?];
        let slots = (0..n_slots)
            .map(|_| dev.alloc(max_layer, "streaming slot"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let kv = dev.alloc(kv_bytes, "KV cache")?;
        let f = |n: usize, what: &str| dev.alloc(n.max(1), what);
        let s = Scratch {
            hidden: f(b * hp.n_embd * 4, "scratch")?,
            xn: f(b * hp.n_embd.max(hp.q_dim()) * 4, "scratch")?,
            q: f(b * hp.q_dim() * 4, "scratch")?,
            k: f(b * hp.k_dim() * 4, "scratch")?,
            v: f(b * hp.v_dim() * 4, "scratch")?,
            attn: f(b * hp.q_dim() * 4, "scratch")?,
            proj: f(b * hp.n_embd * 4, "scratch")?,
            gate: f(b * hp.n_ff * 4, "scratch")?,
            up: f(b * hp.n_ff * 4, "scratch")?,
            logits: f(layout.n_vocab * 4, "logits")?,
            ids: f(b * 4, "ids")?,
            pos: f(b * 4, "positions")?,
            status: f(4, "status")?,
            tok: f(4, "token")?,
            x16: f(b * max_cols * 2, "f16 activations")?,
            w16: f(tile_rows_bytes, "f16 weight tile")?,
        };
        alloc_s += t_alloc.elapsed().as_secs_f64();
        let ring = LoadingRing::spawn(&dev, ring, ModelBytes(Arc::clone(&model)), groups, t0)?;
        let prep_s = t0.elapsed().as_secs_f64();
        let blas = if opt.use_blas {
            LazyBlas::spawn(&dev, ring.progress())
        } else {
            LazyBlas::unavailable()
        };
        let resident_layers = places
            .iter()
            .filter(|p| matches!(p, Place::Resident(_)))
            .count();
        let streamed_layers = hp.n_layer - resident_layers;
        Ok(Self {
            dev,
            hp,
            model: Arc::clone(&model),
            stream,
            ring,
            ready,
            slot_free,
            slots,
            globals,
            embd,
            head,
            output_norm,
            smalls,
            plans,
            places,
            kv,
            kv_layout,
            s,
            blas,
            max_batch: b,
            tile_rows_bytes,
            pos: 0,
            freq_scale,
            report: LoadReport {
                weight_bytes: total as u64,
                resident_layers,
                streamed_layers,
                budget,
                device_weight_bytes: used,
                blas: (!opt.use_blas).then(|| "cuBLAS not used: disabled".to_string()),
                plan_s,
                prep_s,
                alloc_s,
                queue_s: t0.elapsed().as_secs_f64(),
                ..LoadReport::default()
            },
        })
    }

    /// Makes the compute stream wait for the weights of `group` (blocking the host only until
    /// the loader queued them; see [`LoadingRing::wait_group`]).
    pub(super) fn wait_loaded(&mut self, group: LoadGroup) -> Result<()> {
        let resident = |ps: &[Place]| {
            ps.iter()
                .filter(|p| matches!(p, Place::Resident(_)))
                .count()
        };
        let g = match group {
            LoadGroup::Embedding => 0,
            LoadGroup::Layer(l) => match self.places.get(l) {
                Some(Place::Resident(_)) => 1 + resident(&self.places[..l]),
                // Streamed layers are not part of the load.
                _ => return Ok(()),
            },
            LoadGroup::Head => 1 + resident(&self.places),
        };
        self.ring.wait_group(g, &self.stream)?;
        Ok(())
    }
}

/// What the forward pass is about to use (see [`CudaModel::wait_loaded`]).
#[derive(Debug, Clone, Copy)]
pub(super) enum LoadGroup {
    Embedding,
    Layer(usize),
    Head,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `smalls` buffer assembled as the device gets it (host conversions, then the ring's
    /// verbatim copies of F32 tensors) equals converting every norm on the host, on a real
    /// model with non-trivial norms (the synthetic ones are all ones).
    #[test]
    fn smalls_through_the_ring_equal_host_conversion() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.exists() {
            eprintln!(
                "skipped: {} not present (scripts/fetch-model.sh)",
                path.display()
            );
            return;
        }
        let model = Model::open(&path).expect("open SmolLM2");
        let file = model.file().bytes();
        let layout = model.layout();
        let mut plan = SmallPlan::default();
        let mut direct = Vec::new();
        let mut expect: Vec<(usize, Vec<f32>)> = Vec::new();
        let mut tensors = vec![&layout.output_norm];
        for r in &layout.layers {
            tensors.extend([&r.attn_norm, &r.ffn_norm]);
            tensors.extend([&r.bq, &r.bk, &r.bv].into_iter().flatten());
        }
        for t in tensors {
            let (off, item) = plan.add(t, file).expect("plan");
            direct.extend(item);
            expect.push((off, to_f32(&t.view(file), &t.name).expect("convert")));
        }
        assert!(
            !direct.is_empty(),
            "SmolLM2's norms are F32: they go through the ring"
        );
        let mut dev: Vec<u8> = plan.host.iter().flat_map(|v| v.to_le_bytes()).collect();
        for it in &direct {
            dev[it.dst_off..it.dst_off + it.src.len()].copy_from_slice(&file[it.src.clone()]);
        }
        assert!(
            expect.iter().any(|(_, w)| w.iter().any(|&v| v != 1.0)),
            "norms that are not all ones"
        );
        for (off, want) in expect {
            assert_eq!(off % ALIGN, 0);
            let got: Vec<f32> = dev[off..off + want.len() * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            assert_eq!(got, want, "norm at offset {off}");
        }
    }
}
