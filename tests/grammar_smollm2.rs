//! Constrained decoding (`rocmforge::grammar`) on SmolLM2's vocabulary, property-tested: whatever
//! the logits, sampling only what the mask allows never leaves the language. A random walk
//! (random logits every step) under the mask ends in a document that parses and validates, so
//! every prefix it went through was a prefix of a valid document; with a schema whose documents
//! are bounded it always ends. Any JSON object: every prefix the mask lets through is completed
//! by the mask itself into a document `serde_json` parses.

mod common;

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rocmforge::grammar::{Constraint, GrammarCompiler, TokenMask};
use rocmforge::sample::argmax;
use rocmforge::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::sync::OnceLock;

fn setup() -> &'static (Tokenizer, GrammarCompiler) {
    static S: OnceLock<(Tokenizer, GrammarCompiler)> = OnceLock::new();
    S.get_or_init(|| {
        let f = rocmforge::gguf::GgufFile::open(common::smollm2_path()).expect("model");
        let tok = Tokenizer::from_metadata(f.metadata()).expect("tokenizer");
        let g = GrammarCompiler::new(&tok).expect("grammar compiler");
        (tok, g)
    })
}

/// Steps of the random walk: random logits, masked, arg-max; `None` when no end in `limit`.
/// From step `close_after` on, closing tokens are favoured (so unbounded languages end too).
fn walk(mask: &mut TokenMask, seed: u64, limit: usize, close_after: usize) -> Option<String> {
    let (tok, _) = setup();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    let mut logits = vec![0f32; tok.vocab_size()];
    for step in 0..limit {
        for l in logits.iter_mut() {
            *l = rng.gen_range(-4.0..4.0);
        }
        if step >= close_after {
            // Push towards the end: the end tokens and the closing characters.
            for id in tok.eog_ids() {
                logits[*id as usize] += 100.0;
            }
            for c in ["}", "\"", "]", "0", "\"}"] {
                if let Some(id) = tok.encode(c, false, false).ok().filter(|v| v.len() == 1) {
                    logits[id[0] as usize] += 50.0;
                }
            }
        }
        mask.apply(&mut logits).expect("mask");
        assert!(
            logits.iter().any(|l| l.is_finite()),
            "the mask allowed no token after {:?}",
            String::from_utf8_lossy(&out)
        );
        let t = argmax(&logits);
        mask.accept(t).expect("an allowed token is accepted");
        if tok.is_eog(t) {
            assert!(mask.is_complete(), "ended before the document was whole");
            return Some(String::from_utf8(out).expect("UTF-8"));
        }
        out.extend_from_slice(tok.token_bytes(t).expect("token"));
    }
    None
}

fn bounded_schema() -> Value {
    json!({"type": "object",
           "properties": {"color": {"enum": ["red", "green", "blue"]},
                          "ok": {"type": "boolean"}},
           "required": ["color", "ok"], "additionalProperties": false})
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn a_random_walk_under_a_schema_ends_in_a_valid_document(seed in any::<u64>()) {
        let (_, g) = setup();
        let mut mask = g.compile(&Constraint::JsonSchema(bounded_schema())).unwrap();
        // Every document of this schema is under 40 tokens: the walk must end by itself.
        let text = walk(&mut mask, seed, 200, usize::MAX).expect("the walk ends");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        let o = v.as_object().expect("an object");
        prop_assert_eq!(o.len(), 2, "{}", text);
        prop_assert!(["red", "green", "blue"].contains(&o["color"].as_str().unwrap_or("")));
        prop_assert!(o["ok"].is_boolean());
    }

    #[test]
    fn every_prefix_of_a_json_object_walk_completes_to_an_object(
        seed in any::<u64>(), close_after in 0usize..24,
    ) {
        let (_, g) = setup();
        let mut mask = g.compile(&Constraint::JsonObject).unwrap();
        // Random tokens for `close_after` steps, then the walk is steered to close; the mask
        // must still only allow what leads to a whole object.
        let text = walk(&mut mask, seed, close_after + 400, close_after)
            .expect("the steered walk ends");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        prop_assert!(v.is_object(), "{}", text);
    }
}

#[test]
fn an_invalid_schema_is_an_error_not_a_panic() {
    let (_, g) = setup();
    for bad in [
        json!({"type": "no-such-type"}),
        json!({"$ref": "#/definitions/missing"}),
    ] {
        assert!(
            g.compile(&Constraint::JsonSchema(bad.clone())).is_err(),
            "{bad} compiled"
        );
    }
}
