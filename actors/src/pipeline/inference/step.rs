//! One step of the Inference actor: the batch's tokens embedded, every unit run once for
//! all of its sequences (waiting on the residency board before each), and the logits of the
//! sequences that want them, from the global unit or a streamed head's row chunks.

use super::{Inference, Running};
use crate::compute::{BatchSeq, Hidden, ModelCompute, RowLogits, SequenceState};
use crate::error::{Result, RuntimeError};
use crate::messages::Stage;
use crate::pipeline::batch::batch_bucket;
use crate::pipeline::residency::ResidentLayer;
use crate::pipeline::scheduler::SchedMsg;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

impl Inference {
    /// Runs `take[i]` tokens of each running sequence `i` (0: not in this step) through the
    /// model; returns the logits of those whose input this step consumes, in order.
    pub(super) fn run_step(
        &mut self,
        running: &mut [Running],
        take: &[usize],
    ) -> Result<Vec<RowLogits>> {
        let tokens: Vec<u32> = running
            .iter()
            .zip(take)
            .flat_map(|(r, &t)| r.input[..t].iter().copied())
            .collect();
        let n_seqs = take.iter().filter(|&&t| t > 0).count();
        let _span =
            tracing::info_span!("step", sequences = n_seqs, tokens = tokens.len()).entered();
        let c = &self.cfg.shared.counters;
        c.batch_steps[batch_bucket(n_seqs)].fetch_add(1, Ordering::Relaxed);
        c.batch_step_tokens
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        c.batch_step_seqs
            .fetch_add(n_seqs as u64, Ordering::Relaxed);
        // Whose client is still there: a step whose every sequence was cancelled stops early.
        let clients: Vec<(CancellationToken, flume::Sender<_>)> = running
            .iter()
            .zip(take)
            .filter(|(_, &t)| t > 0)
            .map(|(r, _)| (r.job.cancel.clone(), r.job.events.clone()))
            .collect();
        let all_gone = || {
            clients
                .iter()
                .all(|(c, e)| c.is_cancelled() || e.is_disconnected())
        };
        let cancel = self.cfg.cancel.clone();
        let mut hidden = self.embed_tokens(&cancel, &tokens)?;
        let mut batch: Vec<BatchSeq> = running
            .iter_mut()
            .zip(take)
            .filter(|(_, &t)| t > 0)
            .map(|(r, &t)| BatchSeq {
                wants_logits: t == r.input.len(),
                greedy: r.greedy_only(),
                seq: &mut r.slot.state,
                rows: t,
            })
            .collect();
        for l in 0..self.cfg.plan.n_layers {
            if all_gone() {
                return Err(RuntimeError::Cancelled);
            }
            // Pollers that gave up during a wait for a streamed unit start again (`warm`).
            if self.compute.host_parallel() {
                self.warm.arm();
            }
            match self.cfg.plan.experts_of(l) {
                None => self.with_unit(&cancel, l, |c, w| {
                    c.layer_batch(l, w, &mut batch, &mut hidden)
                })?,
                Some(units) => self.routed_layer(&cancel, l, units, &mut batch, &mut hidden)?,
            }
        }
        self.output_batch(&cancel, &mut batch, &hidden)
    }

    /// A mixture-of-experts layer whose experts are units of their own: the layer's unit up to
    /// the router, the scheduler told which experts were chosen (so it loads them in order),
    /// each chosen expert from its unit, then the residual add.
    fn routed_layer(
        &mut self,
        cancel: &CancellationToken,
        l: usize,
        units: std::ops::Range<usize>,
        batch: &mut [BatchSeq<'_>],
        hidden: &mut Hidden,
    ) -> Result<()> {
        let chosen = self.with_unit(cancel, l, |c, w| c.layer_routed(l, w, batch, hidden))?;
        let mut ids = Vec::with_capacity(chosen.len());
        for &e in &chosen {
            match units.start.checked_add(e).filter(|&u| u < units.end) {
                Some(u) => ids.push(u),
                None => {
                    return Err(RuntimeError::Compute {
                        layer: Some(l),
                        message: format!("expert {e} chosen of {} experts", units.len()),
                    })
                }
            }
        }
        if self.cfg.shared.counters.wants_done.load(Ordering::SeqCst) {
            let _ = self.cfg.sched.send(SchedMsg::Route { units: ids.clone() });
        }
        for (&e, &u) in chosen.iter().zip(&ids) {
            if cancel.is_cancelled() {
                return Err(RuntimeError::Cancelled);
            }
            self.with_unit(cancel, u, |c, w| c.expert_batch(l, e, w))?;
        }
        let start = Instant::now();
        let r = self.compute.layer_finish(l, hidden);
        self.cfg.shared.add_busy(Stage::Compute, start);
        r
    }

    /// Embedding rows of `tokens`: straight from the file where the compute can (the first
    /// layer then waits for nothing else), else from the global unit.
    fn embed_tokens(&mut self, cancel: &CancellationToken, tokens: &[u32]) -> Result<Hidden> {
        let start = Instant::now();
        let from_file = {
            let _e = tracing::info_span!("embed", tokens = tokens.len()).entered();
            self.compute.embed_from_file(tokens)
        };
        self.cfg.shared.add_busy(Stage::Compute, start);
        let global = self.cfg.plan.global();
        match from_file {
            Some(Ok(h)) => Ok(h),
            // The file cannot be read (changed, I/O error) but the table is resident in the
            // global unit: embed from there, as a compute without file reads does.
            Some(Err(e))
                if self.cfg.plan.head.is_none()
                    && matches!(
                        e,
                        RuntimeError::Read { .. }
                            | RuntimeError::ModelChanged { .. }
                            | RuntimeError::Open { .. }
                    ) =>
            {
                tracing::debug!("embedding from the resident table: {e}");
                self.with_unit(cancel, global, |c, w| c.embed(w, tokens))
            }
            Some(Err(e)) => Err(e),
            None => self.with_unit(cancel, global, |c, w| c.embed(w, tokens)),
        }
    }

    /// Logits of the batch's sequences that want them: from the global unit, or (streamed
    /// head) the global unit's norm followed by the head's row chunks in order, each chunk
    /// fetched once for the whole batch.
    fn output_batch(
        &mut self,
        cancel: &CancellationToken,
        batch: &mut [BatchSeq<'_>],
        hidden: &Hidden,
    ) -> Result<Vec<RowLogits>> {
        let plan = self.cfg.plan.clone();
        let global = plan.global();
        let Some(head) = &plan.head else {
            return self.with_unit(cancel, global, |c, w| c.output_batch(w, batch, hidden));
        };
        let n = self.with_unit(cancel, global, |c, w| {
            c.output_prepare_batch(w, batch, hidden)
        })?;
        let vocab = head.rows as usize;
        let mut logits = vec![vec![0f32; vocab]; n];
        let mut chunk = Vec::new();
        for unit in head.units.clone() {
            let rows = plan.head_rows(unit).unwrap_or(0..0);
            let (lo, hi) = (rows.start as usize, rows.end as usize);
            if hi > vocab || lo > hi {
                return Err(RuntimeError::Config(format!(
                    "head chunk {rows:?} out of range"
                )));
            }
            chunk.resize(n * (hi - lo), 0f32);
            self.with_unit(cancel, unit, |c, w| c.output_rows_batch(w, n, &mut chunk))?;
            for (out, part) in logits.iter_mut().zip(chunk.chunks_exact(hi - lo)) {
                out[lo..hi].copy_from_slice(part);
            }
        }
        Ok(logits.into_iter().map(RowLogits::Full).collect())
    }

    /// An embedding job's pass: `prompt` through every layer of one fresh sequence, then the
    /// final-normed hidden state of every position.
    pub(super) fn embed_forward(
        &mut self,
        cancel: &CancellationToken,
        state: &mut SequenceState,
        prompt: &[u32],
    ) -> Result<Hidden> {
        let mut hidden = self.embed_tokens(cancel, prompt)?;
        for l in 0..self.cfg.plan.n_layers {
            if cancel.is_cancelled() {
                return Err(RuntimeError::Cancelled);
            }
            match self.cfg.plan.experts_of(l) {
                None => self.with_unit(cancel, l, |c, w| c.layer(l, w, state, &mut hidden))?,
                Some(units) => {
                    let mut one = [BatchSeq {
                        wants_logits: false,
                        greedy: false,
                        seq: &mut *state,
                        rows: prompt.len(),
                    }];
                    self.routed_layer(cancel, l, units, &mut one, &mut hidden)?
                }
            }
        }
        let global = self.cfg.plan.global();
        self.with_unit(cancel, global, |c, w| c.final_hidden(w, state, &hidden))
    }

    /// Runs `f` on a unit once it is resident; `cancel` ends the wait (the runtime's token
    /// for a batch, a request's for a request served alone).
    pub(super) fn with_unit<T>(
        &mut self,
        cancel: &CancellationToken,
        unit: usize,
        f: impl FnOnce(&mut dyn ModelCompute, &ResidentLayer) -> Result<T>,
    ) -> Result<T> {
        let layer = self.cfg.plan.units[unit]
            .layer
            .map(|l| l as i64)
            .unwrap_or(-1);
        let sched = self.cfg.sched.clone();
        let acquired = {
            let _w = tracing::info_span!("wait", layer).entered();
            self.cfg.board.acquire(
                unit,
                || {
                    let _ = sched.send(SchedMsg::Need { unit });
                },
                cancel,
            )
        };
        let acquired = match acquired {
            Ok(a) => a,
            Err(RuntimeError::Cancelled) if self.cfg.cancel.is_cancelled() => {
                return Err(RuntimeError::ShutDown)
            }
            Err(e) => return Err(e),
        };
        let c = &self.cfg.shared.counters;
        if acquired.hit { &c.hits } else { &c.misses }.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let r = {
            let _s = tracing::info_span!("compute", layer).entered();
            match acquired.layer.ready() {
                Some(ev) => ev
                    .wait()
                    .and_then(|_| f(&mut *self.compute, &acquired.layer)),
                None => f(&mut *self.compute, &acquired.layer),
            }
        };
        self.cfg.shared.add_busy(Stage::Compute, start);
        let generation = acquired.layer.generation;
        self.cfg.board.release(unit, acquired.layer);
        // After the release: a deferred eviction sets the flag before it marks the unit.
        if self.cfg.shared.counters.wants_done.load(Ordering::SeqCst) {
            let _ = self.cfg.sched.send(SchedMsg::Done { unit });
        }
        if r.is_ok() && generation != self.generation {
            return Err(RuntimeError::ModelReloaded);
        }
        r
    }
}
