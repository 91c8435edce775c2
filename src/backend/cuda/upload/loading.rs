//! The background load: [`LoadingRing`] moves the pinned ring to a loader thread that uploads
//! groups in forward order and publishes one event per group, so the compute stream waits for
//! exactly the weights it is about to use.

use super::{PinnedRing, UploadItem};
use crate::backend::cuda::stream::{Event, Stream};
use crate::backend::cuda::CudaDevice;
use crate::backend::error::{BackendError, BackendResult};
use crate::backend::{ComputeDevice, DeviceStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// The ring, possibly still filling the resident weights on a background thread.
///
/// [`LoadingRing::spawn`] moves the ring to a loader thread that uploads the groups in order
/// through one fill pipeline (for the forward pass: the embedding table, each resident layer,
/// the output head; their device memory is allocated before, so the loader's path holds no
/// driver calls but its copies and events) and records one event per copy stream as soon as a
/// group's last copy is queued. The compute thread calls
/// [`LoadingRing::wait_group`] before using a group: it blocks the host only until that group's
/// copies are *queued* (an event must be recorded before a stream can wait on it), then makes
/// the compute stream wait on the device. So layer 0 computes while later layers are still read
/// and copied, and the first forward is queued long before the last byte is read.
pub struct LoadingRing {
    state: LoadState,
    shared: Option<Arc<LoadShared>>,
}

enum LoadState {
    Loading(JoinHandle<BackendResult<PinnedRing>>),
    Ready(Box<PinnedRing>),
    /// The loader failed; its error went to the first caller that joined it.
    Failed(String),
    /// Transient, while joining.
    Joining,
}

struct LoadProgress {
    /// Groups whose copies and events are queued.
    queued: usize,
    /// The loader ended (done, failed or cancelled); no further group will be queued.
    ended: bool,
}

struct LoadShared {
    progress: Mutex<LoadProgress>,
    changed: Condvar,
    /// `events[g][s]`: recorded on copy stream `s` once group `g`'s copies are queued.
    events: Vec<Vec<Event>>,
    cancel: AtomicBool,
}

impl LoadShared {
    fn lock(&self) -> MutexGuard<'_, LoadProgress> {
        self.progress.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LoadingRing {
    /// A ring with nothing loading (every wait returns at once).
    pub fn ready(ring: PinnedRing) -> Self {
        Self {
            state: LoadState::Ready(Box::new(ring)),
            shared: None,
        }
    }

    /// Starts the loader thread for `groups`, uploaded in order. `src` holds the bytes the
    /// items index (the mapped model file: the bounds check, and the source when the ring has
    /// no file). Every `dst` must stay alive until this value is dropped or joined and drained
    /// (the owner of the device memory drops it after this). `t0` is the start of the load
    /// (for the `first_group_s`/`queued_s`/`resident_s` stats).
    pub fn spawn<S>(
        dev: &CudaDevice,
        ring: PinnedRing,
        src: S,
        groups: Vec<Vec<UploadItem>>,
        t0: Instant,
    ) -> BackendResult<Self>
    where
        S: AsRef<[u8]> + Send + 'static,
    {
        let events = (0..groups.len())
            .map(|_| {
                (0..ring.copy_streams())
                    .map(|_| dev.new_event(false))
                    .collect::<BackendResult<Vec<_>>>()
            })
            .collect::<BackendResult<Vec<_>>>()?;
        let shared = Arc::new(LoadShared {
            progress: Mutex::new(LoadProgress {
                queued: 0,
                ended: false,
            }),
            changed: Condvar::new(),
            events,
            cancel: AtomicBool::new(false),
        });
        let sh = Arc::clone(&shared);
        let ctx = Arc::clone(&dev.ctx);
        let thread = std::thread::Builder::new()
            .name("rf-loader".into())
            .spawn(move || {
                let mut ring = ring;
                let r = crate::backend::cuda::bind(&ctx)
                    .and_then(|()| load_groups(&mut ring, &src, &groups, &sh, t0));
                let mut p = sh.lock();
                p.ended = true;
                drop(p);
                sh.changed.notify_all();
                r.map(|()| ring)
            })
            .map_err(|e| BackendError::InvalidArgument {
                op: "LoadingRing::spawn",
                what: format!("loader thread: {e}"),
            })?;
        Ok(Self {
            state: LoadState::Loading(thread),
            shared: Some(shared),
        })
    }

    /// A handle other threads can block on until group `g` is queued (`None`: nothing loads).
    pub fn progress(&self) -> Option<LoadProgressWaiter> {
        match self.state {
            LoadState::Loading(_) => self.shared.clone().map(LoadProgressWaiter),
            _ => None,
        }
    }

    /// Makes `compute` wait (on the device) for group `g`'s copies; blocks the host only until
    /// they are queued. A no-op once the load was joined (the join made `compute` wait for
    /// everything).
    pub fn wait_group(&mut self, g: usize, compute: &Stream) -> BackendResult<()> {
        match &self.state {
            LoadState::Ready(_) => return Ok(()),
            LoadState::Failed(why) => {
                return Err(BackendError::UploadFailed {
                    reason: why.clone(),
                })
            }
            LoadState::Loading(_) | LoadState::Joining => {}
        }
        let Some(sh) = self.shared.clone() else {
            return Ok(());
        };
        if g >= sh.events.len() {
            return Err(BackendError::InvalidArgument {
                op: "LoadingRing::wait_group",
                what: format!("group {g} of {}", sh.events.len()),
            });
        }
        let queued = {
            let mut p = sh.lock();
            while p.queued <= g && !p.ended {
                p = sh.changed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            p.queued > g
        };
        if !queued {
            // The loader ended without this group: joining returns its error.
            self.ring(compute)?;
            return Err(BackendError::UploadFailed {
                reason: format!("group {g} was never queued (load cancelled)"),
            });
        }
        for e in &sh.events[g] {
            compute.wait(e)?;
        }
        if g + 1 == sh.events.len() {
            self.ring(compute)?;
        }
        Ok(())
    }

    /// The ring, joining the loader first (it has queued every group then); `compute` waits
    /// on the device for every copy the loader queued.
    pub fn ring(&mut self, compute: &Stream) -> BackendResult<&mut PinnedRing> {
        self.join(compute)?;
        match &mut self.state {
            LoadState::Ready(r) => Ok(r),
            LoadState::Failed(why) => Err(BackendError::UploadFailed {
                reason: why.clone(),
            }),
            LoadState::Loading(_) | LoadState::Joining => Err(BackendError::UploadFailed {
                reason: "the loader was not joined".into(),
            }),
        }
    }

    /// Joins the loader if it runs (see [`LoadingRing::ring`]).
    fn join(&mut self, compute: &Stream) -> BackendResult<()> {
        if !matches!(self.state, LoadState::Loading(_)) {
            return Ok(());
        }
        let LoadState::Loading(t) = std::mem::replace(&mut self.state, LoadState::Joining) else {
            return Ok(());
        };
        let joined = t.join().unwrap_or_else(|_| {
            Err(BackendError::UploadFailed {
                reason: "the loader thread panicked".into(),
            })
        });
        match joined {
            Ok(ring) => self.state = LoadState::Ready(Box::new(ring)),
            Err(e) => {
                self.state = LoadState::Failed(e.to_string());
                return Err(e);
            }
        }
        // Stream order: the last group's events complete after every earlier copy.
        if let Some(last) = self.shared.as_ref().and_then(|s| s.events.last()) {
            for e in last {
                compute.wait(e)?;
            }
        }
        Ok(())
    }
}

impl Drop for LoadingRing {
    fn drop(&mut self) {
        // The loader writes into device memory its owner is about to free: stop it between
        // groups and wait for it (the ring drains its copies when dropped).
        if let Some(sh) = &self.shared {
            sh.cancel.store(true, Ordering::Relaxed);
        }
        if let LoadState::Loading(t) = std::mem::replace(&mut self.state, LoadState::Joining) {
            match t.join() {
                Ok(Ok(ring)) => drop(ring),
                Ok(Err(e)) => tracing::warn!(error = %e, "background weight upload failed"),
                Err(_) => tracing::warn!("the loader thread panicked"),
            }
        }
    }
}

/// Blocks a thread until the loader has queued a group (see [`LoadingRing::progress`]).
pub struct LoadProgressWaiter(Arc<LoadShared>);

impl LoadProgressWaiter {
    /// Returns once group `g` is queued or the loader ended.
    pub fn wait_queued(&self, g: usize) {
        let mut p = self.0.lock();
        while p.queued <= g && !p.ended {
            p = self.0.changed.wait(p).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The loader thread's work: every group through the ring's fill pipeline, each group's events
/// recorded (and published) as soon as its last copy is queued.
fn load_groups<S: AsRef<[u8]>>(
    ring: &mut PinnedRing,
    src: &S,
    groups: &[Vec<UploadItem>],
    sh: &LoadShared,
    t0: Instant,
) -> BackendResult<()> {
    ring.stats.start_at_ms = super::since_epoch_ms();
    let n = groups.len();
    let mut first_group_s = 0.0;
    let mut queued_s = 0.0;
    let done = ring.upload_groups(src.as_ref(), groups, Some(&sh.cancel), |g, streams| {
        for (s, e) in streams.iter().zip(&sh.events[g]) {
            s.record(e)?;
        }
        let at = t0.elapsed().as_secs_f64();
        if g == 0 {
            first_group_s = at;
        }
        queued_s = at;
        if g + 1 < n {
            sh.lock().queued = g + 1;
            sh.changed.notify_all();
        }
        Ok(())
    })?;
    ring.stats.first_group_s = first_group_s;
    ring.stats.queued_s = queued_s;
    if done && n > 0 {
        // The weights-resident moment, for the load figures: the last slot's copy lands
        // ~0.3 ms after it was queued, so the compute thread joining us hardly waits. The last
        // group is published only now, so joining after it never blocks on copies.
        ring.drain()?;
        ring.stats.resident_s = t0.elapsed().as_secs_f64();
        sh.lock().queued = n;
        sh.changed.notify_all();
    }
    Ok(())
}
