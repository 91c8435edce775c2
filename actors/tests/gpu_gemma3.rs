//! Gemma 3 270M (Q4_K_M) on the GPU against llama.cpp, the device half of the CPU golden test
//! (tests/gemma3_golden.rs; references and provenance in tests/data/gemma3/README.md): through
//! the one engine (`Runtime::builder().device(kind)`), in both precisions, greedy decoding must
//! follow llama.cpp's ids until its top-2 margin drops below `TIE_MARGIN` or the float32
//! evaluation of the same weights calls the step a near-tie (the rule and its reasons are the
//! CPU test's). One case runs past the 512-position sliding window of the local layers.
//!
//! Model: `ROCMFORGE_GEMMA3_MODEL`, else models/gemma-3-270m-q4_k_m.gguf
//! (`scripts/fetch-gemma3.sh`); on the GPU machine `scripts/device-build.sh --gemma` stages it.
//! Ignored unless the `gpu-tests` feature is on, failing without a device when it is.

#[macro_use]
#[path = "../../tests/common/gpu.rs"]
#[allow(dead_code)]
mod gpu;
#[path = "../../tests/common/gemma3_rule.rs"]
mod gemma3_rule;

use rocmforge::backend::BackendKind;
use rocmforge::model::Precision;
use rocmforge_actors::{GenerateRequest, Runtime};
use std::path::PathBuf;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
    greedy_top2_margins: Vec<f32>,
    /// f32 oracle: at each greedy step, the logit of llama.cpp's id minus the largest other.
    f32_margins: Vec<f32>,
    /// f32 oracle: the last prompt position's logits at the ids of llama.cpp's top 16.
    f32_last_prompt_top_logits: Vec<(u32, f32)>,
}

/// Log-probabilities asked for at each step (the runtime's most).
const TOP: usize = 20;

/// Bound on the last prompt position's logit differences (each of the f32 oracle's top 16
/// against its top 1, read from the first step's log-probabilities) against the f32 oracle,
/// per precision: twice gpu_forward's relative bounds (1e-2 exact, 5e-2 fast) times this
/// model's largest logits (~30), since a difference moves with both of its logits.
fn gap_bound(p: Precision) -> f32 {
    match p {
        Precision::Exact => 0.6,
        Precision::Fast => 3.0,
    }
}

fn data_dir() -> PathBuf {
    std::env::var_os("ROCMFORGE_TEST_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data"))
}

fn gemma3() -> PathBuf {
    let p = std::env::var_os("ROCMFORGE_GEMMA3_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/gemma-3-270m-q4_k_m.gguf")
        });
    assert!(
        p.exists(),
        "Gemma 3 model {} is missing (scripts/fetch-gemma3.sh; on the GPU machine \
         scripts/device-build.sh --gemma)",
        p.display()
    );
    p
}

fn check(kind: BackendKind) {
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("gemma3/cases.json")).expect("cases.json"),
    )
    .expect("cases.json parses");
    let path = gemma3();
    let mut failures = Vec::new();
    for precision in [Precision::Fast, Precision::Exact] {
        let rt = Runtime::builder()
            .model(&path)
            .device_with(
                kind,
                rocmforge_actors::compute::gpu::GpuPipelineOptions {
                    precision,
                    ..Default::default()
                },
            )
            .build()
            .unwrap_or_else(|e| panic!("Gemma 3 on {kind}: {e}"));
        for c in &cases {
            let mut req = GenerateRequest::tokens(c.prompt_ids.clone(), c.greedy_ids.len());
            req.stop_at_eos = false;
            req.logprobs = Some(TOP);
            let (mut ids, mut first) = (Vec::new(), None);
            for ev in rt.generate(req).into_blocking() {
                let ev = ev.expect("token");
                ids.push(ev.token);
                first = first.or(ev.logprobs);
            }
            // The first step's log-probabilities are the last prompt position's logits less
            // one constant: their differences are the logits' differences.
            let first = first.expect("log-probabilities were asked for");
            let lp = |id: u32| first.top.iter().find(|(t, _)| *t == id).map(|&(_, l)| l);
            let (top_id, top_logit) = c.f32_last_prompt_top_logits[0];
            let gap = lp(top_id).map(|top_lp| {
                c.f32_last_prompt_top_logits
                    .iter()
                    .filter_map(|&(id, l)| lp(id).map(|x| ((x - top_lp) - (l - top_logit)).abs()))
                    .fold(0f32, f32::max)
            });
            match gap {
                Some(g) if g < gap_bound(precision) => {}
                _ => failures.push(format!(
                    "{precision:?} {}: last prompt position's logit differences {gap:?} from the \
                     f32 oracle (bound {})",
                    c.name,
                    gap_bound(precision)
                )),
            }
            let gemma3_rule::Agreement {
                agree,
                required,
                by_llama_cpp,
            } = gemma3_rule::agreement(&ids, &c.greedy_ids, &c.greedy_top2_margins, &c.f32_margins);
            println!(
                "{kind} {precision:?} {:<24} {} prompt ids: logit differences {:.3} from f32; \
                 common prefix {agree}/{} (required {required}; by llama.cpp's margins alone {by_llama_cpp})",
                c.name,
                c.prompt_ids.len(),
                gap.unwrap_or(f32::NAN),
                c.greedy_ids.len()
            );
            if agree < required {
                failures.push(format!(
                    "{precision:?} {}: diverged at step {agree}, before the first near-tie at \
                     {required}: {ids:?} vs {:?}",
                    c.name, c.greedy_ids
                ));
            }
        }
        rt.shutdown().expect("shutdown");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

gpu_test!(cuda: fn gemma3_cuda_follows_llama_cpp_until_near_tie() {
    drop(require_device!(cuda));
    check(BackendKind::Cuda);
});

gpu_test!(hip: fn gemma3_hip_follows_llama_cpp_until_near_tie() {
    drop(require_device!(hip));
    check(BackendKind::Hip);
});
