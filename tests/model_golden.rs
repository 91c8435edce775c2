//! Golden tests of the forward pass on SmolLM2-135M-Instruct (Q4_1) against the float32
//! Hugging Face reference (tests/data/smollm2-logits/README.md). Prompt ids come straight from
//! the reference, so these tests do not depend on the tokenizer.

mod common;

use rocmforge::model::{Model, Precision, Sequence, SequenceConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    hf_prompt_ids: Vec<u32>,
    hf_greedy_ids: Vec<u32>,
    hf_greedy_top2_margins: Vec<f32>,
    logits_file: String,
    logits_argmax: u32,
}

/// Margin below which the reference's top-2 is a near-tie that rounding may flip.
const TIE_MARGIN: f32 = 0.25;
const EXACT_REL_L2: f64 = 1e-3;

fn cases() -> Vec<Case> {
    let p = common::data_dir().join("smollm2-logits/cases.json");
    let text = std::fs::read_to_string(&p).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn reference_logits(c: &Case) -> Vec<f32> {
    let p = common::data_dir()
        .join("smollm2-logits")
        .join(&c.logits_file);
    std::fs::read(p)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

fn model() -> Model {
    Model::open(common::smollm2_path()).unwrap()
}

fn seq(m: &Model, precision: Precision) -> Sequence {
    m.new_sequence(SequenceConfig {
        ctx: Some(512),
        precision,
        kv_type: None,
    })
    .unwrap()
}

fn check_prompt_logits(precision: Precision) {
    let m = model();
    let mut failures = Vec::new();
    for c in cases() {
        let mut s = seq(&m, precision);
        let logits = m.forward(&c.hf_prompt_ids, &mut s).unwrap();
        let err = rel_l2(logits, &reference_logits(&c));
        let top = argmax(logits);
        println!(
            "{precision:?} {:<26} rel L2 {err:.2e}  top-1 {top} (reference {})",
            c.name, c.logits_argmax
        );
        if top != c.logits_argmax {
            failures.push(format!("{}: top-1 {top} != {}", c.name, c.logits_argmax));
        }
        if precision == Precision::Exact && err > EXACT_REL_L2 {
            failures.push(format!("{}: rel L2 {err:.2e} > {EXACT_REL_L2:e}", c.name));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn exact_prompt_logits_match_reference() {
    check_prompt_logits(Precision::Exact);
}

/// Fast mode (Q8 activations, f16 KV): top-1 must match; the error is reported, not bounded.
#[test]
fn fast_prompt_top1_matches_reference() {
    check_prompt_logits(Precision::Fast);
}

fn check_greedy(precision: Precision) {
    let m = model();
    let mut failures = Vec::new();
    for c in cases() {
        let mut s = seq(&m, precision);
        let mut ids = Vec::new();
        let mut next = argmax(m.forward(&c.hf_prompt_ids, &mut s).unwrap());
        ids.push(next);
        while ids.len() < c.hf_greedy_ids.len() {
            next = argmax(m.forward(&[next], &mut s).unwrap());
            ids.push(next);
        }
        let common = ids
            .iter()
            .zip(&c.hf_greedy_ids)
            .take_while(|(a, b)| a == b)
            .count();
        // Agreement is required up to the first near-tie of the reference.
        let required = c
            .hf_greedy_top2_margins
            .iter()
            .position(|&m| m < TIE_MARGIN)
            .unwrap_or(c.hf_greedy_ids.len())
            .min(c.hf_greedy_ids.len());
        println!(
            "{precision:?} {:<26} common prefix {common}/{} (required {required})",
            c.name,
            c.hf_greedy_ids.len()
        );
        if common < required {
            failures.push(format!(
                "{}: diverged at step {common}, before the first near-tie at {required}: {:?} vs {:?}",
                c.name, ids, c.hf_greedy_ids
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn exact_greedy_matches_reference_until_near_tie() {
    check_greedy(Precision::Exact);
}

#[test]
fn fast_greedy_matches_reference_until_near_tie() {
    check_greedy(Precision::Fast);
}

/// Prefill of a whole prompt and token-by-token decode of the same prompt fill the same cache:
/// the last logits agree closely.
#[test]
fn prefill_equals_token_by_token() {
    let m = model();
    let ids = &cases()[0].hf_prompt_ids;
    let mut a = seq(&m, Precision::Exact);
    let batched = m.forward(ids, &mut a).unwrap().to_vec();
    let mut b = seq(&m, Precision::Exact);
    let mut last = Vec::new();
    for &t in ids {
        last = m.forward(&[t], &mut b).unwrap().to_vec();
    }
    let err = rel_l2(&last, &batched);
    assert!(err < 1e-5, "rel L2 {err:e}");
    assert_eq!(a.pos(), ids.len());
}
