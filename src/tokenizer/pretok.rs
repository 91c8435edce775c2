//! Pre-tokenizers of byte-level BPE vocabularies, selected by `tokenizer.ggml.pre`.
//!
//! A pre-tokenizer is a list of regexes applied in turn, as llama.cpp does: each regex splits
//! every piece left by the previous one, and the text between matches stays a piece of its own.
//! A regex only ever sees one piece, so a lookahead cannot look past the end of its piece. That
//! is what makes `smollm` (split every digit first, then the GPT-2 regex) keep a whole run of
//! whitespace before a digit together (`"  42"` gives `"  "`, `"4"`, `"2"`).

use super::error::TokenizerError;
use fancy_regex::Regex;
use std::ops::Range;

/// The GPT-2 regex. The trailing `|\s+` is what the text between matches would become anyway.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// Llama 3 (`llama-bpe`): up to three digits per piece, case-insensitive contractions.
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Qwen2: as Llama 3 but one digit per piece.
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Names accepted for `tokenizer.ggml.pre`, for the error message.
pub const SUPPORTED_NAMES: &str = "default, gpt2 (gpt-2), smollm (starcoder, refact, command-r, \
     codeshell, exaone, minerva-7b), llama-bpe (llama3, llama-v3), qwen2 (deepseek-r1-qwen, stablelm2)";

/// A pre-tokenizer variant, named after llama.cpp's `LLAMA_VOCAB_PRE_TYPE_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreKind {
    Default,
    Gpt2,
    /// Every `\p{N}` split off first, then GPT-2 (llama.cpp's `smollm`, `starcoder`, ...).
    DigitsGpt2,
    Llama3,
    Qwen2,
}

impl PreKind {
    /// The variant for a `tokenizer.ggml.pre` value; `None` (key absent) is `default`, as in llama.cpp.
    pub fn from_name(name: Option<&str>) -> Result<Self, TokenizerError> {
        Ok(match name {
            None | Some("default") => Self::Default,
            Some("gpt2" | "gpt-2") => Self::Gpt2,
            Some(
                "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
                | "minerva-7b",
            ) => Self::DigitsGpt2,
            Some("llama-bpe" | "llama3" | "llama-v3") => Self::Llama3,
            Some("qwen2" | "deepseek-r1-qwen" | "stablelm2") => Self::Qwen2,
            Some(other) => return Err(TokenizerError::UnknownPreTokenizer(other.to_string())),
        })
    }

    fn patterns(self) -> &'static [&'static str] {
        match self {
            // llama.cpp's fallback list for BPE vocabularies without a specific pre-tokenizer.
            Self::Default => &[
                r"[\p{P}\$\+<=>\^~\|]+",
                r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            Self::Gpt2 => &[GPT2],
            Self::DigitsGpt2 => &[r"\p{N}", GPT2],
            Self::Llama3 => &[LLAMA3],
            Self::Qwen2 => &[QWEN2],
        }
    }

    /// Llama 3 looks a whole piece up in the vocabulary before merging (`ignore_merges`).
    pub fn ignore_merges(self) -> bool {
        matches!(self, Self::Llama3)
    }
}

/// The compiled regexes of one variant.
#[derive(Debug, Clone)]
pub struct PreTokenizer {
    kind: PreKind,
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    pub fn new(kind: PreKind) -> Result<Self, TokenizerError> {
        let regexes = kind
            .patterns()
            .iter()
            .map(|p| Regex::new(p).map_err(|e| TokenizerError::Regex(format!("{p}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { kind, regexes })
    }

    pub fn kind(&self) -> PreKind {
        self.kind
    }

    /// Byte ranges of `text`'s pieces, in order, covering all of `text`.
    pub fn split(&self, text: &str) -> Result<Vec<Range<usize>>, TokenizerError> {
        let mut pieces = vec![0..text.len()];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in pieces {
                let s = &text[piece.clone()];
                let mut last = 0;
                for m in re.find_iter(s) {
                    let m = m.map_err(|e| TokenizerError::Regex(e.to_string()))?;
                    if m.start() == m.end() {
                        continue; // none of the patterns can match empty; be safe anyway
                    }
                    if m.start() > last {
                        next.push(piece.start + last..piece.start + m.start());
                    }
                    next.push(piece.start + m.start()..piece.start + m.end());
                    last = m.end();
                }
                if last < s.len() {
                    next.push(piece.start + last..piece.end);
                }
            }
            pieces = next;
        }
        Ok(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(kind: PreKind, text: &str) -> Vec<String> {
        let p = PreTokenizer::new(kind).unwrap();
        p.split(text).unwrap().into_iter().map(|r| text[r].to_string()).collect()
    }

    #[test]
    fn smollm_keeps_whitespace_runs_before_digits() {
        assert_eq!(pieces(PreKind::DigitsGpt2, "  42"), ["  ", "4", "2"]);
        assert_eq!(pieces(PreKind::DigitsGpt2, "\n\n1."), ["\n\n", "1", "."]);
        // Plain GPT-2 gives the last space to the number.
        assert_eq!(pieces(PreKind::Gpt2, "  42"), [" ", " 42"]);
    }

    #[test]
    fn gpt2_words_and_spaces() {
        assert_eq!(pieces(PreKind::Gpt2, "Hello  world's!"), ["Hello", " ", " world", "'s", "!"]);
    }

    #[test]
    fn llama3_groups_three_digits() {
        assert_eq!(pieces(PreKind::Llama3, "12345 I'M"), ["123", "45", " I", "'M"]);
        assert_eq!(pieces(PreKind::Qwen2, "123"), ["1", "2", "3"]);
    }

    #[test]
    fn unknown_name_is_an_error() {
        assert!(matches!(
            PreKind::from_name(Some("nope")),
            Err(TokenizerError::UnknownPreTokenizer(n)) if n == "nope"
        ));
    }
}
