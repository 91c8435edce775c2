//! A `tracing_subscriber::Layer` that records every span as a Chrome trace "complete" event
//! (`ph: "X"`, `ts`/`dur` in microseconds, `pid`, `tid`) with the span's fields as `args`, and
//! every event as an instant (`ph: "i"`). Threads become lanes, named after the OS thread
//! (`rf-reader-0`, `rf-uploader`, ...), so Perfetto or `rocmforge trace view` show the pipeline.

use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::Subscriber;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

#[derive(Default)]
struct Buf {
    events: Vec<Value>,
    /// OS thread -> (lane id, thread name).
    threads: HashMap<std::thread::ThreadId, (u64, String)>,
}

/// Shared handle to what a `ChromeLayer` recorded.
#[derive(Clone)]
pub struct TraceRecorder {
    buf: Arc<Mutex<Buf>>,
}

pub struct ChromeLayer {
    buf: Arc<Mutex<Buf>>,
    epoch: Instant,
}

struct SpanData {
    args: Map<String, Value>,
    entered: Option<Instant>,
}

struct ArgVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for ArgVisitor<'_> {
    fn record_i64(&mut self, f: &Field, v: i64) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_u64(&mut self, f: &Field, v: u64) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_bool(&mut self, f: &Field, v: bool) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_f64(&mut self, f: &Field, v: f64) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_str(&mut self, f: &Field, v: &str) {
        self.0.insert(f.name().into(), json!(v));
    }
    fn record_debug(&mut self, f: &Field, v: &dyn std::fmt::Debug) {
        self.0.insert(f.name().into(), json!(format!("{v:?}")));
    }
}

impl ChromeLayer {
    pub fn new() -> (Self, TraceRecorder) {
        let buf = Arc::new(Mutex::new(Buf::default()));
        (
            Self {
                buf: buf.clone(),
                epoch: Instant::now(),
            },
            TraceRecorder { buf },
        )
    }

    fn lane(&self, buf: &mut Buf) -> u64 {
        let t = std::thread::current();
        let n = buf.threads.len() as u64 + 1;
        buf.threads
            .entry(t.id())
            .or_insert_with(|| (n, t.name().unwrap_or("main").to_string()))
            .0
    }

    fn us(&self, t: Instant) -> f64 {
        t.duration_since(self.epoch).as_nanos() as f64 / 1000.0
    }
}

impl<S> Layer<S> for ChromeLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut args = Map::new();
        attrs.record(&mut ArgVisitor(&mut args));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanData {
                args,
                entered: None,
            });
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(d) = span.extensions_mut().get_mut::<SpanData>() {
                values.record(&mut ArgVisitor(&mut d.args));
            }
        }
    }

    fn on_enter(&self, id: &Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            if let Some(d) = span.extensions_mut().get_mut::<SpanData>() {
                d.entered = Some(Instant::now());
            }
        }
    }

    fn on_exit(&self, id: &Id, ctx: Context<'_, S>) {
        let now = Instant::now();
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        let Some(d) = ext.get_mut::<SpanData>() else {
            return;
        };
        let Some(start) = d.entered.take() else {
            return;
        };
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let tid = self.lane(&mut buf);
        let ev = json!({
            "name": span.name(),
            "cat": span.metadata().target(),
            "ph": "X",
            "ts": self.us(start),
            "dur": now.duration_since(start).as_nanos() as f64 / 1000.0,
            "pid": 1,
            "tid": tid,
            "args": Value::Object(d.args.clone()),
        });
        buf.events.push(ev);
    }

    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut args = Map::new();
        event.record(&mut ArgVisitor(&mut args));
        let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let tid = self.lane(&mut buf);
        let ev = json!({
            "name": event.metadata().name(),
            "cat": event.metadata().target(),
            "ph": "i",
            "s": "t",
            "ts": self.us(Instant::now()),
            "pid": 1,
            "tid": tid,
            "args": Value::Object(args),
        });
        buf.events.push(ev);
    }
}

impl TraceRecorder {
    /// The trace so far as Chrome trace JSON (`{"traceEvents": [...]}`), with thread names.
    pub fn to_json(&self) -> Value {
        let buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
        let mut events: Vec<Value> = buf
            .threads
            .values()
            .map(|(tid, name)| {
                json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid,
                       "args": {"name": name}})
            })
            .collect();
        events.extend(buf.events.iter().cloned());
        json!({ "traceEvents": events, "displayTimeUnit": "ms" })
    }

    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let v = self.to_json();
        let f = std::fs::File::create(path)?;
        serde_json::to_writer(std::io::BufWriter::new(f), &v).map_err(std::io::Error::other)
    }
}

/// Writes the trace file when dropped (or on `finish`).
pub struct TraceGuard {
    recorder: TraceRecorder,
    path: Option<PathBuf>,
}

impl TraceGuard {
    pub fn recorder(&self) -> &TraceRecorder {
        &self.recorder
    }

    /// Writes the file now and reports I/O errors (drop writes too, but cannot report).
    pub fn finish(mut self) -> std::io::Result<()> {
        match self.path.take() {
            Some(p) => self.recorder.write(&p),
            None => Ok(()),
        }
    }
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            if let Err(e) = self.recorder.write(&p) {
                eprintln!("warning: writing trace {}: {e}", p.display());
            }
        }
    }
}

/// Installs the Chrome trace layer as the process-wide subscriber (what `rocmforge run --trace
/// out.json` calls). Fails if a global subscriber is already set.
pub fn enable_chrome_trace(path: impl Into<PathBuf>) -> Result<TraceGuard, String> {
    use tracing_subscriber::prelude::*;
    let (layer, recorder) = ChromeLayer::new();
    tracing_subscriber::registry()
        .with(layer)
        .with(crate::cli::log_layer())
        .try_init()
        .map_err(|e| format!("cannot install the trace subscriber: {e}"))?;
    Ok(TraceGuard {
        recorder,
        path: Some(path.into()),
    })
}
