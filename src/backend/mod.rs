//! Compute backends: `Backend { Cpu, Cuda, Hip }` over small role traits, so the runtime drives
//! CUDA and HIP through the same shape (device, buffer, stream, event).
//!
//! # Layout
//! - `error.rs`         — [`BackendError`], shared by every GPU backend.
//! - `buffer.rs`        — device memory as launchers see it: [`Pod`], the `unsafe`
//!   [`DeviceBuffer`] contract, borrowed [`View`]s and [`DeviceTensor`]s, [`BufferIo`].
//! - `kernels.rs`       — the Rust/device contract: kernel files, entry points, block layouts.
//! - `compile_cache.rs` — compiled modules cached in memory and on disk (vendor-neutral).
//! - `driver.rs`        — device memory, pinned memory, streams and events written once over
//!   the [`driver::Driver`] trait: each vendor supplies only its runtime calls.
//! - `module.rs`        — kernel modules and launches over the same trait ([`module::Module`],
//!   [`module::Kernel`]).
//! - `rtc.rs`           — the run-time compiler library (NVRTC, hipRTC: one C API under two
//!   prefixes) loaded with `dlopen`, compiling and reading output written once.
//! - `gpu/`             — the vendor-neutral forward pass: launchers, layer pass, `GpuLayered`,
//!   over the `KernelDevice` trait that CUDA and HIP implement.
//! - `cuda/`            — NVIDIA through `cudarc` (dynamic loading) and NVRTC.
//! - `hip/`             — AMD through `hip-runtime-sys` (feature `hip`), the same roles.
//!
//! The CPU backend is the engine's own forward pass (`model/`); here it is only a variant.

pub mod buffer;
pub mod compile_cache;
pub mod cuda;
pub mod driver;
pub mod error;
pub mod gpu;
pub mod hip;
pub mod host;
pub mod kernels;
pub mod module;
pub mod rtc;

use std::str::FromStr;
use std::sync::Arc;

pub use buffer::{view, BufferIo, DeviceBuffer, DeviceTensor, Pod, View};
pub use error::{BackendError, BackendResult};

/// What a step gives back for one row that wanted its next token.
#[derive(Debug, Clone, PartialEq)]
pub enum RowLogits {
    /// Every logit of the row (the host samples from them).
    Full(Vec<f32>),
    /// Only the row's greedy token, chosen where the logits are (the lowest id among equal
    /// maxima, never a NaN: [`crate::sample::argmax`]'s choice over the same logits), for a
    /// sequence that needs nothing else of them.
    Argmax(u32),
}

impl RowLogits {
    /// The greedy token: chosen already, or the argmax of the full row.
    pub fn argmax(&self) -> u32 {
        match self {
            RowLogits::Full(l) => crate::sample::argmax(l),
            RowLogits::Argmax(t) => *t,
        }
    }
}

/// Which backend a user asked for (`--backend cpu|cuda|hip|auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum BackendKind {
    Cpu,
    Cuda,
    Hip,
    /// The first GPU backend that opens, else the CPU.
    #[default]
    Auto,
}

impl FromStr for BackendKind {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            "hip" | "rocm" => Ok(Self::Hip),
            "auto" => Ok(Self::Auto),
            _ => Err(BackendError::UnknownBackend(s.to_string())),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Hip => "hip",
            Self::Auto => "auto",
        })
    }
}

/// An opened backend.
#[derive(Debug, Clone)]
pub enum Backend {
    Cpu,
    Cuda(Arc<cuda::CudaDevice>),
    Hip(Arc<hip::HipDevice>),
}

/// Why `auto` did not pick a GPU (printed by the CLI when it falls back to the CPU).
#[derive(Debug, Default)]
pub struct Fallback {
    pub reasons: Vec<BackendError>,
}

impl Backend {
    /// Opens the backend `kind` on device 0. `Cuda`/`Hip` fail with the reason; `Auto` tries
    /// CUDA, then HIP, then returns the CPU together with why each GPU was skipped.
    pub fn open(kind: BackendKind) -> BackendResult<(Self, Fallback)> {
        match kind {
            BackendKind::Cpu => Ok((Self::Cpu, Fallback::default())),
            BackendKind::Cuda => Ok((Self::Cuda(cuda::CudaDevice::open(0)?), Fallback::default())),
            BackendKind::Hip => Ok((Self::Hip(hip::HipDevice::open(0)?), Fallback::default())),
            BackendKind::Auto => {
                let mut fb = Fallback::default();
                match cuda::CudaDevice::open(0) {
                    Ok(d) => return Ok((Self::Cuda(d), fb)),
                    Err(e) => fb.reasons.push(e),
                }
                match hip::HipDevice::open(0) {
                    Ok(d) => return Ok((Self::Hip(d), fb)),
                    Err(e) => fb.reasons.push(e),
                }
                Ok((Self::Cpu, fb))
            }
        }
    }

    pub fn kind(&self) -> BackendKind {
        match self {
            Self::Cpu => BackendKind::Cpu,
            Self::Cuda(_) => BackendKind::Cuda,
            Self::Hip(_) => BackendKind::Hip,
        }
    }
}

/// A device event: a point in a stream's work that other streams and the host can wait for.
pub trait DeviceEvent {
    /// Blocks the host until the recorded work completed.
    fn synchronize(&self) -> BackendResult<()>;
    /// Whether the recorded work completed (never blocks).
    fn is_complete(&self) -> BackendResult<bool>;
    /// Milliseconds between `self` and a later `end` (both recorded with timing enabled).
    fn elapsed_ms(&self, end: &Self) -> BackendResult<f32>;
}

/// An in-order queue of device work.
pub trait DeviceStream {
    type Event: DeviceEvent;
    /// Records `event` at the current end of this stream.
    fn record(&self, event: &Self::Event) -> BackendResult<()>;
    /// Makes later work on this stream wait for `event` on the device (the host does not block).
    fn wait(&self, event: &Self::Event) -> BackendResult<()>;
    /// Blocks the host until everything queued so far completed.
    fn synchronize(&self) -> BackendResult<()>;
}

/// Page-locked host memory: the source of asynchronous host-to-device copies.
pub trait PinnedHost {
    fn host_bytes(&self) -> &[u8];
    fn host_bytes_mut(&mut self) -> &mut [u8];
}

/// A GPU: memory, streams, events and the kernel modules compiled for it. The handles are
/// `Send + Sync` so one generic pipeline backend (`rocmforge-actors`' `GpuBackend`) can share
/// them between its uploader, its slot-recycling threads and the compute thread.
pub trait ComputeDevice {
    type Buf: DeviceBuffer + Send + Sync + 'static;
    type Pinned: PinnedHost + Send + Sync + 'static;
    type Stream: DeviceStream<Event = Self::Event> + Send + Sync + 'static;
    type Event: DeviceEvent + Send + Sync + 'static;
    /// Human-readable name and arch (`"NVIDIA H100 PCIe (sm_90)"`).
    fn describe(&self) -> String;
    /// Lanes per warp / wavefront; launch shapes are multiples of it.
    fn warp_size(&self) -> u32;
    /// (free, total) device memory in bytes.
    fn mem_info(&self) -> BackendResult<(usize, usize)>;
    fn alloc(&self, bytes: usize, what: &str) -> BackendResult<Self::Buf>;
    fn alloc_pinned(&self, bytes: usize) -> BackendResult<Self::Pinned>;
    /// `n` pinned buffers of `bytes` each, for a staging ring. The default allocates each on
    /// its own; a backend may carve them from one region (CUDA: one registered huge-page region,
    /// much cheaper to set up than `n` allocations, and faster to fill), using `region` when it
    /// is given and large enough (faulted in earlier, off the start-up path).
    fn alloc_pinned_ring(
        &self,
        n: usize,
        bytes: usize,
        region: Option<host::HostRegion>,
    ) -> BackendResult<Vec<Self::Pinned>> {
        drop(region);
        (0..n).map(|_| self.alloc_pinned(bytes)).collect()
    }
    fn new_stream(&self) -> BackendResult<Self::Stream>;
    /// `timing`: whether `elapsed_ms` works (timing events cost a little more to record).
    fn new_event(&self, timing: bool) -> BackendResult<Self::Event>;
    /// Queues a copy of `src[src_off..src_off + len]` to `dst` at `dst_off` on `stream`; the
    /// host does not wait. Ranges are checked (an error, nothing queued).
    ///
    /// # Safety
    /// `src` must stay alive and unmodified, and `dst` alive, until the copy completed: record
    /// an event on `stream` after this call and wait for it before reusing or freeing either.
    unsafe fn copy_htod_async(
        &self,
        stream: &Self::Stream,
        dst: &Self::Buf,
        dst_off: usize,
        src: &Self::Pinned,
        src_off: usize,
        len: usize,
    ) -> BackendResult<()>;
}

/// One llama-family layer's weights in device memory (norms and biases are F32), by role.
pub type LayerTensors<'a> = crate::model::LayerSet<DeviceTensor<'a>>;

/// The forward pass one step at a time over weights that someone else keeps in device memory
/// (the pipelined runtime's resident units), queued on one compute stream. Activations stay on
/// the device between steps; only `output`'s logits come back. The sequences' keys and values
/// live in one pool of blocks on the device; each sequence's [`KvCache`](crate::model::KvCache)
/// is its block table there (blocks taken as it grows, shared through the prefix cache).
pub trait LayeredForward: Send {
    type Device: ComputeDevice;
    type Error: std::error::Error + Send + Sync + 'static;
    /// The compute stream: callers make it wait on upload events and record fences on it.
    fn stream(&self) -> &<Self::Device as ComputeDevice>::Stream;
    fn n_vocab(&self) -> usize;
    /// Tokens one sequence's KV cache holds.
    fn context_len(&self) -> usize;
    /// (Re)allocates the KV pool before any sequence holds blocks: `bytes` of blocks, or by
    /// default a full context for every one of [`Self::max_sequences`] sequences as far as
    /// free device memory allows (at least one). Returns the pool's bookkeeping.
    fn configure_kv(
        &mut self,
        bytes: Option<u64>,
    ) -> Result<crate::model::SharedKvPool, Self::Error>;
    /// The KV pool's bookkeeping (stats, prefix cache, eviction); `None` before one exists.
    fn kv_pool(&self) -> Option<crate::model::SharedKvPool>;
    /// An empty KV cache for one sequence in the pool (made with the default size if none
    /// exists yet). Blocks come with `KvCache::reserve`, or at the latest with the step
    /// that writes them (out of blocks is then `KvPoolFull`).
    fn new_kv(&mut self) -> Result<crate::model::KvCache, Self::Error>;
    /// Sequences one step may carry (`set_segments`, `layer_batch`, `output_rows`).
    fn max_sequences(&self) -> usize;
    /// Embeds `tokens` (rows of `table`, `[n_vocab, n_embd]`): the step's rows, every
    /// sequence's tokens in order. Their positions come with `set_segments`.
    fn embed_rows(&mut self, table: &DeviceTensor<'_>, tokens: &[u32]) -> Result<(), Self::Error>;
    /// Which rows of the embedded step belong to which sequence: `(rows, position of the
    /// first)` per sequence, in row order; the rows must add up to the embedded tokens.
    fn set_segments(&mut self, parts: &[(usize, usize)]) -> Result<(), Self::Error>;
    /// Layer `layer` over the step's rows, each sequence's K/V written into its cache (`kvs` in
    /// segment order).
    fn layer_batch(
        &mut self,
        layer: usize,
        weights: &LayerTensors<'_>,
        kvs: &mut [&mut crate::model::KvCache],
    ) -> Result<(), Self::Error>;
    /// [`Self::layer_batch`] for a mixture-of-experts layer whose experts are units of their
    /// own: the layer up to its router (`weights` need not hold the stacked experts); returns
    /// the experts the step's rows chose, ascending. Each then runs with [`Self::expert`] and
    /// [`Self::layer_finish`] ends the layer.
    fn layer_routed(
        &mut self,
        layer: usize,
        weights: &LayerTensors<'_>,
        kvs: &mut [&mut crate::model::KvCache],
    ) -> Result<Vec<usize>, Self::Error>;
    /// Expert `e` of the routed layer on the rows sent to it: `[gate, up, down]`.
    fn expert(
        &mut self,
        layer: usize,
        e: usize,
        weights: [&DeviceTensor<'_>; 3],
    ) -> Result<(), Self::Error>;
    /// The end of a routed layer: the experts' sum added to the residual stream.
    fn layer_finish(&mut self, layer: usize) -> Result<(), Self::Error>;
    /// The step's residual stream `[rows, n_embd]` copied to the host (waits for the stream):
    /// a layer computed on the host takes it from here.
    fn hidden_to_host(&mut self) -> Result<Vec<f32>, Self::Error>;
    /// Replaces the step's residual stream with `rows` (`[rows, n_embd]`, the step's rows)
    /// from the host, after layers computed there.
    fn hidden_from_host(&mut self, rows: &[f32]) -> Result<(), Self::Error>;
    /// Final norm and head on the given rows of the step; waits for the stream and returns
    /// what each row wants, in the order asked: its logits, or where `greedy[i]` says only its
    /// greedy token is wanted, that token ([`RowLogits::Argmax`], chosen on the device; the
    /// row's logits stay there). `greedy` is as long as `rows`.
    fn output_rows(
        &mut self,
        norm: &DeviceTensor<'_>,
        head: &DeviceTensor<'_>,
        rows: &[usize],
        greedy: &[bool],
    ) -> Result<Vec<RowLogits>, Self::Error>;
    /// One sequence's step: embeds `tokens` at positions `pos..`.
    fn embed(
        &mut self,
        table: &DeviceTensor<'_>,
        tokens: &[u32],
        pos: usize,
    ) -> Result<(), Self::Error> {
        self.embed_rows(table, tokens)?;
        self.set_segments(&[(tokens.len(), pos)])
    }
    /// Layer `layer` over one sequence's embedded tokens, writing their K/V into `kv`.
    fn layer(
        &mut self,
        layer: usize,
        weights: &LayerTensors<'_>,
        kv: &mut crate::model::KvCache,
    ) -> Result<(), Self::Error> {
        self.layer_batch(layer, weights, &mut [kv])
    }
    /// The final-normed hidden state of every row of the step (`[rows, n_embd]`, what the head
    /// reads; embeddings); waits for the stream.
    fn final_hidden(&mut self, norm: &DeviceTensor<'_>) -> Result<Vec<f32>, Self::Error>;
    /// Final norm and head on the step's last row; waits for the stream and returns the logits.
    fn output(
        &mut self,
        norm: &DeviceTensor<'_>,
        head: &DeviceTensor<'_>,
    ) -> Result<Vec<f32>, Self::Error>;
    /// No work is waiting: finish lazy set-up now (see `ModelCompute::idle`). Default: nothing.
    fn idle(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_print() {
        for (s, k) in [
            ("cpu", BackendKind::Cpu),
            ("CUDA", BackendKind::Cuda),
            ("hip", BackendKind::Hip),
            ("rocm", BackendKind::Hip),
            (" auto ", BackendKind::Auto),
        ] {
            assert_eq!(s.parse::<BackendKind>().ok(), Some(k));
        }
        assert!(matches!(
            "metal".parse::<BackendKind>(),
            Err(BackendError::UnknownBackend(_))
        ));
        assert_eq!(BackendKind::Cuda.to_string(), "cuda");
    }

    #[test]
    fn cpu_opens_and_auto_always_yields_a_backend() {
        let (b, fb) = Backend::open(BackendKind::Cpu).expect("cpu");
        assert_eq!(b.kind(), BackendKind::Cpu);
        assert!(fb.reasons.is_empty());
        let (b, fb) = Backend::open(BackendKind::Auto).expect("auto never fails");
        // Either a GPU opened, or the CPU came back with a reason per GPU backend.
        assert!(b.kind() != BackendKind::Cpu || fb.reasons.len() == 2);
    }

    /// The no-driver path. A GPU run (feature `gpu-tests`) expects a driver, so the test is
    /// compiled out there; elsewhere a driver makes it fail rather than pass without checking.
    #[cfg(not(feature = "gpu-tests"))]
    #[test]
    fn cuda_without_driver_is_no_device() {
        assert!(
            !cuda::driver_present(),
            "a CUDA driver is installed here, so the no-driver path cannot be checked; \
             on a GPU machine run the GPU tests instead (--features gpu-tests)"
        );
        let e = Backend::open(BackendKind::Cuda).expect_err("no driver");
        assert!(
            matches!(
                e,
                BackendError::NoDevice {
                    backend: "CUDA",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().starts_with("no CUDA driver/device"), "{e}");
    }

    #[cfg(not(feature = "hip"))]
    #[test]
    fn hip_without_feature_is_not_compiled() {
        assert!(matches!(
            Backend::open(BackendKind::Hip),
            Err(BackendError::NotCompiled { backend: "HIP", .. })
        ));
    }
}
