//! Batched steps equal unbatched ones: SmolLM2 on the CPU in exact mode, sequences of
//! different prompt lengths run alone (`layer`, `output`) and together (`layer_batch`,
//! `output_batch`, sequences joining late and prompts fed in chunks) give the same greedy
//! tokens; and every KV block is back in the pool once the sequences are gone.

use super::llama::LlamaCompute;
use super::{BatchLimits, BatchSeq, Hidden, ModelCompute, RowLogits, SequenceState};
use crate::pipeline::backend::CpuBackend;
use crate::pipeline::plan::LoadPlan;
use crate::pipeline::residency::{LayerMemory, ResidentLayer};
use rocmforge::gguf::GgufFile;
use rocmforge::model::{Precision, SequenceConfig};
use rocmforge::sample::argmax;
use std::sync::Arc;

const PROMPTS: [&[u32]; 4] = [
    &[504, 3575, 282, 4649, 314],
    &[1, 2683, 2],
    &[
        504, 3575, 282, 4649, 314, 1, 9690, 28, 359, 3575, 282, 4649, 314, 906,
    ],
    &[19842],
];
const NEW: usize = 6;

struct Fixture {
    compute: LlamaCompute,
    units: Vec<ResidentLayer>,
    n_layers: usize,
}

fn fixture() -> Fixture {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let file = GgufFile::open(&path).expect("the SmolLM2 test model (scripts/fetch-model.sh)");
    let plan = LoadPlan::new(&file, &CpuBackend::new()).unwrap();
    let dims = plan.unit_dims(&file);
    let units = plan
        .units
        .iter()
        .enumerate()
        .map(|(i, u)| ResidentLayer {
            unit: i,
            layer: u.layer,
            memory: LayerMemory::Mapped {
                map: file.map(),
                span: u.file_span.start as usize..u.file_span.end as usize,
            },
            tensors: Arc::new(u.tensors.clone()),
            dims: dims[i].clone(),
            generation: 0,
        })
        .collect();
    let cfg = SequenceConfig {
        ctx: Some(256),
        precision: Precision::Exact,
        kv_type: None,
    };
    let mut compute = LlamaCompute::new(&file, cfg, &Default::default()).unwrap();
    compute
        .configure_batching(BatchLimits {
            max_num_seqs: 4,
            kv_budget: None,
        })
        .unwrap();
    Fixture {
        compute,
        units,
        n_layers: plan.n_layers,
    }
}

impl Fixture {
    fn global(&self) -> &ResidentLayer {
        &self.units[self.n_layers]
    }

    /// Greedy continuation of one prompt, one sequence at a time (the unbatched calls).
    fn alone(&mut self, prompt: &[u32]) -> Vec<u32> {
        let mut seq = self.compute.new_sequence().unwrap();
        let mut input = prompt.to_vec();
        let mut out = Vec::new();
        for _ in 0..NEW {
            let mut h = self.compute.embed_from_file(&input).unwrap().unwrap();
            for l in 0..self.n_layers {
                let c = &mut self.compute;
                c.layer(l, &self.units[l], &mut seq, &mut h).unwrap();
            }
            let logits = self
                .compute
                .output(&self.units[self.n_layers], &mut seq, &h);
            let t = argmax(&logits.unwrap());
            out.push(t);
            input = vec![t];
        }
        out
    }

    /// One batched step: `parts[i]` = (sequence, tokens to feed, wants logits).
    fn step(&mut self, parts: &mut [(&mut SequenceState, Vec<u32>, bool)]) -> Vec<Vec<f32>> {
        let tokens: Vec<u32> = parts.iter().flat_map(|p| p.1.clone()).collect();
        let mut h: Hidden = self.compute.embed_from_file(&tokens).unwrap().unwrap();
        let mut batch: Vec<BatchSeq> = parts
            .iter_mut()
            .map(|(seq, t, wants)| BatchSeq {
                seq,
                rows: t.len(),
                wants_logits: *wants,
                greedy: false,
            })
            .collect();
        for l in 0..self.n_layers {
            self.compute
                .layer_batch(l, &self.units[l], &mut batch, &mut h)
                .unwrap();
        }
        let global = &self.units[self.n_layers];
        self.compute
            .output_batch(global, &mut batch, &h)
            .unwrap()
            .into_iter()
            .map(|r| match r {
                RowLogits::Full(l) => l,
                RowLogits::Argmax(t) => panic!("a token ({t}) where logits were asked"),
            })
            .collect()
    }
}

#[test]
fn sequences_run_together_give_the_tokens_they_give_alone() {
    let mut f = fixture();
    let alone: Vec<Vec<u32>> = PROMPTS.iter().map(|p| f.alone(p)).collect();
    assert_eq!(f.compute.kv_stats().unwrap().blocks_used, 0);

    // Together: sequences 0 and 1 start at step 0; sequence 2's prompt comes in two chunks
    // (steps 0 and 1, the first without logits); sequence 3 joins at step 2 while the others
    // decode.
    let mut seqs: Vec<SequenceState> = (0..4).map(|_| f.compute.new_sequence().unwrap()).collect();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let (p2a, p2b) = PROMPTS[2].split_at(9);
    let mut next: Vec<Vec<u32>> = vec![
        PROMPTS[0].to_vec(),
        PROMPTS[1].to_vec(),
        p2a.to_vec(),
        PROMPTS[3].to_vec(),
    ];
    for step in 0..NEW + 2 {
        let mut order: Vec<usize> = Vec::new();
        let mut parts: Vec<(&mut SequenceState, Vec<u32>, bool)> = Vec::new();
        for (i, seq) in seqs.iter_mut().enumerate() {
            let active = match i {
                3 => step >= 2,
                _ => true,
            };
            if !active || out[i].len() == NEW {
                continue;
            }
            let wants = !(i == 2 && step == 0);
            order.push(i);
            parts.push((seq, next[i].clone(), wants));
        }
        let logits = f.step(&mut parts);
        let mut logits = logits.into_iter();
        for &i in &order {
            if i == 2 && step == 0 {
                next[2] = p2b.to_vec();
                continue;
            }
            let t = argmax(&logits.next().unwrap());
            out[i].push(t);
            next[i] = vec![t];
        }
        assert!(logits.next().is_none());
    }
    assert_eq!(out, alone);
    let used = f.compute.kv_stats().unwrap().blocks_used;
    assert!(used > 0);
    drop(seqs);
    assert_eq!(f.compute.kv_stats().unwrap().blocks_used, 0);
    let _ = f.global();
}

#[test]
fn a_full_pool_refuses_a_reservation_and_corrupts_nothing() {
    let mut f = fixture();
    let alone = f.alone(PROMPTS[0]);
    let total = f.compute.kv_stats().unwrap().blocks_total;
    let block = f.compute.kv_stats().unwrap().block_tokens;
    // Hogs take all but one block (one each: a reservation is capped by the context).
    let mut hogs = Vec::new();
    for _ in 0..total - 1 {
        let mut hog = f.compute.new_sequence().unwrap();
        f.compute.reserve(&mut hog, block).unwrap();
        hogs.push(hog);
    }
    let mut seq = f.compute.new_sequence().unwrap();
    let e = f.compute.reserve(&mut seq, 2 * block).unwrap_err();
    assert!(
        matches!(
            e,
            crate::RuntimeError::KvFull {
                needed: 2,
                free: 1,
                ..
            }
        ),
        "{e}"
    );
    // Nothing was taken by the refused reservation; a sequence that fits runs as before.
    assert_eq!(f.compute.kv_stats().unwrap().blocks_used, total - 1);
    drop(seq);
    drop(hogs);
    assert_eq!(f.compute.kv_stats().unwrap().blocks_used, 0);
    assert_eq!(f.alone(PROMPTS[0]), alone);
}
