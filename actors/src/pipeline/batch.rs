//! Continuous batching: the limits of a step and which tokens of which sequences it carries.
//!
//! Every step of the Inference actor runs one batch: first one token for every running
//! sequence that is decoding, then chunks of the prompts still being read (chunked prefill),
//! oldest first, until the step's token budget is spent. Decode goes first, so a long prompt
//! delays the others' next token by at most one chunk, never by its whole length.

use serde::{Deserialize, Serialize};

/// Sequences running at once when none is configured. On a CPU a step's cost is mostly
/// reading the weights, which a larger batch shares; past a few dozen rows the products
/// become compute-bound and each sequence's tokens slow down.
pub const DEFAULT_MAX_NUM_SEQS: usize = 16;

/// Tokens per step when none is configured: a prompt chunk large enough to keep the
/// matrix kernels efficient, small enough that the decoding sequences beside it wait at most
/// one chunk.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 512;

/// Limits of continuous batching (runtime builder, `serve` options).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchOptions {
    /// Sequences running at once (a step carries at most one token of each decoding one).
    pub max_num_seqs: usize,
    /// Tokens one step carries, decode tokens and prompt chunks together.
    pub max_batch_tokens: usize,
    /// Bytes of KV cache shared by all sequences; `None`: room for `max_num_seqs` whole
    /// contexts, capped at half the memory available.
    pub kv_budget: Option<u64>,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            max_num_seqs: DEFAULT_MAX_NUM_SEQS,
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            kv_budget: None,
        }
    }
}

impl BatchOptions {
    /// The options as a compute that carries at most `capacity` sequences per step can run
    /// them: at least one sequence; a budget of at least one token per sequence. A compute of
    /// one sequence at a time reads each prompt in one step (no chunks), as it always did.
    pub fn effective(self, capacity: usize) -> Self {
        let max_num_seqs = self.max_num_seqs.clamp(1, capacity.max(1));
        let max_batch_tokens = if capacity <= 1 {
            usize::MAX
        } else {
            self.max_batch_tokens.max(max_num_seqs)
        };
        Self {
            max_num_seqs,
            max_batch_tokens,
            kv_budget: self.kv_budget,
        }
    }
}

/// What the planner knows of a running sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// Tokens waiting to be fed (a prompt's unread part, or the one sampled token).
    pub pending: usize,
    /// Whether its prompt is fully read (it is decoding).
    pub decoding: bool,
    /// Whether it can take part in this step (not waiting for its consumer, not finished).
    pub ready: bool,
}

/// Tokens each sequence feeds this step (0: not in this step), in the order of `wants`:
/// decode tokens first, then prompt chunks in order, within `budget` tokens in all.
pub fn plan_step(wants: &[Want], budget: usize) -> Vec<usize> {
    let mut take = vec![0; wants.len()];
    let mut left = budget;
    for (t, w) in take.iter_mut().zip(wants) {
        if w.ready && w.decoding && w.pending > 0 && left > 0 {
            *t = 1.min(w.pending);
            left -= *t;
        }
    }
    for (t, w) in take.iter_mut().zip(wants) {
        if w.ready && !w.decoding && w.pending > 0 && left > 0 {
            *t = w.pending.min(left);
            left -= *t;
        }
    }
    take
}

/// Upper bounds of the batch-size histogram (sequences per step); the last bucket is `+Inf`.
pub const BATCH_BUCKETS: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];

/// The histogram bucket of a step carrying `n` sequences (`BATCH_BUCKETS.len()`: `+Inf`).
pub fn batch_bucket(n: usize) -> usize {
    BATCH_BUCKETS
        .iter()
        .position(|&b| n <= b)
        .unwrap_or(BATCH_BUCKETS.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn w(pending: usize, decoding: bool) -> Want {
        Want {
            pending,
            decoding,
            ready: true,
        }
    }

    #[test]
    fn decode_first_then_prompt_chunks_oldest_first() {
        let wants = [w(100, false), w(1, true), w(30, false), w(1, true)];
        assert_eq!(plan_step(&wants, 64), vec![62, 1, 0, 1]);
        assert_eq!(plan_step(&wants, 200), vec![100, 1, 30, 1]);
        let mut blocked = wants;
        blocked[1].ready = false;
        assert_eq!(plan_step(&blocked, 64), vec![63, 0, 0, 1]);
    }

    #[test]
    fn options_fit_the_compute() {
        let o = BatchOptions {
            max_num_seqs: 8,
            max_batch_tokens: 4,
            kv_budget: None,
        };
        assert_eq!(o.effective(usize::MAX).max_batch_tokens, 8);
        let one = o.effective(1);
        assert_eq!((one.max_num_seqs, one.max_batch_tokens), (1, usize::MAX));
        assert_eq!(batch_bucket(1), 0);
        assert_eq!(batch_bucket(3), 2);
        assert_eq!(batch_bucket(1000), BATCH_BUCKETS.len());
    }

    proptest! {
        #[test]
        fn a_plan_keeps_the_budget_and_serves_every_decoder_it_can(
            wants in proptest::collection::vec(
                (0usize..50, any::<bool>(), any::<bool>())
                    .prop_map(|(p, d, r)| Want { pending: if d { p.min(1) } else { p }, decoding: d, ready: r }),
                0..20,
            ),
            budget in 1usize..80,
        ) {
            let take = plan_step(&wants, budget);
            prop_assert!(take.iter().sum::<usize>() <= budget);
            let decoders = wants.iter().filter(|w| w.ready && w.decoding && w.pending > 0).count();
            for (t, w) in take.iter().zip(&wants) {
                prop_assert!(*t <= w.pending);
                if !w.ready { prop_assert_eq!(*t, 0); }
                if w.ready && w.decoding && w.pending > 0 && decoders <= budget {
                    prop_assert_eq!(*t, 1);
                }
            }
        }
    }
}
