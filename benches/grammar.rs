//! The cost of constrained decoding per generated token (issue 19: the mask may cost at most 10%
//! of CPU decode time): one step is `TokenMask::apply` on a full-vocabulary logits vector plus
//! `TokenMask::accept` of the chosen token, measured over whole documents that a masked greedy
//! walk wrote (a JSON object, a document under a small schema, a required tool call and a reply
//! under `tool_choice: auto`) on SmolLM2's 49,152-token
//! vocabulary. Compare the per-step time with `rocmforge bench --backend cpu -p 0 -n 64` decode.
//! Needs models/SmolLM2-135M-Instruct.Q4_1.gguf.
//!
//!     cargo bench -p rocmforge --bench grammar

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use rocmforge::gguf::GgufFile;
use rocmforge::grammar::{Constraint, GrammarCompiler};
use rocmforge::sample::argmax;
use rocmforge::tokenizer::Tokenizer;
use std::path::PathBuf;

fn load() -> Option<(Tokenizer, GrammarCompiler)> {
    let model = std::env::var_os("ROCMFORGE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    let file = match GgufFile::open(&model) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipping grammar bench: {}: {e}", model.display());
            return None;
        }
    };
    let tok = Tokenizer::from_metadata(file.metadata()).ok()?;
    let g = GrammarCompiler::new(&tok).ok()?;
    Some((tok, g))
}

/// A document the mask allows, written by a greedy walk over deterministic pseudo-random logits
/// (closing tokens favoured after `close_after` steps), as token ids ending in an end token.
fn walk(tok: &Tokenizer, g: &GrammarCompiler, c: &Constraint, close_after: usize) -> Vec<u32> {
    let mut mask = g.compile(c).expect("constraint");
    let mut logits = vec![0f32; tok.vocab_size()];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut ids = Vec::new();
    for step in 0..400 {
        for l in logits.iter_mut() {
            // xorshift: the same walk every run.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *l = (state >> 40) as f32 / (1u64 << 24) as f32 * 8.0 - 4.0;
        }
        if step >= close_after {
            for id in tok.eog_ids() {
                logits[*id as usize] += 100.0;
            }
            for s in ["}", "\"", "]", "0", "\"}"] {
                if let Some(id) = tok.encode(s, false, false).ok().filter(|v| v.len() == 1) {
                    logits[id[0] as usize] += 50.0;
                }
            }
        }
        mask.apply(&mut logits).expect("mask");
        let t = argmax(&logits);
        mask.accept(t).expect("accept");
        ids.push(t);
        if tok.is_eog(t) {
            return ids;
        }
    }
    ids
}

fn bench(c: &mut Criterion) {
    let Some((tok, g)) = load() else { return };
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}}
        },
        "required": ["name", "age"]
    });
    // Tool calls (`tool_calls::grammar`): `required` is a call of one of two functions; `auto`
    // is mostly free text (the cost every token of a plain reply pays while tools are offered).
    use rocmforge::tool_calls::{grammar, parse_tools, ToolChoice};
    let tools = parse_tools(&serde_json::json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    ]))
    .expect("tools");
    let tool_grammar = |choice: ToolChoice| {
        let g = grammar(&tools, &choice, true).expect("a grammar");
        Constraint::Grammar(format!("%llguidance {{}}\n{g}"))
    };
    let cases = [
        ("json_object", Constraint::JsonObject, 48),
        ("json_schema", Constraint::JsonSchema(schema), 48),
        ("tools_required", tool_grammar(ToolChoice::Required), 48),
        ("tools_auto", tool_grammar(ToolChoice::Auto), 48),
    ];
    let mut group = c.benchmark_group("grammar_step");
    for (name, constraint, close_after) in cases {
        let doc = walk(&tok, &g, &constraint, close_after);
        let mut logits = vec![0f32; tok.vocab_size()];
        group.throughput(Throughput::Elements(doc.len() as u64));
        group.bench_function(format!("{name} ({} tokens)", doc.len()), |b| {
            b.iter(|| {
                let mut mask = g.compile(&constraint).expect("constraint");
                for &t in &doc {
                    logits.fill(0.0);
                    mask.apply(black_box(&mut logits)).expect("mask");
                    mask.accept(t).expect("accept");
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
