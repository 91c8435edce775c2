//! Errors of the GPU backends: one enum for CUDA and HIP, carrying what a user needs to act
//! (which library was searched where, the compiler log and kernel name, the size that did not fit).

/// Anything a driver, a compiler or a device can make fail.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// No usable driver or device; `auto` falls back to the CPU on this.
    #[error("no {backend} driver/device: {reason}")]
    NoDevice {
        backend: &'static str,
        reason: String,
    },
    /// The backend was not built into this binary (cargo feature off).
    #[error("the {backend} backend is not compiled into this build (enable the cargo feature `{feature}`)")]
    NotCompiled {
        backend: &'static str,
        feature: &'static str,
    },
    /// The backend exists as a seam but is not written yet.
    #[error("the {backend} backend is not implemented yet: {what}")]
    NotImplemented {
        backend: &'static str,
        what: &'static str,
    },
    /// A run-time compiler library (NVRTC, hipRTC) could not be loaded.
    #[error(
        "cannot load {library}: {reason}; searched: {searched}. Set {env_var} to the library file"
    )]
    CompilerNotFound {
        library: &'static str,
        env_var: &'static str,
        reason: String,
        searched: String,
    },
    /// Device memory ran out. Recoverable: nothing was allocated, the caller may evict and retry.
    #[error("out of device memory allocating {requested} bytes for {what} ({free} bytes free)")]
    OutOfMemory {
        requested: usize,
        free: usize,
        what: String,
    },
    /// Pinned host memory could not be allocated.
    #[error("cannot allocate {requested} bytes of pinned host memory: {reason}")]
    PinnedAlloc { requested: usize, reason: String },
    /// A kernel source failed to compile; `log` is the compiler's output.
    #[error("compiling kernel file {kernel} for {arch} failed:\n{log}")]
    Compile {
        kernel: String,
        arch: String,
        log: String,
    },
    /// A kernel file or entry point is not known.
    #[error("unknown kernel {name} (file {file})")]
    UnknownKernel { file: String, name: String },
    /// A kernel launch was rejected or failed.
    #[error("launching kernel {kernel} failed: {reason}")]
    Launch { kernel: String, reason: String },
    /// A kernel reported bad input through its status word (e.g. a token id out of range).
    #[error("kernel {kernel} reported invalid input: {what}")]
    KernelReported { kernel: String, what: String },
    /// Any other driver call failed.
    #[error("{backend} driver call {op} failed: {reason}")]
    Driver {
        backend: &'static str,
        op: &'static str,
        reason: String,
    },
    /// A caller passed shapes or buffers that do not fit the operation.
    #[error("invalid argument to {op}: {what}")]
    InvalidArgument { op: &'static str, what: String },
    /// Reading weights from the model file into pinned memory failed.
    #[error("reading {len} weight bytes at offset {offset} of the model file: {source}")]
    WeightRead {
        offset: usize,
        len: usize,
        source: std::io::Error,
    },
    /// The background weight upload failed earlier (its own error was returned to the first
    /// waiter); every later wait on it reports this.
    #[error("the background weight upload failed earlier: {reason}")]
    UploadFailed { reason: String },
    /// A backend name that is not cpu|cuda|hip|auto.
    #[error("unknown backend {0:?} (expected cpu, cuda, hip or auto)")]
    UnknownBackend(String),
}

pub type BackendResult<T> = std::result::Result<T, BackendError>;
