//! Keeping the compute pool's other threads on the CPU through a step.
//!
//! A CPU step is some 150 short parallel loops (each product, the attention, the activation
//! quantization) with a little serial work between them. Left to Rayon, a worker that finds
//! no work spins through about 32 `sched_yield`s and then sleeps on a futex, so on the 2-core
//! VM nearly every loop began by waking it (measured with 8 served clients: ~300 futex calls
//! and ~6,600 `sched_yield`s per step, the worker idle a fifth of the time; a wake-up costs
//! tens of microseconds in a VM, and the loop's first pieces run on the actor's thread alone
//! meanwhile). For the length of a step each other thread of the pool instead polls for work
//! with `rayon::yield_now` and `spin_loop` hints (no system calls); it goes back to Rayon's
//! own idling when the step ends, or after [`MAX_IDLE`] without work (a step that waits for a
//! streamed layer does not hold a core for the whole wait; [`Warm::arm`] before each unit
//! brings it back).

use rayon::Yield;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a polling thread goes on without finding work before it returns to Rayon.
const MAX_IDLE: Duration = Duration::from_millis(2);

thread_local! {
    /// Set on a thread while it polls: a second poll job reaching it (from a later `arm`)
    /// returns at once instead of nesting.
    static POLLING: Cell<bool> = const { Cell::new(false) };
}

#[derive(Default)]
struct State {
    /// A step is running: pollers keep polling.
    active: AtomicBool,
    /// Threads polling now.
    polling: AtomicUsize,
    /// Polls begun so far (the tests' witness that a thread polled at all: one that finds no
    /// work for `MAX_IDLE` is gone again before a busy test thread may look).
    started: AtomicUsize,
}

/// The Inference actor's handle on its pool's threads (one per actor).
#[derive(Default)]
pub(super) struct Warm {
    state: Arc<State>,
}

/// A step in progress: while it lives, the pool's other threads poll for work.
pub(super) struct WarmStep {
    state: Arc<State>,
}

impl Warm {
    /// Marks a step as running and starts the pool's other threads polling (see the module
    /// docs). Called from inside the pool (the Inference actor runs as one of its threads);
    /// elsewhere, or in a one-thread pool, it does nothing.
    pub(super) fn step(&self) -> WarmStep {
        self.state.active.store(true, Ordering::Release);
        self.arm();
        WarmStep {
            state: Arc::clone(&self.state),
        }
    }

    /// Starts polling on the threads that are not (a poller returns after [`MAX_IDLE`]
    /// without work): a broadcast only when some thread is missing.
    pub(super) fn arm(&self) {
        let Some(me) = rayon::current_thread_index() else {
            return;
        };
        let others = rayon::current_num_threads().saturating_sub(1);
        if others == 0 || self.state.polling.load(Ordering::Acquire) >= others {
            return;
        }
        let state = Arc::clone(&self.state);
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() != me {
                poll(&state);
            }
        });
    }
}

impl Drop for WarmStep {
    fn drop(&mut self) {
        self.state.active.store(false, Ordering::Release);
    }
}

/// One thread's polling: runs whatever work the pool has while a step is active.
fn poll(state: &State) {
    if POLLING.with(|p| p.replace(true)) {
        return;
    }
    state.polling.fetch_add(1, Ordering::AcqRel);
    state.started.fetch_add(1, Ordering::AcqRel);
    let mut idle_since = Instant::now();
    while state.active.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(Yield::Executed) => idle_since = Instant::now(),
            Some(Yield::Idle) => {
                if idle_since.elapsed() > MAX_IDLE {
                    break;
                }
                for _ in 0..16 {
                    std::hint::spin_loop();
                }
            }
            None => break,
        }
    }
    state.polling.fetch_sub(1, Ordering::AcqRel);
    POLLING.with(|p| p.set(false));
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Inside a 2-thread pool: a step's loops give the same results, the other thread polls
    /// while the step lives and stops once it ends (no thread is left spinning).
    #[test]
    fn pollers_run_the_steps_work_and_stop_with_it() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let warm = Warm::default();
            {
                let _step = warm.step();
                let t0 = Instant::now();
                while warm.state.started.load(Ordering::Acquire) == 0 {
                    assert!(t0.elapsed() < Duration::from_secs(10), "no thread polled");
                    std::thread::yield_now();
                }
                for n in [1usize, 100, 10_000] {
                    let s: u64 = (0..n as u64).into_par_iter().map(|i| i * i).sum();
                    assert_eq!(s, (0..n as u64).map(|i| i * i).sum::<u64>());
                }
                // Never more pollers than other threads, however often it is armed (a poller
                // idle for MAX_IDLE on a busy machine may have left: then one comes back).
                for _ in 0..3 {
                    warm.arm();
                    assert!(warm.state.polling.load(Ordering::Acquire) <= 1);
                }
            }
            let t0 = Instant::now();
            while warm.state.polling.load(Ordering::Acquire) != 0 {
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "a poller kept going"
                );
                std::thread::yield_now();
            }
        });
    }

    /// Outside a pool the handle does nothing.
    #[test]
    fn outside_a_pool_nothing_polls() {
        let warm = Warm::default();
        let _step = warm.step();
        assert_eq!(warm.state.polling.load(Ordering::Acquire), 0);
    }
}
