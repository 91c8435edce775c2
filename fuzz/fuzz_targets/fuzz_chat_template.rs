//! `rocmforge::fuzzing::chat_template` under libFuzzer (docs/FUZZING.md). The same entry function is
//! replayed over the committed seeds by `tests/fuzz_replay.rs` on stable.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| rocmforge::fuzzing::chat_template(data));
