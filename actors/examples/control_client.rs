//! A tiny control-socket client: sends one request to `rocmforge serve --control-socket PATH`
//! and prints the answer (frame format in docs/SERVING.md).
//!
//! cargo run -p rocmforge-actors --example control_client -- PATH stats|progress|warmup|health|reload
//! cargo run -p rocmforge-actors --example control_client -- PATH prefetch|pin|release 3,4

use rocmforge_actors::serve::control::{ControlClient, ControlRequest};
use rocmforge_actors::Hint;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage =
        "usage: control_client SOCKET stats|progress|warmup|health|reload|prefetch L,..|pin L,..|release L,..";
    let path = args.next().ok_or(usage)?;
    let cmd = args.next().ok_or(usage)?;
    let mut layers = || -> Result<Vec<usize>, Box<dyn std::error::Error>> {
        Ok(args
            .next()
            .ok_or(usage)?
            .split(',')
            .map(|s| s.trim().parse::<usize>())
            .collect::<Result<_, _>>()?)
    };
    let req = match cmd.as_str() {
        "stats" => ControlRequest::Stats,
        "progress" => ControlRequest::LoadProgress,
        "warmup" => ControlRequest::Hint(Hint::WarmUp),
        "health" => ControlRequest::Health,
        "reload" => ControlRequest::Reload,
        "prefetch" => ControlRequest::Hint(Hint::Prefetch { layers: layers()? }),
        "pin" => ControlRequest::Hint(Hint::Pin { layers: layers()? }),
        "release" => ControlRequest::Hint(Hint::Release { layers: layers()? }),
        _ => return Err(usage.into()),
    };
    let mut client = ControlClient::connect(&path)?;
    println!("{:#?}", client.request(&req)?);
    Ok(())
}
