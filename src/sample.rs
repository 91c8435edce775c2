//! Token sampling: penalties, top-k, top-p, min-p, temperature and a seeded RNG; stop strings.
//!
//! The chain runs in llama.cpp's default order: penalties on the raw logits, then top-k,
//! top-p and min-p on the softmax of the penalised logits, then temperature, then a draw.
//! Temperature 0 (or below) is greedy: the arg-max after penalties.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 or below: greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches p; 1 keeps all.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; 0 keeps all.
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recent tokens; 1 is off.
    pub repeat_penalty: f32,
    /// Subtracted once from the logit of every recent token; 0 is off.
    pub presence_penalty: f32,
    /// Subtracted per occurrence of a recent token; 0 is off.
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: usize,
    /// RNG seed; `None` draws a fresh one per sampler (see `Sampler::seed`), so two runs
    /// without a seed differ, and two with the same seed agree.
    pub seed: Option<u64>,
    /// Generation stops before any of these strings; they are not part of the output.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    /// llama.cpp's defaults.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: None,
            stop: Vec::new(),
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether any penalty changes the logits.
    fn has_penalties(&self) -> bool {
        self.repeat_penalty != 1.0 || self.presence_penalty != 0.0 || self.frequency_penalty != 0.0
    }
}

/// A sampler with its RNG and reusable buffers (no allocation per token once warm).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    /// The seed in use: the one asked for, or the one drawn when none was.
    seed: u64,
    rng: ChaCha20Rng,
    logits: Vec<f32>,
    candidates: Vec<(u32, f32)>,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(rand::random);
        Self {
            seed,
            rng: ChaCha20Rng::seed_from_u64(seed),
            params,
            logits: Vec::new(),
            candidates: Vec::new(),
            counts: HashMap::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seed in use (drawn at random when the parameters named none); reported so that a
    /// run can be reproduced.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Whether [`Sampler::sample`] is the logits' argmax whatever the history (temperature 0,
    /// no penalties).
    pub fn is_greedy(&self) -> bool {
        self.params.temperature <= 0.0 && !self.params.has_penalties()
    }

    /// Picks the next token from `logits` given the tokens so far (`history`, prompt included).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if self.is_greedy() {
            // Greedy on the logits as they are: no copy of the vocabulary per token.
            return argmax(logits);
        }
        // Penalties change a copy; without them the logits are read where they are.
        let logits = if self.params.has_penalties() {
            self.logits.clear();
            self.logits.extend_from_slice(logits);
            self.apply_penalties(history);
            &self.logits[..]
        } else {
            logits
        };
        let p = &self.params;
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let c = &mut self.candidates;
        c.clear();
        if p.top_k > 0 && p.top_k < logits.len() {
            top_k_sorted(logits, p.top_k, c);
        } else {
            c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
            c.sort_unstable_by(by_logit);
        }
        // Probabilities of the remaining candidates (unscaled by temperature, as llama.cpp).
        softmax_in_place(c);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let mut keep = c.len();
            for (i, &(_, prob)) in c.iter().enumerate() {
                cum += prob;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let floor = c[0].1 * p.min_p;
            let keep = c.iter().take_while(|x| x.1 >= floor).count();
            c.truncate(keep.max(1));
        }
        // Temperature on the surviving candidates' logits, then a draw.
        for x in c.iter_mut() {
            x.1 = logits[x.0 as usize] / p.temperature;
        }
        softmax_in_place(c);
        let r: f32 = self.rng.gen();
        let mut cum = 0.0;
        for &(id, prob) in c.iter() {
            cum += prob;
            if r < cum {
                return id;
            }
        }
        // Rounding left `cum` just under 1: the last candidate takes the remainder.
        c.last().map_or(0, |x| x.0)
    }

    fn apply_penalties(&mut self, history: &[u32]) {
        let p = &self.params;
        if !p.has_penalties() {
            return;
        }
        let recent = &history[history.len().saturating_sub(p.penalty_last_n)..];
        self.counts.clear();
        for &t in recent {
            *self.counts.entry(t).or_insert(0) += 1;
        }
        for (&t, &n) in &self.counts {
            let Some(l) = self.logits.get_mut(t as usize) else {
                continue;
            };
            if p.repeat_penalty != 1.0 {
                *l = if *l > 0.0 {
                    *l / p.repeat_penalty
                } else {
                    *l * p.repeat_penalty
                };
            }
            *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

/// The sampler's order of candidates: larger logit first (`total_cmp`, so a NaN is ordered
/// too), the lower id first among equals; a strict total order.
fn by_logit(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// The first `k` (id, logit) pairs of `logits` in [`by_logit`] order, sorted, into `out`: the
/// set and order a full sort's first `k` would give, in one pass over the vocabulary (128k
/// logits: tens of microseconds rather than building and partitioning 128k pairs). `out` is
/// kept sorted; a logit enters only when it beats the current k-th, which comes at most
/// ~k ln(n / k) times in a shuffled vocabulary.
fn top_k_sorted(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    /// Logits per chunk whose largest key is checked against the k-th before any is looked at.
    const CHUNK: usize = 64;
    out.clear();
    if k == 0 {
        return;
    }
    let mut base = 0;
    for chunk in logits.chunks(CHUNK) {
        // A full set and no key in the chunk above its k-th: nothing here enters (the common
        // case once the set is warm; the key maximum vectorizes).
        if out.len() == k {
            let worst = total_key(out[k - 1].1);
            if chunk.iter().fold(i32::MIN, |m, &v| m.max(total_key(v))) <= worst {
                base += chunk.len();
                continue;
            }
        }
        for (j, &l) in chunk.iter().enumerate() {
            let x = ((base + j) as u32, l);
            if out.len() == k {
                // Ids rise, so an equal logit comes after the k-th: only a larger one enters.
                if total_key(l) <= total_key(out[k - 1].1) {
                    continue;
                }
                out.pop();
            }
            let at = out.partition_point(|y| by_logit(y, &x) == std::cmp::Ordering::Less);
            out.insert(at, x);
        }
        base += chunk.len();
    }
}

/// `v`'s bits as an integer ordered as `f32::total_cmp` orders the floats.
#[inline]
fn total_key(v: f32) -> i32 {
    let b = v.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

fn softmax_in_place(c: &mut [(u32, f32)]) {
    let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for x in c.iter_mut() {
        x.1 = (x.1 - max).exp();
        sum += x.1;
    }
    for x in c.iter_mut() {
        x.1 /= sum;
    }
}

/// Most alternatives a step's log-probabilities list (OpenAI's limit for `top_logprobs`).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The log-probabilities of one generated token: of the chosen token and of the `top.len()`
/// most likely ones (most likely first, the lower id first among equals).
///
/// They are the model's distribution: the log-softmax of the raw logits, before penalties,
/// top-k/top-p/min-p and temperature (vLLM's default `raw_logprobs`), so they do not depend on
/// how the token was drawn; at temperature 0 with no penalties the chosen token is `top[0]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprobs {
    /// The log-probabilities of `token` and of the `top_n` (capped at [`MAX_TOP_LOGPROBS`]) most
    /// likely tokens under `logits`. A token outside `logits` gets negative infinity.
    pub fn of(logits: &[f32], token: u32, top_n: usize) -> Self {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // In f64: a 150k-entry sum in f32 loses the digits a small probability lives in.
        let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
        let log_z = f64::from(max) + sum.ln();
        let lp = |l: f32| (f64::from(l) - log_z) as f32;
        let n = top_n.min(MAX_TOP_LOGPROBS).min(logits.len());
        let mut top = Vec::with_capacity(n);
        top_k_sorted(logits, n, &mut top);
        Self {
            token,
            logprob: logits
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |&l| lp(l)),
            top: top.into_iter().map(|(i, l)| (i, lp(l))).collect(),
        }
    }
}

/// Index of the largest logit (the lowest index among equals; a NaN never wins, and a NaN
/// first entry keeps index 0): what the plain scan (each value against the best so far) returns, found a chunk at a
/// time. A chunk whose maximum does not beat the best so far cannot hold a new best, so only
/// the chunks that do are scanned; the chunk maxima are lane-wise (`vmaxps`), so a decode
/// step's 49,152 logits take a few microseconds rather than one dependent compare each.
pub fn argmax(logits: &[f32]) -> u32 {
    /// Lanes of the chunk maximum, and chunk length.
    const LANES: usize = 8;
    const CHUNK: usize = 8 * LANES;
    let Some(&first) = logits.first() else {
        return 0;
    };
    let (mut best, mut best_v) = (0usize, first);
    let mut base = 0;
    for c in logits.chunks(CHUNK) {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut groups = c.chunks_exact(LANES);
        for g in &mut groups {
            for (m, &v) in lanes.iter_mut().zip(g) {
                // `v > m` ignores a NaN `v`, as the scan's comparison does.
                *m = if v > *m { v } else { *m };
            }
        }
        let mut m = lanes
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        for &v in groups.remainder() {
            m = if v > m { v } else { m };
        }
        if m > best_v {
            for (i, &v) in c.iter().enumerate() {
                if v > best_v {
                    (best, best_v) = (base + i, v);
                }
            }
        }
        base += c.len();
    }
    best as u32
}

/// Finds stop strings in streamed text and says how much text is safe to emit.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }

    /// Byte offset where the earliest stop string starts in `text`, if any.
    pub fn find(&self, text: &str) -> Option<usize> {
        self.stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
    }

    /// Length of the prefix of `text` that can be emitted now: everything except a tail that
    /// might be the start of a stop string completed by later tokens.
    pub fn safe_len(&self, text: &str) -> usize {
        let mut hold = 0;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= text.len()
                    && text.is_char_boundary(text.len() - k)
                    && s.is_char_boundary(k)
                    && text.ends_with(&s[..k])
                {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        text.len() - hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Logits with many ties (a few distinct values), NaNs and infinities among them.
    fn tricky_logits() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![
                8 => (-4i32..4).prop_map(|v| v as f32),
                4 => -10.0f32..10.0,
                1 => Just(f32::NAN),
                1 => Just(f32::NEG_INFINITY),
                1 => Just(f32::INFINITY),
                1 => Just(-0.0f32),
            ],
            1..400,
        )
    }

    proptest! {
        /// The one-pass top-k is the full sort's first k, in the same order.
        #[test]
        fn top_k_sorted_is_the_sorts_prefix(l in tricky_logits(), k in 1usize..64) {
            let mut all: Vec<(u32, f32)> =
                l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
            all.sort_unstable_by(by_logit);
            all.truncate(k);
            let mut got = Vec::new();
            top_k_sorted(&l, k, &mut got);
            let bits = |v: &[(u32, f32)]| v.iter().map(|x| (x.0, x.1.to_bits())).collect::<Vec<_>>();
            prop_assert_eq!(bits(&got), bits(&all));
        }
    }

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    /// The arg-max as a plain scan: each value against the best so far.
    fn argmax_scan(logits: &[f32]) -> u32 {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    }

    /// The chunked arg-max equals the plain scan on ties, NaNs (first, inside, everywhere),
    /// infinities, signed zeros and every length around the chunk size.
    #[test]
    fn argmax_equals_the_scan() {
        let mut s = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::MAX,
            f32::MIN,
        ];
        for len in (0..200).chain([49_152, 49_153]) {
            for case in 0..6 {
                let v: Vec<f32> = (0..len)
                    .map(|i| {
                        let r = next();
                        match case {
                            // Few distinct values: many ties.
                            0 => (r % 5) as f32,
                            // Specials sprinkled in.
                            1 if r % 7 == 0 => specials[(r >> 8) as usize % specials.len()],
                            // A NaN at the front.
                            2 if i == 0 => f32::NAN,
                            // Rising, then falling: the best moves through many chunks.
                            3 => -((i as f32) - len as f32 / 2.0).abs(),
                            4 => f32::NAN,
                            _ => (r % 100_000) as f32 / 1000.0 - 50.0,
                        }
                    })
                    .collect();
                assert_eq!(argmax(&v), argmax_scan(&v), "len {len} case {case}");
            }
        }
    }

    #[test]
    fn greedy_and_top_k_1_agree() {
        let l = logits();
        let g = Sampler::new(SamplingParams::greedy()).sample(&l, &[]);
        assert_eq!(g, argmax(&l));
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.5,
            top_k: 1,
            seed: Some(7),
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&l, &[]), g);
        }
    }

    #[test]
    fn seeds_reproduce_and_differ() {
        let l = vec![0.0f32; 50];
        let params = |seed| SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(params(seed));
            (0..32).map(|_| s.sample(&l, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(Some(1)), draw(Some(1)));
        assert_ne!(draw(Some(1)), draw(Some(2)));
        // No seed: a fresh one each time (32 draws from 50 tokens agree by chance ~never).
        assert_ne!(draw(None), draw(None));
        // The drawn seed reproduces the run.
        let mut s = Sampler::new(params(None));
        let first: Vec<u32> = (0..32).map(|_| s.sample(&l, &[])).collect();
        assert_eq!(draw(Some(s.seed())), first);
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Token 0 holds ~88% of the mass: top-p 0.5 and min-p 0.5 both leave only it.
        let mut l = vec![0.0f32; 10];
        l[0] = 5.0;
        for params in [
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 0.5,
                min_p: 0.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.5,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params);
            assert!((0..50).all(|_| s.sample(&l, &[]) == 0));
        }
    }

    #[test]
    fn penalties_change_greedy_choice() {
        let l = vec![2.0f32, 1.5, 0.0];
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&l, &[0]), 1);
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.3,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&l, &[0]), 0);
        assert_eq!(s.sample(&l, &[0, 0]), 1);
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&l, &[0, 0, 0]), 1);
    }

    #[test]
    fn logprobs_are_the_log_softmax_of_the_logits() {
        let l = logits();
        let z: f64 = l.iter().map(|&x| f64::from(x).exp()).sum();
        let want = |i: usize| (f64::from(l[i]) - z.ln()) as f32;
        let g = argmax(&l);
        let lp = TokenLogprobs::of(&l, 7, 5);
        assert!((lp.logprob - want(7)).abs() < 1e-5, "{lp:?}");
        assert_eq!(lp.top.len(), 5);
        assert_eq!(lp.top[0].0, g);
        assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1), "{lp:?}");
        for &(i, p) in &lp.top {
            assert!((p - want(i as usize)).abs() < 1e-5);
        }
        // Every token's probability together is 1; the top 5 together less.
        let all = TokenLogprobs::of(&l, 0, 1000);
        assert_eq!(all.top.len(), MAX_TOP_LOGPROBS);
        let total: f64 = (0..l.len()).map(|i| f64::from(want(i)).exp()).sum();
        assert!((total - 1.0).abs() < 1e-4);
        assert!(lp.top.iter().map(|x| f64::from(x.1).exp()).sum::<f64>() < 1.0);
        // Greedy picks the top entry.
        let s = Sampler::new(SamplingParams::greedy()).sample(&l, &[]);
        assert_eq!(TokenLogprobs::of(&l, s, 1).top[0].0, s);
        assert_eq!(TokenLogprobs::of(&l, 1000, 0).logprob, f32::NEG_INFINITY);
        assert!(TokenLogprobs::of(&l, 0, 0).top.is_empty());
    }

    #[test]
    fn stop_strings() {
        let st = StopStrings::new(&["</s>".to_string(), "\n\n".to_string()]);
        assert_eq!(st.find("abc</s>def"), Some(3));
        assert_eq!(st.find("a\n\nb</s>"), Some(1));
        assert_eq!(st.find("abc"), None);
        assert_eq!(st.safe_len("abc</"), 3);
        assert_eq!(st.safe_len("abc\n"), 3);
        assert_eq!(st.safe_len("abcd"), 4);
    }
}
