//! Device kernel sources embedded from `kernels/` at build time (see build.rs).

include!(concat!(env!("OUT_DIR"), "/kernel_registry.rs"));

/// Source text of an embedded kernel file (`"common.cuh"`).
pub fn source(name: &str) -> Option<&'static str> {
    KERNEL_SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
}
