//! The GPU compute's prefix cache: copies of the keys and values of prompts that ran, which a
//! new sequence whose prompt starts alike copies into its own cache instead of computing them
//! again (a shared system prompt, a chat's history).
//!
//! The GPU keeps one contiguous KV cache per sequence (not the CPU's paged pool, whose prefix
//! cache shares blocks by reference), so an entry is a snapshot: the prompt's positions copied
//! into a cache of their own when the prompt has run (`publish`), and copied again into each
//! new sequence that starts with them (`lookup`). A device copy of a 1,000-token prefix of an
//! 8B model (131 MB) takes a fraction of a millisecond; computing it takes ~0.1 s.
//!
//! [`PrefixStore`] is the bookkeeping, generic over the snapshot type: which entry serves a
//! prompt (the longest common prefix), least recently used eviction within a byte budget.

/// Fewer shared positions than this are computed rather than copied (a chat template's
/// opening is shared by every prompt and is not worth a copy).
pub const MIN_PREFIX: usize = 16;

struct Entry<K> {
    tokens: Vec<u32>,
    snapshot: K,
    bytes: u64,
    last_used: u64,
}

/// Snapshots of prompts' KV (type `K`) by their tokens, within `budget` bytes.
pub struct PrefixStore<K> {
    entries: Vec<Entry<K>>,
    budget: u64,
    clock: u64,
}

fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<K> PrefixStore<K> {
    pub fn new(budget: u64) -> Self {
        Self {
            entries: Vec::new(),
            budget,
            clock: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes the snapshots take.
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.bytes).sum()
    }

    /// The snapshot sharing the longest prefix with `prompt` and how many positions to take
    /// from it: at most `prompt.len() - 1` (the last prompt token is always computed, for its
    /// logits), at least [`MIN_PREFIX`]; `None` when no entry shares that much. The entry
    /// counts as used.
    pub fn lookup(&mut self, prompt: &[u32]) -> Option<(&K, usize)> {
        let limit = prompt.len().saturating_sub(1);
        let (i, n) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common(&e.tokens, prompt).min(limit)))
            .max_by_key(|&(i, n)| (n, self.entries[i].last_used))?;
        if n < MIN_PREFIX {
            return None;
        }
        self.clock += 1;
        let e = &mut self.entries[i];
        e.last_used = self.clock;
        Some((&e.snapshot, n))
    }

    /// Whether a snapshot of `tokens` is worth taking: long enough, within the budget, and not
    /// already held (an entry that starts with all of `tokens`).
    pub fn wants(&self, tokens: &[u32], bytes: u64) -> bool {
        tokens.len() >= MIN_PREFIX
            && bytes <= self.budget
            && !self
                .entries
                .iter()
                .any(|e| common(&e.tokens, tokens) == tokens.len())
    }

    /// Keeps `snapshot` of `tokens` (`bytes` of device memory), first dropping entries that
    /// `tokens` extends (they serve nothing it does not) and then the least recently used
    /// ones until it fits the budget; returns the dropped snapshots (the caller frees them).
    pub fn insert(&mut self, tokens: Vec<u32>, snapshot: K, bytes: u64) -> Vec<K> {
        let mut dropped = Vec::new();
        let mut i = 0;
        while i < self.entries.len() {
            let e = &self.entries[i];
            if common(&e.tokens, &tokens) == e.tokens.len() {
                dropped.push(self.entries.swap_remove(i).snapshot);
            } else {
                i += 1;
            }
        }
        while !self.entries.is_empty() && self.bytes() + bytes > self.budget {
            dropped.extend(self.evict_oldest());
        }
        self.clock += 1;
        self.entries.push(Entry {
            tokens,
            snapshot,
            bytes,
            last_used: self.clock,
        });
        dropped
    }

    /// Drops the least recently used entry (device memory is short elsewhere).
    pub fn evict_oldest(&mut self) -> Option<K> {
        let i = self
            .entries
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| e.last_used)?
            .0;
        Some(self.entries.swap_remove(i).snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(prefix: u32, n: usize, tail: &[u32]) -> Vec<u32> {
        (0..n as u32)
            .map(|i| prefix * 1000 + i)
            .chain(tail.iter().copied())
            .collect()
    }

    #[test]
    fn the_longest_common_prefix_serves_and_the_last_token_is_left_to_compute() {
        let mut s = PrefixStore::new(1 << 20);
        assert!(s.lookup(&toks(1, 40, &[])).is_none(), "empty store");
        s.insert(toks(1, 40, &[7, 8]), "a", 100);
        s.insert(toks(1, 20, &[9]), "b", 100);
        // Shares 40 with "a", 20 with "b".
        assert_eq!(
            s.lookup(&toks(1, 40, &[5])).map(|(k, n)| (*k, n)),
            Some(("a", 40))
        );
        // The whole prompt cached: its last token is still computed.
        let whole = toks(1, 40, &[7, 8]);
        assert_eq!(s.lookup(&whole).map(|(k, n)| (*k, n)), Some(("a", 41)));
        // Too short a match is computed.
        assert!(s.lookup(&toks(1, MIN_PREFIX - 1, &[3, 3])).is_none());
        assert!(s.lookup(&toks(2, 40, &[])).is_none(), "nothing in common");
    }

    #[test]
    fn held_prefixes_are_not_taken_twice_and_longer_ones_replace_them() {
        let mut s = PrefixStore::new(1 << 20);
        assert!(!s.wants(&toks(1, MIN_PREFIX - 1, &[]), 1), "too short");
        assert!(!s.wants(&toks(1, 40, &[]), 2 << 20), "over the budget");
        assert!(s.insert(toks(1, 30, &[]), 1, 10).is_empty());
        assert!(!s.wants(&toks(1, 30, &[]), 10), "held");
        assert!(!s.wants(&toks(1, 20, &[]), 10), "inside a held one");
        assert!(s.wants(&toks(1, 30, &[4]), 10), "longer");
        // The longer entry makes the shorter one useless.
        assert_eq!(s.insert(toks(1, 30, &[4]), 2, 10), vec![1]);
        assert_eq!(s.len(), 1);
        assert!(
            s.wants(&toks(1, 30, &[5]), 10),
            "a sibling is another entry"
        );
        assert!(s.insert(toks(1, 30, &[5]), 3, 10).is_empty());
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used() {
        let mut s = PrefixStore::new(250);
        s.insert(toks(1, 20, &[]), 1, 100);
        s.insert(toks(2, 20, &[]), 2, 100);
        // Entry 1 used again: 2 is now the oldest.
        assert!(s.lookup(&toks(1, 20, &[0])).is_some());
        assert_eq!(s.insert(toks(3, 20, &[]), 3, 100), vec![2]);
        assert_eq!(s.bytes(), 200);
        assert_eq!(s.evict_oldest(), Some(1));
        assert_eq!(s.evict_oldest(), Some(3));
        assert_eq!(s.evict_oldest(), None);
        assert!(s.is_empty());
    }
}
