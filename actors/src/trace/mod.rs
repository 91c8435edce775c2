//! Tracing output: `chrome` records spans as a Chrome/Perfetto trace (`traceEvents` JSON);
//! `svg` draws such a trace as a pipeline timeline (one lane per actor thread).

pub mod chrome;
pub mod svg;

pub use chrome::{enable_chrome_trace, ChromeLayer, TraceGuard, TraceRecorder};
pub use svg::{render_svg, render_svg_with, view, view_with, ViewOptions};
