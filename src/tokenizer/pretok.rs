//! Pre-tokenizers of byte-level BPE vocabularies, selected by `tokenizer.ggml.pre`.
//!
//! A pre-tokenizer is a list of regexes applied in turn, as llama.cpp does: each regex splits
//! every piece left by the previous one, and the text between matches stays a piece of its own.
//! A regex only ever sees one piece, so a lookahead cannot look past the end of its piece. That
//! is what makes `smollm` (split every digit first, then the GPT-2 regex) keep a whole run of
//! whitespace before a digit together (`"  42"` gives `"  "`, `"4"`, `"2"`).

use super::error::TokenizerError;
use super::gpt2split::{self, Letters};
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

fn compile(kind: PreKind) -> Result<Vec<Regex>, TokenizerError> {
    kind.patterns()
        .iter()
        .map(|p| Regex::new(p).map_err(|e| TokenizerError::Regex(format!("{p}: {e}"))))
        .collect()
}

/// The compiled regexes of one variant.
#[derive(Debug, Clone)]
pub struct PreTokenizer {
    kind: PreKind,
    regexes: Vec<Regex>,
    /// Set where a hand-written matcher does the work (all but `default`).
    fast: Option<Letters>,
}

impl PreTokenizer {
    pub fn new(kind: PreKind) -> Result<Self, TokenizerError> {
        let fast = match kind {
            PreKind::Default => None,
            _ => Some(Letters::new()?),
        };
        // Compiling the Unicode-heavy regexes costs milliseconds; skip it where the
        // hand-written matcher does the work (`split_regex` then compiles on demand).
        let regexes = if fast.is_some() {
            Vec::new()
        } else {
            compile(kind)?
        };
        Ok(Self {
            kind,
            regexes,
            fast,
        })
    }

    pub fn kind(&self) -> PreKind {
        self.kind
    }

    /// Byte ranges of `text`'s pieces, in order, covering all of `text`.
    pub fn split(&self, text: &str) -> Result<Vec<Range<usize>>, TokenizerError> {
        let Some(letters) = &self.fast else {
            return self.split_regex(text);
        };
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        if self.kind == PreKind::DigitsGpt2 {
            // `\p{N}` first: every number char is a piece; GPT-2 runs on the text between them.
            let mut seg_start = 0;
            for (i, c) in text.char_indices() {
                if c.is_numeric() {
                    if i > seg_start {
                        gpt2split::split(letters, text, seg_start..i, &mut out);
                    }
                    out.push(i..i + c.len_utf8());
                    seg_start = i + c.len_utf8();
                }
            }
            if seg_start < text.len() {
                gpt2split::split(letters, text, seg_start..text.len(), &mut out);
            }
        } else if self.kind == PreKind::Llama3 {
            gpt2split::split_llama3(letters, text, 3, &mut out);
        } else if self.kind == PreKind::Qwen2 {
            gpt2split::split_llama3(letters, text, 1, &mut out);
        } else {
            gpt2split::split(letters, text, 0..text.len(), &mut out);
        }
        Ok(out)
    }

    /// `split` through the regex engine only: the reference for the hand-written GPT-2 matcher
    /// (for the variants that have one, the regexes are compiled on each call).
    pub fn split_regex(&self, text: &str) -> Result<Vec<Range<usize>>, TokenizerError> {
        let compiled;
        let regexes = if self.regexes.is_empty() {
            compiled = compile(self.kind)?;
            &compiled
        } else {
            &self.regexes
        };
        let mut pieces: Vec<Range<usize>> = std::iter::once(0..text.len()).collect();
        for re in regexes {
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
        p.split(text)
            .unwrap()
            .into_iter()
            .map(|r| text[r].to_string())
            .collect()
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
        assert_eq!(
            pieces(PreKind::Gpt2, "Hello  world's!"),
            ["Hello", " ", " world", "'s", "!"]
        );
    }

    #[test]
    fn llama3_groups_three_digits() {
        assert_eq!(
            pieces(PreKind::Llama3, "12345 I'M"),
            ["123", "45", " I", "'M"]
        );
        assert_eq!(pieces(PreKind::Qwen2, "123"), ["1", "2", "3"]);
    }

    /// Chars that exercise every branch: letters (incl. non-ASCII), a combining vowel sign that is
    /// alphabetic but not `\p{L}`, numbers (incl. `Nl`, Arabic-Indic), apostrophes and the
    /// contraction letters, punctuation, emoji, and several kinds of whitespace.
    const ALPHABET: &[char] = &[
        ' ', ' ', ' ', '\n', '\t', '\r', '\u{a0}', '\u{3000}', 'a', 'Z', 'é', 'क', '\u{93e}', '1',
        '٣', 'Ⅻ', '\'', 's', 't', 'r', 'e', 'v', 'l', 'd', 'm', 'S', '!', '.', '-', '🙂', '𝐀',
        '\u{200b}', 'L', 'D', 'T', 'E',
    ];

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        #[test]
        fn hand_written_matchers_match_the_regex(
            idx in proptest::collection::vec(0..ALPHABET.len(), 0..40)
        ) {
            // (hand-written matcher, regex-only reference) per variant, built once.
            static PRE: std::sync::OnceLock<Vec<(PreTokenizer, PreTokenizer)>> =
                std::sync::OnceLock::new();
            let pres = PRE.get_or_init(|| {
                [PreKind::Gpt2, PreKind::DigitsGpt2, PreKind::Llama3, PreKind::Qwen2]
                    .map(|kind| {
                        let reference =
                            PreTokenizer { kind, regexes: compile(kind).unwrap(), fast: None };
                        (PreTokenizer::new(kind).unwrap(), reference)
                    })
                    .to_vec()
            });
            let text: String = idx.iter().map(|&i| ALPHABET[i]).collect();
            for (fast, reference) in pres {
                assert!(fast.fast.is_some());
                proptest::prop_assert_eq!(
                    fast.split(&text).unwrap(),
                    reference.split(&text).unwrap(),
                    "{:?} {:?}", fast.kind(), text
                );
            }
        }
    }

    #[test]
    fn unknown_name_is_an_error() {
        assert!(matches!(
            PreKind::from_name(Some("nope")),
            Err(TokenizerError::UnknownPreTokenizer(n)) if n == "nope"
        ));
    }
}
