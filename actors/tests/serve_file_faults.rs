//! The model file failing under a running server (issue #15, items 1 and 2), with real file
//! faults on a copy of SmolLM2: truncated in place, rewritten, restored, replaced by another
//! model. The server never dies or wedges: the requests that need unreadable bytes get a 503
//! naming the file, `/health` says the model failed, every KV slot is given back, the failures
//! are counted in `/metrics`, and the server serves again once the file is readable (restored
//! as it was: automatically; rewritten: after a reload over the control socket).
//!
//! In-process: a SIGBUS (what the default `mmap` mode used to die of) would kill the test.

mod serve_common;

use rocmforge_actors::serve::client::{post_json, request, send, HttpResponse};
use rocmforge_actors::serve::control::{ControlClient, ControlRequest, ControlResponse};
use rocmforge_actors::serve::{promtext, ServeConfig, Server};
use rocmforge_actors::MemoryBudget;
use serde_json::{json, Value};
use serve_common::{config, smollm2, start, MODEL};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long any single awaited result may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(60);

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG:?}"))
}

fn completion_body(max_tokens: usize, stream: bool) -> Value {
    json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": max_tokens,
           "temperature": 0, "stream": stream})
}

async fn completion(addr: SocketAddr) -> HttpResponse {
    within(
        "a completion",
        post_json(addr, "/v1/completions", &completion_body(2, false)),
    )
    .await
    .unwrap()
}

async fn ok_completion(addr: SocketAddr) {
    let r = completion(addr).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// `n` completions at once; their answers.
async fn concurrent(addr: SocketAddr, n: usize) -> Vec<HttpResponse> {
    let tasks: Vec<_> = (0..n)
        .map(|_| tokio::spawn(async move { completion(addr).await }))
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A 503 `model_unavailable` whose message names the model file.
fn assert_unavailable(r: &HttpResponse, file: &Path) {
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {}", r.text()));
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(v["error"]["code"], "model_unavailable", "{}", r.text());
    let msg = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(&file.display().to_string()),
        "the error does not name {}: {msg}",
        file.display()
    );
    assert_eq!(r.header("retry-after"), Some("1"));
}

async fn health(addr: SocketAddr) -> HttpResponse {
    within("/health", request(addr, "GET", "/health", None))
        .await
        .unwrap()
}

async fn scrape(addr: SocketAddr) -> promtext::Exposition {
    let r = within("/metrics", request(addr, "GET", "/metrics", None))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    promtext::parse(&r.text()).unwrap_or_else(|e| panic!("{e}\n{}", r.text()))
}

fn metric(m: &promtext::Exposition, name: &str) -> f64 {
    m.get(name, &[])
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// A private copy of SmolLM2 (the tests change it) and its bytes and timestamp.
struct ModelCopy {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: PathBuf,
    bytes: Vec<u8>,
    mtime: SystemTime,
}

impl ModelCopy {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::copy(smollm2(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        Self {
            socket: dir.path().join("control.sock"),
            _dir: dir,
            path,
            bytes,
            mtime,
        }
    }

    /// A config serving the copy, with a control socket.
    fn config(&self) -> ServeConfig {
        let mut cfg = config();
        cfg.model = self.path.clone();
        cfg.control_socket = Some(self.socket.clone());
        cfg
    }

    /// `truncate -s` in place (same inode).
    fn truncate(&self, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    /// Writes `bytes` over the file in place; `keep_time`: with the original timestamp (what
    /// `cp -p` or a backup restore does), else with a new one.
    fn write(&self, bytes: &[u8], keep_time: bool) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        f.set_len(bytes.len() as u64).unwrap();
        f.write_all_at(bytes, 0).unwrap();
        f.sync_all().unwrap();
        if keep_time {
            f.set_modified(self.mtime).unwrap();
        } else {
            // A timestamp that differs even on a filesystem with coarse clocks.
            f.set_modified(self.mtime + Duration::from_secs(10))
                .unwrap();
        }
    }

    fn control(&self, req: ControlRequest) -> ControlResponse {
        ControlClient::connect(&self.socket)
            .unwrap()
            .request(&req)
            .unwrap()
    }
}

/// Runs a blocking control request off the async workers.
async fn control(copy: &std::sync::Arc<ModelCopy>, req: ControlRequest) -> ControlResponse {
    let c = copy.clone();
    within(
        "a control request",
        tokio::task::spawn_blocking(move || c.control(req)),
    )
    .await
    .unwrap()
}

async fn wait_healthy(addr: SocketAddr) {
    let until = tokio::time::Instant::now() + HANG;
    loop {
        let h = health(addr).await;
        if h.status == 200 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "not healthy again: {}",
            h.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn slots_free(server: &Server) {
    let rt = server.runtime().clone();
    let until = tokio::time::Instant::now() + HANG;
    while rt.stats().kv_slots_in_use != 0 {
        assert!(
            tokio::time::Instant::now() < until,
            "a KV slot stays in use"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Item 2: reads fail under a streaming budget (the default read mode), then the file comes
/// back as it was. Failing requests error instead of hanging (several at once, and one that
/// was streaming when the file broke), slots are freed, `/health` says the model failed, the
/// failures show in `/metrics`; after the restore the next requests read again by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_failure_fails_its_requests_and_the_next_ones_retry() {
    let copy = std::sync::Arc::new(ModelCopy::new());
    let mut cfg = copy.config();
    // Half the weights: streamed layers are read again for every token.
    cfg.memory_budget = MemoryBudget::FractionOfWeights(0.5);
    let server = start(cfg).await;
    let addr = server.local_addr();
    let baseline = completion(addr).await;
    assert_eq!(baseline.status, 200, "{}", baseline.text());
    let m = scrape(addr).await;
    assert_eq!(metric(&m, "rocmforge_weight_load_failures_total"), 0.0);
    assert_eq!(metric(&m, "rocmforge_weight_units_failed"), 0.0);

    // A streaming request that is running when the file is truncated ends with an error event.
    let path = copy.path.clone();
    let c2 = copy.clone();
    let mut seen = 0usize;
    let mut raw = Vec::new();
    let (status, _) = within(
        "a stream across the fault",
        send(
            addr,
            "POST",
            "/v1/completions",
            Some(completion_body(400, true).to_string().into_bytes()),
            |b| {
                raw.extend_from_slice(b);
                seen += 1;
                if seen == 3 {
                    c2.truncate(50 << 20);
                }
            },
        ),
    )
    .await
    .unwrap();
    let raw = String::from_utf8_lossy(&raw).into_owned();
    assert_eq!(status, 200);
    assert!(
        seen >= 3,
        "the stream ended before the fault was injected: {raw}"
    );
    assert!(
        raw.contains("model_unavailable") && !raw.contains("[DONE]"),
        "{raw}"
    );
    assert!(raw.contains(&path.display().to_string()), "{raw}");

    // Requests now fail, at once and all of them (none hangs), naming the file.
    for r in concurrent(addr, 3).await {
        assert_unavailable(&r, &path);
    }
    slots_free(&server).await;
    let h = health(addr).await;
    assert_eq!(h.status, 503, "{}", h.text());
    assert!(h.text().contains("model_failed"), "{}", h.text());
    assert!(
        h.text().contains(&path.display().to_string()),
        "{}",
        h.text()
    );
    let m = scrape(addr).await;
    assert!(metric(&m, "rocmforge_weight_load_failures_total") >= 1.0);
    assert!(metric(&m, "rocmforge_weight_units_failed") >= 1.0);
    assert_eq!(metric(&m, "rocmforge_kv_slots_in_use"), 0.0);
    assert_eq!(metric(&m, "rocmforge_model_file_changed"), 1.0);
    // The routes that do not need the weights still answer.
    let r = within("/v1/models", request(addr, "GET", "/v1/models", None))
        .await
        .unwrap();
    assert_eq!(r.status, 200);

    // Restored as it was (same bytes and timestamp): the next requests read it again, and
    // answer as before (no half-loaded unit of a failed attempt was published).
    copy.write(&copy.bytes, true);
    for r in concurrent(addr, 3).await {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json().unwrap()["choices"],
            baseline.json().unwrap()["choices"]
        );
    }
    wait_healthy(addr).await;
    let m = scrape(addr).await;
    assert_eq!(metric(&m, "rocmforge_weight_units_failed"), 0.0);
    assert_eq!(metric(&m, "rocmforge_model_file_changed"), 0.0);
    assert_eq!(metric(&m, "rocmforge_kv_slots_in_use"), 0.0);
    // The window's next loads may still be in flight: every staging slot comes back.
    let until = tokio::time::Instant::now() + HANG;
    while server.runtime().staging_slots_in_use() != 0 {
        assert!(tokio::time::Instant::now() < until, "staging slots leaked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Item 1 with the default configuration (no budget): every weight is resident in memory the
/// process owns, so truncating or rewriting the file cannot crash the server and requests keep
/// being answered from the loaded weights; `/health` stays 200 with a warning and the change
/// shows in `/metrics`. A reload accepts the rewritten file and the warning goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_file_under_a_resident_model_is_reported_not_fatal() {
    let copy = std::sync::Arc::new(ModelCopy::new());
    let server = start(copy.config()).await;
    let addr = server.local_addr();
    let before = within(
        "completion",
        post_json(addr, "/v1/completions", &completion_body(4, false)),
    )
    .await
    .unwrap();
    assert_eq!(before.status, 200);

    copy.truncate(50 << 20);
    let r = within(
        "completion",
        post_json(addr, "/v1/completions", &completion_body(4, false)),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    // The same answer: the loaded weights, not the file's new bytes.
    assert_eq!(
        r.json().unwrap()["choices"],
        before.json().unwrap()["choices"]
    );
    let h = health(addr).await;
    assert_eq!(h.status, 200, "{}", h.text());
    assert!(
        h.text().contains("changed since it was loaded"),
        "{}",
        h.text()
    );
    assert_eq!(
        metric(&scrape(addr).await, "rocmforge_model_file_changed"),
        1.0
    );

    // Copied back (new timestamp): still not the loaded file until a reload accepts it.
    copy.write(&copy.bytes, false);
    assert!(health(addr).await.text().contains("warning"));
    match control(&copy, ControlRequest::Reload).await {
        ControlResponse::Ok => {}
        other => panic!("reload: {other:?}"),
    }
    let h = health(addr).await;
    assert_eq!(h.status, 200);
    assert!(!h.text().contains("warning"), "{}", h.text());
    ok_completion(addr).await;

    // A request computing while a reload evicts the weights fails rather than mixing two
    // versions of them; the next one is fine.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = tokio::spawn(async move {
        let mut raw = Vec::new();
        send(
            addr,
            "POST",
            "/v1/completions",
            Some(completion_body(400, true).to_string().into_bytes()),
            |b| {
                raw.extend_from_slice(b);
                let _ = tx.send(());
            },
        )
        .await
        .unwrap();
        String::from_utf8_lossy(&raw).into_owned()
    });
    for _ in 0..3 {
        within("stream events", rx.recv()).await;
    }
    match control(&copy, ControlRequest::Reload).await {
        ControlResponse::Ok => {}
        other => panic!("reload: {other:?}"),
    }
    let raw = within("the stream across a reload", stream).await.unwrap();
    assert!(
        raw.contains("reloaded while this request ran") && !raw.contains("[DONE]"),
        "{raw}"
    );
    ok_completion(addr).await;
    slots_free(&server).await;
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Item 1 under a streaming budget: a truncated file fails the requests that need it and
/// `/health` answers 503; the file copied back (a new timestamp) is still refused, a reload
/// that finds another model in the file is refused, and a reload of the same model serves
/// again. A normal request succeeds before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_truncated_file_fails_requests_until_the_model_is_reloaded() {
    let copy = std::sync::Arc::new(ModelCopy::new());
    let mut cfg = copy.config();
    cfg.memory_budget = MemoryBudget::FractionOfWeights(0.5);
    let server = start(cfg).await;
    let addr = server.local_addr();
    let baseline = completion(addr).await;
    assert_eq!(baseline.status, 200, "{}", baseline.text());

    copy.truncate(50 << 20);
    let r = completion(addr).await;
    assert_unavailable(&r, &copy.path);
    assert!(
        r.text().contains("changed since it was loaded"),
        "{}",
        r.text()
    );
    let h = health(addr).await;
    assert_eq!(h.status, 503, "{}", h.text());
    assert!(h.text().contains("model_failed"), "{}", h.text());
    match control(&copy, ControlRequest::Health).await {
        ControlResponse::Health(mh) => {
            assert!(mh.units_failed >= 1, "{mh:?}");
            assert!(mh.file_changed.is_some(), "{mh:?}");
        }
        other => panic!("health: {other:?}"),
    }

    // The same bytes with a new timestamp: the runtime cannot know they are the same.
    copy.write(&copy.bytes, false);
    assert_unavailable(&completion(addr).await, &copy.path);

    // Another model in the file (here: other metadata) is not reloaded.
    let mut other = copy.bytes.clone();
    let at = other
        .windows(13)
        .position(|w| w == b"HuggingFaceTB")
        .expect("the organization is in the metadata");
    other[at] = b'X';
    copy.write(&other, false);
    match control(&copy, ControlRequest::Reload).await {
        ControlResponse::Error(e) => assert!(e.contains("different model"), "{e}"),
        other => panic!("reload of another model: {other:?}"),
    }
    assert_eq!(health(addr).await.status, 503);

    // The model again, accepted by a reload: serving resumes, with the same answers.
    copy.write(&copy.bytes, false);
    match control(&copy, ControlRequest::Reload).await {
        ControlResponse::Ok => {}
        other => panic!("reload: {other:?}"),
    }
    for r in concurrent(addr, 2).await {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json().unwrap()["choices"],
            baseline.json().unwrap()["choices"]
        );
    }
    wait_healthy(addr).await;
    slots_free(&server).await;
    let m = scrape(addr).await;
    assert_eq!(metric(&m, "rocmforge_weight_units_failed"), 0.0);
    assert_eq!(metric(&m, "rocmforge_model_file_changed"), 0.0);
    server.shutdown(Duration::from_secs(5)).await.unwrap();
}
