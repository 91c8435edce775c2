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
    },
}

pub fn run(args: TraceArgs) -> Result<(), Box<dyn std::error::Error>> {
    match args.command {
        TraceCommand::View { trace, svg } => {
            let out = svg.unwrap_or_else(|| trace.with_extension("svg"));
            crate::trace::view(&trace, &out)?;
            println!("wrote {}", out.display());
            Ok(())
        }
    }
}
