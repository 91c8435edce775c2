//! The CUDA forward pass against the CPU backend on the same model: logits relative error of the prompt, 32 greedy tokens on the
//! SmolLM2 reference prompts (the synthetic model: up to its first near-tie), the same tokens with
//! a 40% weight budget (streamed layers), and bit-equal repeats on each side.
//! Models: `ROCMFORGE_TEST_MODEL` (SmolLM2) and `ROCMFORGE_SYNTH_MODEL` (a synthetic 1B, made
//! with `rocmforge synth --preset 1b`). Needs a CUDA device: ignored unless the `gpu-tests`
//! feature is on, and failing without a device or a model when it is (tests/common/gpu.rs).
//! This is CUDA's own forward pass (`CudaModel`); the vendor-neutral one is covered per backend
//! by actors/tests/gpu_pipeline.rs.

#[macro_use]
mod common;

use rocmforge::backend::cuda::forward::{CudaModel, CudaOptions};
use rocmforge::backend::cuda::CudaDevice;
use rocmforge::model::{Model, Precision, SequenceConfig};
use rocmforge::sample::{argmax, Sampler, SamplingParams};
use std::ops::ControlFlow;
use std::sync::Arc;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    hf_prompt_ids: Vec<u32>,
}

const STEPS: usize = 32;

/// Top-1 minus top-2 logit, relative to the largest |logit|: how near a step is to a tie.
fn rel_margin(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    let max_abs = logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    (a - b) / max_abs
}

/// The exact CPU oracle: logits of the prompt, 32 greedy ids, and each step's relative top-2
/// margin (the margin of step i decides id i).
fn cpu_greedy(m: &Model, prompt: &[u32]) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let cfg = SequenceConfig {
        ctx: Some(256),
        precision: Precision::Exact,
        kv_type: None,
    };
    let mut s = m.new_sequence(cfg).unwrap();
    let first = m.forward(prompt, &mut s).unwrap().to_vec();
    let mut ids = vec![argmax(&first)];
    let mut margins = vec![rel_margin(&first)];
    while ids.len() < STEPS {
        let l = m.forward(&[*ids.last().unwrap()], &mut s).unwrap();
        ids.push(argmax(l));
        margins.push(rel_margin(l));
    }
    (first, ids, margins)
}

fn gpu_greedy(cm: &mut CudaModel, prompt: &[u32]) -> (Vec<f32>, Vec<u32>) {
    cm.reset();
    let first = cm.forward_logits(prompt).unwrap();
    cm.reset();
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let g = cm
        .generate(
            &mut sampler,
            prompt,
            STEPS,
            |_| false,
            |_| ControlFlow::Continue(()),
        )
        .unwrap();
    (first, g.ids)
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let max_ref = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max_ref
}

/// Logits relative error (max |diff| / max |ref|) the CUDA path may have against the exact CPU
/// oracle: f16 KV cache and f16/f32 accumulation orders differ from the CPU's f32. Measured on
/// the H100 (docs/results/2026-11-22-h100-hipfwd.txt), prefill GEMM through cuBLAS and through
/// the portable gemm.cu (`ROCMFORGE_NO_CUBLAS=1`) alike: SmolLM2 3.4e-4..1.4e-3, the synthetic 1B
/// 0.9e-3..2.2e-3 (it reached 1.4e-2..2.2e-2 only while a multi-batch prefill race existed,
/// fixed in `forward_batch`). 1e-2 keeps a 4.5x margin over the worst case seen and was 3e-2
/// before; random weights still leave few decisive greedy steps (their top-2 margins are tiny),
/// so the synthetic model is checked mainly by the logits error, the bit-equal repeats and the
/// 40% budget tokens.
const MAX_REL_ERR: f32 = 1e-2;

/// Greedy ids must agree until the CPU oracle's step is a near-tie: each of the two top logits
/// can move by up to MAX_REL_ERR x max|logit|, so a relative margin below twice that may flip
/// without either side being wrong. SmolLM2's reference prompts have no such step in 32 (the
/// test asserts all 32 for it); random weights do.
const NEAR_TIE: f32 = 2.0 * MAX_REL_ERR;

/// Steps of `a` and `b` that must agree: up to (excluding) the first near-tie of the oracle.
fn decisive_prefix(margins: &[f32]) -> usize {
    margins
        .iter()
        .position(|&m| m < NEAR_TIE)
        .unwrap_or(margins.len())
}

fn check_model(dev: Arc<CudaDevice>, path: &std::path::Path, label: &str, require_all_steps: bool) {
    let model = Arc::new(Model::open(path).unwrap());
    let cases: Vec<Case> = serde_json::from_slice(
        &std::fs::read(common::data_dir().join("smollm2-logits/cases.json")).unwrap(),
    )
    .unwrap();
    let opt = CudaOptions {
        ctx: 256,
        max_batch: 64,
        ..CudaOptions::default()
    };
    let mut full = CudaModel::load(Arc::clone(&dev), Arc::clone(&model), opt).unwrap();
    let budget = (full.report.weight_bytes as f64 * 0.4) as usize;
    let mut streamed = CudaModel::load(
        Arc::clone(&dev),
        Arc::clone(&model),
        CudaOptions {
            weight_budget: Some(budget),
            ..opt
        },
    )
    .unwrap();
    println!(
        "{label}: {} weight bytes; 40% budget {budget}: {} resident + {} streamed layers, device weight bytes {}; blas: {:?}; prefill GEMM: {}",
        full.report.weight_bytes, streamed.report.resident_layers, streamed.report.streamed_layers,
        streamed.report.device_weight_bytes, full.report.blas,
        if rocmforge::backend::cuda::blas::cublas_disabled() {
            "portable gemm.cu (ROCMFORGE_NO_CUBLAS)"
        } else {
            "cuBLAS (portable gemm.cu if it fails to load)"
        }
    );
    assert!(streamed.report.streamed_layers > 0);
    assert!(streamed.report.device_weight_bytes <= budget);
    println!("| model | case | prompt tokens | logits rel err | greedy tokens equal (of {STEPS}) | decisive steps | 40% budget equal | GPU repeat bit-equal | CPU repeat bit-equal |");
    let mut worst = 0f32;
    for c in &cases {
        let (cl, cids, margins) = cpu_greedy(&model, &c.hf_prompt_ids);
        let (gl, gids) = gpu_greedy(&mut full, &c.hf_prompt_ids);
        let (_, sids) = gpu_greedy(&mut streamed, &c.hf_prompt_ids);
        // Run-to-run determinism of each side (a flip seen once on the synthetic 1B was never
        // pinned to one side): the same inputs twice must give the same bits.
        let (gl2, gids2) = gpu_greedy(&mut full, &c.hf_prompt_ids);
        let (cl2, cids2, _) = cpu_greedy(&model, &c.hf_prompt_ids);
        let gpu_det = gl == gl2 && gids == gids2;
        let cpu_det = cl == cl2 && cids == cids2;
        let e = rel_err(&gl, &cl);
        worst = worst.max(e);
        let same = cids.iter().zip(&gids).take_while(|(a, b)| a == b).count();
        let same_s = gids.iter().zip(&sids).take_while(|(a, b)| a == b).count();
        let decisive = if require_all_steps {
            STEPS
        } else {
            decisive_prefix(&margins)
        };
        println!(
            "| {label} | {} | {} | {e:.2e} | {same} | {decisive} | {same_s} | {gpu_det} | {cpu_det} |",
            c.name,
            c.hf_prompt_ids.len()
        );
        assert!(
            cpu_det,
            "{}: the CPU oracle differs between two runs",
            c.name
        );
        assert!(
            gpu_det,
            "{}: the CUDA forward differs between two runs",
            c.name
        );
        assert!(
            same >= decisive,
            "{}: CUDA vs CPU greedy tokens differ at step {same} before the first near-tie ({decisive})\n cpu {cids:?}\n gpu {gids:?}",
            c.name
        );
        // Streaming changes where weights live, not the arithmetic: bit-equal tokens.
        assert_eq!(sids, gids, "{}: 40% budget vs unbounded", c.name);
    }
    assert!(worst < MAX_REL_ERR, "worst logits relative error {worst}");
}

gpu_test!(cuda: fn smollm2_cuda_matches_cpu() {
    let dev = require_device!(cuda);
    check_model(dev, &common::smollm2_path(), "SmolLM2-135M Q4_1", true);
});

gpu_test!(cuda: fn synth_cuda_matches_cpu() {
    let dev = require_device!(cuda);
    let path = std::env::var_os("ROCMFORGE_SYNTH_MODEL").expect(
        "ROCMFORGE_SYNTH_MODEL is not set: point it at `rocmforge synth --preset 1b --qtype q4_0` \
         output (scripts/device-check.sh makes one)",
    );
    check_model(dev, std::path::Path::new(&path), "synth 1B Q4_0", false);
});
