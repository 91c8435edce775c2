//! The pipelined runtime (the path `run` and `serve` take on the CPU) on every family's tiny
//! model (tests/data/tiny-families, verified against transformers by the core crate's
//! `tests/tiny_families.rs`): its greedy tokens equal the core forward pass's, with the whole
//! model resident and with a budget that streams layers and the output head. This covers what
//! the runtime's compute does itself: the embedding lookup from the file (Gemma's scale) and
//! the output head in row chunks (Gemma's soft-cap).

use rocmforge::model::{Model, SequenceConfig};
use rocmforge_actors::compute::llama::LlamaCompute;
use rocmforge_actors::{
    GenerateRequest, MemoryBudget, ReadMode, Runtime, RuntimeError, RuntimeHandle,
};
use std::path::PathBuf;

const FAMILIES: [&str; 10] = [
    "gemma3",
    "llama",
    "mistral",
    "mixtral",
    "phi3",
    "phi3longrope",
    "qwen2",
    "qwen2moe",
    "qwen3",
    "qwen3moe",
];
const PROMPT: [u32; 10] = [3, 141, 59, 26, 5, 35, 89, 79, 32, 38];
const N: usize = 12;

fn tiny(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/tiny-families")
        .join(format!("{family}.f32.gguf"))
}

fn core_tokens(path: &PathBuf) -> Vec<u32> {
    let model = Model::open(path).unwrap();
    let mut seq = model.new_sequence(SequenceConfig::default()).unwrap();
    let mut out = Vec::new();
    let mut input = PROMPT.to_vec();
    for _ in 0..N {
        let t = rocmforge::sample::argmax(model.forward(&input, &mut seq).unwrap());
        out.push(t);
        input = vec![t];
    }
    out
}

fn build(path: &PathBuf, budget: MemoryBudget) -> Result<RuntimeHandle, RuntimeError> {
    Runtime::builder()
        .model(path)
        .read_mode(ReadMode::Read)
        .memory_budget(budget)
        .compute(LlamaCompute::factory(SequenceConfig::default()))
        .build()
}

/// The smallest budget the scheduler accepts: the global unit plus one streamed layer, as its
/// refusal of a 1-byte budget reports them.
fn smallest_budget(path: &PathBuf) -> MemoryBudget {
    match build(path, MemoryBudget::Bytes(1)) {
        Err(RuntimeError::BudgetTooSmall {
            global,
            largest_layer,
            ..
        }) => MemoryBudget::Bytes(global + largest_layer),
        other => panic!("expected BudgetTooSmall, got {:?}", other.map(|_| ())),
    }
}

fn runtime_tokens(path: &PathBuf, budget: MemoryBudget) -> (Vec<u32>, rocmforge_actors::Stats) {
    let rt = build(path, budget).unwrap();
    let mut req = GenerateRequest::tokens(PROMPT.to_vec(), N);
    req.stop_at_eos = false;
    let t = rt.generate(req).collect_tokens().unwrap();
    let s = rt.stats();
    rt.shutdown().unwrap();
    (t, s)
}

#[test]
fn runtime_matches_the_core_forward_pass_on_every_family() {
    for family in FAMILIES {
        let path = tiny(family);
        let want = core_tokens(&path);
        let (got, _) = runtime_tokens(&path, MemoryBudget::Unlimited);
        assert_eq!(got, want, "{family}, resident");
        let (got, s) = runtime_tokens(&path, smallest_budget(&path));
        assert_eq!(got, want, "{family}, streamed: {s:?}");
        assert!(s.evictions > 0, "{family} did not stream: {s:?}");
        // Units past the global one (index n_layer) are the output head's chunks: the head
        // streamed, through `output_rows`.
        let g = Model::open(&path).unwrap().hparams().n_layer;
        assert!(
            s.loads_per_layer.len() > g + 1,
            "{family}: head not streamed: {s:?}"
        );
    }
}

/// The mixture-of-experts families under a budget just short of the model: each layer's experts
/// become units of their own (one per expert, after the layers, the global unit and no head
/// chunks), the scheduler streams the ones it cannot keep as the router chooses them, and the
/// greedy tokens still equal the core forward pass's.
#[test]
fn experts_become_units_under_a_budget_and_give_the_same_tokens() {
    for family in ["mixtral", "qwen2moe", "qwen3moe"] {
        let path = tiny(family);
        let want = core_tokens(&path);
        let (_, whole) = runtime_tokens(&path, MemoryBudget::Unlimited);
        let model = Model::open(&path).unwrap();
        let hp = model.hparams();
        let moe = hp.moe.expect("a MoE family");
        assert_eq!(whole.loads_per_layer.len(), hp.n_layer + 1, "{family}");
        let budget = MemoryBudget::Bytes(whole.total_weight_bytes - 1);
        let (got, s) = runtime_tokens(&path, budget);
        assert_eq!(got, want, "{family}, experts as units: {s:?}");
        assert_eq!(
            s.loads_per_layer.len(),
            hp.n_layer + 1 + hp.n_layer * moe.n_expert,
            "{family}: one unit per expert expected: {s:?}"
        );
        assert!(
            s.peak_resident_bytes < whole.total_weight_bytes,
            "{family}: {s:?}"
        );
        // Some expert did not stay: it was loaded again when a later token chose it.
        let experts = &s.loads_per_layer[hp.n_layer + 1..];
        let streamed: Vec<u64> = experts.iter().copied().filter(|&l| l > 1).collect();
        assert!(!streamed.is_empty(), "{family}: no expert streamed: {s:?}");
        // ...but only when chosen: a window that ignored the routing loads every streamed
        // expert at (nearly) every one of the N + 1 steps (measured: 12-13 loads each on the
        // qwen families); with the routing some is loaded at fewer than N steps.
        assert!(
            streamed.iter().min().is_some_and(|&m| m < N as u64),
            "{family}: every streamed expert loaded at (nearly) every step: {experts:?}"
        );
    }
}
