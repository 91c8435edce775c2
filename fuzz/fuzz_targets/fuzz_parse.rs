//! Feeds arbitrary bytes to the GGUF parser. Any panic, abort, overflow (debug assertions are on
//! under `cargo fuzz`), out-of-memory or timeout is a bug: hostile files must yield `Err`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rocmforge::gguf::{group_by_layer, parse};

fuzz_target!(|data: &[u8]| {
    if let Ok(layout) = parse(data) {
        // A file that parses must have every tensor inside the buffer and be groupable.
        for t in &layout.tensors {
            let start = (layout.data_offset + t.offset) as usize;
            let end = start + t.n_bytes as usize;
            assert!(end <= data.len(), "tensor {} past the end", t.name);
            let _ = &data[start..end];
        }
        let groups = group_by_layer(&layout.tensors);
        let n: usize = groups.iter().map(|g| g.tensors.len()).sum();
        assert_eq!(n, layout.tensors.len());
    }
});
