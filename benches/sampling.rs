//! The host sampler's cost per token for the vocabularies a server meets (SmolLM2 49,152,
//! Llama 3 128,256): greedy (`argmax`), the API's default (temperature 0.8, top-k 40, top-p
//! 0.95), the default with a repeat penalty, top-p alone, and a token's log-probabilities with
//! its 5 best alternatives (`logprobs`). A batched step pays this once per sequence (on the
//! inference actor's pool, several at once).
//!
//!     cargo bench -p rocmforge --bench sampling

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rocmforge::sample::{argmax, Sampler, SamplingParams};

fn logits(n: usize) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    (0..n).map(|_| rng.gen_range(-12.0f32..12.0)).collect()
}

fn bench(c: &mut Criterion) {
    let history: Vec<u32> = (0..256).map(|i| i * 97).collect();
    for n in [49_152usize, 128_256] {
        let l = logits(n);
        let mut g = c.benchmark_group(format!("sample_{n}"));
        g.bench_function("greedy", |b| b.iter(|| argmax(black_box(&l))));
        let mut s = Sampler::new(SamplingParams::default());
        g.bench_function("default_top_k_40", |b| {
            b.iter(|| s.sample(black_box(&l), &history))
        });
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 1.1,
            ..SamplingParams::default()
        });
        g.bench_function("default_repeat_penalty", |b| {
            b.iter(|| s.sample(black_box(&l), &history))
        });
        let mut s = Sampler::new(SamplingParams {
            top_k: 0,
            ..SamplingParams::default()
        });
        g.bench_function("top_p_only", |b| {
            b.iter(|| s.sample(black_box(&l), &history))
        });
        g.bench_function("logprobs_top_5", |b| {
            b.iter(|| rocmforge::sample::TokenLogprobs::of(black_box(&l), 3, 5))
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
