//! Draws a Chrome trace as an SVG pipeline timeline: one lane per thread (actor), time on x,
//! spans as boxes (nested spans stacked inside their parent's lane), layers labelled `L<n>`
//! (`G` for the global tensors), so overlap between reading and computing is visible at a glance.
//!
//! A long run holds hundreds of thousands of spans: boxes of one kind that would be drawn less
//! than a pixel wide and touch are merged into one (its tooltip gives the count), so the picture
//! stays a few hundred KB whatever the length; `ViewOptions::window` zooms into a time range.
//! The Perfetto JSON itself stays complete.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

const WIDTH: f64 = 1600.0;
const LEFT: f64 = 150.0;
const LANE_H: f64 = 34.0;
const TOP: f64 = 40.0;

#[derive(Clone)]
struct Span {
    name: String,
    ts: f64,
    dur: f64,
    layer: Option<i64>,
    depth: usize,
    /// How many recorded spans this box stands for (sub-pixel ones merged).
    merged: usize,
}

/// The colours in the legend, in pipeline order.
const LEGEND: [(&str, &str); 7] = [
    ("read", "read unit"),
    ("read_chunk", "read chunk"),
    ("transcode", "transcode"),
    ("upload", "upload"),
    ("schedule", "schedule"),
    ("wait", "wait"),
    ("compute", "compute"),
];

/// Merges, per depth and kind, spans that would each be under a pixel wide and lie within a
/// pixel of the previous one of their kind: one box per run, spanning it (kinds that alternate
/// at the sub-pixel scale, such as `wait` and `compute`, each get their own run).
fn merge_subpixel(spans: Vec<Span>, span_us: f64) -> Vec<Span> {
    let px_us = span_us / (WIDTH - LEFT - 20.0);
    let mut out: Vec<Span> = Vec::with_capacity(spans.len().min(1 << 16));
    // The last box per (depth, kind) that may still absorb a neighbour.
    let mut open: std::collections::HashMap<(usize, String), usize> = Default::default();
    for s in spans {
        let tiny = s.dur < px_us;
        let key = (s.depth, s.name.clone());
        if let Some(&i) = open.get(&key) {
            let b = &mut out[i];
            if tiny && s.ts <= b.ts + b.dur + px_us {
                b.dur = (s.ts + s.dur).max(b.ts + b.dur) - b.ts;
                b.merged += 1;
                if b.layer != s.layer {
                    b.layer = None;
                }
                continue;
            }
        }
        if tiny {
            open.insert(key, out.len());
        } else {
            open.remove(&key);
        }
        out.push(s);
    }
    out
}

fn lane_rank(name: &str) -> usize {
    // Data-flow order, the order of the design drawing.
    const ORDER: [&str; 6] = [
        "rf-scheduler",
        "rf-reader",
        "rf-transcode",
        "rf-uploader",
        "rf-inference",
        "",
    ];
    ORDER
        .iter()
        .position(|p| !p.is_empty() && name.starts_with(p))
        .unwrap_or(ORDER.len())
}

fn color(name: &str) -> &'static str {
    match name {
        "read" => "#9ecae1",
        "read_chunk" => "#3182bd",
        "transcode" => "#fdae6b",
        "upload" => "#74c476",
        "compute" => "#e6550d",
        "wait" => "#d9d9d9",
        "schedule" => "#9e9ac8",
        "token" | "request" => "#fff5eb",
        _ => "#bdbdbd",
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// What to draw of a trace.
#[derive(Debug, Clone, Copy, Default)]
pub struct ViewOptions {
    /// Only this time range, in ms from the trace's first span (`None`: all of it).
    pub window: Option<(f64, f64)>,
}

/// Renders a parsed Chrome trace, all of it. Errors name what is missing.
pub fn render_svg(trace: &Value) -> Result<String, String> {
    render_svg_with(trace, ViewOptions::default())
}

/// Renders a parsed Chrome trace as `opt` says.
pub fn render_svg_with(trace: &Value, opt: ViewOptions) -> Result<String, String> {
    let events = trace
        .get("traceEvents")
        .and_then(Value::as_array)
        .ok_or("no `traceEvents` array")?;
    let mut names: BTreeMap<u64, String> = BTreeMap::new();
    let mut lanes: BTreeMap<u64, Vec<Span>> = BTreeMap::new();
    for e in events {
        let ph = e.get("ph").and_then(Value::as_str).unwrap_or("");
        let tid = e.get("tid").and_then(Value::as_u64).unwrap_or(0);
        match ph {
            "M" => {
                if let Some(n) = e.pointer("/args/name").and_then(Value::as_str) {
                    names.insert(tid, n.to_string());
                }
            }
            "X" => {
                let ts = e
                    .get("ts")
                    .and_then(Value::as_f64)
                    .ok_or("an X event without ts")?;
                let dur = e.get("dur").and_then(Value::as_f64).unwrap_or(0.0);
                lanes.entry(tid).or_default().push(Span {
                    name: e
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string(),
                    ts,
                    dur,
                    layer: e.pointer("/args/layer").and_then(Value::as_i64),
                    depth: 0,
                    merged: 1,
                });
            }
            _ => {}
        }
    }
    if lanes.is_empty() {
        return Err("the trace has no spans (ph = X)".into());
    }
    let first = lanes
        .values()
        .flatten()
        .map(|s| s.ts)
        .fold(f64::INFINITY, f64::min);
    let last = lanes
        .values()
        .flatten()
        .map(|s| s.ts + s.dur)
        .fold(f64::NEG_INFINITY, f64::max);
    let (t0, t1) = match opt.window {
        Some((a, b)) if b > a => (first + a * 1000.0, (first + b * 1000.0).min(last)),
        Some((a, b)) => return Err(format!("empty time window {a}..{b} ms")),
        None => (first, last),
    };
    // Spans outside the window go; the rest are clipped to it.
    for spans in lanes.values_mut() {
        spans.retain(|s| s.ts < t1 && s.ts + s.dur > t0);
        for s in spans.iter_mut() {
            let end = (s.ts + s.dur).min(t1);
            s.ts = s.ts.max(t0);
            s.dur = end - s.ts;
        }
    }
    lanes.retain(|_, spans| !spans.is_empty());
    if lanes.is_empty() {
        return Err("no span in the time window".into());
    }
    let span_us = (t1 - t0).max(1.0);
    let x = |t: f64| LEFT + (t - t0) / span_us * (WIDTH - LEFT - 20.0);

    // Lanes in pipeline order, then by name.
    let mut order: Vec<(u64, String)> = lanes
        .keys()
        .map(|&tid| {
            (
                tid,
                names
                    .get(&tid)
                    .cloned()
                    .unwrap_or_else(|| format!("thread {tid}")),
            )
        })
        .collect();
    order.sort_by(|a, b| (lane_rank(&a.1), &a.1).cmp(&(lane_rank(&b.1), &b.1)));

    let height = TOP + LANE_H * order.len() as f64 + 40.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" font-size="10">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="16" font-size="13">pipeline timeline: {:.1} ms from {:.1} ms, {} lanes</text>"#,
        span_us / 1000.0,
        (t0 - first) / 1000.0,
        order.len()
    );
    // Legend: what each colour is.
    let mut lx = WIDTH - 20.0;
    for (name, what) in LEGEND.iter().rev() {
        lx -= 8.0 + 6.5 * what.len() as f64 + 14.0;
        let _ = writeln!(
            out,
            r##"<rect x="{lx:.1}" y="7" width="10" height="10" fill="{}" stroke="#555" stroke-width="0.3"/><text x="{:.1}" y="16">{what}</text>"##,
            color(name),
            lx + 13.0
        );
    }
    // Time axis: about ten ticks at a round step.
    let step = {
        let raw = span_us / 10.0;
        let mag = 10f64.powf(raw.log10().floor());
        [1.0, 2.0, 5.0, 10.0]
            .iter()
            .map(|m| m * mag)
            .find(|s| *s >= raw)
            .unwrap_or(raw)
    };
    let axis_y = TOP + LANE_H * order.len() as f64 + 4.0;
    let mut t = 0.0;
    while t <= span_us {
        let px = x(t0 + t);
        let _ = writeln!(
            out,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{axis_y}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{:.1} ms</text>"##,
            axis_y + 14.0,
            t / 1000.0
        );
        t += step;
    }
    for (i, (tid, name)) in order.iter().enumerate() {
        let y = TOP + LANE_H * i as f64;
        let _ = writeln!(
            out,
            r##"<text x="4" y="{:.1}">{}</text><line x1="{LEFT}" y1="{y:.1}" x2="{WIDTH}" y2="{y:.1}" stroke="#ccc"/>"##,
            y + LANE_H / 2.0 + 3.0,
            esc(name)
        );
        let spans = lanes.get_mut(tid).map(std::mem::take).unwrap_or_default();
        let mut spans = spans;
        // Nesting depth by a stack of open spans (children end before their parents).
        spans.sort_by(|a, b| a.ts.total_cmp(&b.ts).then(b.dur.total_cmp(&a.dur)));
        let mut stack: Vec<f64> = Vec::new();
        for s in spans.iter_mut() {
            while stack.last().is_some_and(|&end| end <= s.ts) {
                stack.pop();
            }
            s.depth = stack.len();
            stack.push(s.ts + s.dur);
        }
        let max_depth = spans.iter().map(|s| s.depth).max().unwrap_or(0) + 1;
        let h = (LANE_H - 4.0) / max_depth as f64;
        for s in &merge_subpixel(spans, span_us) {
            let x0 = x(s.ts);
            let w = (x(s.ts + s.dur) - x0).max(0.5);
            let y0 = y + 2.0 + h * s.depth as f64;
            let label = match s.layer {
                Some(l) if l >= 0 => format!("L{l}"),
                Some(_) => "G".to_string(),
                None => String::new(),
            };
            let count = if s.merged > 1 {
                format!(" ({} spans)", s.merged)
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                r##"<rect x="{x0:.2}" y="{y0:.1}" width="{w:.2}" height="{:.1}" fill="{}" stroke="#555" stroke-width="0.2"><title>{} {} {:.1} us{count}</title></rect>"##,
                h - 1.0,
                color(&s.name),
                esc(&s.name),
                esc(&label),
                s.dur
            );
            if !label.is_empty() && w > 7.0 * label.len() as f64 && h >= 9.0 {
                let _ = writeln!(
                    out,
                    r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                    x0 + w / 2.0,
                    y0 + h / 2.0 + 3.0
                );
            }
        }
    }
    out.push_str("</svg>\n");
    Ok(out)
}

/// Reads a trace file and writes its SVG timeline.
pub fn view(trace_json: &Path, svg_out: &Path) -> Result<(), String> {
    view_with(trace_json, svg_out, ViewOptions::default())
}

/// [`view`] with options (a time window).
pub fn view_with(trace_json: &Path, svg_out: &Path, opt: ViewOptions) -> Result<(), String> {
    let text = std::fs::read_to_string(trace_json)
        .map_err(|e| format!("reading {}: {e}", trace_json.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not JSON: {e}", trace_json.display()))?;
    let svg = render_svg_with(&v, opt)?;
    std::fs::write(svg_out, svg).map_err(|e| format!("writing {}: {e}", svg_out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_lanes_and_layer_labels() {
        let v = serde_json::json!({"traceEvents": [
            {"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "rf-reader-0"}},
            {"name": "read", "ph": "X", "pid": 1, "tid": 1, "ts": 0.0, "dur": 500.0, "args": {"layer": 3}},
            {"name": "compute", "ph": "X", "pid": 1, "tid": 2, "ts": 400.0, "dur": 600.0, "args": {"layer": 0}},
        ]});
        let svg = render_svg(&v).unwrap();
        assert!(svg.contains("rf-reader-0"));
        assert!(svg.contains(">L3<") && svg.contains(">L0<"));
        assert!(render_svg(&serde_json::json!({})).is_err());
    }

    /// A long run's hundred thousand tiny spans become a bounded number of boxes, with a
    /// legend; a window zooms in and keeps the detail.
    #[test]
    fn long_traces_stay_small_and_windows_zoom() {
        let mut events = vec![
            serde_json::json!({"name": "thread_name", "ph": "M", "pid": 1, "tid": 1, "args": {"name": "rf-inference"}}),
        ];
        for i in 0..100_000u32 {
            events.push(
                serde_json::json!({"name": "compute", "ph": "X", "pid": 1, "tid": 1,
                "ts": f64::from(i) * 10.0, "dur": 8.0, "args": {"layer": i % 30}}),
            );
        }
        let v = serde_json::json!({ "traceEvents": events });
        let svg = render_svg(&v).unwrap();
        let boxes = svg.matches("<rect").count();
        assert!(boxes < 2_000, "{boxes} boxes");
        assert!(svg.len() < 1 << 20, "{} bytes", svg.len());
        assert!(svg.contains("spans)") && svg.contains(">compute<") && svg.contains(">read unit<"));
        // 0.1 ms of it: every span its own box again.
        let zoom = render_svg_with(
            &v,
            ViewOptions {
                window: Some((0.0, 0.1)),
            },
        )
        .unwrap();
        assert!(zoom.matches("<title>compute").count() >= 10);
        assert!(render_svg_with(
            &v,
            ViewOptions {
                window: Some((5.0, 5.0))
            }
        )
        .is_err());
    }
}
