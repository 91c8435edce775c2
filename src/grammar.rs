//! Constrained decoding: the output must be a JSON document (any object, or one valid under a
//! JSON schema), or follow a grammar (GBNF or llguidance's Lark syntax; tool calls compile to
//! one). `llguidance` compiles the schema into a grammar and, at every step, gives the set
//! of tokens that keep the output a prefix of some valid document; the others' logits become
//! negative infinity before sampling. Once the document is complete only the end-of-generation
//! tokens remain.
//!
//! Chosen over `outlines-core` because it computes the mask lazily over the vocabulary's token
//! trie (no automaton over the whole vocabulary built ahead of time per schema), has a JSON-schema
//! compiler of its own, and built here from crates.io in a few minutes with no warnings.

use crate::tokenizer::{TokenType, Tokenizer};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum GrammarError {
    #[error("the tokenizer has no end-of-sequence token: constrained decoding needs one")]
    NoEos,
    #[error("building the token trie: {0}")]
    Vocabulary(String),
    #[error("invalid constraint: {0}")]
    Compile(String),
    #[error("constrained decoding failed: {0}")]
    Step(String),
}

/// What the output must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Constraint {
    /// Any JSON object (OpenAI's `json_object` mode).
    JsonObject,
    /// A JSON document valid under this JSON schema.
    JsonSchema(serde_json::Value),
    /// A grammar: GBNF (llama.cpp's format, converted by [`crate::gbnf`]), or llguidance's
    /// Lark-like syntax when the text starts with `%llguidance` (as llama.cpp's server built
    /// with llguidance reads it). Tool calls compile to this too (`crate::tool_calls`).
    Grammar(String),
}

/// Compiles constraints for one vocabulary (built once per model: the token trie).
pub struct GrammarCompiler {
    factory: ParserFactory,
    /// The end-of-generation tokens, each allowed wherever the grammar allows its EOS.
    eog: Vec<u32>,
    eos: u32,
}

impl GrammarCompiler {
    pub fn new(tok: &Tokenizer) -> Result<Self, GrammarError> {
        let eos = tok
            .eos_id()
            .or_else(|| tok.eog_ids().first().copied())
            .ok_or(GrammarError::NoEos)?;
        let n = tok.vocab_size();
        // Control tokens are marked special (0xFF first) so that no text the grammar wants can
        // be spelled with them.
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let bytes = tok.token_bytes(id).unwrap_or_default();
                match tok.token_type(id) {
                    Some(TokenType::Control) | Some(TokenType::Unused) => {
                        let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                        w.extend_from_slice(bytes);
                        w
                    }
                    _ => bytes.to_vec(),
                }
            })
            .collect();
        let info = TokRxInfo::new(n as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory =
            ParserFactory::new_simple(&env).map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        // Bound the work of one mask (a hostile schema must not stall the inference thread).
        factory.limits_mut().step_max_items = 50_000;
        Ok(Self {
            factory,
            eog: tok.eog_ids().to_vec(),
            eos,
        })
    }

    /// A fresh mask for one generation under `c`.
    pub fn compile(&self, c: &Constraint) -> Result<TokenMask, GrammarError> {
        let mut schema = match c {
            Constraint::JsonObject => serde_json::json!({"type": "object"}),
            Constraint::JsonSchema(s) => s.clone(),
            Constraint::Grammar(g) => return self.parser(TopLevelGrammar::from_lark(lark(g)?)),
        };
        // One space after `,` and `:` and no other whitespace: a small model let free to add
        // whitespace can spend its whole budget on newlines. A schema's own `x-guidance` wins.
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance").or_insert_with(|| {
                serde_json::json!({"whitespace_flexible": false, "item_separator": ", ",
                                   "key_separator": ": "})
            });
        }
        self.parser(TopLevelGrammar::from_json_schema(schema))
    }

    fn parser(&self, grammar: TopLevelGrammar) -> Result<TokenMask, GrammarError> {
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Compile(e.to_string()))?;
        Ok(TokenMask {
            matcher: Matcher::new(Ok(parser)),
            eog: self.eog.clone(),
            eos: self.eos,
        })
    }
}

/// A grammar's text in llguidance's Lark syntax: as it is when it starts with `%llguidance`,
/// else converted from GBNF.
pub fn lark(text: &str) -> Result<String, GrammarError> {
    if text.trim_start().starts_with("%llguidance") {
        Ok(text.to_string())
    } else {
        crate::gbnf::to_lark(text).map_err(|e| GrammarError::Compile(format!("GBNF: {e}")))
    }
}

/// The state of one constrained generation.
pub struct TokenMask {
    matcher: Matcher,
    eog: Vec<u32>,
    eos: u32,
}

impl TokenMask {
    /// Sets the logits of every token that cannot come next to negative infinity. Where the
    /// grammar allows the end, every end-of-generation token is allowed.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        // Once the document cannot grow (the parser stopped), the mask is EOS alone.
        let mask = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Step(e.to_string()))?;
        // The end (not the EOS token that a grammar may name as `<[id]>`) allows every
        // end-of-generation token.
        let end = self.is_complete();
        for (id, l) in logits.iter_mut().enumerate() {
            let id = id as u32;
            if !(mask.is_allowed(id) || end && self.eog.contains(&id)) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Advances past the token that was sampled (an end-of-generation token ends the document).
    pub fn accept(&mut self, token: u32) -> Result<(), GrammarError> {
        // An end-of-generation token is the grammar's end, unless the grammar names that very
        // token (`<[id]>`).
        let t = if self.eog.contains(&token) {
            // A document that cannot grow has stopped the parser: the end is all that is left.
            if self.matcher.is_stopped() {
                return Ok(());
            }
            let named =
                token != self.eos && self.matcher.validate_tokens(&[token]).is_ok_and(|n| n == 1);
            if named {
                token
            } else {
                self.eos
            }
        } else {
            token
        };
        self.matcher
            .consume_token(t)
            .map_err(|e| GrammarError::Step(e.to_string()))
    }

    /// Whether the output so far is a whole valid document.
    pub fn is_complete(&mut self) -> bool {
        self.matcher.is_stopped() || self.matcher.is_accepting().unwrap_or(false)
    }
}
