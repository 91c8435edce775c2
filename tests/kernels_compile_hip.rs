//! Every kernel source compiles for AMD gfx90a (CDNA2, wave64) and gfx1030 (RDNA2, wave32)
//! through the project's own run-time path (hipRTC, `backend::hip::compile`), and the device
//! views of the quant blocks and of the wavefront width agree with the Rust side at compile
//! time. Needs no GPU and not the `hip` feature (hipRTC is loaded with dlopen).
//!
//! A second test builds every kernel with `hipcc --genco` (the ahead-of-time toolchain), an
//! independent check that the sources are valid HIP and not only valid hipRTC input.
//!
//! Skips with a printed reason when hipRTC (or, for the second test, hipcc) is absent, unless
//! ROCMFORGE_REQUIRE_HIPCC=1 (CI), where a missing HIP toolchain fails the tests.

use std::path::Path;
use std::process::Command;

use rocmforge::backend::compile_cache::KernelCache;
use rocmforge::backend::hip::{
    compile, compile_source, wavefront_check_source, HipRtc, CHECKED_ARCHS,
};
use rocmforge::backend::kernels::{block_size_asserts, block_size_asserts_with, entry_points_for};
use rocmforge::backend::BackendError;
use rocmforge::quant::GgmlType;

const REQUIRE_ENV: &str = "ROCMFORGE_REQUIRE_HIPCC";

fn required() -> bool {
    std::env::var(REQUIRE_ENV).as_deref() == Ok("1")
}

/// The loaded hipRTC, or `None` after printing why the test is skipped.
fn hiprtc_or_skip(test: &str) -> Option<HipRtc> {
    match HipRtc::get() {
        Ok(r) => Some(r),
        Err(e) => {
            assert!(
                !required(),
                "{REQUIRE_ENV}=1 but hipRTC is unavailable: {e}"
            );
            eprintln!("SKIP {test}: {e}");
            None
        }
    }
}

/// Whether `hay` contains `needle`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The code object is an AMD GPU ELF (e_machine EM_AMDGPU = 224), or a clang offload bundle
/// holding one, and names `arch`.
fn assert_amdgpu_code_object(what: &str, co: &[u8], arch: &str) {
    let elf_at = if co.starts_with(b"\x7fELF") {
        Some(0)
    } else if co.starts_with(b"__CLANG_OFFLOAD_BUNDLE__") {
        co.windows(4).position(|w| w == b"\x7fELF")
    } else {
        None
    };
    let Some(at) = elf_at else {
        panic!(
            "{what}: not an ELF or offload bundle (starts {:?})",
            &co[..co.len().min(16)]
        );
    };
    let machine = u16::from_le_bytes([co[at + 18], co[at + 19]]);
    assert_eq!(
        machine, 224,
        "{what}: ELF e_machine {machine}, expected EM_AMDGPU (224)"
    );
    assert!(
        contains(co, arch.as_bytes()),
        "{what}: code object does not name {arch}"
    );
}

#[test]
fn every_kernel_compiles_for_gfx90a_and_gfx1030() {
    let Some(rtc) = hiprtc_or_skip("every_kernel_compiles_for_gfx90a_and_gfx1030") else {
        return;
    };
    eprintln!("hipRTC {:?} from {}", rtc.version(), rtc.path());
    // Memory-only cache: this test must exercise the compiler, not a warm disk cache.
    let cache = KernelCache::with_dir(None);
    let mut compiled = 0;
    for (file, entries) in entry_points_for(false) {
        for arch in CHECKED_ARCHS {
            let (co, _) = compile(&cache, file, arch, &[])
                .unwrap_or_else(|e| panic!("{file} for {arch}: {e}"));
            assert_amdgpu_code_object(&format!("{file}/{arch}"), &co, arch);
            for e in &entries {
                // Kernel symbols are extern "C": the name appears verbatim, NUL-terminated, in
                // the symbol string table.
                let mut sym = e.as_bytes().to_vec();
                sym.push(0);
                assert!(
                    contains(&co, &sym),
                    "{file} for {arch}: entry point {e} missing"
                );
            }
            compiled += 1;
        }
    }
    let files: Vec<&str> = rocmforge::kernels::KERNEL_SOURCES
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| n.ends_with(".cu"))
        .collect();
    for f in &files {
        assert!(
            entry_points_for(false).iter().any(|(e, _)| e == f),
            "{f} has no entry in backend::kernels::entry_points"
        );
    }
    assert_eq!(compiled, files.len() * CHECKED_ARCHS.len());
}

#[test]
fn device_block_sizes_match_rust_on_both_archs() {
    let Some(_) = hiprtc_or_skip("device_block_sizes_match_rust_on_both_archs") else {
        return;
    };
    let cache = KernelCache::with_dir(None);
    let src = block_size_asserts();
    for arch in CHECKED_ARCHS {
        compile_source(&cache, "block_sizes_check.cu", &src, arch, &[])
            .unwrap_or_else(|e| panic!("block sizes disagree on {arch}: {e}"));
    }
    // The check can fail: a table with Q4_0 one byte too large must be rejected, naming it.
    let wrong = block_size_asserts_with(|t| t.block_bytes() + u64::from(t == GgmlType::Q4_0));
    for arch in CHECKED_ARCHS {
        match compile_source(&cache, "block_sizes_wrong.cu", &wrong, arch, &[]) {
            Err(BackendError::Compile { log, .. }) => {
                assert!(log.contains("block_q4_0"), "{arch}: {log}")
            }
            other => panic!("{arch}: a wrong size table compiled: {other:?}"),
        }
    }
}

#[test]
fn wavefront_width_is_64_on_cdna_and_32_on_rdna() {
    let Some(_) = hiprtc_or_skip("wavefront_width_is_64_on_cdna_and_32_on_rdna") else {
        return;
    };
    let cache = KernelCache::with_dir(None);
    for arch in CHECKED_ARCHS {
        let src = wavefront_check_source(arch).expect("gfx target");
        compile_source(&cache, "wave_check.cu", &src, arch, &[])
            .unwrap_or_else(|e| panic!("RF_WARP disagrees with the host on {arch}: {e}"));
    }
    // Cross over: the gfx90a expectation (64) must fail on gfx1030 (wave32) and vice versa.
    let (cdna, rdna) = (CHECKED_ARCHS[0], CHECKED_ARCHS[1]);
    for (expect_of, target) in [(cdna, rdna), (rdna, cdna)] {
        let src = wavefront_check_source(expect_of).expect("gfx target");
        let r = compile_source(&cache, "wave_cross.cu", &src, target, &[]);
        assert!(
            matches!(r, Err(BackendError::Compile { ref log, .. }) if log.contains("RF_WARP")),
            "{expect_of}'s wavefront check compiled for {target}: {r:?}"
        );
    }
}

#[test]
fn a_broken_kernel_reports_the_compiler_log() {
    let Some(_) = hiprtc_or_skip("a_broken_kernel_reports_the_compiler_log") else {
        return;
    };
    let cache = KernelCache::with_dir(None);
    let src = "#include \"common.cuh\"\nextern \"C\" __global__ void k(float* x) { x[0] = undeclared_name; }\n";
    match compile_source(&cache, "broken.cu", src, "gfx90a", &[]) {
        Err(BackendError::Compile { kernel, arch, log }) => {
            assert_eq!((kernel.as_str(), arch.as_str()), ("broken.cu", "gfx90a"));
            assert!(log.contains("undeclared_name"), "log: {log}");
        }
        other => panic!("a broken kernel compiled: {other:?}"),
    }
}

/// hipcc's device-library flag for the Debian layout (ROCm installs under /opt/rocm find their
/// own).
fn device_lib_args() -> Vec<String> {
    if let Ok(p) = std::env::var("ROCM_DEVICE_LIB_PATH") {
        return vec![format!("--rocm-device-lib-path={p}")];
    }
    let debian = "/usr/lib/x86_64-linux-gnu/amdgcn/bitcode";
    if Path::new(debian).is_dir() {
        vec![format!("--rocm-device-lib-path={debian}")]
    } else {
        Vec::new()
    }
}

#[test]
fn every_kernel_compiles_with_hipcc_genco() {
    let test = "every_kernel_compiles_with_hipcc_genco";
    if Command::new("hipcc").arg("--version").output().is_err() {
        assert!(!required(), "{REQUIRE_ENV}=1 but hipcc is not installed");
        eprintln!("SKIP {test}: hipcc not found on PATH");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, text) in rocmforge::kernels::KERNEL_SOURCES {
        std::fs::write(dir.path().join(name), text).expect("write kernel source");
    }
    let mut failures = Vec::new();
    for (file, _) in entry_points_for(false) {
        for arch in CHECKED_ARCHS {
            let out = dir.path().join(format!("{file}-{arch}.co"));
            let res = Command::new("hipcc")
                .arg("--genco")
                .arg(format!("--offload-arch={arch}"))
                .args(device_lib_args())
                .args(["-O3", "-std=c++17", "-x", "hip"])
                .arg(dir.path().join(file))
                .arg("-o")
                .arg(&out)
                .output()
                .expect("run hipcc");
            if !res.status.success() {
                failures.push(format!(
                    "{file}/{arch}:\n{}",
                    String::from_utf8_lossy(&res.stderr)
                ));
                continue;
            }
            let co = std::fs::read(&out).expect("read code object");
            assert_amdgpu_code_object(&format!("hipcc {file}/{arch}"), &co, arch);
        }
    }
    assert!(
        failures.is_empty(),
        "hipcc failed:\n{}",
        failures.join("\n")
    );
}
