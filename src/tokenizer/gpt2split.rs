//! Hand-written matchers for the GPT-2 and Llama 3 / Qwen2 pre-tokenizer regexes, the hot path
//! of `gpt2`, `smollm`, `llama-bpe` and `qwen2` vocabularies (llama.cpp has the same
//! `unicode_regex_split_custom_*`). Unlike a backtracking regex they are linear and have no step
//! limit on long whitespace runs. The regex engine, kept in `pretok`, is their reference: a
//! property test checks that both give the same pieces.
//!
//! GPT-2:   `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
//!           ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+` (Qwen2: `\p{N}` alone)

use super::error::TokenizerError;
use std::ops::Range;

/// `\p{L}` membership. `char::is_alphabetic` is not `\p{L}` (it includes combining marks such as
/// Devanagari vowel signs), so the ranges come from the Unicode tables of `regex-syntax`, the
/// same tables the regex engine uses: a bitset for the Basic Multilingual Plane, a binary search
/// above it.
#[derive(Debug, Clone)]
pub struct Letters {
    bmp: Vec<u64>,
    /// Inclusive ranges above U+FFFF, sorted.
    astral: Vec<(u32, u32)>,
}

impl Letters {
    pub fn new() -> Result<Self, TokenizerError> {
        let hir =
            regex_syntax::parse(r"\p{L}").map_err(|e| TokenizerError::Regex(e.to_string()))?;
        let regex_syntax::hir::HirKind::Class(regex_syntax::hir::Class::Unicode(class)) =
            hir.kind()
        else {
            return Err(TokenizerError::Regex(
                r"\p{L} is not a Unicode class".into(),
            ));
        };
        let mut bmp = vec![0u64; 0x10000 / 64];
        let mut astral = Vec::new();
        for r in class.ranges() {
            let (lo, hi) = (r.start() as u32, r.end() as u32);
            for cp in lo..=hi.min(0xFFFF) {
                bmp[cp as usize / 64] |= 1 << (cp % 64);
            }
            if hi > 0xFFFF {
                astral.push((lo.max(0x10000), hi));
            }
        }
        Ok(Self { bmp, astral })
    }

    pub fn is_letter(&self, c: char) -> bool {
        let cp = c as u32;
        if cp < 0x10000 {
            return self.bmp[cp as usize / 64] & (1 << (cp % 64)) != 0;
        }
        // The last range starting at or below `cp` is the only one that can hold it.
        let i = self.astral.partition_point(|&(lo, _)| lo <= cp);
        i > 0 && cp <= self.astral[i - 1].1
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

/// GPT-2: appends the pieces of `text[seg]` to `out`, as byte ranges of `text`.
pub fn split(letters: &Letters, text: &str, seg: Range<usize>, out: &mut Vec<Range<usize>>) {
    let s = &text[seg.clone()];
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let n = chars.len();
    let class = |i: usize| -> Option<Class> {
        chars.get(i).map(|&(_, c)| {
            if c.is_whitespace() {
                Class::Space
            } else if c.is_numeric() {
                Class::Number
            } else if letters.is_letter(c) {
                Class::Letter
            } else {
                Class::Other
            }
        })
    };
    let ch = |i: usize| chars.get(i).map(|&(_, c)| c);
    let byte = |i: usize| seg.start + chars.get(i).map_or(s.len(), |&(b, _)| b);
    let mut pos = 0;
    while pos < n {
        let start = pos;
        let c = chars[pos].1;
        // 's 't 're 've 'm 'll 'd (case-sensitive, as GPT-2's regex)
        if c == '\'' {
            match (ch(pos + 1), ch(pos + 2)) {
                (Some('s' | 't' | 'm' | 'd'), _) => pos += 2,
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => {
                    pos += 3
                }
                _ => {}
            }
            if pos != start {
                out.push(byte(start)..byte(pos));
                continue;
            }
        }
        // ` ?X+` for letters, numbers and other symbols: an optional leading space.
        let lead = usize::from(c == ' ');
        if let Some(k @ (Class::Letter | Class::Number | Class::Other)) = class(pos + lead) {
            pos += lead;
            while class(pos) == Some(k) {
                pos += 1;
            }
            out.push(byte(start)..byte(pos));
            continue;
        }
        // `\s+(?!\S)|\s+`: a run followed by a non-space leaves its last char to the next piece.
        let mut end = pos;
        while class(end) == Some(Class::Space) {
            end += 1;
        }
        if end - pos > 1 && end < n {
            end -= 1;
        }
        // `class(pos)` is Space here (every other class matched above), so the run is non-empty.
        pos = end.max(pos + 1);
        out.push(byte(start)..byte(pos));
    }
}

/// Llama 3 (`max_digits` = 3) or Qwen2 (`max_digits` = 1): appends the pieces of `text`.
pub fn split_llama3(letters: &Letters, text: &str, max_digits: usize, out: &mut Vec<Range<usize>>) {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let class = |i: usize| -> Option<Class> {
        chars.get(i).map(|&(_, c)| {
            if c.is_whitespace() {
                Class::Space
            } else if c.is_numeric() {
                Class::Number
            } else if letters.is_letter(c) {
                Class::Letter
            } else {
                Class::Other
            }
        })
    };
    let lower = |i: usize| chars.get(i).map(|&(_, c)| c.to_ascii_lowercase());
    let is_nl = |i: usize| matches!(chars.get(i), Some((_, '\r' | '\n')));
    let byte = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
    let mut pos = 0;
    while pos < n {
        let start = pos;
        let c = chars[pos].1;
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        if c == '\'' {
            match (lower(pos + 1), lower(pos + 2)) {
                (Some('s' | 't' | 'm' | 'd'), _) => pos += 2,
                (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => {
                    pos += 3
                }
                _ => {}
            }
            if pos != start {
                out.push(byte(start)..byte(pos));
                continue;
            }
        }
        let k = class(pos);
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !is_nl(pos)
            && k != Some(Class::Number)
            && (k == Some(Class::Letter) || class(pos + 1) == Some(Class::Letter))
        {
            pos += 1;
            while class(pos) == Some(Class::Letter) {
                pos += 1;
            }
            out.push(byte(start)..byte(pos));
            continue;
        }
        // \p{N}{1,max_digits}
        if k == Some(Class::Number) {
            while pos < start + max_digits && class(pos) == Some(Class::Number) {
                pos += 1;
            }
            out.push(byte(start)..byte(pos));
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let lead = usize::from(c == ' ');
        if class(pos + lead) == Some(Class::Other) {
            pos += lead;
            while class(pos) == Some(Class::Other) {
                pos += 1;
            }
            while is_nl(pos) {
                pos += 1;
            }
            out.push(byte(start)..byte(pos));
            continue;
        }
        // `\s*[\r\n]+`: up to the last newline of the whitespace run; else `\s+(?!\S)|\s+`.
        let mut end = pos;
        let mut last_nl = None;
        while class(end) == Some(Class::Space) {
            if is_nl(end) {
                last_nl = Some(end + 1);
            }
            end += 1;
        }
        pos = match last_nl {
            Some(e) => e,
            None if end - pos > 1 && end < n => end - 1,
            None => end.max(pos + 1),
        };
        out.push(byte(start)..byte(pos));
    }
}
