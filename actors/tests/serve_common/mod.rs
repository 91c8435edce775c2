//! Helpers shared by the serving tests: the model path and an in-process server on port 0.
#![allow(dead_code)]

use rocmforge_actors::serve::{ServeConfig, Server};
use std::path::PathBuf;
use std::time::Duration;

/// SmolLM2: `ROCMFORGE_TEST_MODEL` if set (the device check joins it there), else `models/`.
pub fn smollm2() -> PathBuf {
    let p = std::env::var_os("ROCMFORGE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

pub const MODEL: &str = "smollm2";

/// A loopback config on a free port, served as `smollm2`.
pub fn config() -> ServeConfig {
    let mut c = ServeConfig::new(smollm2());
    c.port = 0;
    c.model_name = Some(MODEL.into());
    c
}

pub async fn start(cfg: ServeConfig) -> Server {
    let s = Server::start(cfg).await.expect("server starts");
    s.wait_ready(Duration::from_secs(120))
        .await
        .expect("server becomes ready");
    s
}
