//! Tokenizer throughput on the SmolLM2 vocabulary: the reference prompts with a warm word cache,
//! and a long text cold (cache cleared every iteration). Needs models/SmolLM2-135M-Instruct.Q4_1.gguf.
//!
//!     cargo bench -p rocmforge --bench tokenizer

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rocmforge::gguf::GgufFile;
use rocmforge::tokenizer::Tokenizer;
use std::path::PathBuf;

fn load() -> Option<(Tokenizer, Vec<String>)> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("ROCMFORGE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    let file = match GgufFile::open(&model) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipping tokenizer bench: {}: {e}", model.display());
            return None;
        }
    };
    let tok = Tokenizer::from_metadata(file.metadata()).ok()?;
    let cases = std::fs::read_to_string(root.join("tests/data/smollm2/cases.json")).ok()?;
    let cases: Vec<serde_json::Value> = serde_json::from_str(&cases).ok()?;
    let prompts = cases
        .iter()
        .filter_map(|c| c["prompt"].as_str().map(str::to_string))
        .collect();
    Some((tok, prompts))
}

fn bench(c: &mut Criterion) {
    let Some((tok, prompts)) = load() else { return };
    let mut g = c.benchmark_group("tokenizer");
    let model = std::env::var_os("ROCMFORGE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    if let Ok(file) = GgufFile::open(&model) {
        g.sample_size(10);
        g.bench_function("from_metadata", |b| {
            b.iter(|| Tokenizer::from_metadata(black_box(file.metadata())))
        });
        g.sample_size(100);
    }
    for (i, p) in prompts.iter().enumerate() {
        g.throughput(Throughput::Bytes(p.len() as u64));
        g.bench_function(format!("encode_warm/case{i}_{}B", p.len()), |b| {
            b.iter(|| tok.encode(black_box(p), false, true))
        });
    }
    let long: String = prompts.concat().repeat(20);
    g.throughput(Throughput::Bytes(long.len() as u64));
    g.bench_function(format!("encode_cold/{}B", long.len()), |b| {
        b.iter(|| {
            tok.clear_cache();
            tok.encode(black_box(&long), false, true)
        })
    });
    let ids = tok.encode(&long, false, true).unwrap_or_default();
    g.throughput(Throughput::Elements(ids.len() as u64));
    g.bench_function(format!("decode/{}tok", ids.len()), |b| {
        b.iter(|| tok.decode(black_box(&ids)))
    });
    // One 20 000-letter word: the merge queue must keep this near-linear.
    let word = "abcdefghij".repeat(2000);
    g.throughput(Throughput::Bytes(word.len() as u64));
    g.bench_function("encode_cold/one_word_20000B", |b| {
        b.iter(|| {
            tok.clear_cache();
            tok.encode(black_box(&word), false, true)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
