//! The API surface beyond plain generation, in-process on loopback with SmolLM2: `/tokenize`
//! and `/detokenize`, `usage` on every response, request fields that are not implemented
//! answered with a 400 (never silently ignored).

mod serve_common;

use rocmforge::tokenizer::Tokenizer;
use rocmforge_actors::serve::client::{post_json, post_sse};
use serde_json::{json, Value};
use serve_common::{config, smollm2, start, MODEL};
use std::net::SocketAddr;
use std::time::Duration;

fn tokenizer() -> Tokenizer {
    let f = rocmforge::gguf::GgufFile::open(smollm2()).expect("open the model");
    Tokenizer::from_metadata(f.metadata()).expect("tokenizer")
}

async fn ok_json(addr: SocketAddr, path: &str, body: Value) -> Value {
    let r = post_json(addr, path, &body).await.expect("request");
    assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
    r.json().expect("JSON body")
}

async fn status_of(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let r = post_json(addr, path, &body).await.expect("request");
    (r.status, r.json().unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_detokenize_and_usage() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let tok = tokenizer();

    // Plain text: the model's tokenizer, no BOS unless asked, and back again.
    let text = "Hello world, ça va? 🤗 <|im_start|>";
    let r = ok_json(addr, "/tokenize", json!({"content": text})).await;
    let ids: Vec<u32> = serde_json::from_value(r["tokens"].clone()).expect("ids");
    assert_eq!(ids, tok.encode(text, false, true).unwrap());
    // Special-token text is the control token unless `parse_special` is off.
    let im_start = tok.token_id("<|im_start|>").expect("SmolLM2 has <|im_start|>");
    assert_eq!(ids.last(), Some(&im_start));
    let r = ok_json(
        addr,
        "/tokenize",
        json!({"content": text, "parse_special": false}),
    )
    .await;
    let plain: Vec<u32> = serde_json::from_value(r["tokens"].clone()).expect("ids");
    assert!(!plain.contains(&im_start), "{plain:?}");
    let r = ok_json(addr, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(r["content"], text);

    // `add_special` adds exactly what the metadata says.
    let r = ok_json(
        addr,
        "/tokenize",
        json!({"content": "hi", "add_special": true}),
    )
    .await;
    let with: Vec<u32> = serde_json::from_value(r["tokens"].clone()).expect("ids");
    assert_eq!(with, tok.encode("hi", true, true).unwrap());

    // Pieces: ids as above, the bytes of the pieces concatenated are the text; the emoji is
    // split over tokens whose pieces are not UTF-8, sent as byte lists.
    let r = ok_json(
        addr,
        "/tokenize",
        json!({"content": text, "with_pieces": true}),
    )
    .await;
    let mut bytes = Vec::new();
    let mut saw_byte_list = false;
    for (t, &id) in r["tokens"].as_array().expect("tokens").iter().zip(&ids) {
        assert_eq!(t["id"], id, "{t}");
        match &t["piece"] {
            Value::String(s) => bytes.extend_from_slice(s.as_bytes()),
            Value::Array(a) => {
                saw_byte_list = true;
                bytes.extend(a.iter().map(|b| b.as_u64().expect("byte") as u8));
            }
            other => panic!("piece {other}"),
        }
    }
    assert_eq!(r["tokens"].as_array().unwrap().len(), ids.len());
    assert_eq!(String::from_utf8(bytes).unwrap(), text);
    assert!(saw_byte_list, "{r}");

    // Bad input: a 400, not a crash.
    let (st, _) = status_of(addr, "/detokenize", json!({"tokens": [u32::MAX]})).await;
    assert_eq!(st, 400);
    let (st, _) = status_of(addr, "/tokenize", json!({"text": "wrong field"})).await;
    assert_eq!(st, 400);

    // `usage` counts the prompt as /tokenize does (completions add BOS as the model says).
    let prompt = "The capital of France is";
    let n_prompt = tok.encode(prompt, true, true).unwrap().len();
    let c = ok_json(
        addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0}),
    )
    .await;
    assert_eq!(c["usage"]["prompt_tokens"], n_prompt, "{c}");
    assert_eq!(c["usage"]["completion_tokens"], 3, "{c}");
    assert_eq!(c["usage"]["total_tokens"], n_prompt + 3, "{c}");
    // Streamed: the last chunk before [DONE] carries the same usage when asked for.
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 3, "temperature": 0,
                   "stream": true, "stream_options": {"include_usage": true}}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                   "max_tokens": 3, "temperature": 0,
                   "stream": true, "stream_options": {"include_usage": true}}),
        ),
    ] {
        let s = post_sse(addr, path, &body).await.expect("stream");
        assert_eq!(s.status, 200);
        let n = s.events.len();
        assert_eq!(s.events[n - 1].1, "[DONE]");
        let last: Value = serde_json::from_str(&s.events[n - 2].1).expect("usage chunk");
        assert_eq!(last["choices"], json!([]), "{last}");
        assert_eq!(last["usage"]["completion_tokens"], 3, "{last}");
        let u = &last["usage"];
        assert_eq!(
            u["total_tokens"].as_u64(),
            Some(u["prompt_tokens"].as_u64().unwrap() + 3)
        );
        if path == "/v1/completions" {
            assert_eq!(u["prompt_tokens"], n_prompt);
        }
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unimplemented_fields_are_a_400_never_ignored() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let chat = |extra: Value| {
        let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                           "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    };
    let tool = json!([{"type": "function", "function": {"name": "f", "parameters": {}}}]);
    for (what, extra, param) in [
        ("tools", json!({"tools": tool}), "tools"),
        (
            "tool_choice required",
            json!({"tool_choice": "required"}),
            "tool_choice",
        ),
        ("functions", json!({"functions": [{"name": "f"}]}), "functions"),
        (
            "response_format json_schema",
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": {"type": "object"}}}}),
            "response_format",
        ),
        (
            "response_format without a type",
            json!({"response_format": {}}),
            "response_format",
        ),
    ] {
        let (st, v) = status_of(addr, "/v1/chat/completions", chat(extra)).await;
        assert_eq!(st, 400, "{what}: {v}");
        assert_eq!(v["error"]["param"], param, "{what}: {v}");
    }
    // What asks for plain text is fine.
    for extra in [
        json!({"response_format": {"type": "text"}}),
        json!({"tool_choice": "none"}),
        json!({"tools": []}),
    ] {
        let (st, v) = status_of(addr, "/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(st, 200, "{extra}: {v}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
