//! Sampling state of one request: the seeded sampler over prompt and output history, and the
//! assembly of token bytes into text pieces that never split a UTF-8 character.

use crate::messages::SamplingParams;

/// Per-request sampling: the core crate's sampler, with the same semantics as every other entry
/// point: the penalties look at the last `penalty_last_n` tokens of prompt and output alike
/// (llama.cpp's), the seed is the request's or a random one (`seed()` tells which).
pub struct Sampler {
    inner: rocmforge::sample::Sampler,
    /// Prompt and generated tokens.
    history: Vec<u32>,
}

impl Sampler {
    pub fn new(params: &SamplingParams, prompt: &[u32]) -> Self {
        Self {
            inner: rocmforge::sample::Sampler::new(params.clone()),
            history: prompt.to_vec(),
        }
    }

    pub fn seed(&self) -> u64 {
        self.inner.seed()
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let t = self.inner.sample(logits, &self.history);
        self.history.push(t);
        t
    }

    /// Whether `sample` is the argmax of the logits whatever came before.
    pub fn is_greedy(&self) -> bool {
        self.inner.is_greedy()
    }

    /// Records `t`, chosen without `sample` (the compute's argmax for a greedy sampler).
    pub fn accept(&mut self, t: u32) {
        self.history.push(t);
    }
}

/// Turns token bytes into text pieces without splitting a UTF-8 character across two events
/// (byte-level BPE emits multi-byte characters over several tokens).
#[derive(Default)]
pub(crate) struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let s = s.to_string();
                self.pending.clear();
                s
            }
            // An incomplete character at the end: keep it for the next token.
            Err(e) if e.error_len().is_none() => {
                let n = e.valid_up_to();
                let s = String::from_utf8_lossy(&self.pending[..n]).into_owned();
                self.pending.drain(..n);
                s
            }
            // Invalid bytes: emit them replaced rather than stalling the stream.
            Err(_) => {
                let s = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                s
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_pieces_are_never_split() {
        let mut a = Utf8Assembler::default();
        let e = "é".as_bytes();
        assert_eq!(a.push(b"a"), "a");
        assert_eq!(a.push(&e[..1]), "");
        assert_eq!(a.push(&e[1..]), "é");
        assert_eq!(a.push(&[0xff]), "\u{fffd}");
    }

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        assert_eq!(
            Sampler::new(&SamplingParams::greedy(), &[]).sample(&logits),
            1
        );
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
            seed: Some(7),
            ..SamplingParams::default()
        };
        let a: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(&p, &[]);
                move |_| s.sample(&logits)
            })
            .collect();
        let b: Vec<u32> = (0..20)
            .map({
                let mut s = Sampler::new(&p, &[]);
                move |_| s.sample(&logits)
            })
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 1 || t == 3));
    }
}
