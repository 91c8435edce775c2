//! ROCmForge pipelined runtime: actors, embedding API, CLI commands.
//!
//! # Layout
//! - `cli/` — subcommands of the `rocmforge` binary (`inspect`, `synth`, ...).

pub mod cli;
