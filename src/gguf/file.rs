//! `GgufFile`: a parsed GGUF over a read-only memory map, with zero-copy tensor views.

use super::error::{GgufError, Result};
use super::metadata::Metadata;
use super::reader::{parse, GgufLayout};
use super::tensor::{group_by_layer, TensorGroup, TensorInfo};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// An open model file. Cheap to share: the map is reference counted.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    map: Arc<Mmap>,
    layout: Arc<GgufLayout>,
    by_name: Arc<HashMap<String, usize>>,
}

impl GgufFile {
    /// Maps and validates a file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; we never create `&mut`
        // views of it. If another process truncates the file underneath us, reads may fault —
        // the usual caveat of every mmap-based model loader (llama.cpp included).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let layout = parse(&map)?;
        Ok(Self::with_layout(path, map, layout))
    }

    /// The file over `map`, whose bytes `layout` was parsed from.
    fn with_layout(path: PathBuf, map: Mmap, layout: GgufLayout) -> Self {
        let by_name = layout
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Self {
            path,
            map: Arc::new(map),
            layout: Arc::new(layout),
            by_name: Arc::new(by_name),
        }
    }

    /// A file held in memory (tests, fuzzing): `bytes` are parsed and validated as `open`
    /// does, then copied into an anonymous map; `path` only names it in messages.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8]) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let layout = parse(bytes)?;
        let io = |source| GgufError::Io {
            path: path.clone(),
            source,
        };
        // `parse` refused an empty buffer, so the map has at least one byte.
        let mut map = memmap2::MmapMut::map_anon(bytes.len()).map_err(io)?;
        map.copy_from_slice(bytes);
        let map = map.make_read_only().map_err(io)?;
        Ok(Self::with_layout(path, map, layout))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.layout.version
    }

    pub fn metadata(&self) -> &Metadata {
        &self.layout.metadata
    }

    /// Tensors in the order the file lists them.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.layout.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.layout.tensors[i])
    }

    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| GgufError::NoSuchTensor {
            name: name.to_string(),
        })
    }

    pub fn alignment(&self) -> u64 {
        self.layout.alignment
    }

    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.layout.data_offset
    }

    pub fn file_len(&self) -> u64 {
        self.layout.file_len
    }

    /// The whole mapped file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Shared handle to the map (for actors that keep views alive across threads).
    pub fn map(&self) -> Arc<Mmap> {
        self.map.clone()
    }

    /// Absolute byte range of a tensor in the file.
    pub fn tensor_range(&self, t: &TensorInfo) -> std::ops::Range<usize> {
        // Checked against the file length at parse time, so these fit in usize.
        let start = (self.layout.data_offset + t.offset) as usize;
        start..start + t.n_bytes as usize
    }

    /// Zero-copy view of a tensor's bytes.
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        &self.map[self.tensor_range(t)]
    }

    /// Tensors grouped by layer with per-layer byte totals (global group first).
    pub fn layer_groups(&self) -> Vec<TensorGroup> {
        group_by_layer(&self.layout.tensors)
    }

    /// Sum of all tensor bytes.
    pub fn tensor_bytes(&self) -> u64 {
        self.layout.tensors.iter().map(|t| t.n_bytes).sum()
    }

    pub fn layout(&self) -> &GgufLayout {
        &self.layout
    }
}
