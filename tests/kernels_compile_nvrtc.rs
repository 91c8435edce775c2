//! Every kernel source compiles with NVRTC for sm_80 and sm_90 through the project's own compile
//! path (no GPU needed), and the device block layouts match the Rust table at compile time.
//!
//! Skips with a printed reason when libnvrtc cannot be found, unless ROCMFORGE_REQUIRE_NVRTC=1
//! (CI) or the `gpu-tests` feature (a GPU run) requires it, where a missing library fails the
//! test. It needs no device, so it is not ignored.

use rocmforge::backend::compile_cache::{KernelCache, OutputKind};
use rocmforge::backend::cuda::{compile, compile_source, Nvrtc};
use rocmforge::backend::kernels::{block_size_asserts, block_size_asserts_with, entry_points};
use rocmforge::backend::BackendError;
use rocmforge::quant::GgmlType;

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// The loaded NVRTC, or `None` after printing why the test is skipped.
fn nvrtc_or_skip(test: &str) -> Option<Nvrtc> {
    match Nvrtc::get() {
        Ok(n) => Some(n),
        Err(e) => {
            if std::env::var("ROCMFORGE_REQUIRE_NVRTC").as_deref() == Ok("1") {
                panic!("ROCMFORGE_REQUIRE_NVRTC=1 but NVRTC is unavailable: {e}");
            }
            if cfg!(feature = "gpu-tests") {
                panic!("GPU tests requested (feature gpu-tests) but NVRTC is unavailable: {e}");
            }
            eprintln!("SKIP {test}: {e}");
            None
        }
    }
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let Some(nvrtc) = nvrtc_or_skip("every_kernel_compiles_for_sm80_and_sm90") else {
        return;
    };
    eprintln!("NVRTC {:?} from {}", nvrtc.version(), nvrtc.path());
    // Memory-only cache: this test must exercise the compiler, not a warm disk cache.
    let cache = KernelCache::with_dir(None);
    let mut compiled = 0;
    for (file, entries) in entry_points() {
        for arch in ARCHS {
            let (ptx, _) = compile(&cache, file, arch, &[], OutputKind::Ptx)
                .unwrap_or_else(|e| panic!("{file} for {arch}: {e}"));
            let text = String::from_utf8_lossy(&ptx);
            // PTX for compute_XY names its target sm_XY.
            assert!(
                text.contains(&format!(".target {arch}")),
                "{file}/{arch}: PTX targets another arch"
            );
            for e in &entries {
                assert!(
                    text.contains(&format!(".entry {e}(")),
                    "{file} for {arch}: entry point {e} missing from the PTX"
                );
            }
            compiled += 1;
        }
    }
    // Every embedded .cu file is in the entry-point table (a new file must declare its entries).
    let files: Vec<&str> = rocmforge::kernels::KERNEL_SOURCES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| n.ends_with(".cu"))
        .collect();
    for f in &files {
        assert!(
            entry_points().iter().any(|(e, _)| e == f),
            "{f} has no entry in backend::kernels::entry_points"
        );
    }
    assert_eq!(compiled, files.len() * ARCHS.len());
}

#[test]
fn device_block_sizes_match_rust_at_compile_time() {
    let Some(_) = nvrtc_or_skip("device_block_sizes_match_rust_at_compile_time") else {
        return;
    };
    let cache = KernelCache::with_dir(None);
    let src = block_size_asserts();
    for arch in ARCHS {
        compile_source(
            &cache,
            "block_size_asserts.cu",
            &src,
            arch,
            &[],
            OutputKind::Ptx,
        )
        .unwrap_or_else(|e| panic!("block sizes disagree for {arch}: {e}"));
    }
    // The check can fail: a table that claims Q4_K blocks are 145 bytes must not compile.
    let wrong = block_size_asserts_with(|t| {
        if t == GgmlType::Q4_K {
            145
        } else {
            t.block_bytes()
        }
    });
    match compile_source(
        &cache,
        "wrong_sizes.cu",
        &wrong,
        "sm_80",
        &[],
        OutputKind::Ptx,
    ) {
        Err(BackendError::Compile { log, kernel, .. }) => {
            assert_eq!(kernel, "wrong_sizes.cu");
            assert!(
                log.contains("block_q4_K"),
                "log does not name the block: {log}"
            );
        }
        other => panic!("a wrong size table compiled: {other:?}"),
    }
}

#[test]
fn compile_errors_carry_the_log_and_kernel_name() {
    let Some(_) = nvrtc_or_skip("compile_errors_carry_the_log_and_kernel_name") else {
        return;
    };
    let cache = KernelCache::with_dir(None);
    let r = compile_source(
        &cache,
        "broken.cu",
        "extern \"C\" __global__ void f() { undefined_thing(); }",
        "sm_80",
        &[],
        OutputKind::Ptx,
    );
    match r {
        Err(e @ BackendError::Compile { .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("broken.cu") && msg.contains("undefined_thing"),
                "{msg}"
            );
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
}

#[test]
fn binary_output_and_disk_cache_round_trip() {
    let Some(_) = nvrtc_or_skip("binary_output_and_disk_cache_round_trip") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = KernelCache::with_dir(Some(dir.path().to_path_buf()));
    let (cubin, hit) = compile(&cache, "norm.cu", "sm_90", &[], OutputKind::Binary).expect("cubin");
    assert_eq!(hit, rocmforge::backend::compile_cache::CacheHit::Compiled);
    assert_eq!(&cubin[..4], b"\x7fELF", "a cubin is an ELF image");
    let again = KernelCache::with_dir(Some(dir.path().to_path_buf()));
    let (c2, hit) = compile(&again, "norm.cu", "sm_90", &[], OutputKind::Binary).expect("cached");
    assert_eq!(hit, rocmforge::backend::compile_cache::CacheHit::Disk);
    assert_eq!(cubin, c2);
}
