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

/// A random walk under a tool-call grammar (`required`, two functions) ends in calls that
/// `tool_calls::parse` reads back, each naming a declared function with arguments valid under
/// its schema (checked by hand in `valid_args`, not by the mask's compiler).
fn tools() -> Vec<rocmforge::tool_calls::FunctionSpec> {
    rocmforge::tool_calls::parse_tools(&json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "parameters": {
            "type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "boolean"}},
            "required": ["a", "b"], "additionalProperties": false}}}
    ]))
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn a_random_walk_under_a_required_tool_grammar_ends_in_valid_calls(seed in any::<u64>()) {
        use rocmforge::tool_calls::{grammar, parse, ToolChoice};
        let (_, g) = setup();
        let tools = tools();
        let lark = grammar(&tools, &ToolChoice::Required, false).unwrap();
        let mut mask = g.compile(&Constraint::Grammar(format!("%llguidance {{}}\n{lark}"))).unwrap();
        let text = walk(&mut mask, seed, 300, usize::MAX).expect("the walk ends");
        let r = parse(&text);
        prop_assert_eq!(r.content, None, "{}", text);
        prop_assert_eq!(r.calls.len(), 1, "{}", text);
        let call = &r.calls[0];
        let args: Value = serde_json::from_str(&call.arguments).expect("arguments are JSON");
        prop_assert!(valid_args(&call.name, &args), "{} {}", call.name, call.arguments);
    }

    #[test]
    fn under_auto_any_started_call_is_whole(seed in any::<u64>(), steer in 0usize..12) {
        use rocmforge::tool_calls::{grammar, parse, ToolChoice, OPEN};
        let (tok, g) = setup();
        let tools = tools();
        let lark = grammar(&tools, &ToolChoice::Auto, true).unwrap();
        let mut mask = g.compile(&Constraint::Grammar(format!("%llguidance {{}}\n{lark}"))).unwrap();
        // A few random tokens of text, then the marker forced token by token: from there the
        // mask alone must lead to a whole call.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut text = Vec::new();
        for _ in 0..steer {
            let mut logits: Vec<f32> = (0..tok.vocab_size()).map(|_| rng.gen_range(-4.0..4.0)).collect();
            for id in tok.eog_ids() {
                logits[*id as usize] = f32::NEG_INFINITY;
            }
            // Whole characters only: after part of a UTF-8 character only its continuation may
            // follow (the grammar's text is UTF-8), so the newline below could not.
            for (id, l) in logits.iter_mut().enumerate() {
                if tok.token_bytes(id as u32).is_none_or(|b| std::str::from_utf8(b).is_err()) {
                    *l = f32::NEG_INFINITY;
                }
            }
            mask.apply(&mut logits).unwrap();
            let t = argmax(&logits);
            mask.accept(t).unwrap();
            text.extend_from_slice(tok.token_bytes(t).unwrap());
        }
        // Ends with a newline so the marker starts afresh whatever the text was.
        for t in tok.encode(&format!("\n{OPEN}"), false, false).unwrap() {
            let mut logits = vec![0f32; tok.vocab_size()];
            mask.apply(&mut logits).unwrap();
            prop_assert!(
                logits[t as usize].is_finite(),
                "the marker token {} ({:?}) was refused after {:?}",
                t,
                String::from_utf8_lossy(tok.token_bytes(t).unwrap()),
                String::from_utf8_lossy(&text)
            );
            mask.accept(t).unwrap();
            text.extend_from_slice(tok.token_bytes(t).unwrap());
        }
        let rest = walk(&mut mask, seed ^ 1, 300, 40).expect("the walk ends");
        let text = String::from_utf8_lossy(&text).into_owned() + &rest;
        let r = parse(&text);
        prop_assert!(!r.calls.is_empty(), "{}", text);
        for call in &r.calls {
            let args: Value = serde_json::from_str(&call.arguments).expect("arguments are JSON");
            prop_assert!(valid_args(&call.name, &args), "{} {}", call.name, call.arguments);
        }
    }

    #[test]
    fn a_random_walk_under_a_gbnf_grammar_matches_it(seed in any::<u64>()) {
        let (_, g) = setup();
        let gbnf = "root ::= answer \" \" [0-9]{1,3}\nanswer ::= \"yes\" | \"no\"\n";
        let mut mask = g.compile(&Constraint::Grammar(gbnf.into())).unwrap();
        let text = walk(&mut mask, seed, 50, 8).expect("the walk ends");
        let re = regex_lite(&text);
        prop_assert!(re, "{:?}", text);
    }
}

/// The arguments `tools()` allows, written out: exactly the two keys, each one of its values.
fn valid_args(name: &str, args: &Value) -> bool {
    let Some(o) = args.as_object() else {
        return false;
    };
    let is = |k: &str, ok: &dyn Fn(&Value) -> bool| o.get(k).is_some_and(ok);
    o.len() == 2
        && match name {
            "get_weather" => {
                is("city", &|v| v == "Paris" || v == "Oslo")
                    && is("unit", &|v| v == "c" || v == "f")
            }
            "add" => is("a", &|v| v.is_boolean()) && is("b", &|v| v.is_boolean()),
            _ => false,
        }
}

/// `(yes|no) [0-9]{1,3}`, by hand.
fn regex_lite(s: &str) -> bool {
    let rest = s.strip_prefix("yes ").or_else(|| s.strip_prefix("no "));
    rest.is_some_and(|d| (1..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit()))
}

#[test]
fn a_bad_grammar_is_an_error() {
    let (_, g) = setup();
    for bad in ["root ::= missing", "%llguidance {}\nstart: nope"] {
        assert!(
            g.compile(&Constraint::Grammar(bad.into())).is_err(),
            "{bad}"
        );
    }
}

/// `start: <[id]>` allows exactly that token, end-of-generation tokens (the EOS itself) too:
/// how `echo` scores a prompt token by token (actors/src/serve/echo.rs).
#[test]
fn a_grammar_naming_one_token_allows_only_it() {
    let (tok, g) = setup();
    let eos = tok.eos_id().expect("eos");
    let mut ids: Vec<u32> = vec![42, 1000, eos];
    ids.extend(tok.eog_ids());
    for id in ids {
        let mut mask = g
            .compile(&Constraint::Grammar(format!(
                "%llguidance {{}}\nstart: <[{id}]>"
            )))
            .unwrap();
        let mut logits = vec![0f32; tok.vocab_size()];
        mask.apply(&mut logits).unwrap();
        let allowed: Vec<usize> = (0..logits.len())
            .filter(|&i| logits[i].is_finite())
            .collect();
        assert_eq!(allowed, vec![id as usize], "token {id}");
        mask.accept(id)
            .unwrap_or_else(|e| panic!("token {id}: {e}"));
    }
}

/// `auto` without parallel calls: text, one call, and after it no second marker can start.
#[test]
fn auto_without_parallel_calls_allows_one_call() {
    use rocmforge::tool_calls::{grammar, ToolChoice};
    let (tok, g) = setup();
    let lark = grammar(&tools(), &ToolChoice::Auto, false).unwrap();
    let mut mask = g
        .compile(&Constraint::Grammar(format!("%llguidance {{}}\n{lark}")))
        .unwrap();
    let mut force = |text: &str| -> bool {
        for t in tok.encode(text, false, false).unwrap() {
            let mut logits = vec![0f32; tok.vocab_size()];
            mask.apply(&mut logits).unwrap();
            if !logits[t as usize].is_finite() {
                return false;
            }
            mask.accept(t).unwrap();
        }
        true
    };
    assert!(force("Sure.\n<tool_call>\n"));
    assert!(force(
        "{\"name\": \"add\", \"arguments\": {\"a\": true, \"b\": false}}\n</tool_call>\nDone. "
    ));
    assert!(!force("<tool_call>"), "a second call was allowed");
}
