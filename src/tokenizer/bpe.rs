//! Byte-level BPE (`tokenizer.ggml.model = gpt2`): the GPT-2 byte<->char map and rank-ordered merging.
//!
//! Merging follows llama.cpp's `llm_tokenizer_bpe_session`: every byte of a piece starts as one
//! symbol; the adjacent pair with the lowest merge rank (ties: the leftmost) is merged, repeatedly,
//! through a priority queue of candidate pairs, so a long word costs O(n log n), not O(n^2).
//! Symbols are interned strings: ids below the vocabulary size are token ids; strings that only a
//! merge produces (no token of their own, rare) get ids past the vocabulary.

use super::error::TokenizerError;
use super::fxhash::{FxBuild, StrMap, TokenMap};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// GPT-2's reversible map from bytes to printable chars: printable Latin-1 bytes map to
/// themselves, the other 68 bytes to U+0100.. in byte order (so a space is `Ġ`, a newline `Ċ`).
pub fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let cp = if printable {
            b as u32
        } else {
            let c = next;
            next += 1;
            c
        };
        // All code points used are below U+0144, valid scalar values.
        table[b as usize] = char::from_u32(cp).unwrap_or('\0');
    }
    table
}

/// The inverse of [`byte_to_char_table`], indexed by code point (all mapped chars are below U+0144).
pub fn char_to_byte_table() -> [Option<u8>; 0x144] {
    let mut t = [None; 0x144];
    for (b, &c) in byte_to_char_table().iter().enumerate() {
        if let Some(slot) = t.get_mut(c as usize) {
            *slot = Some(b as u8);
        }
    }
    t
}

/// Merge ranks over interned symbols.
#[derive(Debug, Clone)]
pub struct Bpe {
    n_vocab: u32,
    /// Text of interned symbols that are not tokens (index = id - n_vocab), byte-encoded.
    extra_texts: Vec<String>,
    /// (left, right) -> (rank, merged symbol).
    merges: HashMap<(u32, u32), (u32, u32), FxBuild>,
    /// Symbol of each byte's mapped char, `None` when neither a token nor part of a merge.
    byte_symbol: [Option<u32>; 256],
    byte_chars: [char; 256],
}

const NONE: u32 = u32::MAX;

impl Bpe {
    /// `token_to_id` maps byte-encoded token text to ids (the last id wins for duplicate texts).
    pub fn new(
        n_vocab: usize,
        token_to_id: &TokenMap,
        merges: &[String],
    ) -> Result<Self, TokenizerError> {
        let n_vocab = u32::try_from(n_vocab).map_err(|_| TokenizerError::EmptyVocab)?;
        let mut extra = StrMap::default();
        let mut extra_texts = Vec::new();
        let mut intern = |s: &str, extra_texts: &mut Vec<String>| -> u32 {
            if let Some(&id) = token_to_id.get(s) {
                return id;
            }
            if let Some(&id) = extra.get(s) {
                return id;
            }
            let id = n_vocab + extra_texts.len() as u32;
            extra.insert(s.to_string(), id);
            extra_texts.push(s.to_string());
            id
        };
        let mut merge_map = HashMap::with_capacity_and_hasher(merges.len(), FxBuild::default());
        let mut joined = String::new();
        for (rank, m) in merges.iter().enumerate() {
            // A merge is "left right", split at the first space after the first byte (as
            // llama.cpp does, so a left symbol may itself be a space).
            let split = m.as_bytes().iter().skip(1).position(|&b| b == b' ');
            let (l, r) = split
                .map(|p| (&m[..p + 1], &m[p + 2..]))
                .filter(|(l, r)| !l.is_empty() && !r.is_empty())
                .ok_or_else(|| TokenizerError::BadMerge {
                    index: rank,
                    merge: m.clone(),
                })?;
            let li = intern(l, &mut extra_texts);
            let ri = intern(r, &mut extra_texts);
            joined.clear();
            joined.push_str(l);
            joined.push_str(r);
            let mi = intern(&joined, &mut extra_texts);
            // The first occurrence of a pair has the best rank; keep it.
            merge_map.entry((li, ri)).or_insert((rank as u32, mi));
        }
        let byte_chars = byte_to_char_table();
        let mut byte_symbol = [None; 256];
        for (b, c) in byte_chars.iter().enumerate() {
            let mut buf = [0u8; 4];
            let s: &str = c.encode_utf8(&mut buf);
            byte_symbol[b] = token_to_id
                .get(s)
                .copied()
                .or_else(|| extra.get(s).copied());
        }
        Ok(Self {
            n_vocab,
            extra_texts,
            merges: merge_map,
            byte_symbol,
            byte_chars,
        })
    }

    /// The byte-encoded form of raw bytes (`" a"` becomes `"Ġa"`).
    pub fn byte_encode(&self, bytes: &[u8]) -> String {
        bytes.iter().map(|&b| self.byte_chars[b as usize]).collect()
    }

    /// Appends the tokens of one pre-tokenized piece.
    pub fn encode_piece(&self, piece: &[u8], token_to_id: &TokenMap, out: &mut Vec<u32>) {
        #[derive(Clone, Copy)]
        struct Sym {
            id: u32,
            /// Byte range of the piece this symbol covers.
            start: u32,
            end: u32,
            prev: u32,
            next: u32,
        }
        let n = piece.len();
        let mut syms: Vec<Sym> = (0..n)
            .map(|i| Sym {
                id: self.byte_symbol[piece[i] as usize].unwrap_or(NONE),
                start: i as u32,
                end: i as u32 + 1,
                prev: if i == 0 { NONE } else { i as u32 - 1 },
                next: if i + 1 == n { NONE } else { i as u32 + 1 },
            })
            .collect();
        // Candidate merges: (rank, left position, left id, right id), smallest first.
        let mut heap: BinaryHeap<Reverse<(u32, u32, u32, u32)>> = BinaryHeap::new();
        let candidate = |syms: &[Sym], l: u32, heap: &mut BinaryHeap<_>| {
            if l == NONE {
                return;
            }
            let left = syms[l as usize];
            if left.next == NONE {
                return;
            }
            let right = syms[left.next as usize];
            if let Some(&(rank, _)) = self.merges.get(&(left.id, right.id)) {
                heap.push(Reverse((rank, l, left.id, right.id)));
            }
        };
        for i in 0..n.saturating_sub(1) {
            candidate(&syms, i as u32, &mut heap);
        }
        while let Some(Reverse((_, l, lid, rid))) = heap.pop() {
            let left = syms[l as usize];
            // Stale entry: the left symbol merged away (start moved) or changed, or its neighbour did.
            if left.start != l || left.id != lid || left.next == NONE {
                continue;
            }
            let r = left.next;
            let right = syms[r as usize];
            if right.id != rid {
                continue;
            }
            let Some(&(_, merged)) = self.merges.get(&(lid, rid)) else {
                continue;
            };
            syms[l as usize].id = merged;
            syms[l as usize].end = right.end;
            syms[l as usize].next = right.next;
            // Mark the right symbol dead: its start no longer equals its position.
            syms[r as usize].start = NONE;
            if right.next != NONE {
                syms[right.next as usize].prev = l;
            }
            candidate(&syms, left.prev, &mut heap);
            candidate(&syms, l, &mut heap);
        }
        let mut i = if n == 0 { NONE } else { 0 };
        while i != NONE {
            let s = syms[i as usize];
            if s.id < self.n_vocab {
                out.push(s.id);
            } else {
                // No token for this symbol (llama.cpp does the same): emit the tokens of its
                // single UTF-8 bytes where they exist, drop the rest.
                let text = if s.id == NONE {
                    self.byte_encode(&piece[s.start as usize..s.end as usize])
                } else {
                    self.extra_texts[(s.id - self.n_vocab) as usize].clone()
                };
                for b in text.bytes() {
                    let mut buf = [0u8; 4];
                    let one = char::from(b);
                    if b.is_ascii() {
                        if let Some(&id) = token_to_id.get(one.encode_utf8(&mut buf) as &str) {
                            out.push(id);
                        }
                    }
                }
            }
            i = s.next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection() {
        let t = byte_to_char_table();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
        assert_eq!(char_to_byte_table().iter().flatten().count(), 256);
    }

    #[test]
    fn merges_by_rank_not_by_position() {
        // Vocabulary a, b, c, ab, bc, abc; "b c" ranks before "a b", so "abc" -> a + bc -> abc only
        // if "a bc" exists; it does not, so the result is [a, bc].
        let toks = ["a", "b", "c", "ab", "bc", "abc"];
        let t2i = TokenMap::new(toks);
        let merges = vec!["b c".to_string(), "a b".to_string(), "ab c".to_string()];
        let bpe = Bpe::new(toks.len(), &t2i, &merges).unwrap();
        let mut out = Vec::new();
        bpe.encode_piece(b"abc", &t2i, &mut out);
        assert_eq!(out, [0, 4]);
        out.clear();
        bpe.encode_piece(b"ababc", &t2i, &mut out);
        assert_eq!(out, [3, 0, 4]);
    }

    #[test]
    fn long_runs_merge_leftmost_first() {
        let toks = ["a", "aa", "aaaa"];
        let t2i = TokenMap::new(toks);
        let merges = vec!["a a".to_string(), "aa aa".to_string()];
        let bpe = Bpe::new(toks.len(), &t2i, &merges).unwrap();
        let mut out = Vec::new();
        bpe.encode_piece(&[b'a'; 11], &t2i, &mut out);
        assert_eq!(out, [2, 2, 1, 0]);
    }
}
