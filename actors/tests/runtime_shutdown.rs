//! Shutdown with requests in flight: they get errors, every thread is joined, nothing leaks.
//! Alone in its file because it counts the process's threads.

mod runtime_common;

use rocmforge_actors::compute::ChecksumCompute;
use rocmforge_actors::{MemoryBudget, ReadMode, RuntimeError};
use runtime_common::*;
use std::time::Duration;

#[test]
fn shutdown_with_requests_in_flight_errors_them_and_joins_everything() {
    let dir = tempfile::tempdir().unwrap();
    let model = synthetic_model(dir.path(), 6, 64);
    let threads_before = thread_count();
    let rt = builder(&model, ReadMode::Read, MemoryBudget::FractionOfWeights(0.5))
        .readers(3)
        .transcode_threads(2)
        .compute(ChecksumCompute::factory(VOCAB, Duration::from_millis(3)))
        .build()
        .unwrap();
    assert!(thread_count() > threads_before);
    let mut running = rt.generate(request(100_000)).into_blocking();
    let queued = rt.generate(request(10)).into_blocking();
    running.next().unwrap().unwrap();
    assert!(rt.stats().allocated_bytes > 0);

    let other = rt.clone();
    other.shutdown().unwrap();

    // The running request ends with ShutDown (after the tokens already buffered).
    let last = running.by_ref().last().expect("an item after shutdown");
    assert!(matches!(last, Err(RuntimeError::ShutDown)), "{last:?}");
    let q: Vec<_> = queued.collect();
    assert!(
        matches!(q.last(), Some(Err(RuntimeError::ShutDown))),
        "{q:?}"
    );

    // Every actor thread joined, and the Rayon pools' threads have returned (their pools are
    // scoped). A returned thread can still be listed in /proc for a moment while the kernel
    // tears it down (a scope waits for the closure, not for the OS thread's exit; CI saw 3
    // against 2 once), so this waits for the count to settle; a leaked thread never does.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while thread_count() != threads_before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        thread_count(),
        threads_before,
        "threads: {:?}",
        thread_names()
    );
    let s = rt.stats();
    assert_eq!(s.allocated_bytes, 0, "weights leaked: {s:?}");
    assert_eq!(s.kv_slots_in_use, 0);
    assert_eq!(rt.staging_slots_in_use(), 0);
    // After shutdown: errors, not hangs.
    let after: Vec<_> = rt.generate(request(1)).into_blocking().collect();
    assert!(
        matches!(after.as_slice(), [Err(RuntimeError::ShutDown)]),
        "{after:?}"
    );
    assert!(matches!(
        rt.hint(rocmforge_actors::Hint::WarmUp),
        Err(RuntimeError::ShutDown)
    ));
    assert!(rt.shutdown().is_ok());
}
