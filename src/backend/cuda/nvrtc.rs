//! NVRTC, loaded at run time from wherever it is installed.
//!
//! cudarc's own loader only tries names for one CUDA major (12 with our feature set) and panics
//! when nothing loads. The device has CUDA 13 (`libnvrtc.so.13`), CI has the PyPI wheel
//! `nvidia-cuda-nvrtc-cu12` (`libnvrtc.so.12` inside site-packages, not on the loader path), so
//! this module finds the library itself and calls the handful of functions we need through
//! `dlsym`. Search order:
//! 1. `$ROCMFORGE_NVRTC_LIB` (a library file or a directory holding one);
//! 2. the plain sonames through the system loader (`libnvrtc.so`, `.so.13`, `.so.12`, `.so.11.2`);
//! 3. `$CUDA_PATH`, `$CUDA_HOME`, `/usr/local/cuda*` `lib64` folders;
//! 4. `nvidia/cuda_nvrtc/lib` under the Python site-packages folders (found by asking
//!    `python3` for them, plus `$VIRTUAL_ENV`), where the PyPI wheels put it.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::backend::compile_cache::OutputKind;
use crate::backend::error::{BackendError, BackendResult};

/// Environment variable naming the NVRTC library file (or its directory).
pub const NVRTC_ENV: &str = "ROCMFORGE_NVRTC_LIB";

type Prog = *mut c_void;
type NvrtcResult = c_int;
const NVRTC_SUCCESS: NvrtcResult = 0;

type FnVersion = unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult;
type FnCreate = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> NvrtcResult;
type FnCompile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> NvrtcResult;
type FnSize = unsafe extern "C" fn(Prog, *mut usize) -> NvrtcResult;
type FnGet = unsafe extern "C" fn(Prog, *mut c_char) -> NvrtcResult;
type FnDestroy = unsafe extern "C" fn(*mut Prog) -> NvrtcResult;
type FnErrStr = unsafe extern "C" fn(NvrtcResult) -> *const c_char;

/// The loaded library: resolved entry points, valid for the life of the process (never
/// unloaded, so the function pointers cannot dangle).
#[derive(Debug)]
pub struct Nvrtc {
    path: String,
    major: i32,
    minor: i32,
    create: FnCreate,
    compile: FnCompile,
    ptx_size: FnSize,
    ptx: FnGet,
    cubin_size: FnSize,
    cubin: FnGet,
    log_size: FnSize,
    log: FnGet,
    destroy: FnDestroy,
    err_str: FnErrStr,
}

impl Nvrtc {
    /// The process-wide NVRTC, loaded on first use. The result (including a failure) is
    /// remembered: the search runs once.
    pub fn get() -> BackendResult<&'static Nvrtc> {
        static LIB: OnceLock<Result<Nvrtc, (String, String)>> = OnceLock::new();
        match LIB.get_or_init(load) {
            Ok(l) => Ok(l),
            Err((reason, searched)) => Err(BackendError::CompilerNotFound {
                library: "NVRTC (libnvrtc)",
                env_var: NVRTC_ENV,
                reason: reason.clone(),
                searched: searched.clone(),
            }),
        }
    }

    /// File the library was loaded from (or the soname the system loader resolved).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// (major, minor), e.g. (12, 9).
    pub fn version(&self) -> (i32, i32) {
        (self.major, self.minor)
    }

    /// Compiles one translation unit. `headers` are (include name, text) pairs served to
    /// `#include "name"`; `arch` is `sm_90`-style (PTX output uses the matching `compute_90`).
    /// A compile error returns [`BackendError::Compile`] with the full log.
    pub fn compile(
        &self,
        file: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: &str,
        defines: &[(String, String)],
        output: OutputKind,
    ) -> BackendResult<Vec<u8>> {
        let cerr = |what: &str| BackendError::Compile {
            kernel: file.to_string(),
            arch: arch.to_string(),
            log: format!("{what} contains a NUL byte"),
        };
        let src = CString::new(source).map_err(|_| cerr("source"))?;
        let name = CString::new(file).map_err(|_| cerr("file name"))?;
        let mut hsrc = Vec::with_capacity(headers.len());
        let mut hname = Vec::with_capacity(headers.len());
        for (n, t) in headers {
            hname.push(CString::new(*n).map_err(|_| cerr("header name"))?);
            hsrc.push(CString::new(*t).map_err(|_| cerr("header"))?);
        }
        let hsrc_p: Vec<*const c_char> = hsrc.iter().map(|c| c.as_ptr()).collect();
        let hname_p: Vec<*const c_char> = hname.iter().map(|c| c.as_ptr()).collect();
        let target = match output {
            OutputKind::Ptx => arch.replace("sm_", "compute_"),
            OutputKind::Binary => arch.to_string(),
        };
        let mut opts = vec![
            format!("--gpu-architecture={target}"),
            // No --use_fast_math: the kernels are checked against the CPU reference.
            "--std=c++17".to_string(),
        ];
        for (k, v) in defines {
            opts.push(if v.is_empty() {
                format!("-D{k}")
            } else {
                format!("-D{k}={v}")
            });
        }
        let opts_c: Vec<CString> = opts
            .iter()
            .map(|o| CString::new(o.as_str()).map_err(|_| cerr("define")))
            .collect::<BackendResult<_>>()?;
        let opts_p: Vec<*const c_char> = opts_c.iter().map(|c| c.as_ptr()).collect();

        let n_headers = c_int::try_from(headers.len()).map_err(|_| cerr("header list"))?;
        let mut prog: Prog = std::ptr::null_mut();
        // SAFETY: every pointer is a NUL-terminated CString (or an array of them) alive for the
        // call; `prog` is a valid out-pointer.
        let rc = unsafe {
            (self.create)(
                &mut prog,
                src.as_ptr(),
                name.as_ptr(),
                n_headers,
                hsrc_p.as_ptr(),
                hname_p.as_ptr(),
            )
        };
        self.check(rc, "nvrtcCreateProgram")?;
        let guard = ProgGuard { lib: self, prog };
        // SAFETY: `prog` was created above; the option strings outlive the call.
        let rc = unsafe {
            (self.compile)(
                guard.prog,
                c_int::try_from(opts_p.len()).unwrap_or(0),
                opts_p.as_ptr(),
            )
        };
        if rc != NVRTC_SUCCESS {
            let log = self
                .read(guard.prog, self.log_size, self.log)
                .unwrap_or_default();
            let log = String::from_utf8_lossy(&log)
                .trim_end_matches('\0')
                .to_string();
            return Err(BackendError::Compile {
                kernel: file.to_string(),
                arch: arch.to_string(),
                log: format!("{}\n{log}", self.err_string(rc)),
            });
        }
        let mut out = match output {
            OutputKind::Ptx => self.read(guard.prog, self.ptx_size, self.ptx)?,
            OutputKind::Binary => self.read(guard.prog, self.cubin_size, self.cubin)?,
        };
        if output == OutputKind::Ptx && out.last() != Some(&0) {
            // cuModuleLoadData needs the PTX text NUL-terminated.
            out.push(0);
        }
        Ok(out)
    }

    fn read(&self, prog: Prog, size: FnSize, get: FnGet) -> BackendResult<Vec<u8>> {
        let mut n = 0usize;
        // SAFETY: `prog` is a live program, `n` a valid out-pointer.
        self.check(unsafe { size(prog, &mut n) }, "nvrtcGet*Size")?;
        let mut buf = vec![0u8; n];
        // SAFETY: `buf` has exactly the size NVRTC reported for this output.
        self.check(unsafe { get(prog, buf.as_mut_ptr().cast()) }, "nvrtcGet*")?;
        Ok(buf)
    }

    fn err_string(&self, rc: NvrtcResult) -> String {
        // SAFETY: nvrtcGetErrorString returns a static string for any code (or NULL).
        let p = unsafe { (self.err_str)(rc) };
        if p.is_null() {
            return format!("NVRTC error {rc}");
        }
        // SAFETY: non-null pointers from nvrtcGetErrorString are static NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, rc: NvrtcResult, op: &'static str) -> BackendResult<()> {
        if rc == NVRTC_SUCCESS {
            Ok(())
        } else {
            Err(BackendError::Driver {
                backend: "NVRTC",
                op,
                reason: self.err_string(rc),
            })
        }
    }
}

/// Destroys the program on every exit path.
struct ProgGuard<'a> {
    lib: &'a Nvrtc,
    prog: Prog,
}

impl Drop for ProgGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: `prog` came from nvrtcCreateProgram and is destroyed exactly once, here.
        unsafe {
            (self.lib.destroy)(&mut self.prog);
        }
    }
}

/// Candidate library paths/names, in search order.
pub fn candidates() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let push_dir = |out: &mut Vec<String>, d: &Path| {
        for n in [
            "libnvrtc.so",
            "libnvrtc.so.13",
            "libnvrtc.so.12",
            "libnvrtc.so.11.2",
        ] {
            let p = d.join(n);
            if p.exists() {
                out.push(p.display().to_string());
            }
        }
    };
    if let Some(v) = std::env::var_os(NVRTC_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if p.is_dir() {
            push_dir(&mut out, &p);
        } else {
            out.push(p.display().to_string());
        }
    }
    for n in [
        "libnvrtc.so",
        "libnvrtc.so.13",
        "libnvrtc.so.12",
        "libnvrtc.so.11.2",
    ] {
        out.push(n.to_string());
    }
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_PATH", "CUDA_HOME", "CUDA_ROOT"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(&v).join("lib64"));
            dirs.push(PathBuf::from(&v).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    for major in ["13", "12"] {
        dirs.push(PathBuf::from(format!("/usr/local/cuda-{major}/lib64")));
    }
    dirs.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    for sp in site_packages() {
        dirs.push(sp.join("nvidia").join("cuda_nvrtc").join("lib"));
        // CUDA 13 wheels use one folder for all components.
        dirs.push(sp.join("nvidia").join("cu13").join("lib"));
    }
    for d in dirs {
        push_dir(&mut out, &d);
    }
    out
}

/// Python site-packages folders: from `$VIRTUAL_ENV` and from asking `python3` (which knows
/// pyenv, user and system installs). Best effort: no Python means no folders.
fn site_packages() -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(venv) = std::env::var_os("VIRTUAL_ENV").filter(|s| !s.is_empty()) {
        if let Ok(rd) = std::fs::read_dir(PathBuf::from(&venv).join("lib")) {
            for e in rd.flatten() {
                v.push(e.path().join("site-packages"));
            }
        }
    }
    let script =
        "import site,sys\nfor p in site.getsitepackages()+[site.getusersitepackages()]: print(p)";
    for py in ["python3", "python"] {
        if let Ok(out) = std::process::Command::new(py)
            .arg("-c")
            .arg(script)
            .output()
        {
            if out.status.success() {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if !line.trim().is_empty() {
                        v.push(PathBuf::from(line.trim()));
                    }
                }
                break;
            }
        }
    }
    v
}

fn load() -> Result<Nvrtc, (String, String)> {
    let cands = candidates();
    let mut last = String::from("no candidate found");
    for c in &cands {
        match open(c) {
            Ok(lib) => return Ok(lib),
            Err(e) => last = e,
        }
    }
    Err((last, cands.join(", ")))
}

fn open(name: &str) -> Result<Nvrtc, String> {
    let c = CString::new(name).map_err(|_| format!("{name}: NUL in path"))?;
    // SAFETY: dlopen with a NUL-terminated name; RTLD_NOW resolves everything up front so a
    // broken library fails here, not at a later call. The handle is never closed (see Nvrtc).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        return Err(dl_error(name));
    }
    let sym = |s: &str| -> Result<*mut c_void, String> {
        let cs = CString::new(s).map_err(|_| s.to_string())?;
        // SAFETY: `h` is a live handle from dlopen and `cs` NUL-terminated.
        let p = unsafe { libc::dlsym(h, cs.as_ptr()) };
        if p.is_null() {
            Err(format!("{name}: symbol {s} missing"))
        } else {
            Ok(p)
        }
    };
    // SAFETY (all transmutes below): each symbol is the NVRTC C function of that name, whose
    // signature the matching Fn* type spells out from nvrtc.h; function and data pointers have
    // the same size on every platform NVRTC exists for.
    let lib = unsafe {
        Nvrtc {
            path: name.to_string(),
            major: 0,
            minor: 0,
            create: std::mem::transmute::<*mut c_void, FnCreate>(sym("nvrtcCreateProgram")?),
            compile: std::mem::transmute::<*mut c_void, FnCompile>(sym("nvrtcCompileProgram")?),
            ptx_size: std::mem::transmute::<*mut c_void, FnSize>(sym("nvrtcGetPTXSize")?),
            ptx: std::mem::transmute::<*mut c_void, FnGet>(sym("nvrtcGetPTX")?),
            cubin_size: std::mem::transmute::<*mut c_void, FnSize>(sym("nvrtcGetCUBINSize")?),
            cubin: std::mem::transmute::<*mut c_void, FnGet>(sym("nvrtcGetCUBIN")?),
            log_size: std::mem::transmute::<*mut c_void, FnSize>(sym("nvrtcGetProgramLogSize")?),
            log: std::mem::transmute::<*mut c_void, FnGet>(sym("nvrtcGetProgramLog")?),
            destroy: std::mem::transmute::<*mut c_void, FnDestroy>(sym("nvrtcDestroyProgram")?),
            err_str: std::mem::transmute::<*mut c_void, FnErrStr>(sym("nvrtcGetErrorString")?),
        }
    };
    // SAFETY: as above, nvrtcVersion(int*, int*).
    let version = unsafe { std::mem::transmute::<*mut c_void, FnVersion>(sym("nvrtcVersion")?) };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    if unsafe { version(&mut major, &mut minor) } != NVRTC_SUCCESS {
        return Err(format!("{name}: nvrtcVersion failed"));
    }
    Ok(Nvrtc {
        major,
        minor,
        ..lib
    })
}

fn dl_error(name: &str) -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated thread-local string.
    let p = unsafe { libc::dlerror() };
    if p.is_null() {
        format!("{name}: dlopen failed")
    } else {
        // SAFETY: non-null dlerror result, read before any other dl* call on this thread.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}
