//! SentencePiece BPE (`tokenizer.ggml.model = llama`), the Llama 2 / Mistral scheme.
//!
//! As llama.cpp's `llm_tokenizer_spm_session`: spaces are escaped to `▁`, every UTF-8 char starts
//! as one symbol, and the adjacent pair whose concatenation is a token with the highest score
//! (ties: the leftmost) is merged until none is left. A symbol that is not a token can only be a
//! single char (a merge always produces a token), and it falls back to `<0xXX>` byte tokens.

use super::error::TokenizerError;
use super::fxhash::TokenMap;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// The SentencePiece space marker, U+2581.
pub const SPACE: char = '\u{2581}';

/// Replaces every space by `▁`.
pub fn escape_whitespace(text: &str) -> String {
    text.replace(' ', "\u{2581}")
}

/// A candidate merge; ordered so that `BinaryHeap` pops the highest score, then the leftmost.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    /// Byte length; 0 once merged into its left neighbour.
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// Vocabulary views the SentencePiece merge needs.
pub struct SpmVocab<'a> {
    pub token_to_id: &'a TokenMap,
    pub scores: &'a [f32],
    /// `<0xXX>` byte tokens, indexed by byte.
    pub byte_tokens: &'a [Option<u32>; 256],
    pub unk: Option<u32>,
}

/// Appends the tokens of `text` (already escaped with `▁`).
pub fn encode(v: &SpmVocab<'_>, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    for (i, (start, c)) in text.char_indices().enumerate() {
        syms.push(Sym {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: None,
        });
        if i > 0 {
            syms[i - 1].next = Some(i);
        }
    }
    let mut heap = BinaryHeap::new();
    let try_add = |syms: &[Sym], left: Option<usize>, heap: &mut BinaryHeap<Bigram>| {
        let Some(l) = left else { return };
        let Some(r) = syms[l].next else { return };
        let (a, b) = (syms[l], syms[r]);
        let s = &text[a.start..b.start + b.len];
        if let Some(&id) = v.token_to_id.get(s) {
            let score = v.scores.get(id as usize).copied().unwrap_or(0.0);
            heap.push(Bigram {
                score,
                left: l,
                right: r,
                len: s.len(),
            });
        }
    };
    for i in 1..syms.len() {
        try_add(&syms, Some(i - 1), &mut heap);
    }
    while let Some(bg) = heap.pop() {
        let (a, b) = (syms[bg.left], syms[bg.right]);
        // Stale: one side was merged into something else since this candidate was made.
        if a.len == 0 || b.len == 0 || a.len + b.len != bg.len {
            continue;
        }
        syms[bg.left].len += b.len;
        syms[bg.right].len = 0;
        syms[bg.left].next = b.next;
        if let Some(n) = b.next {
            syms[n].prev = Some(bg.left);
        }
        try_add(&syms, a.prev, &mut heap);
        try_add(&syms, Some(bg.left), &mut heap);
    }
    let mut cur = if syms.is_empty() { None } else { Some(0) };
    while let Some(i) = cur {
        let s = syms[i];
        let piece = &text[s.start..s.start + s.len];
        if let Some(&id) = v.token_to_id.get(piece) {
            out.push(id);
        } else {
            for &b in piece.as_bytes() {
                out.push(byte_token(v, b)?);
            }
        }
        cur = s.next;
    }
    Ok(())
}

/// `<0xXX>`, else a one-char token for an ASCII byte, else the unknown token (llama.cpp's order).
fn byte_token(v: &SpmVocab<'_>, b: u8) -> Result<u32, TokenizerError> {
    if let Some(id) = v.byte_tokens[b as usize] {
        return Ok(id);
    }
    if b.is_ascii() {
        let mut buf = [0u8; 4];
        if let Some(&id) = v
            .token_to_id
            .get(char::from(b).encode_utf8(&mut buf) as &str)
        {
            return Ok(id);
        }
    }
    v.unk.ok_or(TokenizerError::NoByteToken { byte: b })
}

/// The byte a `<0xXX>` token stands for.
pub fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}
