//! Scheduler: owns residency — which units are on the device, the budget, pins, the prefetch
//! window, eviction — and tells the DiskReader what to load next.
//!
//! Layers are used cyclically (0, 1, ..., L-1, then 0 again for the next token), so LRU would
//! evict exactly the layer needed soonest. The policy instead keeps a **fixed resident set** (the
//! global tensors, pinned layers, then as many leading layers as fit) and **streams** the other
//! layers through a window of `k` slots: while layer N computes, the next `k` streamed layers in
//! cyclic order are loading, and a streamed layer is evicted as soon as it is done (it is the one
//! whose next use is furthest away: Belady's choice for a cyclic reference string).
//!
//! The budget is never exceeded: bytes are reserved before a load is issued and released only
//! when the memory is really freed (eviction of a layer in use waits for its release).
//!
//! Deadlock freedom: every actor may block sending into the Scheduler's mailbox, so the
//! Scheduler itself never blocks on a send — read jobs go out with `try_send` and wait in a local
//! queue when the reader queue is full; hint replies are `try_send` into a capacity-1 oneshot.

use crate::error::{Result, RuntimeError};
use crate::messages::Hint;
use crate::plan::LoadPlan;
use crate::reader::ReadJob;
use crate::residency::{Eviction, LayerMemory, ResidencyBoard, ResidentLayer};
use crate::shared::{ResidencySnapshot, Shared};
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub enum SchedMsg {
    /// Uploader: a unit is resident.
    Loaded { unit: usize },
    /// Any loading stage: a unit could not be loaded.
    LoadFailed { unit: usize, message: String },
    /// Inference: waiting for a unit that is not resident.
    Need { unit: usize },
    /// Inference: finished with a unit (its use was released).
    Done { unit: usize },
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
    /// Largest streamed layer: the window reserves `window * max_streamed` bytes.
    pub max_streamed: u64,
}

/// Computes the fixed resident set for a budget and a set of pins. Pure, so the builder can
/// reject an impossible budget before any thread starts.
pub fn plan_fixed(
    unit_bytes: &[u64],
    n_layers: usize,
    pinned: &BTreeSet<usize>,
    budget: u64,
    k: usize,
) -> Result<FixedPlan> {
    let g = n_layers;
    let total: u64 = unit_bytes.iter().sum();
    if total <= budget {
        return Ok(FixedPlan {
            fixed: vec![true; n_layers + 1],
            window: 0,
            max_streamed: 0,
        });
    }
    let base: u64 = unit_bytes[g] + pinned.iter().map(|&l| unit_bytes[l]).sum::<u64>();
    let candidates: Vec<usize> = (0..n_layers).filter(|l| !pinned.contains(l)).collect();
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
    let mut fixed = vec![false; n_layers + 1];
    fixed[g] = true;
    for &p in pinned {
        fixed[p] = true;
    }
    // Leading layers first: while they compute, the streamed tail of the model is loading.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Absent,
    Loading,
    Resident,
    /// Evicted while in use: bytes stay reserved until the user reports `Done`.
    EvictPending,
    /// Loading failed; waiters got the error. Bytes stay reserved (a partial region may live on).
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
    pub dims: crate::plan::UnitDims,
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
    prefetched: BTreeSet<usize>,
    reserved: u64,
    peak: u64,
    evictions: u64,
    loads: Vec<u64>,
    hint_noops: u64,
    cursor: usize,
    overflow: VecDeque<ReadJob>,
    initial: Option<BTreeSet<usize>>,
}

pub fn spawn(cfg: SchedulerConfig) -> Result<JoinHandle<()>> {
    let bytes: Vec<u64> = cfg.plan.units.iter().map(|u| u.dev_bytes).collect();
    let fixed = plan_fixed(
        &bytes,
        cfg.plan.n_layers,
        &BTreeSet::new(),
        cfg.budget,
        cfg.prefetch_depth,
    )?;
    let n = bytes.len();
    let mut s = Scheduler {
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

    fn run(mut self) {
        self.act();
        loop {
            if self.cfg.cancel.is_cancelled() {
                break;
            }
            // Wakes periodically only while read jobs wait in the local queue.
            let timeout = if self.overflow.is_empty() {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(2)
            };
            match self.cfg.inbox.recv_timeout(timeout) {
                Ok(msg) => {
                    let start = Instant::now();
                    self.handle(msg);
                    self.cfg
                        .shared
                        .add_busy(crate::messages::Stage::Schedule, start);
                }
                Err(flume::RecvTimeoutError::Timeout) => self.flush(),
                Err(flume::RecvTimeoutError::Disconnected) => break,
            }
        }
        self.cfg.board.close();
    }

    fn handle(&mut self, msg: SchedMsg) {
        let _span = tracing::info_span!("schedule").entered();
        let g = self.n_layers();
        match msg {
            SchedMsg::Loaded { unit } => {
                if self.status[unit] == Status::Loading {
                    self.status[unit] = Status::Resident;
                }
                self.check_initial(unit);
            }
            SchedMsg::LoadFailed { unit, message } => {
                tracing::warn!(unit, %message, "load failed");
                self.status[unit] = Status::Failed;
                self.cfg.board.fail(unit, message);
            }
            SchedMsg::Need { unit } => {
                if unit < g {
                    self.cursor = unit;
                }
            }
            SchedMsg::Done { unit } => {
                if self.status[unit] == Status::EvictPending {
                    self.status[unit] = Status::Absent;
                    self.reserved -= self.bytes[unit];
                    self.evictions += 1;
                }
                self.prefetched.remove(&unit);
                if unit < g {
                    self.cursor = (unit + 1) % g;
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
            }
        }
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
                let reserved_by_plan: u64 = (0..=g)
                    .filter(|&u| self.fixed.fixed[u])
                    .map(|u| self.bytes[u])
                    .sum::<u64>()
                    + self.fixed.window as u64 * self.fixed.max_streamed;
                for l in layers {
                    if matches!(self.status[l], Status::Resident | Status::Loading) {
                        self.hint_noops += 1;
                        continue;
                    }
                    let used: u64 = reserved_by_plan
                        + self.prefetched.iter().map(|&p| self.bytes[p]).sum::<u64>();
                    // Advisory: a prefetch that does not fit beside the plan is dropped.
                    if used + self.bytes[l] <= self.cfg.budget {
                        self.prefetched.insert(l);
                    }
                }
                Ok(())
            }
            Hint::Pin { layers } => {
                check(&layers)?;
                let mut pins = self.pinned.clone();
                pins.extend(layers);
                let plan = plan_fixed(
                    &self.bytes,
                    g,
                    &pins,
                    self.cfg.budget,
                    self.cfg.prefetch_depth,
                )
                .map_err(|e| RuntimeError::HintRejected(e.to_string()))?;
                self.pinned = pins;
                self.fixed = plan;
                Ok(())
            }
            Hint::Release { layers } => {
                check(&layers)?;
                for l in layers {
                    self.pinned.remove(&l);
                }
                // Fewer pins never make the plan infeasible.
                if let Ok(plan) = plan_fixed(
                    &self.bytes,
                    g,
                    &self.pinned,
                    self.cfg.budget,
                    self.cfg.prefetch_depth,
                ) {
                    self.fixed = plan;
                }
                Ok(())
            }
            Hint::WarmUp => {
                let d = self.desired();
                if (0..=g).all(|u| !d[u] || self.status[u] != Status::Absent) {
                    self.hint_noops += 1;
                }
                Ok(())
            }
        }
    }

    /// Units that should be resident now.
    fn desired(&self) -> Vec<bool> {
        let g = self.n_layers();
        let mut d = self.fixed.fixed.clone();
        for &p in &self.prefetched {
            d[p] = true;
        }
        let mut left = self.fixed.window;
        for i in 0..g {
            if left == 0 {
                break;
            }
            let l = (self.cursor + i) % g;
            if !self.fixed.fixed[l] {
                d[l] = true;
                left -= 1;
            }
        }
        d
    }

    /// Evicts what is not wanted, then issues loads in the order compute will need them.
    fn act(&mut self) {
        let g = self.n_layers();
        let d = self.desired();
        for (u, &want) in d.iter().enumerate() {
            match self.status[u] {
                Status::Resident if !want => match self.cfg.board.try_evict(u) {
                    Eviction::Freed | Eviction::Absent => {
                        self.status[u] = Status::Absent;
                        self.reserved -= self.bytes[u];
                        self.evictions += 1;
                    }
                    Eviction::Deferred => self.status[u] = Status::EvictPending,
                },
                Status::EvictPending if want && self.cfg.board.undoom(u) => {
                    self.status[u] = Status::Resident;
                }
                _ => {}
            }
        }
        let cursor = self.cursor;
        let order = std::iter::once(g).chain((0..g).map(move |i| (cursor + i) % g));
        for u in order {
            if !d[u] || self.status[u] != Status::Absent {
                continue;
            }
            if self.reserved + self.bytes[u] > self.cfg.budget {
                // Wait for evictions in flight (a layer still in use) to free bytes.
                break;
            }
            self.reserved += self.bytes[u];
            self.peak = self.peak.max(self.reserved);
            self.loads[u] += 1;
            self.status[u] = Status::Loading;
            if self.cfg.plan.units[u].file_bytes == 0 {
                self.publish_empty(u);
            } else {
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
                    });
                }
            }
        }
        self.flush();
        self.publish_snapshot();
    }

    fn publish_empty(&mut self, u: usize) {
        // A unit without tensors (a model with no global tensors): nothing to read.
        self.cfg.board.publish(ResidentLayer {
            unit: u,
            layer: self.cfg.plan.units[u].layer,
            memory: LayerMemory::Device {
                region: Arc::new(EmptyRegion),
                ready: Arc::new(crate::backend::AlreadyReady),
            },
            tensors: Arc::new(Vec::new()),
            dims: self.cfg.dims[u].clone(),
        });
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

impl crate::backend::DeviceRegion for EmptyRegion {
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
mod tests {
    use super::*;

    #[test]
    fn everything_fits() {
        let p = plan_fixed(&[10, 10, 10, 5], 3, &BTreeSet::new(), 100, 2).unwrap();
        assert_eq!(p.fixed, vec![true; 4]);
        assert_eq!(p.window, 0);
    }

    #[test]
    fn prefix_resident_rest_streamed() {
        // 6 layers of 10 B + global 5 B, budget 45: window 2 (20 B), 2 leading layers fixed.
        let bytes = [10, 10, 10, 10, 10, 10, 5];
        let p = plan_fixed(&bytes, 6, &BTreeSet::new(), 45, 2).unwrap();
        assert_eq!(p.window, 2);
        assert_eq!(p.fixed, vec![true, true, false, false, false, false, true]);
    }

    #[test]
    fn too_small_and_pins() {
        let bytes = [10, 10, 10, 5];
        assert!(matches!(
            plan_fixed(&bytes, 3, &BTreeSet::new(), 14, 1),
            Err(RuntimeError::BudgetTooSmall { .. })
        ));
        let pins: BTreeSet<usize> = [2].into();
        let p = plan_fixed(&bytes, 3, &pins, 25, 1).unwrap();
        assert_eq!(p.fixed, vec![false, false, true, true]);
        let pins: BTreeSet<usize> = [0, 1].into();
        assert!(plan_fixed(&bytes, 3, &pins, 30, 1).is_err());
    }
}
