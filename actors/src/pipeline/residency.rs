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

enum Entry {
    Resident {
        layer: Arc<ResidentLayer>,
        users: usize,
        /// Evicted while in use: removed when the last user releases it.
        doomed: bool,
    },
    Failed(String),
}

struct BoardInner {
    entries: Vec<Option<Entry>>,
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

    pub fn publish(&self, layer: ResidentLayer) {
        let unit = layer.unit;
        let mut g = self.lock();
        if let Some(slot) = g.entries.get_mut(unit) {
            *slot = Some(Entry::Resident {
                layer: Arc::new(layer),
                users: 0,
                doomed: false,
            });
        }
        drop(g);
        self.changed.notify_waiters();
    }

    pub fn fail(&self, unit: usize, message: String) {
        let mut g = self.lock();
        if let Some(slot) = g.entries.get_mut(unit) {
            *slot = Some(Entry::Failed(message));
        }
        drop(g);
        self.changed.notify_waiters();
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
            if let Some(Entry::Resident { users: 0, .. }) | Some(Entry::Failed(_)) = e {
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
    pub fn acquire(
        &self,
        unit: usize,
        mut on_miss: impl FnMut(),
        cancel: &CancellationToken,
    ) -> Result<Acquired> {
        let mut hit = true;
        let mut g = self.lock();
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
                Some(Some(Entry::Failed(m))) => {
                    return Err(RuntimeError::Stage {
                        stage: "load",
                        message: m.clone(),
                    });
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
        let back = match g.entries.get_mut(unit) {
            Some(Some(Entry::Resident { doomed, .. })) => {
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
            Some(Entry::Resident { users: 0, .. }) | Some(Entry::Failed(_)) => {
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
