//! Tracing: the Chrome trace of a `read`-mode run shows overlap (layer 0 computed before the last
//! layer finished loading, by recorded event order), parses as Chrome trace format, and renders
//! as an SVG timeline. One test per file: it installs the process-wide subscriber.

mod runtime_common;

use rocmforge_actors::trace::{enable_chrome_trace, render_svg};
use rocmforge_actors::{MemoryBudget, ReadMode, StageDelays};
use runtime_common::*;
use serde_json::Value;
use std::time::Duration;

/// Index (in recorded order: spans are recorded when they end) of the first span matching.
fn position(events: &[Value], name: &str, layer: i64, last: bool) -> Option<usize> {
    let m = |e: &&Value| {
        e["ph"] == "X" && e["name"] == name && e["args"]["layer"].as_i64() == Some(layer)
    };
    let mut it = events
        .iter()
        .enumerate()
        .filter(|(_, e)| m(e))
        .map(|(i, _)| i);
    if last {
        it.next_back()
    } else {
        it.next()
    }
}

#[test]
fn read_mode_trace_shows_overlap_and_renders() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 12, 64);
    let out = dir.path().join("trace.json");
    let guard = enable_chrome_trace(&out).unwrap();
    // A slow disk (1 ms per chunk) makes the load long next to one layer of compute.
    let rt = builder(&model, ReadMode::Read, MemoryBudget::Unlimited)
        .stage_delays(StageDelays {
            read_per_chunk: Duration::from_millis(1),
            ..Default::default()
        })
        .build()
        .unwrap();
    let tokens = rt.generate(request(2)).collect_tokens().unwrap();
    assert_eq!(tokens.len(), 2);
    rt.shutdown().unwrap();
    guard.finish().unwrap();

    let v: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let events = v["traceEvents"].as_array().expect("traceEvents");
    for e in events {
        assert!(
            e["ph"].is_string() && e["pid"].is_u64() && e["tid"].is_u64(),
            "{e}"
        );
        if e["ph"] == "X" {
            assert!(e["ts"].is_f64() && e["dur"].is_f64(), "{e}");
        }
    }
    let lanes: Vec<&str> = events
        .iter()
        .filter(|e| e["ph"] == "M")
        .filter_map(|e| e["args"]["name"].as_str())
        .collect();
    for actor in ["rf-reader-0", "rf-uploader", "rf-scheduler"] {
        assert!(lanes.contains(&actor), "{actor} missing from {lanes:?}");
    }
    // The inference actor runs on a thread of its compute pool (`rf-inference-N`).
    assert!(
        lanes.iter().any(|l| l.starts_with("rf-inference-")),
        "no rf-inference-N lane in {lanes:?}"
    );
    let last = rt.n_layers() as i64 - 1;
    let compute0 = position(events, "compute", 0, false).expect("compute of layer 0");
    let loaded_last = position(events, "upload", last, true).expect("upload of the last layer");
    assert!(
        compute0 < loaded_last,
        "layer 0 computed (event {compute0}) after the last layer loaded (event {loaded_last})"
    );

    let svg = render_svg(&v).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("rf-inference") && svg.contains(">L0<"));
}
