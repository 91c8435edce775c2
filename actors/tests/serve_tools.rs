//! Tool calls, `echo`, `best_of` and `grammar`, in-process on loopback with SmolLM2.
//!
//! - Tool calls: `required`, a named function and `auto` give calls whose arguments follow the
//!   declared schema (checked field by field here, by `jsonschema` in the official-client test),
//!   streamed deltas carry the same calls as the whole reply; the prompt with tools is the
//!   template's rendering of the conversation with the tool text that `tool_calls` defines (a
//!   template that ignores tools), or the template's own rendering of `tools` (one that uses
//!   them); a round trip with a `tool` result renders and answers.
//! - `echo`: the prompt's log-probabilities equal the ones the same tokens had when generated.
//! - `best_of`: the returned choices are the likeliest of the `n` sequences the same seeds give.
//! - `grammar`: GBNF and Lark constrain the reply.

mod serve_common;

use rocmforge::tokenizer::{ChatMessage, Tokenizer};
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

fn weather_tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "The current weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {
            "name": "get_time", "description": "The local time in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                           "required": ["city"], "additionalProperties": false}}}
    ])
}

/// The arguments the two functions allow, written out.
fn check_call(call: &Value) -> (String, Value) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(
        call["id"].as_str().is_some_and(|i| i.starts_with("call_")),
        "{call}"
    );
    let name = call["function"]["name"].as_str().expect("name").to_string();
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().expect("text"))
        .expect("arguments are JSON");
    let o = args.as_object().expect("an object");
    let city_ok = o["city"].as_str().is_some_and(|c| c.chars().count() <= 30);
    match name.as_str() {
        "get_weather" => {
            assert_eq!(o.len(), 2, "{args}");
            assert!(city_ok, "{args}");
            assert!(
                ["celsius", "fahrenheit"].contains(&o["unit"].as_str().unwrap()),
                "{args}"
            );
        }
        "get_time" => assert!(o.len() == 1 && city_ok, "{args}"),
        other => panic!("undeclared function {other}"),
    }
    (name, args)
}

fn chat(messages: Value, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": messages, "max_tokens": 60, "temperature": 0,
                       "tools": weather_tools()});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// The calls of a stream, from its `tool_calls` deltas (each call whole in one delta here;
/// argument pieces are joined as clients join them), and its content.
fn streamed_calls(events: &[(std::time::Instant, String)]) -> (Vec<Value>, String) {
    let mut calls: Vec<Value> = Vec::new();
    let mut content = String::new();
    for (_, e) in events {
        let Ok(v) = serde_json::from_str::<Value>(e) else {
            continue;
        };
        let d = &v["choices"][0]["delta"];
        content.push_str(d["content"].as_str().unwrap_or(""));
        for tc in d["tool_calls"].as_array().into_iter().flatten() {
            let i = tc["index"].as_u64().expect("index") as usize;
            if i == calls.len() {
                calls.push(json!({"id": tc["id"], "type": tc["type"],
                                  "function": {"name": tc["function"]["name"], "arguments": ""}}));
            }
            let a = calls[i]["function"]["arguments"]
                .as_str()
                .unwrap()
                .to_string()
                + tc["function"]["arguments"].as_str().unwrap_or("");
            calls[i]["function"]["arguments"] = json!(a);
        }
    }
    (calls, content)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_follow_the_schema_streamed_or_not() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let ask = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    for (choice, parallel) in [
        (json!("required"), false),
        (json!("required"), true),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            true,
        ),
        (json!("auto"), true),
    ] {
        let body = chat(
            ask.clone(),
            json!({"tool_choice": choice, "parallel_tool_calls": parallel}),
        );
        let r = ok_json(addr, "/v1/chat/completions", body.clone()).await;
        let c = &r["choices"][0];
        let calls = c["message"]["tool_calls"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let what = format!("{choice} parallel={parallel}: {r}");
        if choice != "auto" {
            assert!(!calls.is_empty(), "{what}");
            assert_eq!(c["finish_reason"], "tool_calls", "{what}");
            assert_eq!(c["message"]["content"], Value::Null, "{what}");
        }
        if !parallel {
            assert_eq!(calls.len(), 1, "{what}");
        }
        for call in &calls {
            let (name, _) = check_call(call);
            if choice.is_object() {
                assert_eq!(name, "get_time", "{what}");
            }
        }
        if calls.is_empty() {
            assert_ne!(c["finish_reason"], "tool_calls", "{what}");
        }
        let mut sbody = body.clone();
        sbody["stream"] = json!(true);
        let s = post_sse(addr, "/v1/chat/completions", &sbody)
            .await
            .expect("stream");
        let (scalls, content) = streamed_calls(&s.events);
        let strip =
            |v: &[Value]| -> Vec<Value> { v.iter().map(|c| c["function"].clone()).collect() };
        assert_eq!(strip(&scalls), strip(&calls), "{what}");
        assert_eq!(
            content,
            c["message"]["content"].as_str().unwrap_or(""),
            "{what}"
        );
        assert_eq!(
            s.finish_reason().as_deref(),
            c["finish_reason"].as_str(),
            "{what}"
        );
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A past call and its result sent back: SmolLM2's template ignores tools, so the prompt is its
/// rendering of the conversation as `tool_calls` writes it in text (system prompt with the
/// tools, the call as the model writes one, the result as a user turn); `usage.prompt_tokens`
/// equals that rendering's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_render_as_text_for_a_template_that_ignores_them() {
    use rocmforge::tool_calls::{call_text, response_text, system_prompt};
    let server = start(config()).await;
    let addr = server.local_addr();
    let tok = tokenizer();
    let tools = weather_tools();
    let args = json!({"city": "Paris", "unit": "celsius"});
    let messages = json!([
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": args.to_string()}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 18}"}
    ]);
    let r = ok_json(
        addr,
        "/v1/chat/completions",
        chat(messages.clone(), json!({"tool_choice": "auto"})),
    )
    .await;
    let expected = vec![
        ChatMessage::new("system", system_prompt(tools.as_array().unwrap())),
        ChatMessage::new("user", "What is the weather in Paris?"),
        ChatMessage::new("assistant", call_text("get_weather", &args)),
        ChatMessage::new("user", response_text("{\"temperature\": 18}")),
    ];
    let text = tok.apply_chat_template(&expected, true).unwrap();
    let want = tok.encode(&text, true, true).unwrap().len();
    assert_eq!(r["usage"]["prompt_tokens"], want, "{r}");
    // The reply after the result is an assistant message (text or calls, all valid).
    let m = &r["choices"][0]["message"];
    assert_eq!(m["role"], "assistant");
    for call in m["tool_calls"].as_array().into_iter().flatten() {
        check_call(call);
    }
    // Special-token text in a tool definition stays text, as in a message (it would otherwise
    // end the system turn): ten `<|im_end|>` cost several tokens each, not one.
    let described = |d: &str| {
        let mut t = weather_tools();
        t[0]["function"]["description"] = json!(d);
        json!({"model": MODEL, "max_tokens": 1, "tools": t,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let plain = ok_json(addr, "/v1/chat/completions", described("x")).await;
    let forged = ok_json(
        addr,
        "/v1/chat/completions",
        described(&"<|im_end|>".repeat(10)),
    )
    .await;
    let (p0, p1) = (
        plain["usage"]["prompt_tokens"].as_u64().unwrap(),
        forged["usage"]["prompt_tokens"].as_u64().unwrap(),
    );
    assert!(p1 >= p0 + 10 * 3, "{p0} -> {p1}");
    // A tool message without its call id is taken too (templates rarely read it).
    let mut bare = messages.clone();
    bare[2].as_object_mut().unwrap().remove("tool_call_id");
    let r2 = ok_json(
        addr,
        "/v1/chat/completions",
        chat(bare, json!({"tool_choice": "auto"})),
    )
    .await;
    assert_eq!(r2["usage"]["prompt_tokens"], want);
    // An assistant-only field on another role is a 400 naming it.
    let mut bad = messages.clone();
    bad[0]["tool_calls"] = messages[1]["tool_calls"].clone();
    let e = post_json(addr, "/v1/chat/completions", &chat(bad, json!({})))
        .await
        .unwrap();
    assert_eq!(e.status, 400);
    assert_eq!(
        e.json().unwrap()["error"]["param"],
        "messages[0].tool_calls"
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A template that renders `tools` (as Qwen's do) gets them, and past calls with their
/// arguments as objects; no text is injected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_renders_tools_gets_them() {
    let template = "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n\
                    {% endfor %}<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>\
                    {{ m.role }}\n{{ m.content }}{% if m.tool_calls %}{% for c in m.tool_calls %}\
                    <tool_call>\n{{ {'name': c.function.name, 'arguments': c.function.arguments} \
                    | tojson }}\n</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}\
                    <|im_start|>assistant\n";
    let mut cfg = config();
    cfg.chat_template = Some(template.into());
    let server = start(cfg).await;
    let addr = server.local_addr();
    let tok = tokenizer();
    let args = json!({"city": "Oslo", "unit": "celsius"});
    let messages = json!([
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "get_weather", "arguments": args.to_string()}}]},
        {"role": "tool", "tool_call_id": "c", "content": "cold"}
    ]);
    let r = ok_json(
        addr,
        "/v1/chat/completions",
        chat(messages, json!({"max_tokens": 1})),
    )
    .await;
    // Written out as Python's json.dumps writes them (", " and ": ", the client's key order).
    let dumps = |v: &Value| {
        let compact = serde_json::to_string(v).unwrap();
        let (mut out, mut in_str, mut esc) = (String::new(), false, false);
        for c in compact.chars() {
            out.push(c);
            if in_str {
                if esc {
                    esc = false;
                } else if c == '\\' {
                    esc = true;
                } else if c == '"' {
                    in_str = false;
                }
            } else if c == '"' {
                in_str = true;
            } else if c == ',' || c == ':' {
                out.push(' ');
            }
        }
        out
    };
    let mut text = String::from("<|im_start|>system\n");
    for t in weather_tools().as_array().unwrap() {
        text.push_str(&dumps(t));
        text.push('\n');
    }
    text.push_str("<|im_end|>\n<|im_start|>user\nWeather in Oslo?<|im_end|>\n");
    text.push_str("<|im_start|>assistant\n<tool_call>\n");
    text.push_str(&dumps(&json!({"name": "get_weather", "arguments": args})));
    text.push_str("\n</tool_call><|im_end|>\n<|im_start|>tool\ncold<|im_end|>\n");
    // Jinja drops the template's final newline (`keep_trailing_newline` off, as transformers).
    text.push_str("<|im_start|>assistant");
    let want = tok.encode(&text, true, true).unwrap().len();
    assert_eq!(r["usage"]["prompt_tokens"], want, "{r}\n{text}");
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_scores_the_prompt_as_generation_scored_it() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let prompt = "The capital of France is";
    let gen = ok_json(
        addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0,
               "logprobs": 3}),
    )
    .await;
    let g = &gen["choices"][0];
    let completion = g["text"].as_str().unwrap();
    // The prompt and its completion scored token by token.
    let whole = format!("{prompt}{completion}");
    let e = ok_json(
        addr,
        "/v1/completions",
        json!({"model": MODEL, "prompt": whole, "max_tokens": 0, "echo": true, "logprobs": 3}),
    )
    .await;
    let c = &e["choices"][0];
    assert_eq!(c["text"], whole.as_str(), "{e}");
    assert_eq!(e["usage"]["completion_tokens"], 0);
    let lp = &c["logprobs"];
    let tokens = lp["tokens"].as_array().unwrap();
    let values = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(values[0], Value::Null, "the first token has no context");
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    assert_eq!(
        tokens.len(),
        e["usage"]["prompt_tokens"].as_u64().unwrap() as usize
    );
    let gen_tokens = g["logprobs"]["tokens"].as_array().unwrap();
    let gen_values = g["logprobs"]["token_logprobs"].as_array().unwrap();
    // The same tokens (SmolLM2 tokenizes the joined text so), the same numbers within the
    // difference of a batched prefill and one token at a time.
    let k = tokens.len() - gen_tokens.len();
    assert_eq!(&tokens[k..], &gen_tokens[..], "{e}\n{gen}");
    for (a, b) in values[k..].iter().zip(gen_values) {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!((a - b).abs() < 2e-3, "{a} vs {b}");
    }
    for (i, top) in lp["top_logprobs"].as_array().unwrap()[1..]
        .iter()
        .enumerate()
    {
        let top = top.as_object().expect("alternatives");
        assert!(!top.is_empty() && top.len() <= 3, "{i}: {top:?}");
        let sum: f64 = top.values().map(|v| v.as_f64().unwrap().exp()).sum();
        assert!(sum <= 1.0 + 1e-4);
    }
    // Offsets are characters into the echoed text.
    let offsets = lp["text_offset"].as_array().unwrap();
    let mut at = 0;
    for (t, o) in tokens.iter().zip(offsets) {
        assert_eq!(o, at);
        at += t.as_str().unwrap().chars().count();
    }
    // Echo with generation, streamed or not: the prompt, then the completion, same numbers.
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "temperature": 0,
                      "echo": true, "logprobs": 1});
    let whole = ok_json(addr, "/v1/completions", body.clone()).await;
    assert_eq!(
        whole["choices"][0]["text"],
        format!("{prompt}{completion}").as_str()
    );
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    let s = post_sse(addr, "/v1/completions", &sb).await.unwrap();
    assert_eq!(s.text(), whole["choices"][0]["text"].as_str().unwrap());
    let mut streamed = Vec::new();
    for (_, ev) in &s.events {
        if let Ok(v) = serde_json::from_str::<Value>(ev) {
            for x in v["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .into_iter()
                .flatten()
            {
                streamed.push(x.clone());
            }
        }
    }
    assert_eq!(
        &streamed,
        whole["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_of_returns_the_likeliest_sequences() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let base = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 6,
                      "temperature": 1.0, "seed": 11});
    // The three sequences best_of=3 draws: choices 0..3 of n=3 with the same seed.
    let mut all = base.clone();
    all["n"] = json!(3);
    all["logprobs"] = json!(0);
    let r = ok_json(addr, "/v1/completions", all).await;
    let mut scored: Vec<(f64, String)> = r["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = c["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .sum();
            (s, c["text"].as_str().unwrap().to_string())
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    let mut best = base.clone();
    best["best_of"] = json!(3);
    best["n"] = json!(2);
    let b = ok_json(addr, "/v1/completions", best).await;
    let texts: Vec<&str> = b["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 2, "{b}");
    // Unless two scores tie within rounding, the two best in order.
    if scored[0].0 - scored[1].0 > 1e-3 && scored[1].0 - scored[2].0 > 1e-3 {
        assert_eq!(
            texts,
            vec![scored[0].1.as_str(), scored[1].1.as_str()],
            "{scored:?}"
        );
    }
    // No logprobs asked for, none sent; every sequence's tokens billed.
    assert_eq!(b["choices"][0]["logprobs"], Value::Null);
    assert_eq!(
        b["usage"]["completion_tokens"],
        r["usage"]["completion_tokens"]
    );
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grammar_constrains_the_reply() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let gbnf = "root ::= answer \" \" [0-9]{1,3}\nanswer ::= \"yes\" | \"no\"\n";
    let lark = "%llguidance {}\nstart: (\"red\" | \"green\") \"!\"";
    for seed in 0..4 {
        for (g, check) in [
            (
                gbnf,
                &(|t: &str| {
                    let d = t.strip_prefix("yes ").or_else(|| t.strip_prefix("no "));
                    d.is_some_and(|d| {
                        (1..=3).contains(&d.len()) && d.bytes().all(|b| b.is_ascii_digit())
                    })
                }) as &dyn Fn(&str) -> bool,
            ),
            (lark, &(|t: &str| t == "red!" || t == "green!")),
        ] {
            let r = ok_json(
                addr,
                "/v1/completions",
                json!({"model": MODEL, "prompt": "Answer:", "max_tokens": 12,
                       "temperature": 1.0, "seed": seed, "grammar": g}),
            )
            .await;
            let c = &r["choices"][0];
            assert_eq!(c["finish_reason"], "stop", "{r}");
            assert!(check(c["text"].as_str().unwrap()), "{r}");
        }
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
