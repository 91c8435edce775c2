//! hipRTC, loaded at run time (`dlopen`), so kernels compile for the exact GPU in the machine.
//!
//! Why hipRTC and not ahead-of-time `hipcc --genco` code objects: a code object runs only on
//! the one `gfx` target it was built for, so shipping them means guessing the users' GPUs at
//! build time (and every new target needs a rebuild); hipRTC compiles for whatever
//! `gcnArchName` the device reports, through the same compile cache as NVRTC (keyed by source
//! hash, arch and compiler version), and needs no compiler on the build machine. It also needs
//! no GPU: the CI check compiles every kernel for gfx90a and gfx1030 through this loader.
//! `scripts/hip-compile-kernels.sh` builds the same sources with `hipcc --genco` as an
//! independent cross-check and for anyone who wants offline code objects.
//!
//! Where the functions live depends on the ROCm release: ROCm 6.x ships `libhiprtc.so.6`;
//! ROCm 5.x up to 5.2 (the Debian 12 packages) exports them from `libamdhip64.so.5` itself (only
//! `libhiprtc-builtins` is a separate package there). Search order:
//! 1. `$ROCMFORGE_HIPRTC_LIB` (a library file or a directory holding one);
//! 2. the sonames through the system loader: `libhiprtc.so`, `.so.6`, `.so.5`;
//! 3. `lib/` under `$HIP_PATH`, `$ROCM_PATH`, `/opt/rocm`, then `/usr/lib/x86_64-linux-gnu`;
//! 4. `libamdhip64.so` (`.so.6`, `.so.5`), for releases that bundle hipRTC into the runtime.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use crate::backend::error::{BackendError, BackendResult};

/// Environment variable naming the hipRTC library file (or its directory).
pub const HIPRTC_ENV: &str = "ROCMFORGE_HIPRTC_LIB";

type Prog = *mut c_void;
type RtcResult = c_int;
const HIPRTC_SUCCESS: RtcResult = 0;

type FnVersion = unsafe extern "C" fn(*mut c_int, *mut c_int) -> RtcResult;
type FnCreate = unsafe extern "C" fn(
    *mut Prog,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> RtcResult;
type FnCompile = unsafe extern "C" fn(Prog, c_int, *const *const c_char) -> RtcResult;
type FnSize = unsafe extern "C" fn(Prog, *mut usize) -> RtcResult;
type FnGet = unsafe extern "C" fn(Prog, *mut c_char) -> RtcResult;
type FnDestroy = unsafe extern "C" fn(*mut Prog) -> RtcResult;
type FnErrStr = unsafe extern "C" fn(RtcResult) -> *const c_char;

const LIB_NAMES: [&str; 3] = ["libhiprtc.so", "libhiprtc.so.6", "libhiprtc.so.5"];
const RUNTIME_NAMES: [&str; 3] = ["libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5"];

/// The loaded library: resolved entry points, valid for the life of the process (the handle is
/// never closed, so the function pointers cannot dangle).
#[derive(Debug)]
pub struct HipRtc {
    path: String,
    major: i32,
    minor: i32,
    create: FnCreate,
    compile: FnCompile,
    code_size: FnSize,
    code: FnGet,
    log_size: FnSize,
    log: FnGet,
    destroy: FnDestroy,
    err_str: FnErrStr,
    /// Serialises compiles: hipRTC 5.2 (comgr/LLVM underneath) crashes with SIGSEGV when two
    /// threads compile at once (seen in this project's tests). Compiles are rare (once per
    /// kernel file, arch and compiler version; the cache serves the rest), so a global lock
    /// costs nothing that matters.
    lock: Mutex<()>,
}

impl HipRtc {
    /// The process-wide hipRTC, loaded on first use. The outcome (including a failure) is
    /// remembered: the search runs once.
    pub fn get() -> BackendResult<&'static HipRtc> {
        static LIB: OnceLock<Result<HipRtc, (String, String)>> = OnceLock::new();
        match LIB.get_or_init(load) {
            Ok(l) => Ok(l),
            Err((reason, searched)) => Err(BackendError::CompilerNotFound {
                library: "hipRTC (libhiprtc, or libamdhip64 on ROCm <= 5.2)",
                env_var: HIPRTC_ENV,
                reason: reason.clone(),
                searched: searched.clone(),
            }),
        }
    }

    /// File the library was loaded from (or the soname the system loader resolved).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// (major, minor) of hipRTC, e.g. (5, 2).
    pub fn version(&self) -> (i32, i32) {
        (self.major, self.minor)
    }

    /// Compiles one translation unit to an AMD code object for `arch` (`gfx90a`, or a full
    /// target id such as `gfx90a:sramecc+:xnack-`). `headers` are (include name, text) pairs
    /// served to `#include "name"`. A compile error is [`BackendError::Compile`] with the log.
    pub fn compile(
        &self,
        file: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: &str,
        defines: &[(String, String)],
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
        let opts = compile_options(arch, defines);
        let opts_c: Vec<CString> = opts
            .iter()
            .map(|o| CString::new(o.as_str()).map_err(|_| cerr("option")))
            .collect::<BackendResult<_>>()?;
        let opts_p: Vec<*const c_char> = opts_c.iter().map(|c| c.as_ptr()).collect();
        let n_headers = c_int::try_from(headers.len()).map_err(|_| cerr("header list"))?;
        let n_opts = c_int::try_from(opts_p.len()).map_err(|_| cerr("option list"))?;

        // A panic while holding the lock cannot leave hipRTC state behind (the guard below
        // destroys the program), so a poisoned lock is still usable.
        let _serial = self.lock.lock().unwrap_or_else(|p| p.into_inner());
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
        self.check(rc, "hiprtcCreateProgram")?;
        let guard = ProgGuard { lib: self, prog };
        // SAFETY: `prog` was created above; the option strings outlive the call.
        let rc = unsafe { (self.compile)(guard.prog, n_opts, opts_p.as_ptr()) };
        if rc != HIPRTC_SUCCESS {
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
        let out = self.read(guard.prog, self.code_size, self.code)?;
        if out.is_empty() {
            return Err(BackendError::Compile {
                kernel: file.to_string(),
                arch: arch.to_string(),
                log: "hipRTC reported success but produced an empty code object".into(),
            });
        }
        Ok(out)
    }

    fn read(&self, prog: Prog, size: FnSize, get: FnGet) -> BackendResult<Vec<u8>> {
        let mut n = 0usize;
        // SAFETY: `prog` is a live program, `n` a valid out-pointer.
        self.check(unsafe { size(prog, &mut n) }, "hiprtcGet*Size")?;
        let mut buf = vec![0u8; n];
        if n == 0 {
            return Ok(buf);
        }
        // SAFETY: `buf` has exactly the size hipRTC reported for this output.
        self.check(unsafe { get(prog, buf.as_mut_ptr().cast()) }, "hiprtcGet*")?;
        Ok(buf)
    }

    fn err_string(&self, rc: RtcResult) -> String {
        // SAFETY: hiprtcGetErrorString returns a static string for any code (or NULL).
        let p = unsafe { (self.err_str)(rc) };
        if p.is_null() {
            return format!("hipRTC error {rc}");
        }
        // SAFETY: non-null results are static NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, rc: RtcResult, op: &'static str) -> BackendResult<()> {
        if rc == HIPRTC_SUCCESS {
            Ok(())
        } else {
            Err(BackendError::Driver {
                backend: "hipRTC",
                op,
                reason: self.err_string(rc),
            })
        }
    }
}

/// The options every kernel is compiled with (public so tests and docs can show them).
pub fn compile_options(arch: &str, defines: &[(String, String)]) -> Vec<String> {
    let mut opts = vec![
        format!("--offload-arch={arch}"),
        "-O3".to_string(),
        "-std=c++17".to_string(),
        // No -ffast-math: the kernels are checked against the CPU reference. The wavefront size
        // is the target's default (64 on gfx9, 32 on gfx10+); vendor.cuh reads it from
        // __AMDGCN_WAVEFRONT_SIZE and the host checks it against the device at open.
    ];
    for (k, v) in defines {
        opts.push(if v.is_empty() {
            format!("-D{k}")
        } else {
            format!("-D{k}={v}")
        });
    }
    opts
}

/// Destroys the program on every exit path.
struct ProgGuard<'a> {
    lib: &'a HipRtc,
    prog: Prog,
}

impl Drop for ProgGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: `prog` came from hiprtcCreateProgram and is destroyed exactly once, here.
        unsafe {
            (self.lib.destroy)(&mut self.prog);
        }
    }
}

/// Candidate library paths/names, in search order.
pub fn candidates() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let push_dir = |out: &mut Vec<String>, d: &Path, names: &[&str]| {
        for n in names {
            let p = d.join(n);
            if p.exists() {
                out.push(p.display().to_string());
            }
        }
    };
    if let Some(v) = std::env::var_os(HIPRTC_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if p.is_dir() {
            push_dir(&mut out, &p, &LIB_NAMES);
            push_dir(&mut out, &p, &RUNTIME_NAMES);
        } else {
            out.push(p.display().to_string());
        }
    }
    out.extend(LIB_NAMES.iter().map(|s| s.to_string()));
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["HIP_PATH", "ROCM_PATH"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(&v).join("lib"));
            dirs.push(PathBuf::from(&v).join("lib64"));
        }
    }
    dirs.push(PathBuf::from("/opt/rocm/lib"));
    dirs.push(PathBuf::from("/usr/lib/x86_64-linux-gnu"));
    for d in &dirs {
        push_dir(&mut out, d, &LIB_NAMES);
    }
    out.extend(RUNTIME_NAMES.iter().map(|s| s.to_string()));
    for d in &dirs {
        push_dir(&mut out, d, &RUNTIME_NAMES);
    }
    out
}

fn load() -> Result<HipRtc, (String, String)> {
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

fn open(name: &str) -> Result<HipRtc, String> {
    let c = CString::new(name).map_err(|_| format!("{name}: NUL in path"))?;
    // SAFETY: dlopen with a NUL-terminated name; RTLD_NOW resolves everything up front so a
    // broken library fails here, not at a later call. The handle is never closed (see HipRtc).
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
    // SAFETY (all transmutes below): each symbol is the hipRTC C function of that name, whose
    // signature the matching Fn* type spells out from hiprtc.h; function and data pointers have
    // the same size on every platform ROCm supports.
    let lib = unsafe {
        HipRtc {
            path: name.to_string(),
            major: 0,
            minor: 0,
            create: std::mem::transmute::<*mut c_void, FnCreate>(sym("hiprtcCreateProgram")?),
            compile: std::mem::transmute::<*mut c_void, FnCompile>(sym("hiprtcCompileProgram")?),
            code_size: std::mem::transmute::<*mut c_void, FnSize>(sym("hiprtcGetCodeSize")?),
            code: std::mem::transmute::<*mut c_void, FnGet>(sym("hiprtcGetCode")?),
            log_size: std::mem::transmute::<*mut c_void, FnSize>(sym("hiprtcGetProgramLogSize")?),
            log: std::mem::transmute::<*mut c_void, FnGet>(sym("hiprtcGetProgramLog")?),
            destroy: std::mem::transmute::<*mut c_void, FnDestroy>(sym("hiprtcDestroyProgram")?),
            err_str: std::mem::transmute::<*mut c_void, FnErrStr>(sym("hiprtcGetErrorString")?),
            lock: Mutex::new(()),
        }
    };
    // SAFETY: as above, hiprtcVersion(int*, int*).
    let version = unsafe { std::mem::transmute::<*mut c_void, FnVersion>(sym("hiprtcVersion")?) };
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers.
    if unsafe { version(&mut major, &mut minor) } != HIPRTC_SUCCESS {
        return Err(format!("{name}: hiprtcVersion failed"));
    }
    Ok(HipRtc {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_name_the_arch_and_defines() {
        let o = compile_options(
            "gfx90a",
            &[("A".into(), "1".into()), ("B".into(), String::new())],
        );
        assert_eq!(o[0], "--offload-arch=gfx90a");
        assert!(o.contains(&"-DA=1".to_string()));
        assert!(o.contains(&"-DB".to_string()));
        assert!(!o.iter().any(|s| s.contains("fast-math")));
    }

    #[test]
    fn candidates_prefer_libhiprtc_then_the_runtime() {
        let c = candidates();
        let rtc = c
            .iter()
            .position(|s| s == "libhiprtc.so")
            .expect("libhiprtc.so listed");
        let rt = c
            .iter()
            .position(|s| s == "libamdhip64.so")
            .expect("libamdhip64.so listed");
        assert!(rtc < rt);
    }
}
