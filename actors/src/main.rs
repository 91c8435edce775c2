use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = rocmforge_actors::cli::Cli::parse();
    match rocmforge_actors::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
