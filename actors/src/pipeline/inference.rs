//! Inference: owns the compute (and through it every sequence's KV cache) and serves
//! requests by continuous batching. A running set of sequences advances together, one step
//! at a time: each step carries one decode token of every decoding sequence and chunks of the
//! prompts being read (`batch::plan_step`), runs every unit once for the whole batch (waiting
//! on the residency board before each, as a streamed layer is loaded once per step), samples
//! each sequence's next token with its own sampler and stop conditions, and streams it.
//! Between steps, sequences that finished or whose client went away leave (their KV blocks go
//! back to the pool) and queued requests join while there is room: `max_num_seqs` and the KV
//! pool. A request that does not fit waits in the bounded queue (`QueueFull` past it).
//!
//! The step itself (units, embedding, output head) is in `step.rs`.

use crate::compute::{BatchLimits, ComputeFactory, ComputeSettings, ModelCompute, RowLogits};
use crate::error::{Result, RuntimeError};
use crate::messages::SessionId;
use crate::messages::{FinishReason, GenerateRequest, Pooling, Prompt, TokenEvent};
use crate::pipeline::batch::{plan_step, BatchOptions, Want};
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::residency::ResidencyBoard;
use crate::pipeline::scheduler::SchedMsg;
use crate::pipeline::shared::{recv_or_cancel, start_actor, Readiness, Shared, Starting};
use rocmforge::sample::TokenLogprobs;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

mod sessions;
mod step;
mod warm;

use sessions::{KeptSequence, KvSlot};

pub use crate::pipeline::sampling::Sampler;
use crate::pipeline::sampling::Utf8Assembler;

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
    /// Continuous batching: sequences at once, tokens per step, the KV budget.
    pub batch: BatchOptions,
    /// Threads of the compute's Rayon pool (`None`: one per core).
    pub compute_threads: Option<usize>,
    pub file: rocmforge::gguf::GgufFile,
    pub factory: ComputeFactory,
    /// Passed to `factory` (the builder's fields a compute applies).
    pub settings: ComputeSettings,
    pub plan: Arc<LoadPlan>,
    pub board: Arc<ResidencyBoard>,
    pub sched: flume::Sender<SchedMsg>,
    pub jobs: flume::Receiver<Job>,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    /// The model file as accepted (handed to the compute for the reads it does itself).
    pub source: Arc<crate::pipeline::source::ModelSource>,
}

/// Starts the actor; building its compute (device workspace, kernels, tokenizer tables) runs
/// while the caller goes on (`Starting::wait` for it).
pub fn spawn(cfg: InferenceConfig) -> Result<Starting> {
    start_actor("inference", "rf-inference".into(), move |ready| {
        let n = cfg.compute_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        // The actor runs inside its own pool, as one of its workers, so a parallel loop of the
        // compute forks and joins there. From outside a pool (Rayon's global one, say) every
        // loop would be handed to a worker and the actor would sleep until it is done: two
        // thread wake-ups per product, some 150 per decode step, which cost the 2-core VM a
        // third of its decode rate (`bench` without `-t`, which `serve` and `run` were like:
        // tg64 137-160 against 227-239 tok/s in this pool).
        // Scoped: the pool's threads are joined before the actor's own thread ends, so a
        // shutdown leaves none behind (a plain `build` detaches them, and they exit some time
        // after the pool is dropped).
        let mut ready = Some(ready);
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            // The actor's own spans run on one of these: traces show it as `rf-inference-N`.
            .thread_name(|i| format!("rf-inference-{i}"))
            .build_scoped(
                |t| t.run(),
                |pool| {
                    let ready = ready.take().expect("the pool body runs once");
                    pool.install(|| start(cfg, ready));
                },
            );
        if let Err(e) = built {
            if let Some(ready) = ready.take() {
                ready.fail(RuntimeError::Spawn {
                    actor: "inference",
                    message: format!("a pool of {n} compute threads: {e}"),
                });
            }
        }
    })
}

/// Builds the compute, checks it against the plan, reports readiness, then serves.
fn start(cfg: InferenceConfig, ready: Readiness) {
    let built =
        tracing::info_span!("build_compute").in_scope(|| (cfg.factory)(&cfg.file, &cfg.settings));
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
            let batch = cfg.batch.effective(compute.max_batch_sequences());
            if let Err(e) = compute.configure_batching(BatchLimits {
                max_num_seqs: batch.max_num_seqs,
                kv_budget: batch.kv_budget,
            }) {
                ready.fail(e);
                return;
            }
            ready.ready();
            let actor = Inference {
                cfg,
                compute,
                sessions: HashMap::new(),
                requests: 0,
                grammar: None,
                generation: 0,
                batch,
                running: Vec::new(),
                held: None,
                deferred: Default::default(),
                warm: Default::default(),
            };
            actor.publish();
            actor.run();
        }
        Err(e) => {
            ready.fail(e);
        }
    }
}

pub(super) struct Inference {
    pub(super) cfg: InferenceConfig,
    pub(super) compute: Box<dyn ModelCompute>,
    sessions: HashMap<SessionId, KeptSequence>,
    /// Requests started, the clock of `KeptSequence::last_used`.
    requests: u64,
    /// Built at the first constrained request (`grammar()`).
    grammar: Option<rocmforge::grammar::GrammarCompiler>,
    /// The board's weight generation the running sequences compute with: a reload fails
    /// them rather than mixing two versions of the weights.
    pub(super) generation: u64,
    /// The batching limits as this compute can run them.
    batch: BatchOptions,
    /// The running set, in the order the sequences joined.
    running: Vec<Running>,
    /// A request taken from the queue that waits for KV room (the head of the queue).
    held: Option<Job>,
    /// Requests taken from the queue that wait for an earlier turn of their session to end.
    deferred: std::collections::VecDeque<Job>,
    /// The compute pool's other threads kept polling through a step (a CPU compute's).
    warm: warm::Warm,
}

/// A sequence of the running set: its request, KV, sampling state and stream.
pub(super) struct Running {
    job: Job,
    slot: KvSlot,
    /// Tokens whose keys and values the sequence holds.
    fed: Vec<u32>,
    /// Tokens to feed next: the unread part of the prompt, then the last sampled token.
    input: Vec<u32>,
    /// Whether the prompt is fully read (the sequence decodes).
    decoding: bool,
    sampler: Sampler,
    mask: Option<rocmforge::grammar::TokenMask>,
    text: Utf8Assembler,
    /// Tokens generated so far.
    generated: usize,
    /// A token event its consumer had no room for yet; the sequence waits until it is taken.
    backlog: Option<TokenEvent>,
    /// Set when it stops generating; it leaves once its backlog is delivered.
    finish: Option<FinishReason>,
}

/// `r`'s next token from the step's `logits` (and its log-probabilities when asked): the
/// compute's choice, or drawn by its sampler through its grammar mask.
fn choose(r: &mut Running, logits: RowLogits) -> Result<(u32, Option<TokenLogprobs>)> {
    let req = &r.job.request;
    match logits {
        // The compute chose it (`BatchSeq::greedy`: nothing else needs the logits).
        RowLogits::Argmax(token) => {
            r.sampler.accept(token);
            Ok((token, None))
        }
        RowLogits::Full(mut logits) => {
            // Log-probabilities are of the model's distribution: the logits before the mask.
            let raw = (r.mask.is_some() && req.logprobs.is_some()).then(|| logits.clone());
            if let Some(m) = &mut r.mask {
                m.apply(&mut logits).map_err(rocmforge::Error::from)?;
            }
            let token = r.sampler.sample(&logits);
            if let Some(m) = &mut r.mask {
                m.accept(token).map_err(rocmforge::Error::from)?;
            }
            let logprobs = req
                .logprobs
                .map(|n| TokenLogprobs::of(raw.as_deref().unwrap_or(&logits), token, n));
            Ok((token, logprobs))
        }
    }
}

impl Running {
    /// Whether this sequence's next token is the logits' argmax and nothing else of them is
    /// needed (greedy, no penalties, no grammar mask, no log-probabilities): the compute may
    /// choose it where the logits are (`BatchSeq::greedy`).
    pub(super) fn greedy_only(&self) -> bool {
        self.mask.is_none() && self.job.request.logprobs.is_none() && self.sampler.is_greedy()
    }
}

/// A request's sequence, ready to join the running set.
struct Started {
    slot: KvSlot,
    fed: Vec<u32>,
    input: Vec<u32>,
    sampler: Sampler,
    mask: Option<rocmforge::grammar::TokenMask>,
}

/// What starting a request gave.
enum Admission {
    /// It joined the running set.
    Running(Box<Running>),
    /// It was served or failed at once (an embedding, a bad request, `max_tokens` 0).
    Done,
    /// It waits for KV blocks that running sequences hold.
    NoRoom(Box<Job>),
}

impl Inference {
    fn run(mut self) {
        loop {
            if !self.admit() {
                break;
            }
            if self.running.is_empty() {
                continue;
            }
            self.step();
            self.publish();
        }
        // Shutdown: running and queued requests get an error instead of silence.
        for r in std::mem::take(&mut self.running) {
            self.fail(r, RuntimeError::ShutDown);
        }
        if let Some(job) = self.held.take() {
            self.finish_with_error(&job, RuntimeError::ShutDown);
        }
        for job in std::mem::take(&mut self.deferred) {
            self.finish_with_error(&job, RuntimeError::ShutDown);
        }
        while let Ok(job) = self.cfg.jobs.try_recv() {
            let _ = job.events.send(Err(RuntimeError::ShutDown));
        }
    }

    /// Takes queued requests into the running set while there is room; waits for one when
    /// nothing runs. `false`: the runtime shuts down (or every handle is gone).
    fn admit(&mut self) -> bool {
        while self.running.len() < self.batch.max_num_seqs {
            if self.cfg.cancel.is_cancelled() {
                return false;
            }
            let ready = self
                .deferred
                .iter()
                .position(|j| !self.session_running(j.request.session));
            // `queued`: fresh from the queue (not yet checked against its session).
            let (job, queued) = match (self.held.take(), ready) {
                (Some(job), _) => (job, false),
                (None, Some(i)) => match self.deferred.remove(i) {
                    Some(job) => (job, false),
                    None => break,
                },
                // Deferred jobs bound what is taken from the queue (which stays the bound).
                (None, None) if self.deferred.len() >= self.batch.max_num_seqs => break,
                (None, None) if self.running.is_empty() => {
                    // Nothing runs and nothing is queued: a moment for lazy set-up.
                    if self.cfg.jobs.is_empty() {
                        self.publish();
                        self.compute.idle();
                    }
                    match recv_or_cancel(&self.cfg.jobs, &self.cfg.cancel) {
                        Some(job) => (job, true),
                        None => return false,
                    }
                }
                (None, None) => match self.cfg.jobs.try_recv() {
                    Ok(job) => (job, true),
                    Err(_) => break,
                },
            };
            // A session's turns run one after another, in order: the next one resumes the KV
            // the previous one leaves (`n` choices of one prompt share its prefill so).
            let session = job.request.session;
            if queued
                && session.is_some()
                && (self.session_running(session)
                    || self.deferred.iter().any(|j| j.request.session == session))
            {
                self.deferred.push_back(job);
                continue;
            }
            if job.cancel.is_cancelled() || job.events.is_disconnected() {
                self.done(&job);
                continue;
            }
            match self.start_job(job) {
                Admission::Running(r) => {
                    self.running.push(*r);
                    let c = &self.cfg.shared.counters;
                    c.running_seqs.fetch_add(1, Ordering::AcqRel);
                }
                Admission::Done => {}
                Admission::NoRoom(job) => {
                    self.held = Some(*job);
                    break;
                }
            }
        }
        true
    }

    /// Starts `job`: checks and tokenizes its prompt, finds its sequence (a session's kept one
    /// or a new one) and reserves the KV room of its prompt and output.
    fn start_job(&mut self, job: Job) -> Admission {
        match self.try_start(&job) {
            Ok(Some(s)) => Admission::Running(Box::new(Running {
                job,
                slot: s.slot,
                fed: s.fed,
                input: s.input,
                decoding: false,
                sampler: s.sampler,
                mask: s.mask,
                text: Utf8Assembler::default(),
                generated: 0,
                backlog: None,
                finish: None,
            })),
            Ok(None) => {
                self.done(&job);
                Admission::Done
            }
            Err(RuntimeError::KvFull { .. }) if !self.running.is_empty() => {
                Admission::NoRoom(Box::new(job))
            }
            Err(RuntimeError::KvFull {
                needed,
                free,
                total,
            }) => {
                let e = RuntimeError::BadRequest(format!(
                    "the prompt and max_tokens need {needed} more KV blocks, {free} of the \
                     pool's {total} are free with nothing running: lower max_tokens or raise \
                     the KV budget"
                ));
                self.finish_with_error(&job, e);
                Admission::Done
            }
            Err(e) => {
                self.finish_with_error(&job, e);
                Admission::Done
            }
        }
    }

    /// `Ok(None)`: served already (embedding, zero tokens wanted).
    fn try_start(&mut self, job: &Job) -> Result<Option<Started>> {
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
        // The prompt must fit; generating until the context is full is a normal finish.
        let ctx = self.compute.context_len();
        if let Some(ctx) = ctx.filter(|&c| prompt.len() > c) {
            return Err(RuntimeError::BadRequest(format!(
                "the prompt has {} tokens, the context holds {ctx}",
                prompt.len()
            )));
        }
        let generation = self.cfg.board.generation();
        if generation != self.generation && self.running.is_empty() {
            // Kept sessions hold keys and values computed with the weights before a reload.
            self.sessions.clear();
            self.generation = generation;
        }
        if let Some(task) = &job.embed {
            self.requests += 1;
            self.embed(job, &prompt, task)?;
            return Ok(None);
        }
        let (mut slot, keep) = self.sequence_for(req.session, &prompt, true)?;
        let want = ctx.map_or(usize::MAX, |c| c.min(prompt.len() + req.max_tokens));
        if let Err(e) = self.reserve(&mut slot, want) {
            // Back where it came from: a session's sequence waits in the session table.
            if let Some(id) = req.session {
                self.keep(id, slot, prompt[..keep].to_vec());
            }
            return Err(e);
        }
        self.requests += 1;
        if keep > 0 && req.session.is_some() {
            self.cfg
                .shared
                .counters
                .prompt_tokens_cached
                .fetch_add(keep as u64, Ordering::Relaxed);
        }
        let mask = match &req.constraint {
            Some(c) => Some(
                self.grammar()?
                    .compile(c)
                    .map_err(|e| RuntimeError::BadRequest(e.to_string()))?,
            ),
            None => None,
        };
        if req.max_tokens == 0 {
            if let Ok(mut f) = job.finish.lock() {
                *f = Some(FinishReason::MaxTokens);
            }
            if let Some(id) = req.session.filter(|_| !req.end_session) {
                self.keep(id, slot, prompt[..keep].to_vec());
            }
            return Ok(None);
        }
        let sampler = Sampler::new(&req.sampling, &prompt);
        tracing::debug!(seed = sampler.seed(), cached = keep, "sampling");
        Ok(Some(Started {
            slot,
            fed: prompt[..keep].to_vec(),
            input: prompt[keep..].to_vec(),
            sampler,
            mask,
        }))
    }

    /// Reserves KV room for `tokens` positions, evicting kept sessions (least recently used
    /// first) while the pool is short.
    fn reserve(&mut self, slot: &mut KvSlot, tokens: usize) -> Result<()> {
        loop {
            match self.compute.reserve(&mut slot.state, tokens) {
                // Cached prefixes nobody uses go first, then kept sessions.
                Err(RuntimeError::KvFull { needed, .. })
                    if self.compute.evict_cached(needed) > 0 => {}
                Err(RuntimeError::KvFull { .. }) if !self.sessions.is_empty() => {
                    self.evict_oldest_session();
                }
                r => return r,
            }
        }
    }

    /// One step of the running set (see the module docs).
    fn step(&mut self) {
        let mut running = std::mem::take(&mut self.running);
        // Leave: cancelled (client gone) and finished sequences, and any whose backlog the
        // consumer has now taken.
        let mut kept = Vec::with_capacity(running.len());
        for mut r in running.drain(..) {
            if let Some(e) = self.cancelled(&r.job) {
                self.fail(r, e);
                continue;
            }
            if let Some(ev) = r.backlog.take() {
                match r.job.events.try_send(Ok(ev)) {
                    Ok(()) => {}
                    Err(flume::TrySendError::Full(Ok(ev))) => r.backlog = Some(ev),
                    Err(_) => {
                        self.fail(r, RuntimeError::Cancelled);
                        continue;
                    }
                }
            }
            if r.finish.is_some() && r.backlog.is_none() {
                self.retire(r);
                continue;
            }
            kept.push(r);
        }
        running = kept;
        let generation = self.cfg.board.generation();
        if generation != self.generation {
            // The weights were reloaded under the running sequences: they fail, as a request
            // did whose weights changed mid-way; the next ones start on the new weights.
            for r in running.drain(..) {
                self.fail(r, RuntimeError::ModelReloaded);
            }
            self.sessions.clear();
            self.generation = generation;
        }
        // Stop at a full context before feeding past it.
        let ctx = self.compute.context_len();
        for r in running.iter_mut().filter(|r| r.finish.is_none()) {
            if ctx.is_some_and(|c| r.fed.len() + r.input.len() > c) {
                r.finish = Some(FinishReason::ContextFull);
            }
        }
        let wants: Vec<Want> = running
            .iter()
            .map(|r| Want {
                pending: r.input.len(),
                decoding: r.decoding,
                ready: r.finish.is_none() && r.backlog.is_none(),
            })
            .collect();
        let take = plan_step(&wants, self.batch.max_batch_tokens);
        if take.iter().all(|&t| t == 0) {
            // Everyone waits for a consumer (or just finished): wait for the oldest's reader
            // instead of spinning.
            if let Some(r) = running.iter_mut().find(|r| r.backlog.is_some()) {
                self.wait_backlog(r);
            }
            self.running = running;
            return;
        }
        // A CPU compute's step: the pool's other threads poll for its loops' work until the
        // tokens are sampled (`warm`).
        let _warm = self.compute.host_parallel().then(|| self.warm.step());
        let result = self.run_step(&mut running, &take);
        match result {
            Ok(logits) => self.sample_all(&mut running, &take, logits),
            Err(e) => {
                // A failed step fails the sequences it carried (the first gets the error
                // itself, the others its copy); the others go on.
                let mut rest = Vec::with_capacity(running.len());
                let copy = e.duplicate();
                let mut first = Some(e);
                for (r, &t) in running.drain(..).zip(&take) {
                    if t > 0 {
                        let e = match first.take() {
                            Some(e) => e,
                            None => copy.duplicate(),
                        };
                        self.fail(r, e);
                    } else {
                        rest.push(r);
                    }
                }
                running = rest;
            }
        }
        self.running = running;
    }

    /// Feeds the step's tokens into each sequence's history, samples the next token of every
    /// sequence that got logits and streams it.
    fn sample_all(&mut self, running: &mut [Running], take: &[usize], logits: Vec<RowLogits>) {
        let mut logits = logits.into_iter();
        // (sequence, its logits) of those whose input the step consumed.
        let mut due: Vec<(&mut Running, RowLogits)> = Vec::new();
        for (r, &t) in running.iter_mut().zip(take) {
            if t == 0 {
                continue;
            }
            r.fed.extend(r.input.drain(..t));
            if !r.input.is_empty() {
                continue; // a prompt chunk: no logits yet
            }
            if !r.decoding {
                // The prompt is in: its full blocks can serve later prompts that start alike.
                self.compute.publish_prefix(&mut r.slot.state, &r.fed);
            }
            r.decoding = true;
            match logits.next() {
                Some(l) => due.push((r, l)),
                None => r.finish = Some(FinishReason::EndOfSequence),
            }
        }
        // A draw takes ~0.1 ms a sequence at a 128k vocabulary (more with a grammar mask;
        // benches/sampling.rs): a step's draws run on the actor's pool at once. Greedy ones
        // (a scan of a few microseconds, or the compute's choice) stay here.
        let drawn = due.iter().filter(|(r, _)| !r.greedy_only()).count();
        fn pick(
            (r, l): (&mut Running, RowLogits),
        ) -> (&mut Running, Result<(u32, Option<TokenLogprobs>)>) {
            let c = choose(r, l);
            (r, c)
        }
        let chosen: Vec<_> = if drawn > 1 {
            use rayon::prelude::*;
            due.into_par_iter().map(pick).collect()
        } else {
            due.into_iter().map(pick).collect()
        };
        for (r, c) in chosen {
            match c {
                Ok((token, logprobs)) => self.emit(r, token, logprobs),
                Err(e) => {
                    r.finish = Some(FinishReason::EndOfSequence);
                    let _ = r.job.events.try_send(Err(e));
                }
            }
        }
    }

    /// Streams `r`'s new `token` and decides whether it goes on.
    fn emit(&mut self, r: &mut Running, token: u32, logprobs: Option<TokenLogprobs>) {
        let req = &r.job.request;
        // The event carries the token (it was generated) but a control token's text is
        // empty: `<|im_end|>` never reaches a reply.
        let ev = TokenEvent {
            index: r.generated,
            token,
            text: r.text.push(&self.compute.token_bytes(token)),
            logprobs,
        };
        r.generated += 1;
        if req.stop_at_eos && self.compute.is_end_of_generation(token) {
            r.finish = Some(FinishReason::EndOfSequence);
        } else if r.generated >= req.max_tokens {
            r.finish = Some(FinishReason::MaxTokens);
        } else {
            r.input = vec![token];
        }
        match r.job.events.try_send(Ok(ev)) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(Ok(ev))) => r.backlog = Some(ev),
            // The consumer is gone: the sequence leaves at the next step.
            Err(_) => {}
        }
    }

    /// Waits until `r`'s consumer takes its pending event (or goes away, or shutdown).
    fn wait_backlog(&mut self, r: &mut Running) {
        let Some(ev) = r.backlog.take() else { return };
        let sent = crate::pipeline::shared::block_on_or_cancel(
            r.job.events.send_async(Ok(ev)),
            &r.job.cancel,
        );
        if !matches!(sent, Some(Ok(()))) && r.finish.is_none() {
            r.finish = Some(FinishReason::EndOfSequence);
        }
    }

    pub(super) fn cancelled(&self, job: &Job) -> Option<RuntimeError> {
        if self.cfg.cancel.is_cancelled() {
            Some(RuntimeError::ShutDown)
        } else if job.cancel.is_cancelled() || job.events.is_disconnected() {
            Some(RuntimeError::Cancelled)
        } else {
            None
        }
    }

    /// A sequence leaves normally: its finish reason, its session kept, its stream ended.
    fn retire(&mut self, mut r: Running) {
        if let (Some(reason), Ok(mut f)) = (r.finish, r.job.finish.lock()) {
            *f = Some(reason);
        }
        let fed = std::mem::take(&mut r.fed);
        let Running { job, mut slot, .. } = r;
        let req = &job.request;
        match req.session.filter(|_| !req.end_session) {
            Some(id) => {
                self.compute.release_unused(&mut slot.state);
                self.keep(id, slot, fed);
            }
            None => drop(slot),
        }
        self.left();
        self.done(&job);
    }

    /// A sequence leaves with an error.
    fn fail(&mut self, r: Running, e: RuntimeError) {
        let Running { job, slot, .. } = r;
        drop(slot);
        self.left();
        self.finish_with_error(&job, e);
    }

    /// Counts a sequence out of the running set, after its blocks went back and before its
    /// stream ends: a client that saw its stream end sees the pool without it.
    fn left(&self) {
        let c = &self.cfg.shared.counters;
        c.running_seqs.fetch_sub(1, Ordering::AcqRel);
        if let Some(kv) = self.compute.kv_stats() {
            c.kv_blocks_used.store(kv.blocks_used, Ordering::Release);
            c.kv_blocks_cached
                .store(kv.blocks_cached, Ordering::Release);
        }
    }

    fn finish_with_error(&self, job: &Job, e: RuntimeError) {
        // Shutdown cancels every request's token too: it is reported as such.
        let e = if self.cfg.cancel.is_cancelled() {
            RuntimeError::ShutDown
        } else {
            e
        };
        match e {
            // The consumer is gone: nobody to tell.
            RuntimeError::Cancelled if job.cancel.is_cancelled() => {}
            e => {
                // An error must not be lost behind a slow reader: wait for it to take it, or
                // to go away (a dropped stream disconnects the channel).
                match job.events.try_send(Err(e)) {
                    Err(flume::TrySendError::Full(item)) => {
                        let _ = job.events.send(item);
                    }
                    Ok(()) | Err(flume::TrySendError::Disconnected(_)) => {}
                }
            }
        }
        self.done(job);
    }

    fn done(&self, _job: &Job) {
        self.cfg
            .shared
            .counters
            .requests_done
            .fetch_add(1, Ordering::AcqRel);
    }

    /// The waiting sequence and the KV pool's blocks, for stats and /metrics (the running
    /// count moves as sequences join and leave).
    fn publish(&self) {
        let c = &self.cfg.shared.counters;
        c.held_seqs.store(
            self.held.is_some() as usize + self.deferred.len(),
            Ordering::Relaxed,
        );
        if let Some(kv) = self.compute.kv_stats() {
            c.kv_blocks_total.store(kv.blocks_total, Ordering::Relaxed);
            c.kv_blocks_used.store(kv.blocks_used, Ordering::Relaxed);
            c.kv_blocks_cached
                .store(kv.blocks_cached, Ordering::Relaxed);
            c.kv_block_tokens.store(kv.block_tokens, Ordering::Relaxed);
        }
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

    /// An embedding job: the prompt in one pass on a fresh sequence, its final hidden states
    /// pooled and L2-normalized.
    fn embed(&mut self, job: &Job, prompt: &[u32], task: &EmbedTask) -> Result<()> {
        let (mut slot, _) = self.sequence_for(None, prompt, false)?;
        self.reserve(&mut slot, prompt.len())?;
        let last = self.embed_forward(&job.cancel, &mut slot.state, prompt)?;
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
        Ok(())
    }
}
