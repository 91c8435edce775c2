//! The actors crate's error type: one enum, variants grouped by concern.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    // --- configuration (caught by `RuntimeBuilder::build`) ---
    #[error("no model given to the runtime builder")]
    NoModel,
    #[error(
        "memory budget {budget} B is smaller than the global tensors ({global} B) plus the \
         largest layer ({largest_layer} B): the model cannot run with this budget"
    )]
    BudgetTooSmall {
        budget: u64,
        global: u64,
        largest_layer: u64,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("model {path} has no layers (`blk.N.*` tensors)")]
    NoLayers { path: PathBuf },

    // --- I/O and the model file ---
    #[error("reading {path} at offset {offset} ({len} B): {source}")]
    Read {
        path: PathBuf,
        offset: u64,
        len: usize,
        source: std::io::Error,
    },
    /// The model file is not the file that was loaded: its size, modification time or inode
    /// differ (truncated, overwritten or replaced in place). Nothing is read from it until it
    /// is the loaded file again or the model is reloaded (`RuntimeHandle::reload`).
    #[error(
        "model file {path} changed since it was loaded ({change}): restore it or reload the model"
    )]
    ModelChanged { path: PathBuf, change: String },
    /// Weights a request needed could not be loaded (a read error, a changed file). The
    /// request fails; the next request that needs them tries the load again.
    #[error("the weights of {what} could not be loaded from {path}{}: {message}",
        offset.map(|o| format!(" at offset {o}")).unwrap_or_default())]
    WeightsUnavailable {
        what: String,
        path: PathBuf,
        offset: Option<u64>,
        message: String,
    },
    /// `RuntimeHandle::reload` ran while the request was computing: it would have mixed
    /// weights of two versions of the file.
    #[error("the model was reloaded while this request ran")]
    ModelReloaded,
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Gguf(#[from] rocmforge::gguf::GgufError),
    #[error(transparent)]
    Core(#[from] rocmforge::Error),

    // --- backend seam ---
    #[error("backend {backend}: {message}")]
    Backend { backend: String, message: String },
    /// A GPU driver or device error (out of device memory among them), typed.
    #[error(transparent)]
    Device(#[from] rocmforge::backend::BackendError),

    // --- compute ---
    #[error("compute failed at layer {layer:?}: {message}")]
    Compute {
        layer: Option<usize>,
        message: String,
    },
    /// A request this backend's compute cannot serve yet (e.g. embeddings on a GPU).
    #[error("not supported on this backend yet: {0}")]
    Unsupported(String),
    #[error("layer {layer} lacks tensor {tensor}")]
    MissingTensor { layer: String, tensor: String },
    /// The KV pool has too few free blocks for a sequence now (it waits for others to end).
    #[error("the KV pool is full: {needed} more blocks needed, {free} of {total} free")]
    KvFull {
        needed: usize,
        free: usize,
        total: usize,
    },

    // --- lifecycle ---
    #[error("the {actor} actor failed to start: {message}")]
    Spawn {
        actor: &'static str,
        message: String,
    },
    #[error("the runtime is shut down")]
    ShutDown,
    #[error("request cancelled")]
    Cancelled,
    #[error("request queue is full ({capacity} waiting)")]
    QueueFull { capacity: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("hint rejected: {0}")]
    HintRejected(String),
    #[error("pipeline stage {stage} failed: {message}")]
    Stage {
        stage: &'static str,
        message: String,
    },
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl RuntimeError {
    /// The same error for another receiver (a failed batched step fails each of its
    /// sequences): variants made of data are copied as they are, so every client sees the
    /// same kind (a `WeightsUnavailable` stays one, answered 503); an I/O source is copied as
    /// its kind and text; the rest (sources of other crates) become `Compute` with the text.
    pub fn duplicate(&self) -> Self {
        use RuntimeError as E;
        let io = |e: &std::io::Error| std::io::Error::new(e.kind(), e.to_string());
        match self {
            E::NoModel => E::NoModel,
            E::BudgetTooSmall {
                budget,
                global,
                largest_layer,
            } => E::BudgetTooSmall {
                budget: *budget,
                global: *global,
                largest_layer: *largest_layer,
            },
            E::Config(m) => E::Config(m.clone()),
            E::NoLayers { path } => E::NoLayers { path: path.clone() },
            E::Read {
                path,
                offset,
                len,
                source,
            } => E::Read {
                path: path.clone(),
                offset: *offset,
                len: *len,
                source: io(source),
            },
            E::ModelChanged { path, change } => E::ModelChanged {
                path: path.clone(),
                change: change.clone(),
            },
            E::WeightsUnavailable {
                what,
                path,
                offset,
                message,
            } => E::WeightsUnavailable {
                what: what.clone(),
                path: path.clone(),
                offset: *offset,
                message: message.clone(),
            },
            E::ModelReloaded => E::ModelReloaded,
            E::Open { path, source } => E::Open {
                path: path.clone(),
                source: io(source),
            },
            E::Backend { backend, message } => E::Backend {
                backend: backend.clone(),
                message: message.clone(),
            },
            E::Compute { layer, message } => E::Compute {
                layer: *layer,
                message: message.clone(),
            },
            E::Unsupported(m) => E::Unsupported(m.clone()),
            E::MissingTensor { layer, tensor } => E::MissingTensor {
                layer: layer.clone(),
                tensor: tensor.clone(),
            },
            E::KvFull {
                needed,
                free,
                total,
            } => E::KvFull {
                needed: *needed,
                free: *free,
                total: *total,
            },
            E::Spawn { actor, message } => E::Spawn {
                actor,
                message: message.clone(),
            },
            E::ShutDown => E::ShutDown,
            E::Cancelled => E::Cancelled,
            E::QueueFull { capacity } => E::QueueFull {
                capacity: *capacity,
            },
            E::BadRequest(m) => E::BadRequest(m.clone()),
            E::HintRejected(m) => E::HintRejected(m.clone()),
            E::Stage { stage, message } => E::Stage {
                stage,
                message: message.clone(),
            },
            e => E::Compute {
                layer: None,
                message: e.to_string(),
            },
        }
    }
}
