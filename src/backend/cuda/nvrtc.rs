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

use std::path::PathBuf;
use std::sync::OnceLock;

use crate::backend::compile_cache::OutputKind;
use crate::backend::error::BackendResult;
use crate::backend::rtc::{define_flags, existing_in, RtcCell, RtcLib, RtcNames};

/// Environment variable naming the NVRTC library file (or its directory).
pub const NVRTC_ENV: &str = "ROCMFORGE_NVRTC_LIB";

const NAMES: RtcNames = RtcNames {
    library: "NVRTC (libnvrtc)",
    env_var: NVRTC_ENV,
    vendor: "NVRTC",
    prefix: "nvrtc",
    // Indexed by `output_index`.
    outputs: &[("GetPTXSize", "GetPTX"), ("GetCUBINSize", "GetCUBIN")],
    serialize: false,
};

const LIB_NAMES: [&str; 4] = [
    "libnvrtc.so",
    "libnvrtc.so.13",
    "libnvrtc.so.12",
    "libnvrtc.so.11.2",
];

fn output_index(output: OutputKind) -> usize {
    match output {
        OutputKind::Ptx => 0,
        OutputKind::Binary => 1,
    }
}

/// The loaded Nvrtc: a handle to the process-wide library (see [`RtcLib`], which it derefs to).
#[derive(Debug, Clone, Copy)]
pub struct Nvrtc(&'static RtcLib);

impl std::ops::Deref for Nvrtc {
    type Target = RtcLib;
    fn deref(&self) -> &RtcLib {
        self.0
    }
}

impl Nvrtc {
    /// The process-wide library, loaded on first use (the search runs once).
    pub fn get() -> BackendResult<Nvrtc> {
        static LIB: RtcCell = OnceLock::new();
        RtcLib::get_or_load(&LIB, &NAMES, candidates).map(Nvrtc)
    }

    /// Compiles one translation unit. `headers` are (include name, text) pairs served to
    /// `#include "name"`; `arch` is `sm_90`-style (PTX output uses the matching `compute_90`).
    /// A compile error returns [`crate::backend::BackendError::Compile`] with the full log.
    pub fn compile(
        &self,
        file: &str,
        source: &str,
        headers: &[(&str, &str)],
        arch: &str,
        defines: &[(String, String)],
        output: OutputKind,
    ) -> BackendResult<Vec<u8>> {
        let target = match output {
            OutputKind::Ptx => arch.replace("sm_", "compute_"),
            OutputKind::Binary => arch.to_string(),
        };
        let mut opts = vec![
            format!("--gpu-architecture={target}"),
            // No --use_fast_math: the kernels are checked against the CPU reference.
            "--std=c++17".to_string(),
        ];
        opts.extend(define_flags(defines));
        let mut out = self
            .0
            .compile(file, source, headers, arch, &opts, output_index(output))?;
        if output == OutputKind::Ptx && out.last() != Some(&0) {
            // cuModuleLoadData needs the PTX text NUL-terminated.
            out.push(0);
        }
        Ok(out)
    }
}

/// Candidate library paths/names, in search order.
pub fn candidates() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let push_dir = |out: &mut Vec<String>, d: &std::path::Path| {
        out.extend(existing_in(d, &LIB_NAMES));
    };
    if let Some(v) = std::env::var_os(NVRTC_ENV).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if p.is_dir() {
            push_dir(&mut out, &p);
        } else {
            out.push(p.display().to_string());
        }
    }
    out.extend(LIB_NAMES.iter().map(|n| n.to_string()));
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
