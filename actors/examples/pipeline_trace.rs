//! Records a Chrome trace of one generation through the pipelined runtime and draws it, the way
//! `rocmforge run --trace out.json` + `rocmforge trace view out.json --svg out.svg` do.
//!
//! cargo run --release -p rocmforge-actors --example pipeline_trace -- \
//!     OUT.json [--model M] [--mode read|mmap|direct] [--budget 40%] [--tokens 4] [--cold]

use rocmforge_actors::cli::ttft::evict_from_page_cache;
use rocmforge_actors::trace::{enable_chrome_trace, view};
use rocmforge_actors::{GenerateRequest, MemoryBudget, ReadMode, Runtime};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut out = PathBuf::from("trace.json");
    let mut model = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut mode = ReadMode::Read;
    let mut budget = MemoryBudget::Unlimited;
    let mut tokens = 4usize;
    let mut cold = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--model" => model = PathBuf::from(val()?),
            "--mode" => mode = val()?.parse()?,
            "--budget" => budget = val()?.parse()?,
            "--tokens" => tokens = val()?.parse()?,
            "--cold" => cold = true,
            _ => out = PathBuf::from(a),
        }
    }
    if cold {
        let left = evict_from_page_cache(&model)?;
        eprintln!("page cache holds {:.0}% of the model", left * 100.0);
    }
    let guard = enable_chrome_trace(&out)?;
    let rt = Runtime::builder()
        .model(&model)
        .read_mode(mode)
        .memory_budget(budget)
        .build()?;
    let mut req = GenerateRequest::text("The pipeline streams layers while", tokens);
    req.stop_at_eos = false;
    let text: String = rt
        .generate(req)
        .into_blocking()
        .map(|e| e.map(|e| e.text))
        .collect::<Result<_, _>>()?;
    let stats = rt.stats();
    rt.shutdown()?;
    guard.finish()?;
    let svg = out.with_extension("svg");
    view(&out, &svg)?;
    println!("{text:?}");
    println!("{}", serde_json::to_string_pretty(&stats)?);
    println!("wrote {} and {}", out.display(), svg.display());
    Ok(())
}
