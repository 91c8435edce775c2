//! Completions' `echo`: the prompt in front of the generated text, and with `logprobs` the
//! prompt tokens' log-probabilities in OpenAI's shape (the first token of the sequence has none:
//! `null`).
//!
//! **How the prompt's log-probabilities are computed.** The runtime computes logits for the last
//! position of a prompt only. Rather than a second path through the model, each prompt token is
//! scored by the generation path itself: token `k` is the one-token generation from the prompt's
//! first `k` tokens under a grammar that allows exactly that token (`<[id]>`), so the sampler
//! must pick it and its event carries its log-probability and the top alternatives (of the
//! unmasked distribution, as every log-probability here). The requests share a runtime session,
//! so each feeds one new token: a prompt of `P` tokens costs `P - 1` decode steps instead of one
//! prefill, which is slower but exact and needs nothing new from the runtime.

use super::error::ApiError;
use super::AppState;
use crate::messages::{Constraint, GenerateRequest, Prompt, SamplingParams, TokenLogprobs};
use futures::StreamExt;

/// The echoed prompt: its text and, when asked for, its tokens' log-probabilities.
#[derive(Debug, Clone)]
pub struct Echo {
    pub text: String,
    /// One entry per echoed token; `None` for the sequence's first token.
    pub logprobs: Option<Vec<(u32, Option<TokenLogprobs>)>>,
}

/// The echo of `tokens`; `added_bos`: the tokenizer put a BOS in front, which is scored as
/// context but not echoed (it is not in the client's text).
pub async fn prompt(
    s: &AppState,
    tokens: &[u32],
    added_bos: bool,
    logprobs: Option<usize>,
) -> Result<Echo, ApiError> {
    let skip = usize::from(added_bos && tokens.len() > 1);
    let shown = &tokens[skip..];
    let text = s
        .tokenizer
        .decode(shown)
        .map_err(|e| ApiError::invalid("prompt", format!("cannot decode the prompt: {e}")))?;
    let Some(top) = logprobs else {
        return Ok(Echo {
            text,
            logprobs: None,
        });
    };
    let session = s.runtime.new_session();
    let mut out = Vec::with_capacity(shown.len());
    for k in skip..tokens.len() {
        if k == 0 {
            out.push((tokens[0], None));
            continue;
        }
        let request = GenerateRequest {
            prompt: Prompt::Tokens(tokens[..k].to_vec()),
            max_tokens: 1,
            sampling: SamplingParams::greedy(),
            stop_at_eos: false,
            session: Some(session),
            end_session: k + 1 == tokens.len(),
            logprobs: Some(top),
            constraint: Some(Constraint::Grammar(format!(
                "%llguidance {{}}\nstart: <[{}]>",
                tokens[k]
            ))),
        };
        let mut stream = s.runtime.generate(request);
        let ev = match stream.next().await {
            Some(Ok(ev)) => ev,
            Some(Err(e)) => return Err(e.into()),
            None => return Err(crate::error::RuntimeError::ShutDown.into()),
        };
        // To its end, so the session is kept before the next token's request.
        while let Some(item) = stream.next().await {
            item?;
        }
        if ev.token != tokens[k] {
            return Err(ApiError::internal(format!(
                "scoring prompt token {k}: the runtime gave {} instead of {}",
                ev.token, tokens[k]
            )));
        }
        out.push((tokens[k], ev.logprobs));
    }
    Ok(Echo {
        text,
        logprobs: Some(out),
    })
}
