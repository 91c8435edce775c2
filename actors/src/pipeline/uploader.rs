//! Uploader: owns the copy streams and assembles each unit's device memory from staged chunks;
//! publishes `LayerResident { layer, ready }` on the residency board and tells the Scheduler.
//!
//! Staging slots go back to the ring as soon as their bytes are on the device (on a GPU backend,
//! once the copy's event completed; the CPU copy is synchronous). On GPUs every copy is
//! asynchronous: this thread queues copies and records one event per unit, never waiting for
//! them; the compute stream waits on that event on the device. Chunks of one unit may arrive in
//! any order (several readers, a pool of transcoders), so completion is counted in bytes.
//!
//! Each assembly belongs to one load attempt. When that attempt stops being the live one on the
//! board (a chunk of it failed, or a reload abandoned it) the assembly is dropped, which frees its
//! memory, before anything else is allocated; chunks of such an attempt are dropped on arrival.

use crate::error::{Result, RuntimeError};
use crate::messages::Stage;
use crate::pipeline::backend::{DeviceRegion, WeightBackend};
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::residency::{LayerMemory, LoadFailure, ResidencyBoard, ResidentLayer};
use crate::pipeline::scheduler::SchedMsg;
use crate::pipeline::shared::{recv_or_cancel, Shared};
use crate::pipeline::transcode::{Staged, StagedData};
use memmap2::Mmap;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub struct UploaderConfig {
    /// The model file (named in load failures).
    pub path: std::path::PathBuf,
    pub map: Arc<Mmap>,
    pub plan: Arc<LoadPlan>,
    pub backend: Arc<dyn WeightBackend>,
    pub zero_copy: bool,
    /// Copy streams used round-robin per unit (`stream` field of the spans).
    pub n_streams: usize,
    pub input: flume::Receiver<Staged>,
    pub board: Arc<ResidencyBoard>,
    pub sched: flume::Sender<SchedMsg>,
    pub shared: Arc<Shared>,
    pub cancel: CancellationToken,
    pub delay_per_chunk: Duration,
    /// `(cols, rows)` of every tensor of every unit, computed once.
    pub dims: crate::pipeline::plan::UnitDims,
}

struct Assembly {
    attempt: u64,
    region: Option<Box<dyn DeviceRegion>>,
    remaining: u64,
    stream: usize,
}

pub fn spawn(cfg: UploaderConfig) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("rf-uploader".into())
        .spawn(move || run(cfg))
        .map_err(|e| RuntimeError::Spawn {
            actor: "uploader",
            message: e.to_string(),
        })
}

fn run(cfg: UploaderConfig) {
    let mut pending: HashMap<usize, Assembly> = HashMap::new();
    let mut next_stream = 0usize;
    while let Some(staged) = recv_or_cancel(&cfg.input, &cfg.cancel) {
        let unit_idx = staged.unit;
        let attempt = staged.attempt;
        let start = Instant::now();
        // Leftovers of failed or abandoned loads go first: their memory is free again before
        // this chunk may allocate.
        pending.retain(|&u, a| cfg.board.is_live(u, a.attempt));
        let r = if cfg.board.is_live(unit_idx, attempt) {
            step(&cfg, &mut pending, &mut next_stream, staged)
        } else {
            // A stale chunk: its slot goes back to the ring as it drops.
            Ok(None)
        };
        cfg.shared.add_busy(Stage::Upload, start);
        match r {
            Ok(Some(layer)) => {
                // Blocking send is safe: the Scheduler never blocks on its own sends.
                if cfg.board.publish(layer, attempt) {
                    let _ = cfg.sched.send(SchedMsg::Loaded {
                        unit: unit_idx,
                        attempt,
                    });
                }
            }
            Ok(None) => {}
            Err(e) => {
                pending.remove(&unit_idx);
                let _ = cfg.sched.send(SchedMsg::LoadFailed {
                    unit: unit_idx,
                    attempt,
                    failure: LoadFailure::new(cfg.plan.unit_name(unit_idx), &cfg.path, &e),
                });
            }
        }
    }
    // Shutdown: half-assembled regions are dropped (freed) here.
}

fn step(
    cfg: &UploaderConfig,
    pending: &mut HashMap<usize, Assembly>,
    next_stream: &mut usize,
    staged: Staged,
) -> Result<Option<ResidentLayer>> {
    let unit = &cfg.plan.units[staged.unit];
    let t = &unit.tensors[staged.tensor];
    let layer = unit.layer.map(|l| l as i64).unwrap_or(-1);
    // A newer attempt of the unit replaces an older one's assembly (which `run` drops as soon as
    // the board calls it stale; this covers a chunk arriving first).
    if pending
        .get(&staged.unit)
        .is_some_and(|a| a.attempt != staged.attempt)
    {
        pending.remove(&staged.unit);
    }
    let asm = pending.entry(staged.unit).or_insert_with(|| {
        let s = *next_stream % cfg.n_streams.max(1);
        *next_stream += 1;
        Assembly {
            attempt: staged.attempt,
            region: None,
            remaining: unit.file_bytes,
            stream: s,
        }
    });
    let span = tracing::info_span!(
        "upload",
        layer,
        tensor = t.name.as_str(),
        bytes = staged.file_len,
        stream = asm.stream
    );
    let _g = span.enter();
    if !cfg.delay_per_chunk.is_zero() {
        std::thread::sleep(cfg.delay_per_chunk);
    }
    match staged.data {
        StagedData::Mapped(_) if cfg.zero_copy => {}
        StagedData::Mapped(_) => {
            return Err(RuntimeError::Stage {
                stage: "upload",
                message: "a mapped chunk reached a backend that cannot read host maps".into(),
            })
        }
        StagedData::Slot(slot) => {
            if asm.region.is_none() {
                asm.region = Some(cfg.backend.alloc(unit.dev_bytes as usize)?);
            }
            if let Some(region) = asm.region.as_mut() {
                let off = (t.dev_offset + staged.dev_offset) as usize;
                // The backend takes the slot: it returns to its ring once the copy no longer
                // reads it (at once on the CPU, after the copy's event on GPUs).
                cfg.backend
                    .upload_slot(&mut **region, off, slot, asm.stream)?;
            }
        }
    }
    cfg.shared
        .counters
        .uploaded_bytes
        .fetch_add(staged.file_len as u64, Ordering::Relaxed);
    asm.remaining = asm.remaining.saturating_sub(staged.file_len as u64);
    if asm.remaining > 0 {
        return Ok(None);
    }
    let Some(asm) = pending.remove(&staged.unit) else {
        return Ok(None);
    };
    let memory = match asm.region {
        Some(region) => {
            let ready = cfg.backend.ready_event(&*region, asm.stream)?;
            LayerMemory::Device {
                region: Arc::from(region),
                ready,
            }
        }
        None => LayerMemory::Mapped {
            map: cfg.map.clone(),
            span: unit.file_span.start as usize..unit.file_span.end as usize,
        },
    };
    Ok(Some(ResidentLayer {
        unit: staged.unit,
        layer: unit.layer,
        memory,
        tensors: Arc::new(unit.tensors.clone()),
        dims: cfg.dims[staged.unit].clone(),
        generation: 0,
    }))
}
