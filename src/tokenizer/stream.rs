//! Streaming decode: a token may end in the middle of a UTF-8 char (byte-level BPE and byte
//! fallback split multi-byte chars across tokens), so bytes are held back until they complete.

use super::error::TokenizerError;
use super::Tokenizer;

/// Incremental decoder: push ids, get back the text that is complete UTF-8 so far.
///
/// Pieces are emitted as they are, with no leading-space removal: a streamed continuation's
/// first `▁word` must print its space (llama.cpp streams generated tokens the same way).
/// Control tokens (end of turn, end of text) show no text unless `with_special(true)`.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    pending: Vec<u8>,
    special: bool,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(t: &'a Tokenizer) -> StreamDecoder<'a> {
        StreamDecoder {
            tokenizer: t,
            pending: Vec::new(),
            special: false,
        }
    }

    /// Whether control tokens show their text (`<|im_end|>`); off by default.
    pub fn with_special(mut self, special: bool) -> Self {
        self.special = special;
        self
    }

    /// Adds one token; returns the text completed by it (possibly empty).
    /// Bytes that can never become valid UTF-8 are emitted as U+FFFD at once.
    pub fn push(&mut self, id: u32) -> Result<String, TokenizerError> {
        let bytes = self.tokenizer.piece_bytes(id, self.special).ok_or(
            TokenizerError::TokenOutOfRange {
                id,
                vocab_size: self.tokenizer.vocab_size(),
            },
        )?;
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // `valid_up_to` marks a prefix that is valid UTF-8, so this never falls back.
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete char at the end: wait for the next token.
                        None => {
                            rest = after;
                            break;
                        }
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        Ok(out)
    }

    /// Whatever is still held back (an incomplete char at the end), lossily.
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}
