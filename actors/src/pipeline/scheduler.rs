//! Scheduler: owns residency — which units are on the device, the budget, pins, the prefetch
//! window, eviction, hints — and tells the DiskReader what to load next.
//!
//! Units are used cyclically in index order: the layers `0..L`, the global unit `L` (output norm,
//! and the output head unless it is streamed) and, when the budget is too small for the head, the
//! head's row chunks `L+1..`; then layer 0 again for the next token. LRU would evict exactly the
//! unit needed soonest, so the policy instead keeps a **fixed resident set** (the global unit,
//! pinned layers, then as many leading units as fit) and **streams** the others through a window
//! of `k` slots: while unit N computes, the next `k` streamed units in cyclic order are loading,
//! and a streamed unit is evicted as soon as it is done (it is the one whose next use is furthest
//! away: Belady's choice for a cyclic reference string).
//!
//! Hints: `Pin` moves layers into the fixed set (rejected when the budget cannot hold them).
//! `Prefetch` of a layer that is not resident loads it now and keeps it until its next use; to
//! make room it demotes fixed layers (furthest next use first) to streaming until that use, so
//! the budget still holds. `Prefetch` of a resident (or loading) layer is a no-op.
//!
//! The budget is never exceeded: bytes are reserved before a load is issued and released only
//! when the memory is really freed (eviction of a unit in use waits for its release). At most
//! `2 * readers` units load at once, in the order compute needs them, so a `Need` from compute
//! (a unit it waits for) reorders what is read next instead of queueing behind the whole model.
//!
//! Deadlock freedom: every actor may block sending into the Scheduler's mailbox, so the
//! Scheduler itself never blocks on a send — read jobs go out with `try_send` and wait in a local
//! queue when the reader queue is full; hint replies are `try_send` into a capacity-1 oneshot.

use crate::error::{Result, RuntimeError};
use crate::messages::Hint;
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::reader::ReadJob;
use crate::pipeline::residency::{
    Eviction, LayerMemory, LoadFailure, ResidencyBoard, ResidentLayer,
};
use crate::pipeline::shared::{recv_or_cancel, ResidencySnapshot, Shared};
use std::cmp::Reverse;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

pub enum SchedMsg {
    /// Uploader: load `attempt` of a unit is resident (published on the board).
    Loaded { unit: usize, attempt: u64 },
    /// Any loading stage: load `attempt` of a unit failed. Reports of an attempt that is no
    /// longer the live one (a second chunk of the same failed load) are ignored.
    LoadFailed {
        unit: usize,
        attempt: u64,
        failure: LoadFailure,
    },
    /// Inference: waiting for a unit that is not resident (a failed one is tried again).
    Need { unit: usize },
    /// Try the failed units again (`RuntimeHandle::retry_failed_loads`).
    Retry,
    /// The model file was accepted again (`RuntimeHandle::reload`): evict every unit, forget
    /// failures, load again from the file under board generation `generation`.
    Reload {
        generation: u64,
        reply: flume::Sender<Result<()>>,
    },
    /// Inference: finished with a unit (its use was released).
    Done { unit: usize },
    /// Inference: the expert units a MoE layer's router chose for this step (split experts),
    /// which the window then loads in use order; replaces the last such set.
    Route { units: Vec<usize> },
    Hint {
        hint: Hint,
        reply: flume::Sender<Result<()>>,
    },
}

/// The static part of the policy: which units stay resident and how wide the window is.
#[derive(Debug, Clone, PartialEq)]
pub struct FixedPlan {
    pub fixed: Vec<bool>,
    pub window: usize,
    /// Largest streamed unit: the window reserves `window * max_streamed` bytes.
    pub max_streamed: u64,
}

impl FixedPlan {
    /// Bytes the plan reserves: the fixed set plus the window.
    fn reserved(&self, unit_bytes: &[u64]) -> u64 {
        let fixed: u64 = (0..unit_bytes.len())
            .filter(|&u| self.fixed[u])
            .map(|u| unit_bytes[u])
            .sum();
        fixed + self.window as u64 * self.max_streamed
    }
}

/// Computes the fixed resident set for a budget and a set of pins. `global` is the index of the
/// global unit (always fixed); every other unit can be streamed. Pure, so the builder can reject
/// an impossible budget before any thread starts.
pub fn plan_fixed(
    unit_bytes: &[u64],
    global: usize,
    pinned: &BTreeSet<usize>,
    budget: u64,
    k: usize,
) -> Result<FixedPlan> {
    let n = unit_bytes.len();
    let total: u64 = unit_bytes.iter().sum();
    if total <= budget {
        return Ok(FixedPlan {
            fixed: vec![true; n],
            window: 0,
            max_streamed: 0,
        });
    }
    let base: u64 = unit_bytes[global] + pinned.iter().map(|&l| unit_bytes[l]).sum::<u64>();
    let candidates: Vec<usize> = (0..n)
        .filter(|&u| u != global && !pinned.contains(&u))
        .collect();
    let max_streamed = candidates.iter().map(|&l| unit_bytes[l]).max().unwrap_or(0);
    if base + max_streamed > budget {
        return Err(RuntimeError::BudgetTooSmall {
            budget,
            global: base,
            largest_layer: max_streamed,
        });
    }
    let fit = (budget - base)
        .checked_div(max_streamed)
        .map(|f| f as usize)
        .unwrap_or(candidates.len());
    let window = k.max(1).min(fit).min(candidates.len());
    let mut remaining = budget - base - window as u64 * max_streamed;
    let mut fixed = vec![false; n];
    fixed[global] = true;
    for &p in pinned {
        fixed[p] = true;
    }
    // Leading units first: while they compute, the streamed tail of the model is loading.
    for &l in &candidates {
        if unit_bytes[l] <= remaining {
            fixed[l] = true;
            remaining -= unit_bytes[l];
        }
    }
    Ok(FixedPlan {
        fixed,
        window,
        max_streamed,
    })
}

/// The plan a budget can run: unchanged when the whole model fits. Otherwise a
/// mixture-of-experts model's experts become units of their own (streamed only when routed,
/// the layers' dense parts kept first), and when the fixed set still cannot plan, the output
/// head streams in row chunks no larger than the largest layer (so the window slot does not
/// grow). `BudgetTooSmall` when even that does not fit.
pub fn fit_budget(
    plan: LoadPlan,
    file: &rocmforge::gguf::GgufFile,
    backend: &dyn crate::pipeline::backend::WeightBackend,
    budget: u64,
    k: usize,
) -> Result<LoadPlan> {
    let bytes = |p: &LoadPlan| p.units.iter().map(|u| u.dev_bytes).collect::<Vec<u64>>();
    let none = BTreeSet::new();
    if plan.total_dev_bytes() <= budget {
        return Ok(plan);
    }
    // Something streams: a MoE model streams only the experts its tokens choose.
    let plan = match plan.split_experts(file, backend)? {
        Some(split) => split,
        None => plan,
    };
    let whole = match plan_fixed(&bytes(&plan), plan.global(), &none, budget, k) {
        Ok(_) => return Ok(plan),
        Err(e) => e,
    };
    let largest_layer = plan.units[..plan.n_layers]
        .iter()
        .map(|u| u.dev_bytes)
        .max()
        .unwrap_or(0);
    match plan.stream_head(file, backend, largest_layer)? {
        Some(split) => {
            plan_fixed(&bytes(&split), split.global(), &none, budget, k)?;
            Ok(split)
        }
        None => Err(whole),
    }
}

/// Makes room in `plan` for `prefetched` units (hinted, resident until their next use): demotes
/// fixed units to streaming, the one whose next use (cyclically from `cursor`, a position in the
/// use order; `pos` is each unit's position) is furthest away
/// first, until the fixed set, the window and the prefetched units fit `budget`. The global unit,
/// pins and prefetched units are never demoted. A plan without a window (everything fixed) has no
/// slot to stream a demoted unit through, so it cannot make room. Returns the demoted units.
pub fn make_room(
    plan: &mut FixedPlan,
    unit_bytes: &[u64],
    global: usize,
    pinned: &BTreeSet<usize>,
    prefetched: &BTreeSet<usize>,
    budget: u64,
    (cursor, pos): (usize, &[usize]),
) -> Result<Vec<usize>> {
    let n = unit_bytes.len();
    let extra: u64 = prefetched
        .iter()
        .filter(|&&u| !plan.fixed[u])
        .map(|&u| unit_bytes[u])
        .sum();
    let mut used = plan.reserved(unit_bytes) + extra;
    let mut demoted = Vec::new();
    if used <= budget {
        return Ok(demoted);
    }
    let reject = |used: u64| {
        RuntimeError::HintRejected(format!(
            "prefetching {prefetched:?} needs {used} B beside the pins and the streaming window, \
             over the budget of {budget} B"
        ))
    };
    if plan.window == 0 {
        return Err(reject(used));
    }
    let mut victims: Vec<usize> = (0..n)
        .filter(|&u| {
            plan.fixed[u] && u != global && !pinned.contains(&u) && !prefetched.contains(&u)
        })
        .collect();
    // Belady: the unit used last (cyclically from the cursor) goes first.
    victims.sort_by_key(|&u| Reverse((pos[u] + n - cursor % n) % n));
    let mut trial = plan.clone();
    for u in victims {
        trial.fixed[u] = false;
        used -= unit_bytes[u];
        demoted.push(u);
        if used <= budget {
            *plan = trial;
            return Ok(demoted);
        }
    }
    Err(reject(used))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Absent,
    Loading,
    Resident,
    /// Evicted while in use: bytes stay reserved until the user reports `Done`.
    EvictPending,
    /// The last load failed; the waiters got the error. Nothing is reserved (the uploader frees
    /// the half-assembled memory of the stale attempt before it allocates again), and it is
    /// not loaded again until asked: a `Need` (the next request), a hint, `Retry`, `Reload`.
    Failed,
}

pub struct SchedulerConfig {
    pub plan: Arc<LoadPlan>,
    pub budget: u64,
    pub prefetch_depth: usize,
    pub jobs: flume::Sender<ReadJob>,
    pub board: Arc<ResidencyBoard>,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    pub inbox: flume::Receiver<SchedMsg>,
    pub dims: crate::pipeline::plan::UnitDims,
    /// Readers available, and the chunk size: units of at least four chunks are split.
    pub n_readers: usize,
    pub split_bytes: u64,
}

struct Scheduler {
    cfg: SchedulerConfig,
    bytes: Vec<u64>,
    status: Vec<Status>,
    pinned: BTreeSet<usize>,
    fixed: FixedPlan,
    /// Hinted units kept resident until their next use (`Done`).
    prefetched: BTreeSet<usize>,
    reserved: u64,
    peak: u64,
    evictions: u64,
    loads: Vec<u64>,
    hint_noops: u64,
    /// Where compute is in the use order (`LoadPlan::use_order`; the position of the unit it
    /// needs next or is using): loads and the window go from here.
    cursor: usize,
    /// The use order, and each unit's position in it.
    order: Vec<usize>,
    pos: Vec<usize>,
    /// Expert units (split experts) stream only when routed: those of the current routing.
    routed: BTreeSet<usize>,
    overflow: VecDeque<ReadJob>,
    initial: Option<BTreeSet<usize>>,
    /// The last load attempt issued (attempts are numbered from 1 across all units).
    attempts: u64,
    /// Per unit, the attempt issued last.
    attempt_of: Vec<u64>,
    /// Units whose last load failed and that have not loaded since.
    failed: BTreeSet<usize>,
}

pub fn spawn(cfg: SchedulerConfig) -> Result<JoinHandle<()>> {
    let bytes: Vec<u64> = cfg.plan.units.iter().map(|u| u.dev_bytes).collect();
    let fixed = plan_fixed(
        &bytes,
        cfg.plan.global(),
        &BTreeSet::new(),
        cfg.budget,
        cfg.prefetch_depth,
    )?;
    let n = bytes.len();
    let order = cfg.plan.use_order();
    let mut pos = vec![usize::MAX; n];
    for (i, &u) in order.iter().enumerate() {
        pos[u] = i;
    }
    if order.len() != n || pos.contains(&usize::MAX) {
        return Err(RuntimeError::Config(format!(
            "the use order of {n} units lists {} of them",
            order.len()
        )));
    }
    let mut s = Scheduler {
        order,
        pos,
        routed: BTreeSet::new(),
        cfg,
        status: vec![Status::Absent; n],
        bytes,
        pinned: BTreeSet::new(),
        fixed,
        prefetched: BTreeSet::new(),
        reserved: 0,
        peak: 0,
        evictions: 0,
        loads: vec![0; n],
        hint_noops: 0,
        cursor: 0,
        overflow: VecDeque::new(),
        initial: None,
        attempts: 0,
        attempt_of: vec![0; n],
        failed: BTreeSet::new(),
    };
    let d = s.desired();
    let initial: BTreeSet<usize> = (0..n).filter(|&u| d[u]).collect();
    s.cfg
        .shared
        .counters
        .initial_bytes
        .store(initial.iter().map(|&u| s.bytes[u]).sum(), Ordering::Release);
    s.initial = Some(initial);
    std::thread::Builder::new()
        .name("rf-scheduler".into())
        .spawn(move || s.run())
        .map_err(|e| RuntimeError::Spawn {
            actor: "scheduler",
            message: e.to_string(),
        })
}
impl Scheduler {
    fn n_layers(&self) -> usize {
        self.cfg.plan.n_layers
    }

    fn is_expert(&self, unit: usize) -> bool {
        self.cfg
            .plan
            .units
            .get(unit)
            .is_some_and(|u| u.expert.is_some())
    }

    fn global(&self) -> usize {
        self.cfg.plan.global()
    }

    fn run(mut self) {
        self.act();
        // The readers' channel holds every job the in-flight limit allows (runtime/builder.rs), so
        // `overflow` stays empty; should it ever fill, the next message flushes it.
        while let Some(msg) = recv_or_cancel(&self.cfg.inbox, &self.cfg.cancel) {
            let start = Instant::now();
            self.handle(msg);
            self.flush();
            self.cfg
                .shared
                .add_busy(crate::messages::Stage::Schedule, start);
        }
        self.cfg.board.close();
    }

    fn handle(&mut self, msg: SchedMsg) {
        let _span = tracing::info_span!("schedule").entered();
        let n = self.bytes.len();
        match msg {
            SchedMsg::Loaded { unit, attempt } => {
                // A result of an attempt abandoned since (a reload) changes nothing.
                if attempt != self.attempt_of[unit] {
                    return;
                }
                if self.status[unit] == Status::Loading {
                    self.status[unit] = Status::Resident;
                }
                if self.failed.remove(&unit) {
                    tracing::info!(unit = %self.cfg.plan.unit_name(unit), "loaded again");
                    self.publish_failures();
                }
                self.check_initial(unit);
            }
            SchedMsg::LoadFailed {
                unit,
                attempt,
                failure,
            } => {
                // Only the first report of the live attempt counts: other chunks of the same
                // load, or a load already abandoned by a reload, change nothing.
                if self.status[unit] == Status::Loading
                    && self.cfg.board.fail(unit, attempt, failure.clone())
                {
                    tracing::warn!(
                        unit = %failure.what,
                        path = %failure.path.display(),
                        offset = failure.offset,
                        "load failed: {}",
                        failure.message
                    );
                    self.status[unit] = Status::Failed;
                    self.reserved -= self.bytes[unit];
                    self.failed.insert(unit);
                    let c = &self.cfg.shared.counters;
                    c.load_failures.fetch_add(1, Ordering::Relaxed);
                    *self
                        .cfg
                        .shared
                        .last_failure
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(failure);
                    self.publish_failures();
                    // The initial load is over for this unit: `wait_loaded` must not wait for
                    // a load nobody retries; the first request will.
                    self.check_initial(unit);
                }
            }
            SchedMsg::Need { unit } => {
                if self.status[unit] == Status::Failed {
                    self.status[unit] = Status::Absent;
                }
                if self.is_expert(unit) {
                    self.routed.insert(unit);
                }
                self.cursor = self.pos[unit];
            }
            SchedMsg::Route { units } => {
                self.routed = units.into_iter().filter(|&u| self.is_expert(u)).collect();
            }
            SchedMsg::Retry => {
                let mut first_streamed = None;
                for &u in &self.failed {
                    if self.status[u] == Status::Failed {
                        self.status[u] = Status::Absent;
                        if !self.fixed.fixed[u] && first_streamed.is_none() {
                            first_streamed = Some(u);
                        }
                    }
                }
                // A streamed unit loads when the window reaches it: move the window there (a
                // request's next `Need` moves it back).
                if let Some(u) = first_streamed {
                    if self.is_expert(u) {
                        self.routed.insert(u);
                    }
                    self.cursor = self.pos[u];
                }
            }
            SchedMsg::Reload { generation, reply } => {
                self.reload(generation);
                self.act();
                let _ = reply.try_send(Ok(()));
                return;
            }
            SchedMsg::Done { unit } => {
                if self.status[unit] == Status::EvictPending {
                    self.status[unit] = Status::Absent;
                    self.reserved -= self.bytes[unit];
                    self.evictions += 1;
                }
                // The global unit is used twice per token (embedding and output) and is always
                // resident, so only the other units move the cursor.
                if unit != self.global() {
                    self.cursor = (self.pos[unit] + 1) % n;
                }
                self.routed.remove(&unit);
                if self.prefetched.remove(&unit) {
                    // Its use came: the layers demoted for it return to the fixed set. The pins
                    // alone always fit (they were checked), so this cannot fail.
                    let rest = self.prefetched.clone();
                    let _ = self.replan_or_drop_prefetches(self.pinned.clone(), rest);
                }
            }
            SchedMsg::Hint { hint, reply } => {
                let r = self.hint(hint);
                // Reply after acting, so a caller reading `stats()` next sees the hint's effect.
                self.act();
                let _ = reply.try_send(r);
                return;
            }
        }
        self.act();
    }

    /// Settles the books after the board evicted everything for a reload.
    fn reload(&mut self, generation: u64) {
        // As for any deferred eviction (see `act`): the users that release a doomed unit must
        // see that a `Done` is wanted, or its bytes are never given back and it never reloads.
        self.cfg
            .shared
            .counters
            .wants_done
            .store(true, Ordering::SeqCst);
        let evictions = self.cfg.board.reload(generation);
        for (u, ev) in evictions.into_iter().enumerate() {
            match (self.status[u], ev) {
                (Status::Resident, Eviction::Freed) => {
                    self.status[u] = Status::Absent;
                    self.reserved -= self.bytes[u];
                    self.evictions += 1;
                }
                // In use (also a load published just before the reload): freed at its release.
                (Status::Resident | Status::Loading, Eviction::Deferred) => {
                    self.status[u] = Status::EvictPending
                }
                // Its chunks are stale now; the uploader frees what it assembled.
                (Status::Loading, _) => {
                    self.status[u] = Status::Absent;
                    self.reserved -= self.bytes[u];
                }
                (Status::Failed, _) => self.status[u] = Status::Absent,
                // EvictPending: still in use, its `Done` releases it. Absent: nothing to do.
                _ => {}
            }
        }
        self.failed.clear();
        self.publish_failures();
    }

    fn publish_failures(&self) {
        self.cfg
            .shared
            .counters
            .units_failed
            .store(self.failed.len(), Ordering::Release);
    }

    fn check_initial(&mut self, unit: usize) {
        if let Some(set) = &mut self.initial {
            set.remove(&unit);
            if set.is_empty() {
                self.initial = None;
                self.cfg
                    .shared
                    .counters
                    .initial_done
                    .store(true, Ordering::Release);
                self.cfg.shared.announce_load_event();
            }
        }
    }

    /// The fixed set for `pins`, with room made for `prefetched`.
    fn replan(&self, pins: &BTreeSet<usize>, prefetched: &BTreeSet<usize>) -> Result<FixedPlan> {
        let mut plan = plan_fixed(
            &self.bytes,
            self.global(),
            pins,
            self.cfg.budget,
            self.cfg.prefetch_depth,
        )
        .map_err(|e| RuntimeError::HintRejected(e.to_string()))?;
        make_room(
            &mut plan,
            &self.bytes,
            self.global(),
            pins,
            prefetched,
            self.cfg.budget,
            (self.cursor, &self.pos),
        )?;
        Ok(plan)
    }

    /// Applies `pins` and `prefetched`; when the prefetches no longer fit beside the pins they are
    /// dropped (they are advice, pins are orders). Errors only when the pins alone do not fit.
    fn replan_or_drop_prefetches(
        &mut self,
        pins: BTreeSet<usize>,
        prefetched: BTreeSet<usize>,
    ) -> Result<()> {
        let (plan, prefetched) = match self.replan(&pins, &prefetched) {
            Ok(p) => (p, prefetched),
            Err(_) => (self.replan(&pins, &BTreeSet::new())?, BTreeSet::new()),
        };
        self.fixed = plan;
        self.pinned = pins;
        self.prefetched = prefetched;
        Ok(())
    }

    fn hint(&mut self, hint: Hint) -> Result<()> {
        let g = self.n_layers();
        let check = |layers: &[usize]| -> Result<()> {
            match layers.iter().find(|&&l| l >= g) {
                Some(l) => Err(RuntimeError::HintRejected(format!(
                    "layer {l} does not exist (the model has {g})"
                ))),
                None => Ok(()),
            }
        };
        match hint {
            Hint::Prefetch { layers } => {
                check(&layers)?;
                let mut want = self.prefetched.clone();
                let mut noops = 0;
                for l in layers {
                    match self.status[l] {
                        // Resident or on its way: nothing to do.
                        Status::Resident | Status::Loading => noops += 1,
                        // A failed layer is tried again.
                        Status::Failed => {
                            self.status[l] = Status::Absent;
                            want.insert(l);
                        }
                        // An evicted layer still in use is taken back by `act`.
                        Status::Absent | Status::EvictPending => {
                            want.insert(l);
                        }
                    }
                }
                if want != self.prefetched {
                    // All or nothing: a prefetch that cannot fit leaves the plan unchanged.
                    self.fixed = self.replan(&self.pinned, &want)?;
                    self.prefetched = want;
                }
                self.hint_noops += noops;
                Ok(())
            }
            Hint::Pin { layers } => {
                check(&layers)?;
                let mut pins = self.pinned.clone();
                pins.extend(layers);
                let prefetched = self.prefetched.clone();
                self.replan_or_drop_prefetches(pins, prefetched)
            }
            Hint::Release { layers } => {
                check(&layers)?;
                let mut pins = self.pinned.clone();
                for l in layers {
                    pins.remove(&l);
                }
                let prefetched = self.prefetched.clone();
                // Fewer pins never make the plan infeasible.
                self.replan_or_drop_prefetches(pins, prefetched)
            }
            Hint::WarmUp => {
                // Warming up includes trying failed units again.
                for s in self.status.iter_mut() {
                    if *s == Status::Failed {
                        *s = Status::Absent;
                    }
                }
                let d = self.desired();
                if d.iter()
                    .zip(&self.status)
                    .all(|(&want, &s)| !want || s != Status::Absent)
                {
                    self.hint_noops += 1;
                }
                Ok(())
            }
        }
    }

    /// Units that should be resident now: the fixed set, the prefetched units, and the next
    /// `window` streamed units from the cursor.
    fn desired(&self) -> Vec<bool> {
        let n = self.bytes.len();
        let mut d = self.fixed.fixed.clone();
        for &p in &self.prefetched {
            d[p] = true;
        }
        let mut left = self.fixed.window;
        for i in 0..n {
            if left == 0 {
                break;
            }
            let u = self.order[(self.cursor + i) % n];
            // An expert no token was routed to is passed over: compute will not ask for it.
            if !self.fixed.fixed[u] && (!self.is_expert(u) || self.routed.contains(&u)) {
                d[u] = true;
                left -= 1;
            }
        }
        d
    }

    /// Evicts what is not wanted, then issues loads in the order compute will need them.
    fn act(&mut self) {
        let n = self.bytes.len();
        let d = self.desired();
        for (u, &want) in d.iter().enumerate() {
            match self.status[u] {
                Status::Resident if !want => {
                    // Before the eviction can be deferred: the user that releases the unit
                    // must then see that a `Done` is wanted (the board's lock orders the two).
                    self.cfg
                        .shared
                        .counters
                        .wants_done
                        .store(true, Ordering::SeqCst);
                    match self.cfg.board.try_evict(u) {
                        Eviction::Freed | Eviction::Absent => {
                            self.status[u] = Status::Absent;
                            self.reserved -= self.bytes[u];
                            self.evictions += 1;
                        }
                        Eviction::Deferred => self.status[u] = Status::EvictPending,
                    }
                }
                Status::EvictPending if want && self.cfg.board.undoom(u) => {
                    self.status[u] = Status::Resident;
                }
                _ => {}
            }
        }
        // Few units in flight: enough to keep every reader busy (and the kernel's readahead
        // ahead of them), few enough that a `Need` still decides what is read next.
        let max_in_flight = 2 * self.cfg.n_readers.max(1);
        let mut in_flight = self
            .status
            .iter()
            .filter(|&&s| s == Status::Loading)
            .count();
        let cursor = self.cursor;
        let order = std::mem::take(&mut self.order);
        for u in (0..n).map(|i| order[(cursor + i) % n]) {
            if !d[u] || self.status[u] != Status::Absent {
                continue;
            }
            if in_flight >= max_in_flight {
                break;
            }
            if self.reserved + self.bytes[u] > self.cfg.budget {
                // Wait for evictions in flight (a unit still in use) to free bytes.
                break;
            }
            self.reserved += self.bytes[u];
            self.peak = self.peak.max(self.reserved);
            self.loads[u] += 1;
            self.status[u] = Status::Loading;
            self.attempts += 1;
            let attempt = self.attempts;
            self.attempt_of[u] = attempt;
            self.cfg.board.begin_load(u, attempt);
            if self.cfg.plan.units[u].file_bytes == 0 {
                self.publish_empty(u, attempt);
            } else {
                in_flight += 1;
                // Big units (the embedding table) are read by every reader at once.
                let unit = &self.cfg.plan.units[u];
                let n_parts = if unit.file_bytes >= 4 * self.cfg.split_bytes {
                    self.cfg.n_readers.max(1)
                } else {
                    1
                };
                for part in 0..n_parts {
                    self.overflow.push_back(ReadJob {
                        unit: u,
                        part,
                        n_parts,
                        attempt,
                    });
                }
            }
        }
        self.order = order;
        self.flush();
        self.publish_snapshot();
        // `Done` messages matter while something streams, loads, waits for eviction or was
        // prefetched by a hint; with everything fixed and resident they change nothing.
        let settled = self.initial.is_none()
            && self.prefetched.is_empty()
            && self.fixed.fixed.iter().all(|&f| f)
            && self.status.iter().all(|&s| s == Status::Resident);
        self.cfg
            .shared
            .counters
            .wants_done
            .store(!settled, Ordering::SeqCst);
    }

    fn publish_empty(&mut self, u: usize, attempt: u64) {
        // A unit without tensors (a model with no global tensors): nothing to read.
        self.cfg.board.publish(
            ResidentLayer {
                unit: u,
                layer: self.cfg.plan.units[u].layer,
                memory: LayerMemory::Device {
                    region: Arc::new(EmptyRegion),
                    ready: Arc::new(crate::pipeline::backend::AlreadyReady),
                },
                tensors: Arc::new(Vec::new()),
                dims: self.cfg.dims[u].clone(),
                generation: 0,
            },
            attempt,
        );
        self.status[u] = Status::Resident;
        self.check_initial(u);
    }

    fn flush(&mut self) {
        while let Some(job) = self.overflow.pop_front() {
            match self.cfg.jobs.try_send(job) {
                Ok(()) => {}
                Err(flume::TrySendError::Full(job)) => {
                    self.overflow.push_front(job);
                    break;
                }
                Err(flume::TrySendError::Disconnected(_)) => {
                    self.overflow.clear();
                    break;
                }
            }
        }
    }

    fn publish_snapshot(&self) {
        let g = self.n_layers();
        let snap = ResidencySnapshot {
            reserved_bytes: self.reserved,
            peak_reserved_bytes: self.peak,
            evictions: self.evictions,
            loads_per_unit: self.loads.clone(),
            resident: self.status.iter().map(|s| *s == Status::Resident).collect(),
            pinned: self.pinned.iter().copied().collect(),
            fixed: (0..g)
                .filter(|&l| self.fixed.fixed[l] && !self.pinned.contains(&l))
                .collect(),
            window: self.fixed.window,
            hint_noops: self.hint_noops,
        };
        *self
            .cfg
            .shared
            .residency
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = snap;
    }
}

struct EmptyRegion;

impl crate::pipeline::backend::DeviceRegion for EmptyRegion {
    fn len(&self) -> usize {
        0
    }
    fn host_bytes(&self) -> Option<&[u8]> {
        Some(&[])
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
