//! The pipelined runtime with the real SmolLM2-135M model and the core crate's forward pass.

use rocmforge::model::{Model, SequenceConfig};
use rocmforge_actors::compute::llama::LlamaCompute;
use rocmforge_actors::{GenerateRequest, MemoryBudget, ReadMode, Runtime, RuntimeError};
use std::path::PathBuf;

fn smollm2() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

const PROMPT: [u32; 6] = [504, 3575, 282, 4649, 314, 1];
const N: usize = 8;

fn request() -> GenerateRequest {
    let mut r = GenerateRequest::tokens(PROMPT.to_vec(), N);
    r.stop_at_eos = false;
    r
}

/// Greedy tokens from the core crate's own `Model::forward` over the memory map.
fn core_tokens() -> Vec<u32> {
    let model = Model::open(smollm2()).unwrap();
    let mut seq = model.new_sequence(SequenceConfig::default()).unwrap();
    let mut out = Vec::new();
    let mut input = PROMPT.to_vec();
    for _ in 0..N {
        let logits = model.forward(&input, &mut seq).unwrap();
        let t = rocmforge::sample::argmax(logits);
        out.push(t);
        input = vec![t];
    }
    out
}

fn runtime_tokens(mode: ReadMode, budget: MemoryBudget) -> (Vec<u32>, rocmforge_actors::Stats) {
    let rt = Runtime::builder()
        .model(smollm2())
        .read_mode(mode)
        .memory_budget(budget)
        .compute(LlamaCompute::factory(SequenceConfig::default()))
        .build()
        .unwrap();
    let t = rt.generate(request()).collect_tokens().unwrap();
    let s = rt.stats();
    rt.shutdown().unwrap();
    (t, s)
}

#[test]
fn pipelined_runtime_matches_the_core_forward_pass() {
    let want = core_tokens();
    let (got, _) = runtime_tokens(ReadMode::Mmap, MemoryBudget::Unlimited);
    assert_eq!(got, want);
}

#[test]
fn budget_40_percent_gives_the_same_tokens_and_stays_within_budget() {
    let (want, _) = runtime_tokens(ReadMode::Read, MemoryBudget::Unlimited);
    for mode in [ReadMode::Read, ReadMode::Mmap] {
        let (got, s) = runtime_tokens(mode, MemoryBudget::FractionOfWeights(0.4));
        assert_eq!(got, want, "{mode:?}");
        assert!(s.peak_resident_bytes <= s.budget_bytes, "{mode:?}: {s:?}");
        assert!(s.peak_allocated_bytes <= s.budget_bytes, "{mode:?}: {s:?}");
        assert!(s.evictions > 0, "{mode:?} did not stream: {s:?}");
    }
}

#[test]
fn budget_25_percent_streams_the_output_head_with_the_same_tokens() {
    // The tied embedding/output matrix is 31 % of SmolLM2: at 25 % it streams in row chunks.
    let (want, _) = runtime_tokens(ReadMode::Read, MemoryBudget::Unlimited);
    for mode in [ReadMode::Read, ReadMode::Mmap] {
        let (got, s) = runtime_tokens(mode, MemoryBudget::FractionOfWeights(0.25));
        assert_eq!(got, want, "{mode:?}");
        assert!(s.peak_resident_bytes <= s.budget_bytes, "{mode:?}: {s:?}");
        assert!(s.peak_allocated_bytes <= s.budget_bytes, "{mode:?}: {s:?}");
        // Units past the global one (index n_layers) are the head's chunks.
        let g = Model::open(smollm2()).unwrap().hparams().n_layer;
        let chunks = &s.loads_per_layer[g + 1..];
        assert!(chunks.len() > 1, "{mode:?}: head not split: {s:?}");
        assert!(chunks.iter().any(|&n| n as usize >= N), "{mode:?}: {s:?}");
    }
}

#[test]
fn budget_below_one_layer_is_a_clear_build_error() {
    let r = Runtime::builder()
        .model(smollm2())
        .memory_budget(MemoryBudget::Bytes(1 << 20))
        .compute(LlamaCompute::factory(SequenceConfig::default()))
        .build();
    match r {
        Err(e @ RuntimeError::BudgetTooSmall { .. }) => {
            assert!(e.to_string().contains("budget"), "{e}")
        }
        other => panic!("expected BudgetTooSmall, got {other:?}"),
    }
}

#[test]
fn text_prompts_stream_text_pieces() {
    let rt = Runtime::builder()
        .model(smollm2())
        .compute(LlamaCompute::factory(SequenceConfig::default()))
        .build()
        .unwrap();
    let mut req = GenerateRequest::text("The capital of France is", 6);
    req.stop_at_eos = false;
    let text: String = rt
        .generate(req)
        .into_blocking()
        .map(|e| e.unwrap().text)
        .collect();
    assert!(!text.is_empty());
    rt.shutdown().unwrap();
}

/// A chat reply ends at `<|im_end|>`, whose text never reaches the stream (it once ended every
/// reply); the end-of-turn token is one of the end-of-generation set, so generation stops there.
#[test]
fn chat_replies_carry_no_control_token_text() {
    let rt = Runtime::builder()
        .model(smollm2())
        .compute(LlamaCompute::factory(SequenceConfig::default()))
        .build()
        .unwrap();
    let prompt = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                  Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n\
                  <|im_start|>assistant\n";
    let mut stream = rt
        .generate(GenerateRequest::text(prompt, 200))
        .into_blocking();
    let events: Vec<_> = stream.by_ref().map(|e| e.unwrap()).collect();
    assert_eq!(
        stream.finish_reason(),
        Some(rocmforge_actors::FinishReason::EndOfSequence),
        "the reply should end its turn within 200 tokens"
    );
    let text: String = events.iter().map(|e| e.text.as_str()).collect();
    assert!(!text.is_empty());
    assert!(!text.contains("<|"), "control token text in {text:?}");
    assert!(events.last().unwrap().text.is_empty());
    rt.shutdown().unwrap();
}

/// A session's second turn prefills only what follows the shared prefix and gives the same
/// greedy tokens as the whole conversation sent afresh.
#[test]
fn sessions_keep_the_kv_cache_between_turns() {
    let rt = Runtime::builder()
        .model(smollm2())
        .compute(LlamaCompute::factory(SequenceConfig::default()))
        .build()
        .unwrap();
    let session = rt.new_session();
    let turn = |prompt: Vec<u32>, session| {
        let mut r = GenerateRequest::tokens(prompt, 6);
        r.stop_at_eos = false;
        r.session = session;
        rt.generate(r).collect_tokens().unwrap()
    };
    let first = turn(PROMPT.to_vec(), Some(session));
    // The next turn: the first prompt, the reply, and more text.
    let mut second_prompt = PROMPT.to_vec();
    second_prompt.extend_from_slice(&first);
    second_prompt.extend_from_slice(&PROMPT[..3]);
    let cached_before = rt.stats().prompt_tokens_cached;
    let resumed = turn(second_prompt.clone(), Some(session));
    // Everything fed in turn one (the prompt and all but the last reply token) was kept.
    let cached = rt.stats().prompt_tokens_cached - cached_before;
    assert_eq!(cached as usize, PROMPT.len() + first.len() - 1);
    let fresh = turn(second_prompt, None);
    assert_eq!(resumed, fresh);
    rt.shutdown().unwrap();
}
