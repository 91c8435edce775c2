//! TranscodePool: turns file blocks into the backend's weight format, directly into staging
//! slots, on a Rayon pool of its own.
//!
//! Pass-through chunks that already sit in a staging slot (`read` mode) are forwarded untouched;
//! mapped chunks bound for a device that cannot read host maps are copied (or dequantized, when
//! the backend says so) into a slot of the upload ring; on the CPU in `mmap` mode nothing is
//! copied at all (zero-copy). The pool's threads are scoped: they are joined when the actor ends.

use crate::error::{Result, RuntimeError};
use crate::messages::Stage;
use crate::pipeline::backend::WeightBackend;
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::reader::{Chunk, ChunkData};
use crate::pipeline::residency::LoadFailure;
use crate::pipeline::scheduler::SchedMsg;
use crate::pipeline::shared::{recv_or_cancel, spawn_actor, Shared};
use crate::pipeline::staging::{StagingRing, StagingSlot};
use memmap2::Mmap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub enum StagedData {
    Slot(StagingSlot),
    /// A range of the file map, used in place (zero-copy).
    Mapped(Range<usize>),
}

/// TranscodePool -> Uploader.
pub struct Staged {
    pub unit: usize,
    /// The load attempt the chunk was read for.
    pub attempt: u64,
    pub tensor: usize,
    /// Offset within the tensor's device bytes.
    pub dev_offset: u64,
    /// File bytes this chunk covered (for progress accounting).
    pub file_len: usize,
    pub data: StagedData,
}

pub struct TranscodeConfig {
    /// The model file (named in load failures).
    pub path: std::path::PathBuf,
    pub n_threads: usize,
    pub map: Arc<Mmap>,
    pub plan: Arc<LoadPlan>,
    pub backend: Arc<dyn WeightBackend>,
    /// True when the uploader uses mapped chunks in place (CPU backend, `mmap` mode).
    pub zero_copy: bool,
    pub ring: StagingRing,
    pub input: flume::Receiver<Chunk>,
    pub out: flume::Sender<Staged>,
    pub sched: flume::Sender<SchedMsg>,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    pub delay_per_chunk: Duration,
}

pub fn spawn(cfg: TranscodeConfig) -> Result<JoinHandle<()>> {
    spawn_actor("transcode", "rf-transcode".into(), move |ready| {
        let n = cfg.n_threads.max(1);
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("rf-transcode-{i}"))
            .build_scoped(
                |t| t.run(),
                |pool| {
                    ready.ready();
                    run(&cfg, pool);
                },
            );
        if let Err(e) = built {
            ready.fail(RuntimeError::Spawn {
                actor: "transcode",
                message: e.to_string(),
            });
        }
    })
}

fn run(cfg: &TranscodeConfig, pool: &rayon::ThreadPool) {
    // Permits bound the chunks queued inside the pool (its own queue is unbounded). Capacity:
    // two per thread keeps every thread busy while the next chunk is handed over.
    let cap = cfg.n_threads.max(1) * 2;
    let (permit_tx, permit_rx) = flume::bounded::<()>(cap);
    for _ in 0..cap {
        let _ = permit_tx.try_send(());
    }
    let shared_cfg = Arc::new(Job {
        path: cfg.path.clone(),
        map: cfg.map.clone(),
        plan: cfg.plan.clone(),
        backend: cfg.backend.clone(),
        ring: cfg.ring.clone(),
        out: cfg.out.clone(),
        sched: cfg.sched.clone(),
        shared: cfg.shared.clone(),
        cancel: cfg.cancel.clone(),
        delay: cfg.delay_per_chunk,
    });
    while let Some(chunk) = recv_or_cancel(&cfg.input, &cfg.cancel) {
        let forward = match &chunk.data {
            ChunkData::Mapped(_) => cfg.zero_copy,
            ChunkData::Slot(_) => {
                let ty = cfg.plan.units[chunk.unit].tensors[chunk.tensor].ty;
                cfg.backend.is_pass_through(ty)
            }
        };
        if forward && cfg.delay_per_chunk.is_zero() {
            // Nothing to do: skip the pool hop.
            shared_cfg.forward(chunk);
            continue;
        }
        if recv_or_cancel(&permit_rx, &cfg.cancel).is_none() {
            return;
        }
        let job = shared_cfg.clone();
        let permit_back = permit_tx.clone();
        pool.spawn(move || {
            if forward {
                std::thread::sleep(job.delay);
                job.forward(chunk);
            } else {
                job.transcode(chunk);
            }
            // Capacity equals the number of permits, so this never finds the channel full.
            let _ = permit_back.try_send(());
        });
    }
}

struct Job {
    path: std::path::PathBuf,
    map: Arc<Mmap>,
    plan: Arc<LoadPlan>,
    backend: Arc<dyn WeightBackend>,
    ring: StagingRing,
    out: flume::Sender<Staged>,
    sched: flume::Sender<SchedMsg>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    delay: Duration,
}

impl Job {
    fn forward(&self, chunk: Chunk) {
        let data = match chunk.data {
            ChunkData::Slot(s) => StagedData::Slot(s),
            ChunkData::Mapped(r) => StagedData::Mapped(r),
        };
        self.shared
            .counters
            .transcoded_bytes
            .fetch_add(chunk.len as u64, Ordering::Relaxed);
        let _ = self.out.send(Staged {
            unit: chunk.unit,
            attempt: chunk.attempt,
            tensor: chunk.tensor,
            dev_offset: chunk.offset,
            file_len: chunk.len,
            data,
        });
    }

    fn transcode(&self, chunk: Chunk) {
        let t = &self.plan.units[chunk.unit].tensors[chunk.tensor];
        let layer = self.plan.units[chunk.unit]
            .layer
            .map(|l| l as i64)
            .unwrap_or(-1);
        let start = Instant::now();
        let span = tracing::info_span!(
            "transcode",
            layer,
            tensor = t.name.as_str(),
            bytes = chunk.len
        );
        let _g = span.enter();
        if !self.delay.is_zero() {
            std::thread::sleep(self.delay);
        }
        let result = (|| -> Result<Staged> {
            let mut dst = self
                .ring
                .acquire(&self.cancel)
                .ok_or(RuntimeError::Cancelled)?;
            let dev_len = self.backend.transcoded_bytes(t.ty, chunk.len as u64) as usize;
            if dev_len > dst.buffer_mut().len() {
                return Err(RuntimeError::Stage {
                    stage: "transcode",
                    message: format!("{dev_len} B do not fit a staging slot"),
                });
            }
            {
                let src: &[u8] = match &chunk.data {
                    ChunkData::Slot(s) => s.data(),
                    ChunkData::Mapped(r) => self.map.get(r.clone()).unwrap_or(&[]),
                };
                self.backend
                    .transcode(t.ty, src, &mut dst.buffer_mut()[..dev_len])?;
            }
            dst.len = dev_len;
            Ok(Staged {
                unit: chunk.unit,
                attempt: chunk.attempt,
                tensor: chunk.tensor,
                dev_offset: self.backend.transcoded_bytes(t.ty, chunk.offset),
                file_len: chunk.len,
                data: StagedData::Slot(dst),
            })
        })();
        self.shared.add_busy(Stage::Transcode, start);
        match result {
            Ok(staged) => {
                self.shared
                    .counters
                    .transcoded_bytes
                    .fetch_add(chunk.len as u64, Ordering::Relaxed);
                let _ = self.out.send(staged);
            }
            Err(RuntimeError::Cancelled) => {}
            Err(e) => {
                let _ = self.sched.send(SchedMsg::LoadFailed {
                    unit: chunk.unit,
                    attempt: chunk.attempt,
                    failure: LoadFailure::new(self.plan.unit_name(chunk.unit), &self.path, &e),
                });
            }
        }
    }
}
