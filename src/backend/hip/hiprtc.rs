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

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::backend::error::BackendResult;
use crate::backend::rtc::{define_flags, existing_in, RtcCell, RtcLib, RtcNames};

/// Environment variable naming the hipRTC library file (or its directory).
pub const HIPRTC_ENV: &str = "ROCMFORGE_HIPRTC_LIB";

const NAMES: RtcNames = RtcNames {
    library: "hipRTC (libhiprtc, or libamdhip64 on ROCm <= 5.2)",
    env_var: HIPRTC_ENV,
    vendor: "hipRTC",
    prefix: "hiprtc",
    outputs: &[("GetCodeSize", "GetCode")],
    // hipRTC 5.2 (comgr/LLVM underneath) crashes with SIGSEGV when two threads compile at once
    // (seen in this project's tests).
    serialize: true,
};

const LIB_NAMES: [&str; 3] = ["libhiprtc.so", "libhiprtc.so.6", "libhiprtc.so.5"];
const RUNTIME_NAMES: [&str; 3] = ["libamdhip64.so", "libamdhip64.so.6", "libamdhip64.so.5"];

/// The loaded hipRTC: a handle to the process-wide library (see [`RtcLib`], which it derefs to).
#[derive(Debug, Clone, Copy)]
pub struct HipRtc(&'static RtcLib);

impl std::ops::Deref for HipRtc {
    type Target = RtcLib;
    fn deref(&self) -> &RtcLib {
        self.0
    }
}

impl HipRtc {
    /// The process-wide library, loaded on first use (the search runs once).
    pub fn get() -> BackendResult<HipRtc> {
        static LIB: RtcCell = OnceLock::new();
        RtcLib::get_or_load(&LIB, &NAMES, candidates).map(HipRtc)
    }

    /// Compiles one translation unit to an AMD code object for `arch` (`gfx90a`, or a full
    /// target id such as `gfx90a:sramecc+:xnack-`). `headers` are (include name, text) pairs
    /// served to `#include "name"`. A compile error is [`crate::backend::BackendError::Compile`] with the log.
    pub fn compile(
        &self,
        file: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: &str,
        defines: &[(String, String)],
    ) -> BackendResult<Vec<u8>> {
        let opts = compile_options(arch, defines);
        self.0.compile(file, source, headers, arch, &opts, 0)
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
    opts.extend(define_flags(defines));
    opts
}

/// Candidate library paths/names, in search order.
pub fn candidates() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let push_dir = |out: &mut Vec<String>, d: &std::path::Path, names: &[&str]| {
        out.extend(existing_in(d, names));
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
