//! Stamps the binary with the commit it was built from and whether the HIP backend is in it
//! (`rocmforge --version`).
use std::process::Command;

fn main() {
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=ROCMFORGE_GIT_COMMIT={commit}");
    let hip = std::env::var_os("CARGO_FEATURE_HIP").is_some();
    println!(
        "cargo:rustc-env=ROCMFORGE_HIP_BACKEND={}",
        if hip {
            ", hip"
        } else {
            " (hip: not compiled, cargo feature `hip`)"
        }
    );
    // A new commit moves HEAD or the branch it names (loose or packed refs). Only paths that
    // exist: cargo reruns a build script on every build for a path that does not.
    println!("cargo:rerun-if-changed=build.rs");
    for p in ["../.git/HEAD", "../.git/refs/heads", "../.git/packed-refs"] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
