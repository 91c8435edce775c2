//! A vendor's run-time compiler (NVRTC, hipRTC) loaded with `dlopen`: the two libraries have
//! the same C API under different prefixes (`nvrtcCreateProgram` / `hiprtcCreateProgram`, ...),
//! so loading, compiling and reading the output are written once here; `cuda/nvrtc.rs` and
//! `hip/hiprtc.rs` supply the library's names, where to look for it and the options.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use super::error::{BackendError, BackendResult};

type Prog = *mut c_void;
type RtcResult = c_int;
const RTC_SUCCESS: RtcResult = 0;

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

/// What tells one vendor's compiler library apart.
#[derive(Debug)]
pub(crate) struct RtcNames {
    /// `"NVRTC"`, `"hipRTC"` (messages).
    pub vendor: &'static str,
    /// The library as a not-found error names it (`"NVRTC (libnvrtc)"`).
    pub library: &'static str,
    /// The environment variable naming the library file or its folder.
    pub env_var: &'static str,
    /// Symbol prefix: `"nvrtc"`, `"hiprtc"`.
    pub prefix: &'static str,
    /// The outputs a compile can return, as (size symbol, get symbol) without the prefix:
    /// NVRTC `[("GetPTXSize", "GetPTX"), ("GetCUBINSize", "GetCUBIN")]`.
    pub outputs: &'static [(&'static str, &'static str)],
    /// Compile one program at a time (hipRTC 5.2, comgr/LLVM underneath, crashes with SIGSEGV
    /// when two threads compile at once; compiles are rare, so the lock costs nothing).
    pub serialize: bool,
}

/// The loaded library: resolved entry points, valid for the life of the process (the handle is
/// never closed, so the function pointers cannot dangle).
#[derive(Debug)]
pub struct RtcLib {
    vendor: &'static str,
    path: String,
    major: i32,
    minor: i32,
    create: FnCreate,
    compile: FnCompile,
    outputs: Vec<(FnSize, FnGet)>,
    log_size: FnSize,
    log: FnGet,
    destroy: FnDestroy,
    err_str: FnErrStr,
    serial: Option<Mutex<()>>,
}

/// Destroys the program on every exit path.
struct ProgGuard<'a> {
    lib: &'a RtcLib,
    prog: Prog,
}

impl Drop for ProgGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: `prog` came from the create call and is destroyed exactly once, here.
        unsafe {
            (self.lib.destroy)(&mut self.prog);
        }
    }
}

/// Where a vendor keeps its process-wide library: loaded on first use, the outcome (a failure
/// too) remembered, so the search runs once.
pub(crate) type RtcCell = OnceLock<Result<RtcLib, (String, String)>>;

impl RtcLib {
    /// The library in `cell`, loaded from the first of `candidates()` that works on first use.
    pub(crate) fn get_or_load(
        cell: &'static RtcCell,
        names: &RtcNames,
        candidates: fn() -> Vec<String>,
    ) -> BackendResult<&'static RtcLib> {
        match cell.get_or_init(|| Self::load_first(names, &candidates())) {
            Ok(l) => Ok(l),
            Err((reason, searched)) => Err(BackendError::CompilerNotFound {
                library: names.library,
                env_var: names.env_var,
                reason: reason.clone(),
                searched: searched.clone(),
            }),
        }
    }

    /// The first of `candidates` (paths or sonames) that loads with every symbol; else the last
    /// failure and the list searched.
    pub(crate) fn load_first(
        names: &RtcNames,
        candidates: &[String],
    ) -> Result<Self, (String, String)> {
        let mut last = String::from("no candidate found");
        for c in candidates {
            match Self::open(names, c) {
                Ok(lib) => return Ok(lib),
                Err(e) => last = e,
            }
        }
        Err((last, candidates.join(", ")))
    }

    fn open(names: &RtcNames, path: &str) -> Result<Self, String> {
        let c = CString::new(path).map_err(|_| format!("{path}: NUL in path"))?;
        // SAFETY: dlopen with a NUL-terminated name; RTLD_NOW resolves everything up front so a
        // broken library fails here, not at a later call. The handle is never closed.
        let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if h.is_null() {
            return Err(dl_error(path));
        }
        let sym = |s: &str| -> Result<*mut c_void, String> {
            let full = format!("{}{s}", names.prefix);
            let cs = CString::new(full.as_str()).map_err(|_| full.clone())?;
            // SAFETY: `h` is a live handle from dlopen and `cs` NUL-terminated.
            let p = unsafe { libc::dlsym(h, cs.as_ptr()) };
            if p.is_null() {
                Err(format!("{path}: symbol {full} missing"))
            } else {
                Ok(p)
            }
        };
        // SAFETY (all transmutes below): each symbol is the C function of that name in
        // nvrtc.h / hiprtc.h, whose signature the matching Fn* type spells out (the two headers
        // agree); function and data pointers have the same size on every platform either
        // library exists for.
        let size_get = |(s, g): &(&str, &str)| -> Result<(FnSize, FnGet), String> {
            unsafe {
                Ok((
                    std::mem::transmute::<*mut c_void, FnSize>(sym(s)?),
                    std::mem::transmute::<*mut c_void, FnGet>(sym(g)?),
                ))
            }
        };
        let outputs = names
            .outputs
            .iter()
            .map(size_get)
            .collect::<Result<Vec<_>, _>>()?;
        let (log_size, log) = size_get(&("GetProgramLogSize", "GetProgramLog"))?;
        // SAFETY: as above.
        let (create, compile, destroy, err_str, version) = unsafe {
            (
                std::mem::transmute::<*mut c_void, FnCreate>(sym("CreateProgram")?),
                std::mem::transmute::<*mut c_void, FnCompile>(sym("CompileProgram")?),
                std::mem::transmute::<*mut c_void, FnDestroy>(sym("DestroyProgram")?),
                std::mem::transmute::<*mut c_void, FnErrStr>(sym("GetErrorString")?),
                std::mem::transmute::<*mut c_void, FnVersion>(sym("Version")?),
            )
        };
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two valid out-pointers.
        if unsafe { version(&mut major, &mut minor) } != RTC_SUCCESS {
            return Err(format!("{path}: {}Version failed", names.prefix));
        }
        Ok(Self {
            vendor: names.vendor,
            path: path.to_string(),
            major,
            minor,
            create,
            compile,
            outputs,
            log_size,
            log,
            destroy,
            err_str,
            serial: names.serialize.then(|| Mutex::new(())),
        })
    }

    /// File the library was loaded from (or the soname the system loader resolved).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// (major, minor), e.g. (12, 9).
    pub fn version(&self) -> (i32, i32) {
        (self.major, self.minor)
    }

    /// Compiles one translation unit with `opts` and returns output number `output` (an index
    /// into [`RtcNames::outputs`]). `headers` are (include name, text) pairs served to
    /// `#include "name"`; `arch` is only for messages. A compile error is
    /// [`BackendError::Compile`] with the full log; an empty output is an error too.
    pub(crate) fn compile(
        &self,
        file: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: &str,
        opts: &[String],
        output: usize,
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
        let opts_c: Vec<CString> = opts
            .iter()
            .map(|o| CString::new(o.as_str()).map_err(|_| cerr("option")))
            .collect::<BackendResult<_>>()?;
        let opts_p: Vec<*const c_char> = opts_c.iter().map(|c| c.as_ptr()).collect();
        let n_headers = c_int::try_from(headers.len()).map_err(|_| cerr("header list"))?;
        let n_opts = c_int::try_from(opts_p.len()).map_err(|_| cerr("option list"))?;
        let &(size, get) =
            self.outputs
                .get(output)
                .ok_or_else(|| BackendError::InvalidArgument {
                    op: "RtcLib::compile",
                    what: format!("output {output} of {}", self.outputs.len()),
                })?;

        // A panic while holding the lock cannot leave compiler state behind (the guard below
        // destroys the program), so a poisoned lock is still usable.
        let _serial = self
            .serial
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()));
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
        self.check(rc, "CreateProgram")?;
        let guard = ProgGuard { lib: self, prog };
        // SAFETY: `prog` was created above; the option strings outlive the call.
        let rc = unsafe { (self.compile)(guard.prog, n_opts, opts_p.as_ptr()) };
        if rc != RTC_SUCCESS {
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
        let out = self.read(guard.prog, size, get)?;
        if out.is_empty() {
            return Err(BackendError::Compile {
                kernel: file.to_string(),
                arch: arch.to_string(),
                log: format!("{} reported success but produced no output", self.vendor),
            });
        }
        Ok(out)
    }

    fn read(&self, prog: Prog, size: FnSize, get: FnGet) -> BackendResult<Vec<u8>> {
        let mut n = 0usize;
        // SAFETY: `prog` is a live program, `n` a valid out-pointer.
        self.check(unsafe { size(prog, &mut n) }, "Get*Size")?;
        let mut buf = vec![0u8; n];
        if n == 0 {
            return Ok(buf);
        }
        // SAFETY: `buf` has exactly the size the library reported for this output.
        self.check(unsafe { get(prog, buf.as_mut_ptr().cast()) }, "Get*")?;
        Ok(buf)
    }

    fn err_string(&self, rc: RtcResult) -> String {
        // SAFETY: the error-string call returns a static string for any code (or NULL).
        let p = unsafe { (self.err_str)(rc) };
        if p.is_null() {
            return format!("{} error {rc}", self.vendor);
        }
        // SAFETY: non-null results are static NUL-terminated strings.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    fn check(&self, rc: RtcResult, op: &'static str) -> BackendResult<()> {
        if rc == RTC_SUCCESS {
            Ok(())
        } else {
            Err(BackendError::Driver {
                backend: self.vendor,
                op,
                reason: self.err_string(rc),
            })
        }
    }
}

/// `-DK=V` (or `-DK` for an empty value) for each define.
pub(crate) fn define_flags(defines: &[(String, String)]) -> impl Iterator<Item = String> + '_ {
    defines.iter().map(|(k, v)| {
        if v.is_empty() {
            format!("-D{k}")
        } else {
            format!("-D{k}={v}")
        }
    })
}

/// The files among `names` that exist in `dir`, as paths.
pub(crate) fn existing_in(dir: &Path, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect()
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
