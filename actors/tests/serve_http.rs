//! The HTTP server in-process on loopback with SmolLM2: bad input answered with OpenAI-style
//! 4xx errors (and the server keeps serving), metrics that parse and move, backpressure,
//! cancellation on disconnect, and 32 concurrent streams equal to a sequential run.

mod serve_common;

use rocmforge_actors::serve::client::{post_json, post_sse, request};
use rocmforge_actors::serve::promtext;
use serde_json::{json, Value};
use serve_common::{config, start, MODEL};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Asserts an OpenAI error object and returns it.
fn assert_openai_error(status: u16, want: u16, body: &[u8], what: &str) -> Value {
    assert_eq!(status, want, "{what}: {}", String::from_utf8_lossy(body));
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {body:?}"));
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(e["type"].as_str().is_some(), "{what}: {v}");
    let obj = e.as_object().expect("error object");
    assert!(
        obj.contains_key("param") && obj.contains_key("code"),
        "{what}: {v}"
    );
    v
}

async fn ok_completion(addr: SocketAddr) {
    let r = post_json(
        addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2,
                "temperature": 0}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_openai_error_and_the_server_keeps_serving() {
    let mut cfg = config();
    // A small context makes "prompt longer than the context" cheap to build.
    cfg.ctx = Some(256);
    let server = start(cfg).await;
    let addr = server.local_addr();
    let chat = "/v1/chat/completions";
    let msgs = json!([{"role": "user", "content": "hi"}]);
    let cases: Vec<(&str, &str, Vec<u8>, u16)> = vec![
        (
            "malformed JSON",
            chat,
            b"{\"model\": \"smollm2\", \"messages\": [".to_vec(),
            400,
        ),
        ("not JSON at all", chat, b"hello".to_vec(), 400),
        (
            "unknown model",
            chat,
            json!({"model": "gpt-17", "messages": msgs})
                .to_string()
                .into_bytes(),
            404,
        ),
        (
            "negative max_tokens",
            chat,
            json!({"model": MODEL, "messages": msgs, "max_tokens": -3})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "huge max_tokens",
            chat,
            json!({"model": MODEL, "messages": msgs, "max_tokens": 1_000_000_000_000u64})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "max_tokens as a string",
            "/v1/completions",
            json!({"model": MODEL, "prompt": "a", "max_tokens": "ten"})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "messages not a list",
            chat,
            json!({"model": MODEL, "messages": "hi"})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "temperature out of range",
            chat,
            json!({"model": MODEL, "messages": msgs, "temperature": 9.5})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "n = 17",
            chat,
            json!({"model": MODEL, "messages": msgs, "n": 17})
                .to_string()
                .into_bytes(),
            400,
        ),
        (
            "prompt longer than the context",
            "/v1/completions",
            json!({"model": MODEL, "prompt": "hello ".repeat(400), "max_tokens": 1})
                .to_string()
                .into_bytes(),
            400,
        ),
        ("10 MB body", "/v1/completions", vec![b'a'; 10 << 20], 413),
    ];
    for (what, path, body, want) in cases {
        let r = request(addr, "POST", path, Some(body)).await.unwrap();
        let v = assert_openai_error(r.status, want, &r.body, what);
        if what == "prompt longer than the context" {
            assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
        }
        if what == "unknown model" {
            assert_eq!(v["error"]["param"], "model", "{v}");
        }
        // Still serving after every bad request.
        let h = request(addr, "GET", "/health", None).await.unwrap();
        assert_eq!(h.status, 200, "after {what}");
    }
    let r = request(addr, "GET", "/no/such/path", None).await.unwrap();
    assert_openai_error(r.status, 404, &r.body, "unknown path");
    let r = request(addr, "GET", "/v1/completions", None).await.unwrap();
    assert_openai_error(r.status, 405, &r.body, "GET on a POST endpoint");
    ok_completion(addr).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

async fn scrape(addr: SocketAddr) -> promtext::Exposition {
    let r = request(addr, "GET", "/metrics", None).await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    promtext::parse(&r.text()).unwrap_or_else(|e| panic!("{e}\n{}", r.text()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move_with_requests() {
    let server = start(config()).await;
    let addr = server.local_addr();
    let m0 = scrape(addr).await;
    assert_eq!(
        m0.types["rocmforge_time_to_first_token_seconds"],
        "histogram"
    );
    assert_eq!(m0.types["rocmforge_completion_tokens_total"], "counter");
    assert_eq!(m0.get("rocmforge_ready", &[]), Some(1.0));
    assert!(m0.get("rocmforge_resident_weight_bytes", &[]).unwrap() > 0.0);
    assert!(
        m0.get("rocmforge_load_bytes_total", &[("stage", "read")])
            .unwrap()
            > 0.0
    );
    assert!(m0
        .get(
            "rocmforge_stage_busy_seconds_total",
            &[("stage", "compute")]
        )
        .is_some());

    let r = post_json(
        addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 5,
                "temperature": 0}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json().unwrap();
    let used = v["usage"]["completion_tokens"].as_f64().unwrap();
    let prompt = v["usage"]["prompt_tokens"].as_f64().unwrap();
    assert!(used >= 1.0 && prompt >= 1.0, "{v}");

    let m1 = scrape(addr).await;
    let d = |name: &str, labels: &[(&str, &str)]| {
        m1.get(name, labels).unwrap_or(0.0) - m0.get(name, labels).unwrap_or(0.0)
    };
    assert_eq!(d("rocmforge_completion_tokens_total", &[]), used);
    assert_eq!(d("rocmforge_prompt_tokens_total", &[]), prompt);
    assert_eq!(d("rocmforge_time_to_first_token_seconds_count", &[]), 1.0);
    assert_eq!(
        d("rocmforge_inter_token_latency_seconds_count", &[]),
        used - 1.0
    );
    assert_eq!(
        d(
            "rocmforge_http_requests_total",
            &[("endpoint", "/v1/completions"), ("status", "200")]
        ),
        1.0
    );
    assert!(
        d(
            "rocmforge_stage_busy_seconds_total",
            &[("stage", "compute")]
        ) > 0.0
    );
    // Histogram buckets are cumulative.
    let buckets: Vec<f64> = m1
        .samples
        .iter()
        .filter(|s| s.name == "rocmforge_time_to_first_token_seconds_bucket")
        .map(|s| s.value)
        .collect();
    assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    assert_eq!(m1.get("rocmforge_queue_depth", &[]), Some(0.0));
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_429_with_retry_after_and_disconnect_cancels() {
    let mut cfg = config();
    cfg.queue_capacity = 1;
    // One running sequence, so the six requests below meet a full queue however fast the
    // runtime takes requests into its running set.
    cfg.batch.max_num_seqs = 1;
    let server = start(cfg).await;
    let addr = server.local_addr();
    let body = json!({"model": MODEL, "prompt": "Tell me a story", "max_tokens": 24,
                      "temperature": 0});
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let b = body.clone();
            tokio::spawn(async move { post_json(addr, "/v1/completions", &b).await })
        })
        .collect();
    let mut ok = 0;
    let mut busy = 0;
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
                let v = assert_openai_error(r.status, 429, &r.body, "queue full");
                assert_eq!(v["error"]["code"], "queue_full");
                busy += 1;
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    assert!(ok >= 1 && busy >= 1, "ok {ok}, busy {busy}");

    // A streaming client that hangs up after the first token: the request is cancelled long
    // before its 400 tokens, and its KV slot is freed.
    let done0 = server.runtime().stats().requests_done;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let b = json!({"model": MODEL, "prompt": "Write a long essay", "max_tokens": 400,
                   "temperature": 0, "stream": true})
    .to_string();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{b}",
        b.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while seen.windows(6).filter(|w| w == b"data: ").count() < 3 {
        let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut buf))
            .await
            .expect("first tokens in time")
            .unwrap();
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    // While it streams, its sequence runs and holds KV blocks.
    let during = scrape(addr).await;
    assert_eq!(during.get("rocmforge_sequences_running", &[]), Some(1.0));
    assert!(during.get("rocmforge_kv_blocks_used", &[]).unwrap() > 0.0);
    drop(s);
    let m0 = scrape(addr).await;
    let tokens_at_drop = m0.get("rocmforge_completion_tokens_total", &[]).unwrap();
    let mut freed = false;
    for _ in 0..600 {
        let st = server.runtime().stats();
        if st.requests_done > done0 && st.kv_slots_in_use == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        freed,
        "request not cancelled: {:?}",
        server.runtime().stats()
    );
    let m1 = scrape(addr).await;
    let generated = m1.get("rocmforge_completion_tokens_total", &[]).unwrap();
    assert!(
        generated < tokens_at_drop + 100.0,
        "{tokens_at_drop} -> {generated}"
    );
    assert_eq!(m1.get("rocmforge_requests_running", &[]), Some(0.0));
    // Its blocks are back in the pool, as /metrics shows.
    assert_eq!(m1.get("rocmforge_kv_blocks_used", &[]), Some(0.0));
    assert!(m1.get("rocmforge_kv_blocks_free", &[]).unwrap() > 0.0);
    assert_eq!(m1.get("rocmforge_sequences_running", &[]), Some(0.0));
    assert!(m1.get("rocmforge_batch_sequences_count", &[]).unwrap() > 0.0);
    ok_completion(addr).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_equal_a_sequential_run() {
    const CLIENTS: usize = 32;
    let server = start(config()).await;
    let addr = server.local_addr();
    let body = |i: usize| {
        json!({"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": true,
               "messages": [{"role": "user", "content": format!("Give me fact number {i}.")}]})
    };
    let mut sequential = Vec::new();
    for i in 0..CLIENTS {
        let r = post_sse(addr, "/v1/chat/completions", &body(i))
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.raw));
        sequential.push((r.text(), r.finish_reason()));
    }
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let b = body(i);
            tokio::spawn(async move { post_sse(addr, "/v1/chat/completions", &b).await })
        })
        .collect();
    let run = tokio::time::timeout(Duration::from_secs(600), futures::future::join_all(tasks))
        .await
        .expect("32 concurrent streams finish in bounded time");
    for (i, r) in run.into_iter().enumerate() {
        let r = r.unwrap().unwrap();
        assert_eq!(
            r.status,
            200,
            "client {i}: {}",
            String::from_utf8_lossy(&r.raw)
        );
        assert_eq!(
            r.events.last().map(|e| e.1.as_str()),
            Some("[DONE]"),
            "client {i}"
        );
        assert!(!r.text().is_empty(), "client {i}");
        assert_eq!((r.text(), r.finish_reason()), sequential[i], "client {i}");
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
