//! Draws a Chrome trace as an SVG pipeline timeline: one lane per thread (actor), time on x,
//! spans as boxes (nested spans stacked inside their parent's lane), layers labelled `L<n>`
//! (`G` for the global tensors), so overlap between reading and computing is visible at a glance.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

const WIDTH: f64 = 1600.0;
const LEFT: f64 = 150.0;
const LANE_H: f64 = 34.0;
const TOP: f64 = 40.0;

struct Span {
    name: String,
    ts: f64,
    dur: f64,
    layer: Option<i64>,
    depth: usize,
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

/// Renders a parsed Chrome trace. Errors name what is missing.
pub fn render_svg(trace: &Value) -> Result<String, String> {
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
                });
            }
            _ => {}
        }
    }
    if lanes.is_empty() {
        return Err("the trace has no spans (ph = X)".into());
    }
    let t0 = lanes
        .values()
        .flatten()
        .map(|s| s.ts)
        .fold(f64::INFINITY, f64::min);
    let t1 = lanes
        .values()
        .flatten()
        .map(|s| s.ts + s.dur)
        .fold(f64::NEG_INFINITY, f64::max);
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
        r#"<text x="{LEFT}" y="16" font-size="13">pipeline timeline: {:.1} ms, {} lanes</text>"#,
        span_us / 1000.0,
        order.len()
    );
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
        for s in &spans {
            let x0 = x(s.ts);
            let w = (x(s.ts + s.dur) - x0).max(0.5);
            let y0 = y + 2.0 + h * s.depth as f64;
            let label = match s.layer {
                Some(l) if l >= 0 => format!("L{l}"),
                Some(_) => "G".to_string(),
                None => String::new(),
            };
            let _ = writeln!(
                out,
                r##"<rect x="{x0:.2}" y="{y0:.1}" width="{w:.2}" height="{:.1}" fill="{}" stroke="#555" stroke-width="0.2"><title>{} {} {:.1} us</title></rect>"##,
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
    let text = std::fs::read_to_string(trace_json)
        .map_err(|e| format!("reading {}: {e}", trace_json.display()))?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not JSON: {e}", trace_json.display()))?;
    let svg = render_svg(&v)?;
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
}
