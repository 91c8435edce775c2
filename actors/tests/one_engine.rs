//! One engine: the same greedy reply to the same chat through `run`, `chat` (first turn),
//! `serve` and the embedding API, on the CPU, and on CUDA (ignored without the `gpu-tests`
//! feature; `scripts/device-check.sh` runs it). They all go through the runtime's actors.

#[macro_use]
#[path = "../../tests/common/gpu.rs"]
#[allow(dead_code)]
mod gpu;
mod serve_common;

use rocmforge::backend::BackendKind;
use rocmforge::tokenizer::{ChatMessage, Tokenizer};
use rocmforge_actors::serve::client::post_json;
use rocmforge_actors::{GenerateRequest, Runtime, SamplingParams};
use serde_json::{json, Value};
use serve_common::{config, smollm2, start, MODEL};
use std::io::Write;
use std::process::{Command, Stdio};

const QUESTION: &str = "What is 2+2?";
const N: &str = "48";

fn rendered_prompt() -> String {
    let file = rocmforge::gguf::GgufFile::open(smollm2()).unwrap();
    let tok = Tokenizer::from_metadata(file.metadata()).unwrap();
    tok.apply_chat_template(&[ChatMessage::new("user", QUESTION)], true)
        .unwrap()
}

fn cli(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the rocmforge binary runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_greedy_reply_through_run_chat_serve_and_the_api() {
    same_reply_everywhere(BackendKind::Cpu).await;
}

gpu_test!(cuda: fn the_same_greedy_reply_through_run_chat_serve_and_the_api_on_cuda() {
    drop(require_device!(cuda));
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(same_reply_everywhere(BackendKind::Cuda));
});

async fn same_reply_everywhere(kind: BackendKind) {
    let m = smollm2();
    let m = m.to_str().unwrap();
    let prompt = rendered_prompt();
    let backend = kind.to_string();
    let common = ["--model", m, "--backend", &backend, "--temp", "0", "-n", N];

    let run: Value = serde_json::from_slice(
        &cli(
            &[&["run", "--json", "--prompt", &prompt][..], &common[..]].concat(),
            "",
        )
        .stdout,
    )
    .expect("run --json prints JSON");
    let run_text = run["text"].as_str().unwrap().to_string();
    assert_eq!(run["stop_reason"], "eog", "{run}");

    let chat = cli(
        &[&["chat"][..], &common[..]].concat(),
        &format!("{QUESTION}\n/bye\n"),
    );
    let chat_text = String::from_utf8_lossy(&chat.stdout).trim_end().to_string();

    let rt = Runtime::builder().model(m).device(kind).build().unwrap();
    let mut req = GenerateRequest::text(prompt.clone(), N.parse().unwrap());
    req.sampling = SamplingParams::greedy();
    let api_text: String = rt
        .generate(req)
        .into_blocking()
        .map(|e| e.unwrap().text)
        .collect();
    rt.shutdown().unwrap();

    let mut cfg = config();
    cfg.backend = kind;
    let server = start(cfg).await;
    let r = post_json(
        server.local_addr(),
        "/v1/chat/completions",
        &json!({"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 48, "temperature": 0}),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    let serve_text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();

    assert!(!run_text.is_empty());
    assert_eq!(chat_text, run_text, "chat vs run");
    assert_eq!(api_text, run_text, "API vs run");
    assert_eq!(serve_text, run_text, "serve vs run");
    println!("{kind}: run, chat, the API and serve agree: {run_text:?}");
    server
        .shutdown(std::time::Duration::from_secs(5))
        .await
        .ok();
}
