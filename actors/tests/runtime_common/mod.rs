//! Helpers for the runtime tests: a synthetic GGUF model and runtime builders.
#![allow(dead_code)]

use rocmforge::gguf::{GgufWriter, Metadata, TensorSpec, Value};
use rocmforge::quant::qtype::GgmlType;
use rocmforge_actors::compute::ChecksumCompute;
use rocmforge_actors::{GenerateRequest, MemoryBudget, ReadMode, Runtime, RuntimeBuilder};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const VOCAB: usize = 64;

/// Writes a llama-shaped model: `token_embd` [32, VOCAB] F32, `output_norm`, and per layer four
/// Q8_0 matrices of `cols x rows` (pseudo-random bytes, different per layer).
pub fn synthetic_model(dir: &Path, n_layers: usize, rows: u64) -> PathBuf {
    synthetic_model_vocab(dir, n_layers, rows, VOCAB)
}

/// `synthetic_model` with a `vocab`-row embedding table (tied output head): a large vocabulary
/// makes the head bigger than a layer, as in real small models.
pub fn synthetic_model_vocab(dir: &Path, n_layers: usize, rows: u64, vocab: usize) -> PathBuf {
    let path = dir.join(format!("synthetic-{n_layers}x{rows}-v{vocab}.gguf"));
    let mut md = Metadata::new();
    md.insert("general.architecture", Value::String("llama".into()));
    md.insert("llama.block_count", Value::U32(n_layers as u32));
    let mut specs = vec![TensorSpec {
        name: "token_embd.weight".into(),
        shape: vec![32, vocab as u64],
        ggml_type: GgmlType::F32,
    }];
    for l in 0..n_layers {
        for k in ["attn_q", "attn_k", "ffn_up", "ffn_down"] {
            specs.push(TensorSpec {
                name: format!("blk.{l}.{k}.weight"),
                shape: vec![256, rows],
                ggml_type: GgmlType::Q8_0,
            });
        }
    }
    specs.push(TensorSpec {
        name: "output_norm.weight".into(),
        shape: vec![32],
        ggml_type: GgmlType::F32,
    });
    let f = std::fs::File::create(&path).expect("create model");
    let mut w = GgufWriter::new(std::io::BufWriter::new(f), &md, &specs).expect("writer");
    let mut seed = 0x1234_5678_9abc_def0u64;
    while let Some(info) = w.next_tensor() {
        let n = info.n_bytes as usize;
        let mut data = Vec::with_capacity(n);
        for _ in 0..n {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            data.push((seed >> 24) as u8);
        }
        w.write_tensor(&data).expect("tensor");
    }
    w.finish().expect("finish");
    path
}

pub fn builder(model: &Path, mode: ReadMode, budget: MemoryBudget) -> RuntimeBuilder {
    Runtime::builder()
        .model(model)
        .read_mode(mode)
        .memory_budget(budget)
        .staging(4, 16 << 10)
        .compute(ChecksumCompute::factory(VOCAB, Duration::ZERO))
}

/// `builder` for a model written by `synthetic_model_vocab`.
pub fn builder_vocab(
    model: &Path,
    mode: ReadMode,
    budget: MemoryBudget,
    vocab: usize,
) -> RuntimeBuilder {
    builder(model, mode, budget).compute(ChecksumCompute::factory(vocab, Duration::ZERO))
}

pub fn request(n: usize) -> GenerateRequest {
    GenerateRequest::tokens(vec![1, 5, 9], n)
}

/// Threads of this process (Linux).
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Names of this process's threads (Linux), for a failure's message.
pub fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .map(|n| n.trim_end().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// SmolLM2-135M-Instruct: `ROCMFORGE_TEST_MODEL` if set (the device check joins it there),
/// else `models/` (scripts/fetch-model.sh).
pub fn smollm2() -> PathBuf {
    let p = std::env::var_os("ROCMFORGE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}
