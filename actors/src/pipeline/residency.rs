//! What is on the device: `ResidentLayer` (a unit's weights plus readiness) and the
//! `ResidencyBoard` where the Uploader publishes layers and the Inference actor waits for them.
//!
//! The board is the `LayerResident { layer, ready }` message of the design, kept as a table rather
//! than a channel because the reader of a message (Inference) and the owner of the memory
//! (Scheduler, which evicts) differ: a layer stays published until evicted, and eviction of a layer
//! in use is deferred to its release, so the memory in use never exceeds what the scheduler
//! accounted for.

use crate::error::{Result, RuntimeError};
use crate::pipeline::backend::{DeviceRegion, ReadyEvent};
use crate::pipeline::plan::TensorSlot;
use memmap2::Mmap;
use rocmforge::quant::qtype::GgmlType;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

/// Where a resident unit's bytes live.
pub enum LayerMemory {
    /// Device memory filled by the Uploader.
    Device {
        region: Arc<dyn DeviceRegion>,
        ready: Arc<dyn ReadyEvent>,
    },
    /// Zero-copy view into the file map (CPU backend, `mmap` mode). Dropping it advises the kernel
    /// that the pages are no longer needed (`MADV_DONTNEED`).
    Mapped { map: Arc<Mmap>, span: Range<usize> },
}

impl Drop for LayerMemory {
    fn drop(&mut self) {
        if let LayerMemory::Mapped { map, span } = self {
            crate::pipeline::reader::advise_dontneed(map, span.clone());
        }
    }
}

/// A view of one tensor's bytes in the backend's format.
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    pub name: &'a str,
    pub ty: GgmlType,
    /// Elements per row (`shape[0]`) and rows.
    pub cols: u64,
    pub rows: u64,
    pub data: &'a [u8],
}

/// One unit's weights, ready (or becoming ready) on the device.
pub struct ResidentLayer {
    pub unit: usize,
    pub layer: Option<usize>,
    pub memory: LayerMemory,
    pub tensors: Arc<Vec<TensorSlot>>,
    /// `(cols, rows)` per tensor, same order as `tensors`.
    pub dims: Arc<Vec<(u64, u64)>>,
    /// The board's generation when it was published (set by `ResidencyBoard::publish`): a
    /// reload starts a new one, and a unit of an older one is never handed out again.
    pub generation: u64,
}

impl ResidentLayer {
    pub fn ready(&self) -> Option<&Arc<dyn ReadyEvent>> {
        match &self.memory {
            LayerMemory::Device { ready, .. } => Some(ready),
            LayerMemory::Mapped { .. } => None,
        }
    }

    /// Host bytes of tensor `i` (CPU backends); `None` when the memory is not host-visible.
    pub fn tensor_bytes(&self, i: usize) -> Option<&[u8]> {
        let t = self.tensors.get(i)?;
        match &self.memory {
            LayerMemory::Device { region, .. } => {
                let h = region.host_bytes()?;
                h.get(t.dev_offset as usize..(t.dev_offset + t.dev_len) as usize)
            }
            LayerMemory::Mapped { map, .. } => map.get(t.file.start as usize..t.file.end as usize),
        }
    }

    /// Looks a tensor up by its full GGUF name.
    pub fn tensor(&self, name: &str) -> Option<WeightView<'_>> {
        let i = self.tensors.iter().position(|t| t.name == name)?;
        let (cols, rows) = self.dims[i];
        Some(WeightView {
            name: &self.tensors[i].name,
            ty: self.tensors[i].ty,
            cols,
            rows,
            data: self.tensor_bytes(i)?,
        })
    }

    pub fn require(&self, name: &str) -> Result<WeightView<'_>> {
        self.tensor(name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                layer: match self.layer {
                    Some(l) => format!("{l}"),
                    None => "global".into(),
                },
                tensor: name.to_string(),
            })
    }
}

/// Why a unit could not be loaded: which unit, where in which file, what happened.
#[derive(Debug, Clone)]
pub struct LoadFailure {
    /// `layer 3`, `global`, `head rows 0..4096`.
    pub what: String,
    pub path: PathBuf,
    pub offset: Option<u64>,
    pub message: String,
}

impl LoadFailure {
    /// The failure of `what` for error `e` of a load from `path`.
    pub fn new(what: String, path: &std::path::Path, e: &RuntimeError) -> Self {
        let (path, offset, message) = match e {
            RuntimeError::Read {
                path,
                offset,
                len,
                source,
            } => (
                path.clone(),
                Some(*offset),
                format!("reading {len} B: {source}"),
            ),
            other => (path.to_path_buf(), None, other.to_string()),
        };
        Self {
            what,
            path,
            offset,
            message,
        }
    }

    pub fn to_error(&self) -> RuntimeError {
        RuntimeError::WeightsUnavailable {
            what: self.what.clone(),
            path: self.path.clone(),
            offset: self.offset,
            message: self.message.clone(),
        }
    }
}

enum Entry {
    Resident {
        layer: Arc<ResidentLayer>,
        users: usize,
        /// Evicted while in use: removed when the last user releases it.
        doomed: bool,
    },
    /// The last load failed; `seq` orders it among all failures (see `acquire`).
    Failed { failure: LoadFailure, seq: u64 },
}

struct BoardInner {
    entries: Vec<Option<Entry>>,
    /// Per unit, the load attempt whose result is wanted (0: none). Chunks, results and
    /// failures of any other attempt are stale: a failed or reloaded attempt's leftovers.
    live: Vec<u64>,
    /// Failures so far (`Entry::Failed::seq`).
    failures: u64,
    /// Grows with every reload (`ResidentLayer::generation`).
    generation: u64,
    closed: bool,
}

/// Outcome of waiting for a layer.
pub struct Acquired {
    pub layer: Arc<ResidentLayer>,
    /// True when the layer was resident at the first look (a cache hit).
    pub hit: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    Freed,
    /// In use: freed by the last `release` (which precedes the user's "layer done" report).
    Deferred,
    Absent,
}

pub struct ResidencyBoard {
    inner: Mutex<BoardInner>,
    /// Woken (all waiters) whenever an entry changes or the board closes.
    changed: tokio::sync::Notify,
}

impl ResidencyBoard {
    pub fn new(n_units: usize) -> Self {
        Self {
            inner: Mutex::new(BoardInner {
                entries: (0..n_units).map(|_| None).collect(),
                live: vec![0; n_units],
                failures: 0,
                generation: 0,
                closed: false,
            }),
            changed: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BoardInner> {
        // A poisoned board means a thread panicked while holding it; the table itself is still
        // consistent (every mutation is a single assignment), so keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Load attempt `attempt` of `unit` starts (Scheduler): its result is the one wanted, and
    /// a failure recorded before is forgotten (waiters keep waiting for this attempt).
    pub fn begin_load(&self, unit: usize, attempt: u64) {
        let mut g = self.lock();
        if let Some(l) = g.live.get_mut(unit) {
            *l = attempt;
        }
        if let Some(e @ Some(Entry::Failed { .. })) = g.entries.get_mut(unit) {
            *e = None;
        }
    }

    /// Whether `attempt` is still the wanted load of `unit` (readers and the uploader drop the
    /// chunks of one that is not).
    pub fn is_live(&self, unit: usize, attempt: u64) -> bool {
        attempt != 0 && self.lock().live.get(unit) == Some(&attempt)
    }

    /// The generation of the weights (see `reload`).
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Publishes the result of load `attempt`; `false` (and the layer is dropped) when that
    /// attempt is no longer wanted.
    pub fn publish(&self, mut layer: ResidentLayer, attempt: u64) -> bool {
        let unit = layer.unit;
        let mut g = self.lock();
        if g.live.get(unit) != Some(&attempt) || attempt == 0 {
            drop(g);
            return false;
        }
        g.live[unit] = 0;
        layer.generation = g.generation;
        if let Some(slot) = g.entries.get_mut(unit) {
            *slot = Some(Entry::Resident {
                layer: Arc::new(layer),
                users: 0,
                doomed: false,
            });
        }
        drop(g);
        self.changed.notify_waiters();
        true
    }

    /// Load `attempt` of `unit` failed: the requests waiting for it get the error. `false` when
    /// that attempt was not the wanted one any more (a second report of the same failure).
    pub fn fail(&self, unit: usize, attempt: u64, failure: LoadFailure) -> bool {
        let mut g = self.lock();
        if g.live.get(unit) != Some(&attempt) || attempt == 0 {
            return false;
        }
        g.live[unit] = 0;
        g.failures += 1;
        let seq = g.failures;
        if let Some(slot) = g.entries.get_mut(unit) {
            *slot = Some(Entry::Failed { failure, seq });
        }
        drop(g);
        self.changed.notify_waiters();
        true
    }

    /// A reload (generation `generation`): every load in flight becomes stale, failures are
    /// forgotten, and every resident unit is evicted: freed now when unused, otherwise doomed
    /// (freed by its last release, never taken back by `undoom`). Returns the eviction of each
    /// unit, so the Scheduler can settle its books.
    pub fn reload(&self, generation: u64) -> Vec<Eviction> {
        let mut freed = Vec::new();
        let mut out = Vec::new();
        let mut g = self.lock();
        g.generation = generation;
        g.live.iter_mut().for_each(|l| *l = 0);
        for e in g.entries.iter_mut() {
            out.push(match e {
                Some(Entry::Resident { users: 0, .. }) => {
                    freed.push(e.take());
                    Eviction::Freed
                }
                Some(Entry::Resident { doomed, .. }) => {
                    *doomed = true;
                    Eviction::Deferred
                }
                Some(Entry::Failed { .. }) | None => {
                    *e = None;
                    Eviction::Absent
                }
            });
        }
        drop(g);
        // Freed outside the lock: dropping may `madvise` or free megabytes.
        drop(freed);
        self.changed.notify_waiters();
        out
    }

    /// Wakes every waiter with `ShutDown`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_waiters();
    }

    /// Drops every entry nobody uses (shutdown).
    pub fn clear(&self) {
        let mut g = self.lock();
        for e in g.entries.iter_mut() {
            if let Some(Entry::Resident { users: 0, .. }) | Some(Entry::Failed { .. }) = e {
                *e = None;
            }
        }
    }

    pub fn is_resident(&self, unit: usize) -> bool {
        matches!(
            self.lock().entries.get(unit),
            Some(Some(Entry::Resident { doomed: false, .. }))
        )
    }

    /// Waits until `unit` is resident and takes a use of it. `on_miss` runs once, without the lock,
    /// when the unit is not there at the first look (Inference tells the Scheduler it needs it).
    /// The wait ends at once when `cancel` fires (a dropped request, shutdown).
    ///
    /// A failure recorded before the call counts as "not there" (the miss asks the Scheduler to
    /// try again); one recorded during the wait is this caller's error. So a failed read fails
    /// the requests that waited for it, and the next request retries it.
    pub fn acquire(
        &self,
        unit: usize,
        mut on_miss: impl FnMut(),
        cancel: &CancellationToken,
    ) -> Result<Acquired> {
        let mut hit = true;
        let mut g = self.lock();
        let seen = g.failures;
        loop {
            if g.closed {
                return Err(RuntimeError::ShutDown);
            }
            match g.entries.get_mut(unit) {
                None => {
                    return Err(RuntimeError::Config(format!("no unit {unit} on the board")));
                }
                Some(Some(Entry::Resident {
                    layer,
                    users,
                    doomed: false,
                })) => {
                    *users += 1;
                    return Ok(Acquired {
                        layer: layer.clone(),
                        hit,
                    });
                }
                Some(Some(Entry::Failed { failure, seq })) if *seq > seen => {
                    return Err(failure.to_error());
                }
                _ => {}
            }
            if cancel.is_cancelled() {
                return Err(RuntimeError::Cancelled);
            }
            if hit {
                hit = false;
                drop(g);
                on_miss();
                g = self.lock();
                continue;
            }
            // Registered before the lock is released: every change is made under the lock and
            // announced after it, so none is missed between the look above and the wait.
            let mut changed = std::pin::pin!(self.changed.notified());
            changed.as_mut().enable();
            drop(g);
            if crate::pipeline::shared::block_on_or_cancel(changed, cancel).is_none() {
                return Err(RuntimeError::Cancelled);
            }
            g = self.lock();
        }
    }

    /// Gives a use back. The caller's `Arc` is dropped first so a doomed layer's memory is freed
    /// here, before the caller reports the layer done to the Scheduler.
    pub fn release(&self, unit: usize, layer: Arc<ResidentLayer>) {
        drop(layer);
        let mut g = self.lock();
        if let Some(slot) = g.entries.get_mut(unit) {
            let remove = match slot {
                Some(Entry::Resident { users, doomed, .. }) => {
                    *users = users.saturating_sub(1);
                    *doomed && *users == 0
                }
                _ => false,
            };
            if remove {
                *slot = None;
            }
        }
    }

    /// Takes back a deferred eviction (the unit is wanted again before its user released it).
    /// Returns true when the unit is resident and no longer doomed.
    pub fn undoom(&self, unit: usize) -> bool {
        let mut g = self.lock();
        let generation = g.generation;
        let back = match g.entries.get_mut(unit) {
            // A unit of an older generation (doomed by a reload) is never taken back.
            Some(Some(Entry::Resident { doomed, layer, .. })) if layer.generation == generation => {
                *doomed = false;
                true
            }
            _ => false,
        };
        drop(g);
        // A waiter may be waiting for exactly this unit to be usable again.
        if back {
            self.changed.notify_waiters();
        }
        back
    }

    /// Evicts a unit: frees it now, or (in use) marks it to be freed by the last `release`.
    pub fn try_evict(&self, unit: usize) -> Eviction {
        let mut g = self.lock();
        let Some(slot) = g.entries.get_mut(unit) else {
            return Eviction::Absent;
        };
        match slot {
            Some(Entry::Resident { users: 0, .. }) | Some(Entry::Failed { .. }) => {
                let old = slot.take();
                drop(g);
                // Freed outside the lock: dropping may `madvise` or free megabytes.
                drop(old);
                Eviction::Freed
            }
            Some(Entry::Resident { doomed, .. }) => {
                *doomed = true;
                Eviction::Deferred
            }
            None => Eviction::Absent,
        }
    }
}
