//! Cache of compiled kernel modules, shared by the CUDA (NVRTC) and HIP paths.
//!
//! Two levels: in memory by (kernel file, arch, defines), and on disk under
//! `$ROCMFORGE_KERNEL_CACHE` or `~/.cache/rocmforge/kernels`, keyed by a hash of the sources
//! (the file and every header it may include), the arch, the defines, the output kind and the
//! compiler version. So a second start does not pay the compile, and a new compiler or an edited
//! header never serves a stale module. The disk level is best effort: a cache that cannot be
//! read or written costs a compile, never an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::error::BackendResult;

/// Environment variable naming the on-disk cache directory ("off" disables the disk level).
pub const CACHE_ENV: &str = "ROCMFORGE_KERNEL_CACHE";

/// What a compile produces, part of the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutputKind {
    /// Textual PTX (CUDA), JIT-compiled by the driver at load.
    Ptx,
    /// A device binary for exactly one arch (CUDA cubin, AMD code object).
    Binary,
}

impl OutputKind {
    fn ext(self) -> &'static str {
        match self {
            Self::Ptx => "ptx",
            Self::Binary => "bin",
        }
    }
}

/// Identity of one compiled module.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CompileKey {
    /// Kernel file (`"mmvq.cu"`).
    pub file: String,
    /// Target (`"sm_90"`, `"gfx90a"`).
    pub arch: String,
    /// Preprocessor defines, sorted by the caller's order (kept as given).
    pub defines: Vec<(String, String)>,
    pub output: OutputKind,
}

/// 64-bit FNV-1a: stable across Rust releases (std's hasher is not), good enough to key a cache.
pub fn fnv1a64(chunks: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for c in chunks {
        for &b in *c {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// In-memory plus on-disk cache of compiled modules.
#[derive(Debug)]
pub struct KernelCache {
    mem: Mutex<HashMap<CompileKey, Arc<Vec<u8>>>>,
    dir: Option<PathBuf>,
}

impl KernelCache {
    /// Cache with the default directory (`$ROCMFORGE_KERNEL_CACHE`, else
    /// `$XDG_CACHE_HOME/rocmforge/kernels`, else `~/.cache/rocmforge/kernels`).
    pub fn from_env() -> Self {
        Self::with_dir(default_dir())
    }

    /// Cache with an explicit directory; `None` keeps it in memory only.
    pub fn with_dir(dir: Option<PathBuf>) -> Self {
        Self {
            mem: Mutex::new(HashMap::new()),
            dir,
        }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Returns the module for `key`, compiling it with `compile` on a miss in both levels.
    /// `sources` are every text the compile reads and `compiler` names the compiler version;
    /// both go into the disk key.
    pub fn get_or_compile(
        &self,
        key: &CompileKey,
        sources: &[&str],
        compiler: &str,
        compile: impl FnOnce() -> BackendResult<Vec<u8>>,
    ) -> BackendResult<(Arc<Vec<u8>>, CacheHit)> {
        if let Some(m) = self.lock().get(key) {
            return Ok((Arc::clone(m), CacheHit::Memory));
        }
        let path = self
            .dir
            .as_ref()
            .map(|d| d.join(disk_name(key, sources, compiler)));
        if let Some(bytes) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
            if !bytes.is_empty() {
                let m = Arc::new(bytes);
                self.lock().insert(key.clone(), Arc::clone(&m));
                return Ok((m, CacheHit::Disk));
            }
        }
        let m = Arc::new(compile()?);
        if let Some(p) = path {
            if let Err(e) = write_atomic(&p, &m) {
                tracing::debug!(path = %p.display(), error = %e, "kernel cache not written");
            }
        }
        self.lock().insert(key.clone(), Arc::clone(&m));
        Ok((m, CacheHit::Compiled))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CompileKey, Arc<Vec<u8>>>> {
        // A poisoned map still holds complete entries (insert is the only mutation).
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where a module came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheHit {
    Memory,
    Disk,
    Compiled,
}

fn default_dir() -> Option<PathBuf> {
    match std::env::var_os(CACHE_ENV) {
        Some(v) if v == "off" || v == "0" => return None,
        Some(v) if !v.is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("rocmforge").join("kernels"));
    }
    std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| {
        PathBuf::from(h)
            .join(".cache")
            .join("rocmforge")
            .join("kernels")
    })
}

fn disk_name(key: &CompileKey, sources: &[&str], compiler: &str) -> String {
    let mut chunks: Vec<&[u8]> = sources.iter().map(|s| s.as_bytes()).collect();
    chunks.push(key.arch.as_bytes());
    chunks.push(compiler.as_bytes());
    chunks.push(key.output.ext().as_bytes());
    for (k, v) in &key.defines {
        chunks.push(k.as_bytes());
        chunks.push(v.as_bytes());
    }
    let stem = key.file.trim_end_matches(".cu").replace(['/', '\\'], "_");
    format!(
        "{stem}-{}-{:016x}.{}",
        key.arch,
        fnv1a64(&chunks),
        key.output.ext()
    )
}

fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // Unique temp name per process so concurrent starts never interleave writes; rename is atomic.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;

    fn key(arch: &str) -> CompileKey {
        CompileKey {
            file: "k.cu".into(),
            arch: arch.into(),
            defines: vec![],
            output: OutputKind::Ptx,
        }
    }

    #[test]
    fn second_lookup_skips_compile_and_disk_survives_a_new_cache() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = KernelCache::with_dir(Some(dir.path().to_path_buf()));
        let (m, hit) = c
            .get_or_compile(&key("sm_90"), &["src"], "12.9", || Ok(vec![1, 2, 3]))
            .expect("compile");
        assert_eq!(hit, CacheHit::Compiled);
        assert_eq!(*m, vec![1, 2, 3]);
        let r = c.get_or_compile(&key("sm_90"), &["src"], "12.9", || {
            Err(BackendError::UnknownBackend("must not compile".into()))
        });
        assert!(matches!(r, Ok((_, CacheHit::Memory))));
        // A fresh cache over the same directory finds the module on disk.
        let c2 = KernelCache::with_dir(Some(dir.path().to_path_buf()));
        let r = c2.get_or_compile(&key("sm_90"), &["src"], "12.9", || Ok(vec![9]));
        assert!(matches!(r, Ok((ref m, CacheHit::Disk)) if **m == vec![1, 2, 3]));
        // A changed source or compiler version is a different entry.
        let c3 = KernelCache::with_dir(Some(dir.path().to_path_buf()));
        let r = c3.get_or_compile(&key("sm_90"), &["src2"], "12.9", || Ok(vec![7]));
        assert!(matches!(r, Ok((_, CacheHit::Compiled))));
        let r = c3.get_or_compile(&key("sm_80"), &["src"], "13.0", || Ok(vec![7]));
        assert!(matches!(r, Ok((_, CacheHit::Compiled))));
    }

    #[test]
    fn compile_errors_are_returned_and_not_cached() {
        let c = KernelCache::with_dir(None);
        let r = c.get_or_compile(&key("sm_80"), &["s"], "v", || {
            Err(BackendError::Compile {
                kernel: "k.cu".into(),
                arch: "sm_80".into(),
                log: "error: x".into(),
            })
        });
        assert!(matches!(r, Err(BackendError::Compile { .. })));
        let r = c.get_or_compile(&key("sm_80"), &["s"], "v", || Ok(vec![1]));
        assert!(matches!(r, Ok((_, CacheHit::Compiled))));
    }
}
