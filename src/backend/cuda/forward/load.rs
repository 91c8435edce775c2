//! Loading a model onto the device: placement plan (resident prefix, streamed tail), device
//! allocations, and the resident uploads queued through the pinned ring.

use super::*;

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

        // Small f32 vectors (norms, biases) in one resident buffer.
        let mut small_host: Vec<f32> = Vec::new();
        let mut push_small = |v: Vec<f32>| {
            let off = small_host.len() * 4;
            small_host.extend(v);
            small_host.resize(align(small_host.len() * 4) / 4, 0.0);
            off
        };
        let on = &layout.output_norm;
        let output_norm = push_small(to_f32(&on.view(bytes), &on.name)?);
        let mut plans = Vec::with_capacity(hp.n_layer);
        for (l, r) in layout.layers.iter().enumerate() {
            let w = model.layer_weights(l);
            let attn_norm = push_small(to_f32(&w.attn_norm, &r.attn_norm.name)?);
            let ffn_norm = push_small(to_f32(&w.ffn_norm, &r.ffn_norm.name)?);
            let mut bias = [None; 3];
            for (i, (bv, br)) in [(&w.bq, &r.bq), (&w.bk, &r.bk), (&w.bv, &r.bv)]
                .into_iter()
                .enumerate()
            {
                if let (Some(bv), Some(br)) = (bv, br) {
                    bias[i] = Some(push_small(to_f32(bv, &br.name)?));
                }
            }
            let mut off = 0;
            let mut mat = |t: &crate::model::TensorRef| {
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
        let mut places = Vec::with_capacity(hp.n_layer);
        let mut used = gbytes;
        let n_slots = if total <= budget { 0 } else { 2 };
        if n_slots > 0 && gbytes + 2 * max_layer > budget {
            return Err(CudaForwardError::BudgetTooSmall {
                budget,
                needed: gbytes + 2 * max_layer,
            });
        }
        used += n_slots * max_layer;
        for p in &plans {
            if used + p.bytes <= budget {
                used += p.bytes;
                places.push(Place::Resident(dev.alloc(p.bytes, "layer weights")?));
            } else {
                places.push(Place::Streamed);
            }
        }
        let slots = (0..n_slots)
            .map(|_| dev.alloc(max_layer, "streaming slot"))
            .collect::<std::result::Result<Vec<_>, _>>()?;

        let stream = dev.new_stream()?;
        let mut ring = match ring {
            Some(r) => r,
            None => PinnedRing::new(&dev, opt.ring)?,
        };
        // Positional reads of the file beat page faults of the mapping; if it cannot be opened
        // again (removed meanwhile?), the mapping still works.
        ring.set_source_file(std::fs::File::open(model.file().path()).ok());
        let ready = (0..ring.copy_streams())
            .map(|_| dev.new_event(false))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let slot_free = [dev.new_event(false)?, dev.new_event(false)?];
        let globals = dev.alloc(gbytes, "global weights")?;
        let smalls = dev.upload(&small_host, "norms and biases")?;
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
        let (blas, blas_note) = if opt.use_blas {
            match Blas::open(&stream) {
                Ok(h) => (Some(h), None),
                Err(why) => (None, Some(why)),
            }
        } else {
            (None, Some("disabled".into()))
        };
        let mut me = Self {
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
                budget,
                device_weight_bytes: used,
                blas: blas_note.map(|n| format!("cuBLAS not used: {n}")),
                ..LoadReport::default()
            },
        };
        me.report.resident_layers = me
            .places
            .iter()
            .filter(|p| matches!(p, Place::Resident(_)))
            .count();
        me.report.streamed_layers = me.hp.n_layer - me.report.resident_layers;
        // Queue uploads: globals, then resident layers in order, packed into the ring's slots.
        me.report.prep_s = t0.elapsed().as_secs_f64();
        let g = DevRange {
            ptr: me.globals.device_ptr(),
            len: me.globals.len_bytes(),
        };
        let mut items = vec![UploadItem {
            src: embd_t.range.clone(),
            dst: g,
            dst_off: 0,
        }];
        if let Some(h) = &layout.output {
            items.push(UploadItem {
                src: h.range.clone(),
                dst: g,
                dst_off: me.head.1,
            });
        }
        for l in 0..me.hp.n_layer {
            if let Place::Resident(buf) = &me.places[l] {
                let dst = DevRange {
                    ptr: buf.device_ptr(),
                    len: buf.len_bytes(),
                };
                items.extend(me.plans[l].mats.iter().map(|m| UploadItem {
                    src: m.src.clone(),
                    dst,
                    dst_off: m.off,
                }));
            }
        }
        me.ring.upload_many(bytes, &items)?;
        me.ring.mark_ready(&me.stream, &me.ready)?;
        me.report.queue_s = t0.elapsed().as_secs_f64();
        me.report.upload = me.ring.stats;
        Ok(me)
    }
}
