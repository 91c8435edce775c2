//! Time-to-first-token of the pipelined runtime, split by stage, at several budgets; pipelined vs
//! load-then-compute. The same measurement `rocmforge bench --ttft` reports.
//!
//! cargo run --release -p rocmforge-actors --example pipeline_ttft -- \
//!     [MODEL] [--mode read|mmap|direct] [--budgets 1,0.5,0.25] [--prompt 64] [--decode 16] [--warm] [--repeat 3] [--readers 2] [--depth 2]

use rocmforge_actors::cli::ttft::{
    default_config, format_medians, format_table, run_ttft_repeated,
};
use rocmforge_actors::ReadMode;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut cfg_mode = ReadMode::Read;
    let mut budgets = vec![1.0, 0.5, 0.25];
    let mut prompt = 64usize;
    let mut decode = 16usize;
    let mut cold = true;
    let mut repeat = 1usize;
    let mut readers = None;
    let mut depth = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--mode" => cfg_mode = val()?.parse()?,
            "--budgets" => {
                budgets = val()?
                    .split(',')
                    .map(|s| s.trim().parse::<f64>())
                    .collect::<Result<_, _>>()?
            }
            "--prompt" => prompt = val()?.parse()?,
            "--decode" => decode = val()?.parse()?,
            "--warm" => cold = false,
            "--repeat" => repeat = val()?.parse()?,
            "--readers" => readers = Some(val()?.parse()?),
            "--depth" => depth = Some(val()?.parse()?),
            _ => model = PathBuf::from(a),
        }
    }
    let mut cfg = default_config(&model, prompt, decode);
    cfg.read_mode = cfg_mode;
    cfg.budgets = budgets;
    cfg.cold = cold;
    cfg.readers = readers.unwrap_or(cfg.readers);
    cfg.prefetch_depth = depth.unwrap_or(cfg.prefetch_depth);
    println!(
        "model {}, mode {cfg_mode:?}, prompt {prompt} tokens, decode {decode}, cold {cold}, readers {}, depth {}",
        model.display(),
        cfg.readers,
        cfg.prefetch_depth
    );
    let rounds = run_ttft_repeated(&cfg, repeat);
    for (i, rows) in rounds.iter().enumerate() {
        println!("round {}:\n{}", i + 1, format_table(rows));
    }
    // Medians over the rounds: the machine is shared, single runs are noisy.
    print!("{}", format_medians(&rounds));
    Ok(())
}
