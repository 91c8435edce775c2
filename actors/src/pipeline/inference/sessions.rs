//! A request's KV slot, and chat sessions: sequences kept between a session's turns (least
//! recently used evicted first), each turn resuming the prefix it shares with the last, and a
//! session's turns run one after another.

use super::Inference;
use crate::compute::SequenceState;
use crate::error::{Result, RuntimeError};
use crate::messages::SessionId;
use crate::pipeline::shared::Shared;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A KV slot in use; frees its count on drop (the sequence state drops with it).
pub(super) struct KvSlot {
    pub(super) state: SequenceState,
    pub(super) shared: Arc<Shared>,
}

/// A session's sequence kept between requests, with the tokens whose keys and values it holds.
pub(super) struct KeptSequence {
    slot: KvSlot,
    tokens: Vec<u32>,
    /// Request counter at its last use (least recently used is evicted first).
    last_used: u64,
}

impl Drop for KvSlot {
    fn drop(&mut self) {
        self.shared
            .counters
            .kv_slots_in_use
            .fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inference {
    /// The sequence a request runs on and how many of its prompt tokens are already cached:
    /// a session's kept sequence cut back to the prefix it shares with the prompt (at least
    /// one prompt token is always fed, for the logits), else a new one.
    /// A new sequence starts from the prefix cache when `prefix` says so (not for embeddings,
    /// which need every position's hidden state).
    pub(super) fn sequence_for(
        &mut self,
        session: Option<SessionId>,
        prompt: &[u32],
        prefix: bool,
    ) -> Result<(KvSlot, usize)> {
        if let Some(mut kept) = session.and_then(|id| self.sessions.remove(&id)) {
            let keep = kept
                .tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count()
                .min(prompt.len() - 1);
            if self.compute.resume(&mut kept.slot.state, keep)? {
                return Ok((kept.slot, keep));
            }
        }
        // No room for a new sequence's KV (a GPU's device memory): kept sessions give theirs
        // back, least recently used first.
        let state = loop {
            match self.compute.new_sequence() {
                Err(RuntimeError::KvFull { .. }) if !self.sessions.is_empty() => {
                    self.evict_oldest_session();
                }
                r => break r?,
            }
        };
        // Counted once the slot exists (its drop takes the count back).
        self.cfg
            .shared
            .counters
            .kv_slots_in_use
            .fetch_add(1, Ordering::AcqRel);
        let mut slot = KvSlot {
            state,
            shared: self.cfg.shared.clone(),
        };
        let cached = if prefix {
            self.compute.adopt_prefix(&mut slot.state, prompt)
        } else {
            0
        };
        if cached > 0 {
            self.cfg
                .shared
                .counters
                .prefix_hit_tokens
                .fetch_add(cached as u64, Ordering::Relaxed);
        }
        Ok((slot, cached))
    }

    /// Keeps a finished request's sequence for its session's next turn, evicting the least
    /// recently used session beyond `max_sessions` (its next turn starts from scratch).
    pub(super) fn keep(&mut self, id: SessionId, slot: KvSlot, tokens: Vec<u32>) {
        if self.cfg.max_sessions == 0 {
            return;
        }
        self.sessions.insert(
            id,
            KeptSequence {
                slot,
                tokens,
                last_used: self.requests,
            },
        );
        while self.sessions.len() > self.cfg.max_sessions {
            self.evict_oldest_session();
        }
    }

    pub(super) fn evict_oldest_session(&mut self) {
        let oldest = self
            .sessions
            .iter()
            .min_by_key(|(_, k)| k.last_used)
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.sessions.remove(&id);
        }
    }
    /// Whether a turn of `session` is in the running set.
    pub(super) fn session_running(&self, session: Option<SessionId>) -> bool {
        session.is_some()
            && self
                .running
                .iter()
                .any(|r| r.job.request.session == session)
    }
}
