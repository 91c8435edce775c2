//! Embeds every source under `kernels/` into the core crate as a generated registry
//! (`KERNEL_SOURCES: &[(&str, &str)]`, file name -> text), so the runtime compiles them
//! with NVRTC / hipRTC without touching the file system.
use std::{env, fs, path::Path};

fn main() {
    let dir = Path::new("kernels");
    println!("cargo:rerun-if-changed=kernels");
    let mut entries: Vec<String> = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        let mut paths: Vec<_> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for p in paths {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ext != "cu" && ext != "cuh" {
                continue;
            }
            println!("cargo:rerun-if-changed={}", p.display());
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let abs = fs::canonicalize(&p).unwrap_or(p.clone());
            entries.push(format!(
                "    ({name:?}, include_str!({:?})),\n",
                abs.display().to_string()
            ));
        }
    }
    let out =
        Path::new(&env::var("OUT_DIR").unwrap_or_else(|_| ".".into())).join("kernel_registry.rs");
    let body = format!(
        "/// Kernel sources embedded from `kernels/` by build.rs: (file name, text).\npub const KERNEL_SOURCES: &[(&str, &str)] = &[\n{}];\n",
        entries.concat()
    );
    if let Err(e) = fs::write(&out, body) {
        println!("cargo:warning=could not write kernel registry: {e}");
    }
}
