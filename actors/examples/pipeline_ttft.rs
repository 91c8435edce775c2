//! Time-to-first-token of the pipelined runtime, split by stage, at several budgets; pipelined vs
//! load-then-compute. The same measurement `rocmforge bench --memory-budget` reports.
//!
//! cargo run --release -p rocmforge-actors --example pipeline_ttft -- \
//!     [MODEL] [--mode read|mmap|direct] [--budgets 1,0.5,0.35,0.25] [--prompt 64] [--decode 16] [--warm] [--repeat 3]

use rocmforge_actors::bench::{default_config, format_table, run_ttft_bench};
use rocmforge_actors::ReadMode;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model = PathBuf::from("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let mut cfg_mode = ReadMode::Read;
    let mut budgets = vec![1.0, 0.5, 0.35, 0.25];
    let mut prompt = 64usize;
    let mut decode = 16usize;
    let mut cold = true;
    let mut repeat = 1usize;
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
            _ => model = PathBuf::from(a),
        }
    }
    let mut cfg = default_config(&model, prompt, decode);
    cfg.read_mode = cfg_mode;
    cfg.budgets = budgets;
    cfg.cold = cold;
    println!(
        "model {}, mode {cfg_mode:?}, prompt {prompt} tokens, decode {decode}, cold {cold}",
        model.display()
    );
    let mut all = Vec::new();
    for i in 0..repeat.max(1) {
        let rows = run_ttft_bench(&cfg);
        println!("run {}:\n{}", i + 1, format_table(&rows));
        all.push(rows);
    }
    let tokens: Vec<&Vec<u32>> = all
        .iter()
        .flatten()
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .map(|r| &r.tokens)
        .collect();
    println!(
        "identical tokens across all rows: {}",
        tokens.windows(2).all(|w| w[0] == w[1])
    );
    // Medians over the repetitions: the machine is shared, single runs are noisy.
    println!("| budget | strategy | median TTFT ms | median decode tok/s | runs |\n| --- | --- | --- | --- | --- |");
    for k in 0..all[0].len() {
        let (b, st, _) = &all[0][k];
        let mut ttft: Vec<f64> = all
            .iter()
            .filter_map(|r| r[k].2.as_ref().ok())
            .map(|r| r.ttft_ms)
            .collect();
        let mut dec: Vec<f64> = all
            .iter()
            .filter_map(|r| r[k].2.as_ref().ok())
            .map(|r| r.decode_tokens_per_s)
            .collect();
        if ttft.is_empty() {
            continue;
        }
        ttft.sort_by(f64::total_cmp);
        dec.sort_by(f64::total_cmp);
        println!(
            "| {:.0}% | {st:?} | {:.1} | {:.1} | {} |",
            b * 100.0,
            ttft[ttft.len() / 2],
            dec[dec.len() / 2],
            ttft.len()
        );
    }
    Ok(())
}
