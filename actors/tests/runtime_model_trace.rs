//! Overlap is real: in the trace of a `read`-mode run of SmolLM2, layer 0 is computed before the
//! last layer finished loading — asserted on recorded event order (spans are recorded when they
//! end), not on wall time. Alone in its file: it installs the global subscriber.
//!
//! The disk is slowed to ~50 MB/s (20 ms per 1 MiB chunk): on this machine the 92 MiB model is
//! read from the page cache faster than the model setup (which runs concurrently with the load)
//! takes, so without it the whole load would be over before the first request, and the test would
//! prove nothing about overlap.

use rocmforge::model::SequenceConfig;
use rocmforge_actors::compute::llama::LlamaCompute;
use rocmforge_actors::trace::{enable_chrome_trace, render_svg};
use rocmforge_actors::{GenerateRequest, ReadMode, Runtime, StageDelays};
use serde_json::Value;
use std::path::PathBuf;

#[test]
fn read_mode_run_computes_layer_0_before_the_last_layer_is_loaded() {
    let model =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.exists(), "run scripts/fetch-model.sh");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("trace.json");
    let guard = enable_chrome_trace(&out).unwrap();
    let rt = Runtime::builder()
        .model(&model)
        .read_mode(ReadMode::Read)
        .stage_delays(StageDelays {
            read_per_chunk: std::time::Duration::from_millis(20),
            ..Default::default()
        })
        .compute(LlamaCompute::factory(SequenceConfig::default()))
        .build()
        .unwrap();
    let mut req = GenerateRequest::tokens(vec![1, 504, 3575, 282], 2);
    req.stop_at_eos = false;
    assert_eq!(rt.generate(req).collect_tokens().unwrap().len(), 2);
    let last = rt.n_layers() as i64 - 1;
    rt.shutdown().unwrap();
    guard.finish().unwrap();

    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().expect("traceEvents");
    let at = |name: &str, layer: i64| {
        events.iter().position(|e| {
            e["ph"] == "X" && e["name"] == name && e["args"]["layer"].as_i64() == Some(layer)
        })
    };
    let compute0 = at("compute", 0).expect("compute of layer 0");
    let read_last = at("read", last).expect("read of the last layer");
    assert!(
        compute0 < read_last,
        "no overlap: layer 0 computed (event {compute0}) after layer {last} was read (event {read_last})"
    );
    assert!(render_svg(&v).unwrap().contains("rf-inference"));
}
