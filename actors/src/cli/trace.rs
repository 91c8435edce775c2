//! `rocmforge trace view out.json --svg out.svg`: draws a recorded pipeline trace.

use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: TraceCommand,
}

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Draw a Chrome trace (from `rocmforge run --trace`) as an SVG timeline, one lane per actor.
    View {
        /// The trace JSON.
        trace: PathBuf,
        /// Output SVG [default: the trace path with `.svg`].
        #[arg(long)]
        svg: Option<PathBuf>,
        /// Only from this time on, in ms since the first span.
        #[arg(long)]
        from_ms: Option<f64>,
        /// Only up to this time, in ms since the first span.
        #[arg(long)]
        to_ms: Option<f64>,
    },
}

pub fn run(args: TraceArgs) -> Result<(), Box<dyn std::error::Error>> {
    match args.command {
        TraceCommand::View {
            trace,
            svg,
            from_ms,
            to_ms,
        } => {
            let out = svg.unwrap_or_else(|| trace.with_extension("svg"));
            let window = match (from_ms, to_ms) {
                (None, None) => None,
                (a, b) => Some((a.unwrap_or(0.0), b.unwrap_or(f64::MAX / 2e3))),
            };
            crate::trace::view_with(&trace, &out, crate::trace::ViewOptions { window })?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}
