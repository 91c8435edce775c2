//! Feeds arbitrary bytes to the GGUF parser (`rocmforge::fuzzing::gguf_parse`). Any panic, abort,
//! overflow (debug assertions are on under `cargo fuzz`), out-of-memory or timeout is a bug:
//! hostile files must yield `Err`. `tests/fuzz_replay.rs` replays the same function on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rocmforge::fuzzing::gguf_parse(data));
