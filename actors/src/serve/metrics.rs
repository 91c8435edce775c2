//! Server metrics and their Prometheus text exposition (format 0.0.4).
//!
//! Request and token counters and the latency histograms live here; weight residency, load
//! bytes and stage busy time are read from the runtime at scrape time, so they never go stale.

use crate::messages::Stage;
use crate::runtime::RuntimeHandle;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the time-to-first-token buckets: a queued request on a busy CPU
/// can wait many seconds, so the buckets reach far.
const TTFT_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Inter-token latency buckets: one decode step, a few ms on a GPU to ~100 ms on a slow CPU.
const ITL_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<HistState>,
}

#[derive(Debug, Default)]
struct HistState {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new(HistState {
                counts: vec![0; bounds.len()],
                ..Default::default()
            }),
        }
    }

    pub fn observe(&self, d: Duration) {
        let v = d.as_secs_f64();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            s.counts[i] += 1;
        }
        s.sum += v;
        s.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&s.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", s.count);
        let _ = writeln!(out, "{name}_sum {}", s.sum);
        let _ = writeln!(out, "{name}_count {}", s.count);
    }
}

#[derive(Debug)]
pub struct Metrics {
    /// (endpoint, status) -> count.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Admitted requests that have no token yet (queued or in prefill).
    pub waiting: AtomicU64,
    /// Requests producing tokens.
    pub running: AtomicU64,
    pub rejected_queue_full: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            rejected_queue_full: AtomicU64::new(0),
            ttft: Histogram::new(&TTFT_BUCKETS),
            itl: Histogram::new(&ITL_BUCKETS),
        }
    }
}

/// Holds one unit of a gauge (`waiting`, `running`) and gives it back when dropped, so a
/// cancelled request cannot leak a count.
pub struct GaugeGuard {
    metrics: Arc<Metrics>,
    which: fn(&Metrics) -> &AtomicU64,
}

impl GaugeGuard {
    pub fn inc(metrics: Arc<Metrics>, which: fn(&Metrics) -> &AtomicU64) -> Self {
        which(&metrics).fetch_add(1, Ordering::AcqRel);
        Self { metrics, which }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        (self.which)(&self.metrics).fetch_sub(1, Ordering::AcqRel);
    }
}

fn counter(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
    );
}

fn gauge(out: &mut String, name: &str, help: &str, v: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

impl Metrics {
    pub fn count_request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((endpoint.to_string(), status)).or_insert(0) += 1;
    }

    /// The Prometheus text page.
    pub fn render(&self, rt: &RuntimeHandle, ready: bool, queue_capacity: usize) -> String {
        let mut out = String::with_capacity(8192);
        {
            let m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            let name = "rocmforge_http_requests_total";
            let _ = writeln!(
                out,
                "# HELP {name} HTTP requests answered, by endpoint and status."
            );
            let _ = writeln!(out, "# TYPE {name} counter");
            for ((ep, st), n) in m.iter() {
                let _ = writeln!(out, "{name}{{endpoint=\"{ep}\",status=\"{st}\"}} {n}");
            }
        }
        let ld = |a: &AtomicU64| a.load(Ordering::Acquire);
        counter(
            &mut out,
            "rocmforge_prompt_tokens_total",
            "Prompt tokens of admitted generation requests.",
            ld(&self.prompt_tokens),
        );
        counter(
            &mut out,
            "rocmforge_completion_tokens_total",
            "Tokens generated.",
            ld(&self.completion_tokens),
        );
        counter(
            &mut out,
            "rocmforge_queue_rejections_total",
            "Requests answered 429 because the runtime's queue was full.",
            ld(&self.rejected_queue_full),
        );
        gauge(
            &mut out,
            "rocmforge_queue_depth",
            "Admitted requests waiting for their first token (queued or in prefill).",
            ld(&self.waiting),
        );
        gauge(
            &mut out,
            "rocmforge_requests_running",
            "Requests producing tokens.",
            ld(&self.running),
        );
        gauge(
            &mut out,
            "rocmforge_queue_capacity",
            "Requests the runtime queues behind the running one.",
            queue_capacity,
        );
        gauge(
            &mut out,
            "rocmforge_ready",
            "1 once the model is loaded and warmed.",
            u8::from(ready),
        );
        self.ttft.render(
            &mut out,
            "rocmforge_time_to_first_token_seconds",
            "Time from admission to the first generated token.",
        );
        self.itl.render(
            &mut out,
            "rocmforge_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request.",
        );

        let s = rt.stats();
        let p = rt.load_progress();
        gauge(
            &mut out,
            "rocmforge_resident_weight_bytes",
            "Weight bytes reserved on the device (resident plus loading).",
            s.resident_bytes,
        );
        gauge(
            &mut out,
            "rocmforge_allocated_weight_bytes",
            "Bytes allocated in the backend's weight memory.",
            s.allocated_bytes,
        );
        gauge(
            &mut out,
            "rocmforge_total_weight_bytes",
            "Weight bytes of the whole model.",
            s.total_weight_bytes,
        );
        gauge(
            &mut out,
            "rocmforge_memory_budget_bytes",
            "The weight memory budget.",
            s.budget_bytes,
        );
        gauge(
            &mut out,
            "rocmforge_resident_layers",
            "Units (layers and the global group) resident now.",
            s.resident_layers.iter().filter(|&&r| r).count(),
        );
        gauge(
            &mut out,
            "rocmforge_kv_slots_in_use",
            "Sequences holding a KV cache.",
            s.kv_slots_in_use,
        );
        batching(&mut out, &s);
        counter(
            &mut out,
            "rocmforge_layer_hits_total",
            "Layer waits that found the layer resident.",
            s.hits,
        );
        counter(
            &mut out,
            "rocmforge_layer_misses_total",
            "Layer waits that had to wait for a load.",
            s.misses,
        );
        counter(
            &mut out,
            "rocmforge_evictions_total",
            "Layers evicted to stay in budget.",
            s.evictions,
        );
        let h = rt.model_health();
        counter(
            &mut out,
            "rocmforge_weight_load_failures_total",
            "Weight loads that failed (read errors, a changed model file).",
            h.load_failures,
        );
        gauge(
            &mut out,
            "rocmforge_weight_units_failed",
            "Units whose last load failed (the model cannot be served whole while above 0).",
            h.units_failed,
        );
        gauge(
            &mut out,
            "rocmforge_model_file_changed",
            "1 while the model file on disk is not the one loaded.",
            u8::from(h.file_changed.is_some()),
        );
        let name = "rocmforge_load_bytes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Bytes moved by each loading stage since start."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (stage, v) in [
            ("read", p.read_bytes),
            ("transcode", p.transcoded_bytes),
            ("upload", p.uploaded_bytes),
        ] {
            let _ = writeln!(out, "{name}{{stage=\"{stage}\"}} {v}");
        }
        let name = "rocmforge_stage_busy_seconds_total";
        let _ = writeln!(out, "# HELP {name} Time each pipeline stage spent working.");
        let _ = writeln!(out, "# TYPE {name} counter");
        for st in Stage::ALL {
            let v = s.busy_ns(st) as f64 / 1e9;
            let _ = writeln!(out, "{name}{{stage=\"{}\"}} {v}", st.name());
        }
        out
    }
}

/// Continuous batching and the paged KV pool: running and waiting sequences, blocks used,
/// cached and free, prompt tokens the caches spared, and the sequences each step carried.
fn batching(out: &mut String, s: &crate::messages::Stats) {
    gauge(
        out,
        "rocmforge_sequences_running",
        "Sequences in the running set (continuous batching).",
        s.running_seqs,
    );
    gauge(
        out,
        "rocmforge_sequences_waiting",
        "Requests queued for a place in the running set (max_num_seqs, KV room).",
        s.waiting_seqs,
    );
    gauge(
        out,
        "rocmforge_kv_blocks_used",
        "Blocks of the paged KV pool held by sequences.",
        s.kv_blocks_used,
    );
    gauge(
        out,
        "rocmforge_kv_blocks_free",
        "Blocks of the paged KV pool free (neither used nor cached).",
        s.kv_blocks_total
            .saturating_sub(s.kv_blocks_used)
            .saturating_sub(s.kv_blocks_cached),
    );
    gauge(
        out,
        "rocmforge_kv_blocks_cached",
        "Blocks only the prefix cache holds (freed when the pool runs short).",
        s.kv_blocks_cached,
    );
    gauge(
        out,
        "rocmforge_kv_block_tokens",
        "Positions per KV block.",
        s.kv_block_tokens,
    );
    counter(
        out,
        "rocmforge_prefix_cache_hit_tokens_total",
        "Prompt tokens whose keys and values came from the prefix cache instead of prefill.",
        s.prefix_cache_hit_tokens,
    );
    counter(
        out,
        "rocmforge_session_cached_tokens_total",
        "Prompt tokens a chat session's kept sequence spared from prefill.",
        s.prompt_tokens_cached,
    );
    let name = "rocmforge_batch_sequences";
    let _ = writeln!(
        out,
        "# HELP {name} Sequences carried by each step of the running set.\n# TYPE {name} histogram"
    );
    let mut cum = 0u64;
    for (i, n) in s.batch_steps.iter().enumerate() {
        cum += n;
        match crate::pipeline::batch::BATCH_BUCKETS.get(i) {
            Some(le) => {
                let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cum}");
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cum}");
            }
        }
    }
    let _ = writeln!(
        out,
        "{name}_sum {}\n{name}_count {cum}",
        s.batch_step_sequences
    );
    counter(
        out,
        "rocmforge_batch_tokens_total",
        "Tokens carried by all steps (decode tokens and prompt chunks).",
        s.batch_step_tokens,
    );
}
