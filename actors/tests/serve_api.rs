//! The API surface beyond plain generation, in-process on loopback with SmolLM2: `/tokenize`
//! and `/detokenize`, `usage` on every response, request fields that are not implemented (or
//! malformed) answered with a 400 (never silently ignored), log probabilities, `n > 1`,
//! embeddings. Structured output and tool calls are tested with the official client and
//! `jsonschema` (`scripts/serve_openai_client.py`); tools, `echo`, `best_of` and `grammar` in
//! `serve_tools.rs`.

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
    let im_start = tok
        .token_id("<|im_start|>")
        .expect("SmolLM2 has <|im_start|>");
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
        (
            "tools that are not functions",
            json!({"tools": [{"type": "code_interpreter"}]}),
            "tools[0].type",
        ),
        (
            "tool_choice required without tools",
            json!({"tool_choice": "required"}),
            "tool_choice",
        ),
        (
            "tools with response_format",
            json!({"tools": tool, "response_format": {"type": "json_object"}}),
            "tool_choice",
        ),
        ("echo in chat", json!({"echo": true}), "echo"),
        (
            "a grammar that does not parse",
            json!({"grammar": "root ::= ("}),
            "grammar",
        ),
        (
            "functions",
            json!({"functions": [{"name": "f"}]}),
            "functions",
        ),
        (
            "response_format json_schema without a schema",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format",
        ),
        (
            "response_format with a schema the compiler rejects",
            json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}}),
            "response_format",
        ),
        (
            "response_format of an unknown type",
            json!({"response_format": {"type": "yaml"}}),
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
    // What asks for plain text is fine, and so are tools under tool_choice "none".
    for extra in [
        json!({"response_format": {"type": "text"}}),
        json!({"tool_choice": "none"}),
        json!({"tools": []}),
        json!({"tools": tool, "tool_choice": "none", "response_format": {"type": "json_object"}}),
    ] {
        let (st, v) = status_of(addr, "/v1/chat/completions", chat(extra.clone())).await;
        assert_eq!(st, 200, "{extra}: {v}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// exp of each logprob in `entries[*][field]`, summed.
fn prob_sum(entries: &[Value]) -> f64 {
    entries
        .iter()
        .map(|e| e["logprob"].as_f64().expect("logprob").exp())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_chat_and_completions_streamed_and_not() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let tok = tokenizer();
    let messages = json!([{"role": "user", "content": "Name three colors."}]);

    // Chat, greedy: every chosen token is the top entry, with the same logprob; the top 5
    // hold at most all the probability; the bytes are the token's.
    let body = json!({"model": MODEL, "messages": messages, "max_tokens": 12,
                      "temperature": 0, "logprobs": true, "top_logprobs": 5});
    let c = ok_json(addr, "/v1/chat/completions", body.clone()).await;
    let content = c["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("logprobs.content")
        .clone();
    assert_eq!(
        content.len(),
        c["usage"]["completion_tokens"].as_u64().unwrap() as usize
            - usize::from(c["choices"][0]["finish_reason"] == "stop"),
        "{c}"
    );
    let mut text = Vec::new();
    for e in &content {
        let top = e["top_logprobs"].as_array().expect("top_logprobs");
        assert_eq!(top.len(), 5, "{e}");
        assert_eq!(top[0]["token"], e["token"], "{e}");
        assert_eq!(top[0]["logprob"], e["logprob"], "{e}");
        assert!(e["logprob"].as_f64().unwrap() <= 0.0);
        let sum = prob_sum(top);
        assert!(sum <= 1.0 + 1e-4 && sum > 0.0, "{sum} {e}");
        let bytes: Vec<u8> = serde_json::from_value(e["bytes"].clone()).expect("bytes");
        text.extend(bytes);
    }
    assert_eq!(
        String::from_utf8(text).unwrap(),
        c["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // Sampled (temperature 1, fixed seed): the chosen token's logprob is the model's, the
    // same number wherever the token also appears among the top entries.
    let sampled = json!({"model": MODEL, "messages": messages, "max_tokens": 12,
                         "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                         "seed": 5, "logprobs": true, "top_logprobs": 20});
    let c = ok_json(addr, "/v1/chat/completions", sampled).await;
    for e in c["choices"][0]["logprobs"]["content"].as_array().unwrap() {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 20);
        assert!(prob_sum(top) <= 1.0 + 1e-4);
        let lp = e["logprob"].as_f64().unwrap();
        if let Some(t) = top.iter().find(|t| t["bytes"] == e["bytes"]) {
            assert!((t["logprob"].as_f64().unwrap() - lp).abs() < 1e-6, "{e}");
        } else {
            // Not among the top 20: no likelier than the 20th.
            assert!(lp <= top[19]["logprob"].as_f64().unwrap(), "{e}");
        }
    }

    // Streamed chat: the same entries, spread over the chunks.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let s = post_sse(addr, "/v1/chat/completions", &sb)
        .await
        .expect("stream");
    let mut streamed = Vec::new();
    for (_, e) in &s.events {
        if let Ok(v) = serde_json::from_str::<Value>(e) {
            if let Some(a) = v["choices"][0]["logprobs"]["content"].as_array() {
                streamed.extend(a.iter().cloned());
            }
        }
    }
    assert_eq!(streamed, content);

    // Completions: `logprobs: 3`, the legacy shape; text offsets follow the text.
    let prompt = "The capital of France is";
    let cb = json!({"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 0,
                    "logprobs": 3});
    let c = ok_json(addr, "/v1/completions", cb.clone()).await;
    let lp = &c["choices"][0]["logprobs"];
    let tokens: Vec<String> = serde_json::from_value(lp["tokens"].clone()).unwrap();
    let offsets: Vec<usize> = serde_json::from_value(lp["text_offset"].clone()).unwrap();
    assert_eq!(tokens.len(), 6, "{c}");
    assert_eq!(tokens.concat(), c["choices"][0]["text"].as_str().unwrap());
    let mut at = 0;
    for (t, &o) in tokens.iter().zip(&offsets) {
        assert_eq!(o, at);
        at += t.chars().count();
    }
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().expect("a map");
        assert!(!top.is_empty() && top.len() <= 3, "{top:?}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(best, lp["token_logprobs"][i].as_f64().unwrap());
        assert!(top.values().map(|v| v.as_f64().unwrap().exp()).sum::<f64>() <= 1.0 + 1e-4);
        assert!(top.contains_key(&tokens[i]));
    }
    // Streamed completions: the chunks' objects together are the whole one.
    let mut sb = cb.clone();
    sb["stream"] = json!(true);
    let s = post_sse(addr, "/v1/completions", &sb)
        .await
        .expect("stream");
    let (mut st, mut so) = (Vec::<String>::new(), Vec::<usize>::new());
    for (_, e) in &s.events {
        if let Ok(v) = serde_json::from_str::<Value>(e) {
            let l = &v["choices"][0]["logprobs"];
            if l.is_object() {
                st.extend(serde_json::from_value::<Vec<String>>(l["tokens"].clone()).unwrap());
                so.extend(serde_json::from_value::<Vec<usize>>(l["text_offset"].clone()).unwrap());
            }
        }
    }
    assert_eq!((st, so), (tokens, offsets));
    // The prompt is not in the logprobs: the ids come from the model's tokenizer.
    assert!(tok.encode(prompt, true, true).unwrap().len() > 1);

    // Out of range or wrong types are 400s naming the field.
    for (path, extra, param) in [
        (
            "/v1/chat/completions",
            json!({"top_logprobs": 21, "logprobs": true}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"logprobs": "yes"}),
            "logprobs",
        ),
        ("/v1/completions", json!({"logprobs": 21}), "logprobs"),
        ("/v1/completions", json!({"logprobs": -1}), "logprobs"),
    ] {
        let mut b = if path == "/v1/completions" {
            json!({"model": MODEL, "prompt": "a", "max_tokens": 1})
        } else {
            json!({"model": MODEL, "messages": messages, "max_tokens": 1})
        };
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (st, v) = status_of(addr, path, b).await;
        assert_eq!(st, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_share_the_prompt_and_are_equal_when_greedy() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let messages = json!([{"role": "user", "content": "Name three colors."}]);
    let cached0 = server.runtime().stats().prompt_tokens_cached;

    let body = json!({"model": MODEL, "messages": messages, "max_tokens": 10,
                      "temperature": 0, "n": 3});
    let c = ok_json(addr, "/v1/chat/completions", body.clone()).await;
    let choices = c["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3, "{c}");
    for (i, ch) in choices.iter().enumerate() {
        assert_eq!(ch["index"], i);
        assert_eq!(ch["message"], choices[0]["message"], "{c}");
    }
    let one = ok_json(
        addr,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": messages, "max_tokens": 10, "temperature": 0}),
    )
    .await;
    assert_eq!(one["choices"][0]["message"], choices[0]["message"]);
    let per_choice = one["usage"]["completion_tokens"].as_u64().unwrap();
    assert_eq!(c["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    assert_eq!(c["usage"]["completion_tokens"], 3 * per_choice);
    // Choices 1 and 2 reused the prefill of choice 0: all but the last prompt token each.
    let n_prompt = one["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = server.runtime().stats().prompt_tokens_cached - cached0;
    assert_eq!(cached, 2 * (n_prompt - 1));
    // And the session is not kept once the request is done.
    assert_eq!(server.runtime().stats().kv_slots_in_use, 0);

    // Sampled: each choice has its own seed, so they differ (4 choices of 24 tokens at
    // temperature 1.5 over the whole vocabulary agreeing would be a broken seed).
    let c = ok_json(
        addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "n": 4,
               "temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 11}),
    )
    .await;
    let texts: Vec<&str> = c["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 4);
    assert!(texts.iter().any(|t| *t != texts[0]), "{texts:?}");

    // Streamed: each choice's chunks carry its index; put together they are the choices above.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let s = post_sse(addr, "/v1/chat/completions", &sb)
        .await
        .expect("stream");
    let mut parts = vec![String::new(); 3];
    let mut finishes = 0;
    let mut usage = Value::Null;
    for (_, e) in &s.events {
        let Ok(v) = serde_json::from_str::<Value>(e) else {
            continue;
        };
        if v["usage"].is_object() {
            usage = v["usage"].clone();
        }
        for ch in v["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            if let Some(t) = ch["delta"]["content"].as_str() {
                parts[i].push_str(t);
            }
            finishes += usize::from(ch["finish_reason"].is_string());
        }
    }
    assert_eq!(finishes, 3);
    for p in &parts {
        assert_eq!(p, choices[0]["message"]["content"].as_str().unwrap());
    }
    assert_eq!(usage["completion_tokens"], 3 * per_choice);

    // n past the bound, best_of below n or with stream, are 400s.
    for (extra, param) in [
        (json!({"n": 17}), "n"),
        (json!({"n": 0}), "n"),
        (json!({"n": 2, "best_of": 1}), "best_of"),
        (json!({"best_of": 17}), "best_of"),
        (json!({"best_of": 2, "stream": true}), "best_of"),
    ] {
        let mut b = json!({"model": MODEL, "prompt": "a", "max_tokens": 1});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        let (st, v) = status_of(addr, "/v1/completions", b).await;
        assert_eq!(st, 400, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    let c = ok_json(
        addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "a", "max_tokens": 1, "n": 2, "best_of": 2}),
    )
    .await;
    assert_eq!(c["choices"].as_array().unwrap().len(), 2);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// The reference vectors of `scripts/embedding_reference.py` (numpy over the GGUF tensors).
fn reference_embeddings(inputs: &[Vec<u32>]) -> Vec<Vec<f64>> {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scripts/embedding_reference.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(smollm2())
        .arg(serde_json::to_string(inputs).unwrap())
        .output()
        .expect("python3 runs (pip install -r scripts/requirements-test.txt)");
    assert!(
        out.status.success(),
        "reference failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

fn vector(v: &Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).expect("a vector of numbers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_a_numpy_reference() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let tok = tokenizer();
    let text = "The capital of France is Paris.";
    let ids = tok.encode(text, true, true).unwrap();
    let inputs = vec![ids.clone(), vec![504, 3575, 282, 4649, 314], vec![1]];
    let want = reference_embeddings(&inputs);

    let r = ok_json(
        addr,
        "/v1/embeddings",
        json!({"model": MODEL, "input": inputs}),
    )
    .await;
    assert_eq!(r["object"], "list");
    let data = r["data"].as_array().expect("data");
    assert_eq!(data.len(), 3);
    let total: usize = inputs.iter().map(Vec::len).sum();
    assert_eq!(r["usage"]["prompt_tokens"], total, "{}", r["usage"]);
    assert_eq!(r["usage"]["total_tokens"], total);
    for (i, (d, w)) in data.iter().zip(&want).enumerate() {
        assert_eq!(d["index"], i);
        assert_eq!(d["object"], "embedding");
        let v = vector(&d["embedding"]);
        assert_eq!(v.len(), 576, "SmolLM2's width");
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "not normalized: {norm}");
        let cos: f64 = v.iter().zip(w).map(|(a, b)| a * b).sum();
        let max_diff = v
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        // The CPU kernels quantize activations to 8 bits for the dot products; the reference
        // is float64 on the dequantized weights.
        assert!(
            cos > 0.999 && max_diff < 0.01,
            "input {i}: cosine {cos}, max diff {max_diff}"
        );
    }

    // Text input is the tokens /tokenize-with-BOS-as-completions gives; base64 is the same
    // floats; one string alone is a list of one.
    for (input, fmt) in [(json!(text), "float"), (json!([text]), "base64")] {
        let r = ok_json(
            addr,
            "/v1/embeddings",
            json!({"model": MODEL, "input": input, "encoding_format": fmt}),
        )
        .await;
        assert_eq!(r["data"].as_array().unwrap().len(), 1);
        assert_eq!(r["usage"]["prompt_tokens"], ids.len());
        let got: Vec<f64> = if fmt == "base64" {
            use base64::Engine;
            let b = base64::engine::general_purpose::STANDARD
                .decode(r["data"][0]["embedding"].as_str().expect("base64 text"))
                .expect("base64");
            b.chunks_exact(4)
                .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                .collect()
        } else {
            vector(&r["data"][0]["embedding"])
        };
        // JSON numbers are f32's shortest text; compared as the f32 they stand for.
        let as_f32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        assert!(
            as_f32(got) == as_f32(vector(&data[0]["embedding"])),
            "{fmt}: not the vector of the token input"
        );
    }

    // Bad input is a 400 naming the field.
    for (body, param) in [
        (json!({"model": MODEL, "input": []}), "input"),
        (json!({"model": MODEL, "input": ""}), "input"),
        (json!({"model": MODEL, "input": [[]]}), "input"),
        (
            json!({"model": MODEL, "input": "a", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (
            json!({"model": MODEL, "input": "a", "dimensions": 64}),
            "dimensions",
        ),
        (json!({"input": "a"}), "model"),
    ] {
        let (st, v) = status_of(addr, "/v1/embeddings", body.clone()).await;
        assert_eq!(st, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
    }
    let (st, v) = status_of(
        addr,
        "/v1/embeddings",
        json!({"model": MODEL, "input": [[u32::MAX]]}),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    // Still serving, and no sequence left behind.
    assert_eq!(server.runtime().stats().kv_slots_in_use, 0);
    ok_json(
        addr,
        "/v1/embeddings",
        json!({"model": MODEL, "input": "ok"}),
    )
    .await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
