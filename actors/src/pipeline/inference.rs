//! Inference: owns the compute (and through it every sequence's KV cache). Requests are queued
//! and served one after another (continuous batching comes later). Before each unit it waits on
//! the residency board, computes, releases the unit and reports it done to the Scheduler.

use crate::compute::{ComputeFactory, ModelCompute, SequenceState};
use crate::error::{Result, RuntimeError};
use crate::messages::SessionId;
use crate::messages::{
    FinishReason, GenerateRequest, Pooling, Prompt, SamplingParams, Stage, TokenEvent,
};
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::residency::{ResidencyBoard, ResidentLayer};
use crate::pipeline::scheduler::SchedMsg;
use crate::pipeline::shared::{recv_or_cancel, start_actor, Readiness, Shared, Starting};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a token stream receives.
pub type StreamItem = Result<TokenEvent>;

/// One queued request (RuntimeHandle -> Inference).
pub struct Job {
    pub request: GenerateRequest,
    pub events: flume::Sender<StreamItem>,
    /// Filled with the finish reason before the stream ends normally.
    pub finish: Arc<std::sync::Mutex<Option<FinishReason>>>,
    pub cancel: CancellationToken,
    /// An embedding instead of a generation: the prompt's pooled hidden state goes to
    /// `EmbedTask::reply`, and the token stream (`events`) only carries a failure.
    pub embed: Option<EmbedTask>,
}

/// What an embedding job wants (see `RuntimeHandle::embed`).
pub struct EmbedTask {
    pub pooling: Pooling,
    pub reply: flume::Sender<Vec<f32>>,
}

pub struct InferenceConfig {
    /// Sessions whose KV cache is kept between requests (least recently used ones go first).
    pub max_sessions: usize,
    /// Threads of the compute's Rayon pool (`None`: Rayon's global pool, one per core).
    pub compute_threads: Option<usize>,
    pub file: rocmforge::gguf::GgufFile,
    pub factory: ComputeFactory,
    pub plan: Arc<LoadPlan>,
    pub board: Arc<ResidencyBoard>,
    pub sched: flume::Sender<SchedMsg>,
    pub jobs: flume::Receiver<Job>,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    /// The model file as accepted (handed to the compute for the reads it does itself).
    pub source: Arc<crate::pipeline::source::ModelSource>,
}

/// A KV slot in use; frees its count on drop (the sequence state drops with it).
struct KvSlot {
    state: SequenceState,
    shared: Arc<Shared>,
}

/// A session's sequence kept between requests, with the tokens whose keys and values it holds.
struct KeptSequence {
    slot: KvSlot,
    tokens: Vec<u32>,
    /// Request counter at its last use (least recently used is evicted first).
    last_used: u64,
}

impl Drop for KvSlot {
    fn drop(&mut self) {
        self.shared
            .counters
            .kv_slots_in_use
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts the actor; building its compute (device workspace, kernels, tokenizer tables) runs
/// while the caller goes on (`Starting::wait` for it).
pub fn spawn(cfg: InferenceConfig) -> Result<Starting> {
    start_actor("inference", "rf-inference".into(), move |ready| {
        match cfg.compute_threads {
            // The actor runs inside its own pool, so the compute's parallel loops use it.
            Some(n) => match rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .thread_name(|i| format!("rf-compute-{i}"))
                .build()
            {
                Ok(pool) => pool.install(|| start(cfg, ready)),
                Err(e) => ready.fail(RuntimeError::Spawn {
                    actor: "inference",
                    message: format!("a pool of {n} compute threads: {e}"),
                }),
            },
            None => start(cfg, ready),
        }
    })
}

/// Builds the compute, checks it against the plan, reports readiness, then serves.
fn start(cfg: InferenceConfig, ready: Readiness) {
    let built = tracing::info_span!("build_compute").in_scope(|| (cfg.factory)(&cfg.file));
    match built {
        Ok(mut compute) => {
            if compute.n_layers() != cfg.plan.n_layers {
                ready.fail(RuntimeError::Config(format!(
                    "compute expects {} layers, the file has {}",
                    compute.n_layers(),
                    cfg.plan.n_layers
                )));
                return;
            }
            // An empty lookup asks whether the compute can embed without the global unit
            // (a streamed tied head leaves no embedding table there).
            if cfg.plan.head.is_some()
                && !(compute.streams_output_head() && compute.embed_from_file(&[]).is_some())
            {
                ready.fail(RuntimeError::Config(
                    "the memory budget cannot hold the output head, and this compute cannot \
                         stream it in chunks: raise the budget"
                        .into(),
                ));
                return;
            }
            compute.attach_source(cfg.source.clone());
            ready.ready();
            Inference {
                cfg,
                compute,
                sessions: HashMap::new(),
                requests: 0,
                grammar: None,
                generation: 0,
            }
            .run();
        }
        Err(e) => {
            ready.fail(e);
        }
    }
}

struct Inference {
    cfg: InferenceConfig,
    compute: Box<dyn ModelCompute>,
    sessions: HashMap<SessionId, KeptSequence>,
    /// Requests served, the clock of `KeptSequence::last_used`.
    requests: u64,
    /// Built at the first constrained request (`grammar()`).
    grammar: Option<rocmforge::grammar::GrammarCompiler>,
    /// The board's weight generation when the running request started: a reload during the
    /// request fails it rather than mixing two versions of the weights.
    generation: u64,
}

impl Inference {
    fn run(mut self) {
        while let Some(job) = recv_or_cancel(&self.cfg.jobs, &self.cfg.cancel) {
            let result = self.serve(&job);
            match result {
                Ok(reason) => {
                    if let Ok(mut f) = job.finish.lock() {
                        *f = Some(reason);
                    }
                }
                // The consumer is gone: nobody to tell.
                Err(RuntimeError::Cancelled) if job.cancel.is_cancelled() => {}
                Err(e) => {
                    let e = if self.cfg.cancel.is_cancelled() {
                        RuntimeError::ShutDown
                    } else {
                        e
                    };
                    let _ = job.events.send(Err(e));
                }
            }
            self.cfg
                .shared
                .counters
                .requests_done
                .fetch_add(1, Ordering::AcqRel);
            // The request's stream ends here (its sender drops); with nothing queued, the
            // compute may finish lazy set-up now without delaying anyone.
            drop(job);
            if self.cfg.jobs.is_empty() {
                self.compute.idle();
            }
        }
        // Shutdown: requests still queued get an error instead of silence.
        while let Ok(job) = self.cfg.jobs.try_recv() {
            let _ = job.events.send(Err(RuntimeError::ShutDown));
        }
    }

    fn cancelled(&self, job: &Job) -> Option<RuntimeError> {
        if self.cfg.cancel.is_cancelled() {
            Some(RuntimeError::ShutDown)
        } else if job.cancel.is_cancelled() || job.events.is_disconnected() {
            Some(RuntimeError::Cancelled)
        } else {
            None
        }
    }

    /// Runs `f` on a unit once it is resident.
    fn with_unit<T>(
        &mut self,
        job: &Job,
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
            // The request's token is a child of the runtime's and fires when its stream is
            // dropped, so it covers shutdown and a consumer that went away.
            self.cfg.board.acquire(
                unit,
                || {
                    let _ = sched.send(SchedMsg::Need { unit });
                },
                &job.cancel,
            )
        };
        let acquired = match acquired {
            Ok(a) => a,
            Err(RuntimeError::Cancelled) => {
                return Err(self.cancelled(job).unwrap_or(RuntimeError::Cancelled))
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

    /// Sends a token, waiting for a slow consumer but noticing cancellation and shutdown (a
    /// plain blocking send could wait forever on a stream nobody reads).
    fn send_event(&self, job: &Job, ev: TokenEvent) -> Result<()> {
        match crate::pipeline::shared::block_on_or_cancel(
            job.events.send_async(Ok(ev)),
            &job.cancel,
        ) {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(RuntimeError::Cancelled),
            None => Err(self.cancelled(job).unwrap_or(RuntimeError::Cancelled)),
        }
    }

    /// Logits of the last position: from the global unit, or (streamed head) the global unit's
    /// norm followed by the head's row chunks in order.
    fn output(
        &mut self,
        job: &Job,
        state: &mut crate::compute::SequenceState,
        hidden: &crate::compute::Hidden,
    ) -> Result<Vec<f32>> {
        let plan = self.cfg.plan.clone();
        let global = plan.global();
        let Some(head) = &plan.head else {
            return self.with_unit(job, global, |c, w| c.output(w, state, hidden));
        };
        self.with_unit(job, global, |c, w| c.output_prepare(w, state, hidden))?;
        let mut logits = vec![0f32; head.rows as usize];
        for unit in head.units.clone() {
            let rows = plan.head_rows(unit).unwrap_or(0..0);
            let out = logits
                .get_mut(rows.start as usize..rows.end as usize)
                .ok_or_else(|| RuntimeError::Config(format!("head chunk {rows:?} out of range")))?;
            if let Some(e) = self.cancelled(job) {
                return Err(e);
            }
            self.with_unit(job, unit, |c, w| c.output_rows(w, out))?;
        }
        Ok(logits)
    }

    /// The constraint compiler for this model's vocabulary, built at the first constrained
    /// request (the token trie takes a moment; most runs never need it).
    fn grammar(&mut self) -> Result<&rocmforge::grammar::GrammarCompiler> {
        if self.grammar.is_none() {
            let tok = rocmforge::tokenizer::Tokenizer::from_metadata(self.cfg.file.metadata())
                .map_err(|e| {
                    RuntimeError::BadRequest(format!(
                        "constrained decoding needs the model's tokenizer: {e}"
                    ))
                })?;
            let g = rocmforge::grammar::GrammarCompiler::new(&tok)
                .map_err(|e| RuntimeError::BadRequest(e.to_string()))?;
            self.grammar = Some(g);
        }
        self.grammar
            .as_ref()
            .ok_or_else(|| RuntimeError::Config("grammar compiler missing".into()))
    }

    /// `input` through the embedding and every layer of `state`'s sequence.
    fn forward(
        &mut self,
        job: &Job,
        state: &mut SequenceState,
        input: &[u32],
    ) -> Result<crate::compute::Hidden> {
        // The prompt's embedding rows straight from the file where the compute can: the
        // first layer then waits for nothing else.
        let start = Instant::now();
        let from_file = {
            let _e = tracing::info_span!("embed", tokens = input.len()).entered();
            self.compute.embed_from_file(input)
        };
        self.cfg.shared.add_busy(Stage::Compute, start);
        let global = self.cfg.plan.global();
        let mut hidden = match from_file {
            Some(Ok(h)) => h,
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
                self.with_unit(job, global, |c, w| c.embed(w, input))?
            }
            Some(Err(e)) => return Err(e),
            None => self.with_unit(job, global, |c, w| c.embed(w, input))?,
        };
        for l in 0..self.cfg.plan.n_layers {
            if let Some(e) = self.cancelled(job) {
                return Err(e);
            }
            self.with_unit(job, l, |c, w| c.layer(l, w, state, &mut hidden))?;
        }
        Ok(hidden)
    }

    /// An embedding job: the prompt in one pass on a fresh sequence, its final hidden states
    /// pooled and L2-normalized.
    fn embed(&mut self, job: &Job, prompt: &[u32], task: &EmbedTask) -> Result<FinishReason> {
        let (mut slot, _) = self.sequence_for(None, prompt)?;
        let hidden = self.forward(job, &mut slot.state, prompt)?;
        let global = self.cfg.plan.global();
        let state = &mut slot.state;
        let last = self.with_unit(job, global, |c, w| c.final_hidden(w, state, &hidden))?;
        let v = task
            .pooling
            .pool(&last.data, last.n_tokens)
            .ok_or_else(|| RuntimeError::Compute {
                layer: None,
                message: format!(
                    "{} hidden values do not make {} rows",
                    last.data.len(),
                    last.n_tokens
                ),
            })?;
        // The caller went away: nobody to tell.
        let _ = task.reply.send(v);
        Ok(FinishReason::EndOfSequence)
    }

    fn serve(&mut self, job: &Job) -> Result<FinishReason> {
        let req = &job.request;
        let prompt: Vec<u32> = match &req.prompt {
            Prompt::Tokens(t) => t.clone(),
            Prompt::Text(s) => match self.compute.tokenize(s) {
                Some(r) => r?,
                None => {
                    return Err(RuntimeError::BadRequest(
                        "this runtime has no tokenizer; send token ids".into(),
                    ))
                }
            },
        };
        if prompt.is_empty() {
            return Err(RuntimeError::BadRequest("empty prompt".into()));
        }
        let _span = tracing::info_span!("request", prompt_tokens = prompt.len()).entered();
        // The prompt must fit; generating until the context is full is a normal finish.
        let ctx = self.compute.context_len();
        if let Some(ctx) = ctx.filter(|&c| prompt.len() > c) {
            return Err(RuntimeError::BadRequest(format!(
                "the prompt has {} tokens, the context holds {ctx}",
                prompt.len()
            )));
        }
        self.requests += 1;
        let generation = self.cfg.board.generation();
        if generation != self.generation {
            // Kept sessions hold keys and values computed with the weights before a reload.
            self.sessions.clear();
            self.generation = generation;
        }
        if let Some(task) = &job.embed {
            return self.embed(job, &prompt, task);
        }
        let (mut slot, keep) = self.sequence_for(req.session, &prompt)?;
        // `fed`: the tokens whose keys and values the sequence holds (kept for a session).
        let mut fed: Vec<u32> = prompt[..keep].to_vec();
        let mut mask = match &req.constraint {
            Some(c) => Some(
                self.grammar()?
                    .compile(c)
                    .map_err(|e| RuntimeError::BadRequest(e.to_string()))?,
            ),
            None => None,
        };
        let mut sampler = Sampler::new(&req.sampling, &prompt);
        tracing::debug!(seed = sampler.seed(), cached = keep, "sampling");
        let mut input = prompt[keep..].to_vec();
        let mut pos = keep;
        let mut text = Utf8Assembler::default();
        let mut finish = FinishReason::MaxTokens;
        for index in 0..req.max_tokens {
            if let Some(e) = self.cancelled(job) {
                return Err(e);
            }
            if ctx.is_some_and(|c| pos + input.len() > c) {
                finish = FinishReason::ContextFull;
                break;
            }
            let _tok = tracing::info_span!("token", index).entered();
            let hidden = self.forward(job, &mut slot.state, &input)?;
            let mut logits = self.output(job, &mut slot.state, &hidden)?;
            pos += input.len();
            fed.append(&mut input);
            // Log-probabilities are of the model's distribution: the logits before the mask.
            let raw = (mask.is_some() && req.logprobs.is_some()).then(|| logits.clone());
            if let Some(m) = &mut mask {
                m.apply(&mut logits).map_err(rocmforge::Error::from)?;
            }
            let token = sampler.sample(&logits);
            if let Some(m) = &mut mask {
                m.accept(token).map_err(rocmforge::Error::from)?;
            }
            // The event carries the token (it was generated) but a control token's text is
            // empty: `<|im_end|>` never reaches a reply.
            let ev = TokenEvent {
                index,
                token,
                text: text.push(&self.compute.token_bytes(token)),
                logprobs: req.logprobs.map(|n| {
                    rocmforge::sample::TokenLogprobs::of(
                        raw.as_deref().unwrap_or(&logits),
                        token,
                        n,
                    )
                }),
            };
            self.send_event(job, ev)?;
            if req.stop_at_eos && self.compute.is_end_of_generation(token) {
                finish = FinishReason::EndOfSequence;
                break;
            }
            input = vec![token];
        }
        if let Some(id) = req.session.filter(|_| !req.end_session) {
            self.keep(id, slot, fed);
        }
        Ok(finish)
    }

    /// The sequence a request runs on and how many of its prompt tokens are already cached:
    /// a session's kept sequence cut back to the prefix it shares with the prompt (at least
    /// one prompt token is always fed, for the logits), else a new one.
    fn sequence_for(
        &mut self,
        session: Option<SessionId>,
        prompt: &[u32],
    ) -> Result<(KvSlot, usize)> {
        if let Some(mut kept) = session.and_then(|id| self.sessions.remove(&id)) {
            let keep = kept
                .tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len() - 1);
            if self.compute.resume(&mut kept.slot.state, keep)? {
                self.cfg
                    .shared
                    .counters
                    .prompt_tokens_cached
                    .fetch_add(keep as u64, Ordering::Relaxed);
                return Ok((kept.slot, keep));
            }
        }
        self.cfg
            .shared
            .counters
            .kv_slots_in_use
            .fetch_add(1, Ordering::AcqRel);
        let slot = KvSlot {
            state: self.compute.new_sequence()?,
            shared: self.cfg.shared.clone(),
        };
        Ok((slot, 0))
    }

    /// Keeps a finished request's sequence for its session's next turn, evicting the least
    /// recently used session beyond `max_sessions` (its next turn starts from scratch).
    fn keep(&mut self, id: SessionId, slot: KvSlot, tokens: Vec<u32>) {
        if self.cfg.max_sessions == 0 {
            return;
        }
        self.sessions.insert(
            id,
            KeptSequence {
                slot,
                tokens,
                last_used: self.requests,
            },
        );
        while self.sessions.len() > self.cfg.max_sessions {
            let oldest = self
                .sessions
                .iter()
                .min_by_key(|(_, k)| k.last_used)
                .map(|(id, _)| *id);
            match oldest {
                Some(id) => self.sessions.remove(&id),
                None => break,
            };
        }
    }
}

/// Per-request sampling: the core crate's sampler, with the same semantics as every other entry
/// point: the penalties look at the last `penalty_last_n` tokens of prompt and output alike
/// (llama.cpp's), the seed is the request's or a random one (`seed()` tells which).
pub struct Sampler {
    inner: rocmforge::sample::Sampler,
    /// Prompt and generated tokens.
    history: Vec<u32>,
}

impl Sampler {
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        Self {
            inner: rocmforge::sample::Sampler::new(params.clone()),
            history: prompt.to_vec(),
        }
    }

    pub fn seed(&self) -> u64 {
        self.inner.seed()
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let t = self.inner.sample(logits, &self.history);
        self.history.push(t);
        t
    }
}

/// Turns token bytes into text pieces without splitting a UTF-8 character across two events
/// (byte-level BPE emits multi-byte characters over several tokens).
#[derive(Default)]
struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_string();
                self.pending.clear();
                s
            }
            // An incomplete character at the end: keep it for the next token.
            Err(e) if e.error_len().is_none() => {
                let n = e.valid_up_to();
                let s = String::from_utf8_lossy(&self.pending[..n]).into_owned();
                self.pending.drain(..n);
                s
            }
            // Invalid bytes: emit them replaced rather than stalling the stream.
            Err(_) => {
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_pieces_are_never_split() {
        let mut a = Utf8Assembler::default();
        let e = "é".as_bytes();
        assert_eq!(a.push(b"a"), "a");
        assert_eq!(a.push(&e[..1]), "");
        assert_eq!(a.push(&e[1..]), "é");
        assert_eq!(a.push(&[0xff]), "\u{fffd}");
    }

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        assert_eq!(
            Sampler::new(&SamplingParams::greedy(), &[]).sample(&logits),
            1
        );
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let a: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(&p, &[]);
                move |_| s.sample(&logits)
            })
            .collect();
        let b: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(&p, &[]);
                move |_| s.sample(&logits)
            })
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 1 || t == 3));
    }
}
