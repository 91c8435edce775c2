//! Cache of compiled kernel modules, shared by the CUDA (NVRTC) and HIP paths.
//!
//! Two levels: in memory by (kernel file, arch, defines), and on disk under
//! `$ROCMFORGE_KERNEL_CACHE` or `~/.cache/rocmforge/kernels`, keyed by a hash of the sources
//! (the file and every header it may include), the arch, the defines, the output kind and the
//! compiler version. So a second start does not pay the compile, and a new compiler or an edited
//! header never serves a stale module. The disk level is best effort: a cache that cannot be
//! read or written costs a compile, never an error.
//!
//! The compiler version is part of the key, but loading the compiler only to learn its version
//! costs start-up time (NVRTC is a 110 MB library: ~0.2 s from a cold disk, plus the library
//! search). So the cache also keeps a *compiler stamp* per compiler: which library file (path,
//! size, modification time) reported which version, under which search environment. While the
//! stamp still matches the file on disk, [`KernelCache::stamped_compiler`] gives the version
//! without loading anything, and a full cache hit never loads the compiler.

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
    /// Compiler stamps read in this process (see [`KernelCache::stamped_compiler`]).
    stamps: Mutex<HashMap<String, Option<String>>>,
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
            stamps: Mutex::new(HashMap::new()),
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
        if let Some(hit) = self.lookup(key, sources, compiler) {
            return Ok(hit);
        }
        let m = compile()?;
        Ok((self.store(key, sources, compiler, m), CacheHit::Compiled))
    }

    /// The module for `key` from memory or disk, without compiling.
    pub fn lookup(
        &self,
        key: &CompileKey,
        sources: &[&str],
        compiler: &str,
    ) -> Option<(Arc<Vec<u8>>, CacheHit)> {
        if let Some(m) = self.lock().get(key) {
            return Some((Arc::clone(m), CacheHit::Memory));
        }
        let path = self.dir.as_ref()?.join(disk_name(key, sources, compiler));
        let bytes = std::fs::read(path).ok().filter(|b| !b.is_empty())?;
        let m = Arc::new(bytes);
        self.lock().insert(key.clone(), Arc::clone(&m));
        Some((m, CacheHit::Disk))
    }

    /// Records a compiled module in both levels (replacing what was there, e.g. a cached file
    /// the driver refused to load).
    pub fn store(
        &self,
        key: &CompileKey,
        sources: &[&str],
        compiler: &str,
        module: Vec<u8>,
    ) -> Arc<Vec<u8>> {
        let m = Arc::new(module);
        if let Some(p) = self
            .dir
            .as_ref()
            .map(|d| d.join(disk_name(key, sources, compiler)))
        {
            if let Err(e) = write_atomic(&p, &m) {
                tracing::debug!(path = %p.display(), error = %e, "kernel cache not written");
            }
        }
        self.lock().insert(key.clone(), Arc::clone(&m));
        m
    }

    /// Reads the newest files of the disk level (at most `max_files` and `max_bytes`) into the
    /// page cache and returns the bytes read. From a cold disk, the kernel loading otherwise
    /// reads each module while the weight loader keeps the disk queue full (H100: 0.65-0.9 s
    /// for ~20 small files instead of ~10 ms); called while CUDA initialises, before the
    /// device's arch (and so the exact file names) is known.
    pub fn prefetch(&self, max_files: usize, max_bytes: u64) -> u64 {
        let Some(dir) = &self.dir else { return 0 };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let m = e.metadata().ok().filter(|m| m.is_file())?;
                Some((m.modified().ok()?, m.len(), e.path()))
            })
            .collect();
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        let mut read = 0u64;
        for (_, len, path) in files.into_iter().take(max_files) {
            if read + len > max_bytes {
                break;
            }
            if std::fs::read(&path).is_ok() {
                read += len;
            }
        }
        read
    }

    /// The compiler version recorded by [`KernelCache::write_stamp`] for compiler `name`, if
    /// the recorded library file still has the recorded size and modification time and the
    /// search environment `env` is unchanged; else `None` (the caller loads the compiler).
    /// Read once per process and name.
    pub fn stamped_compiler(&self, name: &str, env: &str) -> Option<String> {
        let mut st = self.stamps.lock().unwrap_or_else(|p| p.into_inner());
        st.entry(name.to_string())
            .or_insert_with(|| {
                let text =
                    std::fs::read_to_string(self.dir.as_ref()?.join(stamp_name(name))).ok()?;
                Stamp::parse(&text)
                    .filter(|s| s.env == env && s.matches_file())?
                    .compiler
                    .into()
            })
            .clone()
    }

    /// Records that the library file `lib` (as it is now) is compiler version `compiler` under
    /// the search environment `env`. Best effort, like the disk level; skipped when the same
    /// stamp is already there.
    pub fn write_stamp(&self, name: &str, lib: &Path, env: &str, compiler: &str) {
        let Some(dir) = &self.dir else { return };
        let Some(stamp) = Stamp::of_file(lib, env, compiler) else {
            return;
        };
        let path = dir.join(stamp_name(name));
        let text = stamp.render();
        if std::fs::read_to_string(&path).is_ok_and(|t| t == text) {
            return;
        }
        if let Err(e) = write_atomic(&path, text.as_bytes()) {
            tracing::debug!(path = %path.display(), error = %e, "compiler stamp not written");
        }
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

fn stamp_name(name: &str) -> String {
    format!("compiler-{}.stamp", name.replace(['/', '\\'], "_"))
}

/// A compiler stamp: the library file's identity and the version it reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    lib: PathBuf,
    size: u64,
    mtime_ns: i128,
    env: String,
    compiler: String,
}

impl Stamp {
    fn of_file(lib: &Path, env: &str, compiler: &str) -> Option<Self> {
        let (size, mtime_ns) = file_id(lib)?;
        Some(Self {
            lib: lib.to_path_buf(),
            size,
            mtime_ns,
            env: env.to_string(),
            compiler: compiler.to_string(),
        })
    }

    fn matches_file(&self) -> bool {
        file_id(&self.lib) == Some((self.size, self.mtime_ns))
    }

    /// One `key=value` per line; values are single lines (the writer refuses others).
    fn render(&self) -> String {
        format!(
            "lib={}\nsize={}\nmtime_ns={}\nenv={}\ncompiler={}\n",
            self.lib.display(),
            self.size,
            self.mtime_ns,
            self.env.replace('\n', " "),
            self.compiler.replace('\n', " ")
        )
    }

    fn parse(text: &str) -> Option<Self> {
        let mut f: HashMap<&str, &str> = HashMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=')?;
            f.insert(k, v);
        }
        Some(Self {
            lib: PathBuf::from(f.get("lib")?),
            size: f.get("size")?.parse().ok()?,
            mtime_ns: f.get("mtime_ns")?.parse().ok()?,
            env: f.get("env")?.to_string(),
            compiler: f.get("compiler")?.to_string(),
        })
    }
}

/// (size, modification time in ns since the epoch) of a file, following links.
fn file_id(p: &Path) -> Option<(u64, i128)> {
    let m = std::fs::metadata(p).ok()?;
    let t = m.modified().ok()?;
    let ns = match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i128,
        Err(e) => -(e.duration().as_nanos() as i128),
    };
    Some((m.len(), ns))
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

    /// A stamp gives the compiler version while its library file is unchanged and the search
    /// environment is the same; a changed file (size or time) or environment voids it.
    #[test]
    fn compiler_stamp_holds_while_the_library_file_is_unchanged() {
        let dir = tempfile::tempdir().expect("temp dir");
        let lib = dir.path().join("libcc.so");
        std::fs::write(&lib, b"version one").expect("write lib");
        let c = KernelCache::with_dir(Some(dir.path().join("cache")));
        assert_eq!(c.stamped_compiler("cc", "E"), None, "no stamp yet");
        c.write_stamp("cc", &lib, "E", "cc-1.0");
        let fresh = || KernelCache::with_dir(Some(dir.path().join("cache")));
        assert_eq!(
            fresh().stamped_compiler("cc", "E").as_deref(),
            Some("cc-1.0")
        );
        assert_eq!(
            fresh().stamped_compiler("cc", "F"),
            None,
            "other environment"
        );
        assert_eq!(
            fresh().stamped_compiler("other", "E"),
            None,
            "other compiler"
        );
        // The library replaced by one of another size: the stamp no longer holds.
        std::fs::write(&lib, b"version two, longer").expect("rewrite lib");
        assert_eq!(fresh().stamped_compiler("cc", "E"), None);
        // Same size, other modification time: also void.
        c.write_stamp("cc", &lib, "E", "cc-2.0");
        assert_eq!(
            fresh().stamped_compiler("cc", "E").as_deref(),
            Some("cc-2.0")
        );
        let f = std::fs::File::options()
            .write(true)
            .open(&lib)
            .expect("open lib");
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000))
            .expect("set mtime");
        assert_eq!(fresh().stamped_compiler("cc", "E"), None);
        // A damaged stamp file is no stamp.
        std::fs::write(
            dir.path().join("cache").join(stamp_name("cc")),
            "lib=x\nsize=y\n",
        )
        .expect("damage");
        assert_eq!(fresh().stamped_compiler("cc", "E"), None);
    }

    #[test]
    fn prefetch_reads_the_newest_files_within_the_caps() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (i, n) in [10u64, 20, 40].iter().enumerate() {
            let p = dir.path().join(format!("m{i}.bin"));
            std::fs::write(&p, vec![0u8; *n as usize]).expect("write");
            let f = std::fs::File::options().write(true).open(&p).expect("open");
            f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64))
                .expect("mtime");
        }
        let c = KernelCache::with_dir(Some(dir.path().to_path_buf()));
        assert_eq!(c.prefetch(10, 1000), 70);
        // Newest first: m2 (40), then m1 (20); m0 would pass the byte cap.
        assert_eq!(c.prefetch(10, 65), 60);
        assert_eq!(c.prefetch(1, 1000), 40);
        assert_eq!(KernelCache::with_dir(None).prefetch(10, 1000), 0);
    }

    #[test]
    fn lookup_never_compiles_and_store_replaces() {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = KernelCache::with_dir(Some(dir.path().to_path_buf()));
        assert!(c.lookup(&key("sm_90"), &["src"], "v1").is_none());
        c.store(&key("sm_90"), &["src"], "v1", vec![1]);
        let c2 = KernelCache::with_dir(Some(dir.path().to_path_buf()));
        assert!(
            c2.lookup(&key("sm_90"), &["src"], "v2").is_none(),
            "other compiler"
        );
        assert!(matches!(
            c2.lookup(&key("sm_90"), &["src"], "v1"),
            Some((ref m, CacheHit::Disk)) if **m == vec![1]
        ));
        c2.store(&key("sm_90"), &["src"], "v1", vec![2]);
        let c3 = KernelCache::with_dir(Some(dir.path().to_path_buf()));
        assert!(matches!(
            c3.lookup(&key("sm_90"), &["src"], "v1"),
            Some((ref m, CacheHit::Disk)) if **m == vec![2]
        ));
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
