//! `run` and `bench` on the CUDA backend (`--backend cuda|auto`): device selection with a
//! printed fallback (HIP routes `run` to the pipelined runtime), generation through `CudaModel`,
//! and the load / first-token / pp / tg measurements of the GPU bench.

use super::bench::{median, tokens, BenchArgs};
use super::run::{GenError, RunArgs, TextSink};
use rocmforge::backend::compile_cache::KernelCache;
use rocmforge::backend::cuda::forward::{CudaModel, CudaOptions, LoadReport, GEMM_MIN_TOKENS};
use rocmforge::backend::cuda::upload::{
    since_epoch_ms, EarlyRead, HostRegion, PinnedRing, RingConfig,
};
use rocmforge::backend::cuda::CudaDevice;
use rocmforge::backend::error::BackendError;
use rocmforge::backend::{Backend, BackendKind};
use rocmforge::model::Model;
use rocmforge::sample::Sampler;
use rocmforge::tokenizer::Tokenizer;
use serde::Serialize;
use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// Start-up work moved off the critical path, started right after CUDA init: registering the
/// upload ring's memory (faulted in during init by [`open_early`]) and loading every kernel
/// module (disk cache or NVRTC) run on their own threads while the model opens and (kernels)
/// while the weights upload.
struct Prewarm {
    ring: JoinHandle<Result<PinnedRing, BackendError>>,
    kernels: JoinHandle<Result<KernelTimes, BackendError>>,
}

/// The kernel loading thread's work, in ms: its duration and its span since the process epoch.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct KernelTimes {
    ms: f64,
    start_at_ms: f64,
    end_at_ms: f64,
}

type BoxErr = Box<dyn std::error::Error>;

impl Prewarm {
    fn start(
        dev: &Arc<CudaDevice>,
        ring: RingConfig,
        model: &std::path::Path,
        host: Option<JoinHandle<Result<HostRegion, BackendError>>>,
    ) -> Self {
        let d = Arc::clone(dev);
        let ring = std::thread::spawn(move || {
            // The region was being faulted in while CUDA initialised (done by now in practice);
            // without it the ring maps its own.
            let region = host.and_then(|h| h.join().ok()).and_then(|r| r.ok());
            PinnedRing::with_region(&d, ring, region)
        });
        let d = Arc::clone(dev);
        let path = model.to_path_buf();
        let kernels = std::thread::spawn(move || {
            let t = Instant::now();
            let start_at_ms = since_epoch_ms();
            for (file, names) in rocmforge::backend::kernels::entry_points() {
                if file == "quant_sizes.cu" {
                    continue;
                }
                for n in names {
                    d.kernel(file, &n)?;
                }
            }
            // The readahead's deep queue of reads starts only now: from a cold cache it made
            // every other read wait (before CUDA init: init 0.35 -> 2.4 s; with the kernels:
            // loading NVRTC and the modules 0.3-0.7 -> 2.7-2.9 s). The loader reads meanwhile.
            rocmforge::backend::cuda::upload::spawn_readahead(&path);
            Ok(KernelTimes {
                ms: t.elapsed().as_secs_f64() * 1e3,
                start_at_ms,
                end_at_ms: since_epoch_ms(),
            })
        });
        Self { ring, kernels }
    }

    /// The ring and the milliseconds this thread waited for it.
    fn ring(
        ring: JoinHandle<Result<PinnedRing, BackendError>>,
    ) -> Result<(PinnedRing, f64), BoxErr> {
        let t = Instant::now();
        let r = ring
            .join()
            .map_err(|_| "the ring allocation thread panicked")??;
        Ok((r, t.elapsed().as_secs_f64() * 1e3))
    }

    /// How long the kernel loading took on its thread.
    fn kernels(k: JoinHandle<Result<KernelTimes, BackendError>>) -> Result<KernelTimes, BoxErr> {
        Ok(k.join()
            .map_err(|_| "the kernel loading thread panicked")??)
    }
}

/// An opened CUDA device and the milliseconds its initialisation took.
pub type Selected = (Arc<CudaDevice>, f64);

/// Whether `run --backend kind` goes through the pipelined runtime even without `--pipeline`:
/// the direct path (`CudaModel`, its own loader and streaming) is CUDA's alone, while the
/// pipelined runtime's compute (`GpuLayered`) runs on HIP too. So `hip`, and `auto` when no
/// CUDA driver is installed but a HIP device opens, route there. (Only the driver library is
/// probed for CUDA: opening a CUDA device here would pay its initialisation twice. Without any
/// GPU this is false and `auto` keeps its CPU path.)
pub fn routes_to_pipeline(kind: BackendKind) -> bool {
    match kind {
        BackendKind::Hip => true,
        BackendKind::Auto => {
            cfg!(feature = "hip")
                && !rocmforge::backend::cuda::driver_present()
                && rocmforge::backend::hip::HipDevice::open(0).is_ok()
        }
        BackendKind::Cpu | BackendKind::Cuda => false,
    }
}

/// The CUDA device for `kind` (the direct path of `run` and `bench`), or `None` for the CPU.
/// `auto` without a GPU prints why and falls back; `cuda` without a device is an error. HIP
/// has no direct path: `run` routes it to the pipelined runtime first
/// ([`routes_to_pipeline`]), so only `bench` gets here with it, and is told so.
pub fn select(kind: BackendKind) -> Result<Option<Selected>, Box<dyn std::error::Error>> {
    if kind == BackendKind::Cpu {
        return Ok(None);
    }
    let t = Instant::now();
    let (b, fallback) = Backend::open(kind)?;
    match b {
        Backend::Cuda(d) => Ok(Some((d, t.elapsed().as_secs_f64() * 1e3))),
        Backend::Cpu => {
            for r in &fallback.reasons {
                eprintln!("backend auto: {r}; using the CPU");
            }
            Ok(None)
        }
        Backend::Hip(_) => Err(
            "on HIP only the pipelined runtime runs a model (`rocmforge run --backend hip`, \
             `serve --backend hip`); the direct path and its bench are CUDA-only"
                .into(),
        ),
    }
}

type Opened = Result<(Arc<Model>, Tokenizer), GenError>;

/// Work started before CUDA initialises, overlapping it (~0.2 s warm): the model file opened
/// (metadata, tokenizer) and the upload ring's host memory mapped and faulted in (registered
/// after init, see `Prewarm`). Empty for the CPU backend.
pub struct EarlyOpen {
    open: Option<JoinHandle<Opened>>,
    host: Option<JoinHandle<Result<HostRegion, BackendError>>>,
    /// Cold-disk reading during init (on unless `ROCMFORGE_EARLY_READ=0`, see [`EarlyRead`]);
    /// stopped when the load starts, or when the whole value is dropped.
    early_read: Option<EarlyRead>,
}

/// The process epoch ([`since_epoch_ms`]'s origin) as Unix time in ns, so a script can place
/// the timeline against its own clock (launch to epoch, last output to process end).
fn epoch_unix_ns() -> u128 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_nanos().saturating_sub(
        rocmforge::backend::cuda::upload::epoch()
            .elapsed()
            .as_nanos(),
    )
}

/// The ring geometry for the model at `path` (as [`CudaOptions::default`]'s, sized to the file).
fn ring_for(path: &std::path::Path) -> RingConfig {
    let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(u64::MAX);
    CudaOptions::default().ring.for_file(len)
}

pub fn open_early(kind: BackendKind, path: &std::path::Path) -> EarlyOpen {
    // The origin of the start-up timeline (bench JSON `*_at_ms`).
    let _ = rocmforge::backend::cuda::upload::epoch();
    // Without a CUDA driver `auto` falls back to the CPU path, which opens the model itself.
    if kind == BackendKind::Cpu || !rocmforge::backend::cuda::driver_present() {
        return EarlyOpen {
            open: None,
            host: None,
            early_read: None,
        };
    }
    // The kernel modules come from the disk cache after init; from a cold disk their reads
    // would queue behind the weight loader's, so they are read into the page cache now.
    let _ = std::thread::Builder::new()
        .name("rf-kcache".into())
        .spawn(|| KernelCache::from_env().prefetch(256, 64 << 20));
    let early_read = EarlyRead::start(path);
    let p = path.to_path_buf();
    let open = std::thread::Builder::new()
        .name("rf-open".into())
        .spawn(move || {
            let r = open(&p);
            // NVRTC (a large library, dlopen'ed with RTLD_NOW) is needed only when a kernel is
            // not in the disk cache (the cache remembers which NVRTC built it, so a full hit
            // never loads it). If that is likely, load it here, while CUDA initialises, off the
            // kernels' path to the first forward; after the open, so its dlopen does not hold
            // up the driver library's at the start of CUDA init.
            if rocmforge::backend::cuda::nvrtc_needed_soon() {
                let _ = std::thread::Builder::new()
                    .name("rf-nvrtc".into())
                    .spawn(|| rocmforge::backend::cuda::Nvrtc::get().map(|_| ()));
            }
            r
        })
        .ok();
    let bytes = ring_for(path).ring_bytes();
    let host = std::thread::Builder::new()
        .name("rf-hostmem".into())
        .spawn(move || HostRegion::new(bytes))
        .ok();
    EarlyOpen {
        open,
        host,
        early_read,
    }
}

impl EarlyOpen {
    /// The opened model (waiting for the thread), or an open on this thread if none ran.
    fn take(&mut self, path: &std::path::Path) -> Opened {
        match self.open.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            // Not started, or it panicked: open here (a real failure reports itself).
            None | Some(Err(_)) => open(path),
        }
    }
}

fn open(path: &std::path::Path) -> Opened {
    let model = Model::open(path).map_err(|source| GenError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    let tok = Tokenizer::from_metadata(model.file().metadata()).map_err(|source| {
        GenError::Tokenizer {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok((Arc::new(model), tok))
}

pub fn run(
    a: &RunArgs,
    prompt: &str,
    (dev, init_ms): (Arc<CudaDevice>, f64),
    mut early: EarlyOpen,
) -> Result<(), Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let opt = CudaOptions {
        ctx: a.model.ctx,
        ring: ring_for(&a.model.model),
        ..CudaOptions::default()
    };
    let pre = Prewarm::start(&dev, opt.ring, &a.model.model, early.host.take());
    let (model, tok) = early.take(&a.model.model)?;
    let prompt_ids = tok.encode(prompt, true, true).map_err(GenError::from)?;
    // `run` prefills this prompt once and then decodes: cuBLAS only pays off when the prompt
    // reaches the GEMM threshold (a short one never loads libcublas, ~0.3 s from a cold disk).
    let opt = CudaOptions {
        use_blas: prompt_ids.len() >= GEMM_MIN_TOKENS,
        ..opt
    };
    let (ring, _) = Prewarm::ring(pre.ring)?;
    let early_read_bytes = early.early_read.take().map_or(0, EarlyRead::stop);
    let mut cm = CudaModel::load_with_ring(dev, Arc::clone(&model), opt, Some(ring))?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Kernels load concurrently; errors surface here (the forward would load them anyway).
    Prewarm::kernels(pre.kernels)?;
    let mut sampler = Sampler::new(a.sampling.params());
    let mut sink = TextSink::new(&tok, &a.sampling.stop);
    let mut out = std::io::stdout();
    let mut err = None;
    let g = cm.generate(
        &mut sampler,
        &prompt_ids,
        a.n_predict,
        |id| tok.is_eog(id),
        |id| match sink.push(id) {
            Ok((piece, stop)) => {
                if !a.json && !piece.is_empty() {
                    if let Err(e) = out.write_all(piece.as_bytes()).and_then(|_| out.flush()) {
                        err = Some(GenError::from(e));
                        return ControlFlow::Break(());
                    }
                }
                if stop {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            }
            Err(e) => {
                err = Some(e);
                ControlFlow::Break(())
            }
        },
    )?;
    if let Some(e) = err {
        return Err(e.into());
    }
    let t = &g.timings;
    if a.json {
        let j = serde_json::json!({
            "backend": "cuda",
            "seed": sampler.seed(),
            "prompt_ids": prompt_ids,
            "ids": g.ids,
            "text": sink.text,
            "stop_reason": g.stop_reason,
            "timings": {
                "cuda_init_ms": init_ms, "load_ms": load_ms, "gen": t,
                "early_read_bytes": early_read_bytes,
                "epoch_unix_ns": epoch_unix_ns(), "end_at_ms": since_epoch_ms(),
            },
            "load": cm.report,
        });
        serde_json::to_writer(&mut out, &j)?;
        writeln!(out)?;
    } else {
        let tail = sink.finish().to_string();
        writeln!(out, "{tail}")?;
        eprintln!(
            "cuda: init {init_ms:.0} ms | load (queued) {load_ms:.0} ms | prompt: {} tokens in {:.1} ms ({:.1} tok/s) | decode: {} tokens in {:.1} ms ({:.1} tok/s) | stop: {:?}",
            t.prompt_tokens, t.prompt_ms, t.prompt_tokens_per_second, t.decode_tokens, t.decode_ms,
            t.decode_tokens_per_second, g.stop_reason,
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct GpuBench {
    backend: &'static str,
    device: String,
    model: String,
    cuda_init_ms: f64,
    kernel_load_ms: f64,
    /// Start-up timeline, ms since the process epoch (first thing in `open_early`): CUDA init
    /// ended, the kernel loading thread's span, the weight load's start (the ring wait counts
    /// from here) and the loader thread's start.
    init_end_at_ms: f64,
    kernels: KernelTimes,
    load_start_at_ms: f64,
    /// Bytes the early reader had read into the page cache when the load started.
    early_read_bytes: u64,
    epoch_unix_ns: u128,
    /// Time the main thread waited for the model open started before CUDA init.
    model_open_ms: f64,
    /// Time the main thread waited for the ring allocated on another thread.
    ring_wait_ms: f64,
    /// Host time until the load returned (the uploads go on on the loader thread; the first
    /// forward waits per layer).
    load_queue_ms: f64,
    /// Until every weight was resident (the loader's last copy completed), from the start of
    /// the load including the wait for the ring.
    load_resident_ms: f64,
    load_gb_per_s: f64,
    load: LoadReport,
    /// Entry of `bench` to the first token id on the host (init + kernels + open + load +
    /// prefill of `first_token_prompt` tokens + sampling), weights loaded pipelined.
    first_token_ms: f64,
    first_forward_ms: f64,
    tests: Vec<super::bench::BenchResult>,
}

pub fn bench(
    a: &BenchArgs,
    (dev, init_ms): (Arc<CudaDevice>, f64),
    mut early: EarlyOpen,
) -> Result<(), Box<dyn std::error::Error>> {
    let t_start = Instant::now();
    let init_end_at_ms = since_epoch_ms();
    let ctx = a.n_prompt.max(a.n_gen).max(16);
    let opt = CudaOptions {
        ctx,
        max_batch: a.n_prompt.clamp(1, 512),
        ring: ring_for(&a.model),
        ..CudaOptions::default()
    };
    // Ring registration and kernel loading run on their own threads (see `Prewarm`).
    let pre = Prewarm::start(&dev, opt.ring, &a.model, early.host.take());
    let t = Instant::now();
    let (model, _tok) = early.take(&a.model)?;
    let model_open_ms = t.elapsed().as_secs_f64() * 1e3;
    let t_load = Instant::now();
    let load_start_at_ms = since_epoch_ms();
    let (ring, ring_wait_ms) = Prewarm::ring(pre.ring)?;
    let early_read_bytes = early.early_read.take().map_or(0, EarlyRead::stop);
    let mut cm = CudaModel::load_with_ring(Arc::clone(&dev), Arc::clone(&model), opt, Some(ring))?;
    let load_queue_ms = t_load.elapsed().as_secs_f64() * 1e3;
    // First token, pipelined with the tail of the upload (the compute stream waits on it).
    let t_ff = Instant::now();
    let first_prompt = tokens(8, model.n_vocab());
    cm.prefill(&first_prompt)?;
    cm.decode_steps(first_prompt[0], 0)?;
    let first_forward_ms = t_ff.elapsed().as_secs_f64() * 1e3;
    let first_token_ms = t_start.elapsed().as_secs_f64() * 1e3 + init_ms;
    // Measured on its own thread, concurrently with open/load/first forward.
    let kernels = Prewarm::kernels(pre.kernels)?;
    let kernel_load_ms = kernels.ms;
    cm.wait_resident(t_load)?;
    // Measured by the loader when its last copy completed (`wait_resident` runs only after the
    // first forward); from `t_load`, so the wait for the ring counts.
    let load_resident_ms = if cm.report.upload.resident_s > 0.0 {
        ring_wait_ms + cm.report.upload.resident_s * 1e3
    } else {
        cm.report.resident_s * 1e3
    };
    let load_gb_per_s = cm.report.weight_bytes as f64 / (load_resident_ms / 1e3) / 1e9;
    let mut tests = Vec::new();
    let reps = a.repetitions.max(1);
    if a.n_prompt > 0 {
        let toks = tokens(a.n_prompt, model.n_vocab());
        let mut samples = Vec::new();
        for i in 0..=reps {
            cm.reset();
            let t = Instant::now();
            cm.prefill(&toks)?;
            if i > 0 {
                samples.push(a.n_prompt as f64 / t.elapsed().as_secs_f64());
            }
        }
        tests.push(result(a, format!("pp{}", a.n_prompt), samples));
    }
    if a.n_gen > 0 {
        let mut samples = Vec::new();
        for i in 0..=reps {
            cm.reset();
            let t = Instant::now();
            cm.decode_steps(1, a.n_gen)?;
            if i > 0 {
                samples.push(a.n_gen as f64 / t.elapsed().as_secs_f64());
            }
        }
        tests.push(result(a, format!("tg{}", a.n_gen), samples));
    }
    let r = GpuBench {
        backend: "cuda",
        device: rocmforge::backend::ComputeDevice::describe(&*dev),
        model: a.model.display().to_string(),
        cuda_init_ms: init_ms,
        kernel_load_ms,
        init_end_at_ms,
        kernels,
        load_start_at_ms,
        early_read_bytes,
        epoch_unix_ns: epoch_unix_ns(),
        model_open_ms,
        ring_wait_ms,
        load_queue_ms,
        load_resident_ms,
        load_gb_per_s,
        load: cm.report.clone(),
        first_token_ms,
        first_forward_ms,
        tests,
    };
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "cuda {} | init {:.0} ms, kernels {:.0} ms (own thread), open {:.0} ms, ring wait {:.0} ms, load queued {:.0} ms, resident {:.0} ms ({:.1} GB/s), first forward {:.0} ms, first token {:.0} ms",
            r.device, init_ms, kernel_load_ms, model_open_ms, ring_wait_ms, load_queue_ms, load_resident_ms, load_gb_per_s, first_forward_ms, first_token_ms
        );
        let (l, u) = (&r.load, &r.load.upload);
        println!(
            "load split | load returned {:.0} ms (plan {:.0}, device allocs {:.0}, loader started at {:.0}), ring {:.1} ms ({}, own thread) | loader: embedding queued at {:.0} ms, last copy queued at {:.0} ms, copies done at {:.0} ms; read {:.0} ms ({}, {:.1} GB/s, {:.0} thread-ms), waits: fills {:.1} ms, slots {:.1} ms; copy queueing {:.1} ms (longest {:.1} ms at {:.0}); {:.2} GB",
            l.queue_s * 1e3, l.plan_s * 1e3, l.alloc_s * 1e3, l.prep_s * 1e3, u.ring_alloc_s * 1e3, u.host,
            u.first_group_s * 1e3, u.queued_s * 1e3, u.resident_s * 1e3, u.fill_s * 1e3, if u.pread { "pread" } else { "mmap" },
            u.bytes as f64 / u.fill_s.max(1e-9) / 1e9, u.read_busy_s * 1e3, u.stall_s * 1e3, u.wait_s * 1e3, u.queue_s * 1e3,
            u.queue_max_ms, u.queue_max_at_ms, u.bytes as f64 / 1e9
        );
        println!(
            "timeline (ms since start) | init ended {:.0}, kernels {:.0}-{:.0}, load start {:.0} (early read {:.0} MB before), loader start {:.0}",
            r.init_end_at_ms, r.kernels.start_at_ms, r.kernels.end_at_ms, r.load_start_at_ms,
            r.early_read_bytes as f64 / 1e6, u.start_at_ms
        );
        for t in &r.tests {
            println!(
                "{:<8} {:>10.2} tok/s  (samples {:?})",
                t.test, t.tokens_per_second, t.samples
            );
        }
    }
    Ok(())
}

fn result(a: &BenchArgs, test: String, samples: Vec<f64>) -> super::bench::BenchResult {
    super::bench::BenchResult {
        test,
        tokens_per_second: median(&samples),
        samples,
        backend: "cuda".into(),
        threads: 1,
        model: a.model.display().to_string(),
        precision: a.precision,
    }
}
