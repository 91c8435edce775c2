//! A small multiplicative hasher (the "Fx" hash of rustc) for the vocabulary and merge tables.
//! Their keys come from the model file and are hashed tens of thousands of times at load and on
//! every merge step, where SipHash costs several times more. User text is never hashed with it
//! (the word cache keeps the standard, DoS-resistant hasher).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64)
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64)
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i)
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64)
    }
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub type FxBuild = BuildHasherDefault<FxHasher>;
/// Text -> id for texts added one by one (the BPE merges' symbols outside the vocabulary).
pub type StrMap = HashMap<String, u32, FxBuild>;

/// The Fx hash of a text, finished with splitmix64's mixer: the table takes its bucket from the
/// low bits, which a multiplicative hash of a short text leaves depending on its first bytes
/// only (without the mixer Gemma 3's vocabulary took ~0.7 s to build).
fn fx(s: &str) -> u64 {
    let mut h = FxHasher::default();
    h.write(s.as_bytes());
    let mut x = h.finish() ^ s.len() as u64;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A vocabulary's texts and their text -> id map, in one buffer: text i is
/// `buf[ends[i - 1]..ends[i]]`, and the table holds ids, hashed and compared through the texts.
/// (A `HashMap<String, u32>` beside a `Vec<String>` made two heap strings per token: Gemma 3's
/// 262,144 tokens cost ~50 ms of allocation and hashing per tokenizer at start-up.)
#[derive(Clone, Default)]
pub struct TokenMap {
    buf: String,
    ends: Vec<usize>,
    table: hashbrown::HashTable<u32>,
}

impl std::fmt::Debug for TokenMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenMap")
            .field("texts", &self.ends.len())
            .finish()
    }
}

impl TokenMap {
    /// The texts in id order; a text that occurs twice maps to its last id, as llama.cpp's
    /// `token_to_id[text] = id` does.
    pub fn new<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut m = Self::default();
        for t in texts {
            m.buf.push_str(t);
            m.ends.push(m.buf.len());
        }
        let Self { buf, ends, table } = &mut m;
        let text = |j: u32| &buf[if j == 0 { 0 } else { ends[j as usize - 1] }..ends[j as usize]];
        table.reserve(ends.len(), |_| 0);
        for id in 0..ends.len() as u32 {
            let t = text(id);
            match table.entry(fx(t), |&j| text(j) == t, |&j| fx(text(j))) {
                hashbrown::hash_table::Entry::Occupied(mut o) => *o.get_mut() = id,
                hashbrown::hash_table::Entry::Vacant(v) => {
                    v.insert(id);
                }
            }
        }
        m
    }

    /// The id of a text.
    pub fn get(&self, s: &str) -> Option<&u32> {
        self.table.find(fx(s), |&j| self.text(j) == Some(s))
    }

    /// Text `id`.
    pub fn text(&self, id: u32) -> Option<&str> {
        let i = id as usize;
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(&self.buf[start..end])
    }

    /// Texts held (ids 0..len).
    pub fn len(&self) -> usize {
        self.ends.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_map_finds_every_text_and_the_last_of_duplicates() {
        let texts = ["a", "", "ab", "a", "▁the", "<|im_end|>"];
        let m = TokenMap::new(texts);
        assert_eq!(m.len(), 6);
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(m.text(i as u32), Some(*t));
        }
        assert_eq!(m.get("a"), Some(&3));
        assert_eq!(m.get(""), Some(&1));
        assert_eq!(m.get("ab"), Some(&2));
        assert_eq!(m.get("▁the"), Some(&4));
        assert_eq!(m.get("<|im_end|>"), Some(&5));
        assert_eq!(m.get("b"), None);
        assert_eq!(m.text(6), None);
    }
}
