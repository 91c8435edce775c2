//! The model file as the runtime accepted it: its path and identity (device, inode, size,
//! modification time) when it was loaded or last reloaded, and a generation that grows with
//! every reload.
//!
//! Every read of weights after the load goes through a `SourceFile`, which checks the
//! descriptor's identity against the accepted one first (one `fstat`): a file truncated,
//! overwritten or replaced in place is then an error naming the file (`ModelChanged`) instead
//! of bytes of another model or, through a map, a SIGBUS. A file replaced by `rename` keeps the
//! old inode open and readable, so serving goes on from it; `changed_on_disk` sees the new one.
//! After `RuntimeHandle::reload` accepts the file again, every `SourceFile` reopens the path.

use crate::error::{Result, RuntimeError};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What identifies the bytes of a file without reading them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    pub len: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
}

impl FileId {
    pub fn of(m: &std::fs::Metadata) -> Self {
        Self {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }

    /// How `now` differs from `self`, in words (`None`: it does not).
    pub fn change(&self, now: &FileId) -> Option<String> {
        if self == now {
            return None;
        }
        let mut what = Vec::new();
        if (self.dev, self.ino) != (now.dev, now.ino) {
            what.push("replaced by another file".to_string());
        }
        if self.len != now.len {
            what.push(format!("size {} B, was {} B", now.len, self.len));
        }
        if self.mtime_ns != now.mtime_ns {
            what.push("modified".to_string());
        }
        Some(what.join(", "))
    }
}

pub struct ModelSource {
    path: PathBuf,
    accepted: Mutex<FileId>,
    generation: AtomicU64,
}

impl ModelSource {
    /// The file at `path` as it is now.
    pub fn open(path: &Path) -> Result<Self> {
        let m = std::fs::metadata(path).map_err(|source| RuntimeError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            accepted: Mutex::new(FileId::of(&m)),
            generation: AtomicU64::new(0),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Grows by one with every reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn accepted(&self) -> FileId {
        *self.accepted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accepts the file as it is now (a reload); returns the new generation.
    pub fn accept(&self, id: FileId) -> u64 {
        *self.accepted.lock().unwrap_or_else(|p| p.into_inner()) = id;
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether the file at the path is still the accepted one: `None` when it is, else the
    /// change in words (also when it can no longer be found).
    pub fn changed_on_disk(&self) -> Option<String> {
        match std::fs::metadata(&self.path) {
            Ok(m) => self.accepted().change(&FileId::of(&m)),
            Err(e) => Some(format!("cannot stat it: {e}")),
        }
    }

    /// Checks an open descriptor of the model against the accepted identity.
    pub fn check(&self, file: &File) -> Result<()> {
        let m = file.metadata().map_err(|source| RuntimeError::Read {
            path: self.path.clone(),
            offset: 0,
            len: 0,
            source,
        })?;
        match self.accepted().change(&FileId::of(&m)) {
            None => Ok(()),
            Some(change) => Err(RuntimeError::ModelChanged {
                path: self.path.clone(),
                change,
            }),
        }
    }
}

/// A descriptor of the model that follows reloads: `get` reopens the path when the generation
/// moved, and checks the identity before handing the descriptor out.
pub struct SourceFile {
    source: Arc<ModelSource>,
    open: Option<(u64, File)>,
}

impl SourceFile {
    pub fn new(source: Arc<ModelSource>) -> Self {
        Self { source, open: None }
    }

    pub fn source(&self) -> &Arc<ModelSource> {
        &self.source
    }

    /// The descriptor, checked: `ModelChanged` when the file is not the accepted one.
    pub fn get(&mut self) -> Result<&File> {
        let generation = self.source.generation();
        let f = match self.open.take() {
            Some((g, f)) if g == generation => f,
            _ => File::open(self.source.path()).map_err(|source| RuntimeError::Open {
                path: self.source.path().to_path_buf(),
                source,
            })?,
        };
        let (_, f) = self.open.insert((generation, f));
        self.source.check(f)?;
        Ok(f)
    }

    /// The descriptor the last `get` checked (no new check).
    pub fn opened(&self) -> Option<&File> {
        self.open.as_ref().map(|(_, f)| f)
    }

    /// `pread` of exactly `buf.len()` bytes at `offset`, after the identity check.
    pub fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        let path = self.source.path().to_path_buf();
        self.get()?
            .read_exact_at(buf, offset)
            .map_err(|source| RuntimeError::Read {
                path,
                offset,
                len: buf.len(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_changed_file_is_refused_until_accepted_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.bin");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let src = Arc::new(ModelSource::open(&p).unwrap());
        let mut f = SourceFile::new(src.clone());
        let mut buf = [0u8; 16];
        f.read_exact_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [7u8; 16]);
        assert!(src.changed_on_disk().is_none());

        // Truncated in place: refused, naming the file and the sizes.
        let orig = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096)
            .unwrap();
        let e = f.read_exact_at(&mut buf, 100).unwrap_err();
        let m = e.to_string();
        assert!(matches!(e, RuntimeError::ModelChanged { .. }), "{m}");
        assert!(m.contains("m.bin") && m.contains("4096"), "{m}");
        assert!(src.changed_on_disk().is_some());

        // Restored with its timestamp: the same file again.
        let mut w = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        w.set_len(0).unwrap();
        w.write_all(&[7u8; 8192]).unwrap();
        w.set_modified(orig).unwrap();
        drop(w);
        f.read_exact_at(&mut buf, 100).unwrap();

        // Rewritten (new timestamp): refused until accepted; then read again.
        std::fs::write(&p, vec![9u8; 8192]).unwrap();
        let later = orig + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert!(f.read_exact_at(&mut buf, 100).is_err());
        let g = src.accept(FileId::of(&std::fs::metadata(&p).unwrap()));
        assert_eq!(g, 1);
        f.read_exact_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [9u8; 16]);
    }
}
