//! The mixture-of-experts feed-forward block (Qwen3-MoE, Mixtral): a router scores every expert
//! for each token, each token runs through its `n_expert_used` best experts, and their outputs
//! are summed with the router's softmax weights (renormalised over the chosen ones).
//!
//! Experts run only on the tokens routed to them: the tokens of one expert are gathered into a
//! batch, so a prefill does one matrix product per expert in use, not one per token, and an
//! expert no token chose is never read. The experts of a layer are stored stacked in 3-D
//! tensors (`ffn_{gate,up,down}_exps`); expert e is a block of rows of each (whole quant
//! blocks), so a quantized expert is an ordinary quantized matrix (`WeightView::rows`).

use super::error::ModelError;
use super::hparams::{FfnActivation, Moe};
use super::names::{TensorId, TensorKind};
use super::ops::{self, Precision};
use super::weights::WeightView;
use std::cell::RefCell;
use std::fmt;

/// Buffers of one MoE block, per thread, reused across layers and tokens.
#[derive(Default)]
struct Scratch {
    /// Router logits, then probabilities, `[n, n_expert]`.
    logits: Vec<f32>,
    /// The tokens routed to the current expert and their weights.
    tokens: Vec<usize>,
    token_w: Vec<f32>,
    /// Their normed inputs `[m, d]`, gate and up `[m, n_ff_exp]`, outputs `[m, d]`.
    xs: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    ys: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The weights of one MoE block: the router `[n_expert, d]` and the stacked experts
/// `[n_expert * n_ff_exp, d]` (gate, up) and `[n_expert * d, n_ff_exp]` (down).
pub struct MoeWeights<'a> {
    pub router: &'a WeightView<'a>,
    pub gate: &'a WeightView<'a>,
    pub up: &'a WeightView<'a>,
    pub down: &'a WeightView<'a>,
    /// A shared expert run on every token (Qwen2-MoE), if the layer has one.
    pub shared: Option<SharedExpert<'a>>,
}

/// Qwen2-MoE's shared expert: a dense FFN (`gate`, `up` `[n_ff_shexp, d]`, `down`
/// `[d, n_ff_shexp]`) whose output is scaled per token by `sigmoid(x . gate_inp)` (`[1, d]`)
/// and added to the routed experts' sum.
pub struct SharedExpert<'a> {
    pub gate_inp: &'a WeightView<'a>,
    pub gate: &'a WeightView<'a>,
    pub up: &'a WeightView<'a>,
    pub down: &'a WeightView<'a>,
}

/// Names one expert's slice of a stacked tensor in errors.
struct ExpertName {
    tensor: TensorId,
    expert: usize,
}

impl fmt::Display for ExpertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (expert {})", self.tensor, self.expert)
    }
}

/// Picks the `chosen.len()` most probable experts from one token's router `logits` (turned
/// into softmax probabilities in place), best first, lower index first among equals, and
/// their weights: the probabilities, renormalised to sum to 1 when `norm` is set.
pub fn route(logits: &mut [f32], norm: bool, chosen: &mut [usize], weights: &mut [f32]) {
    ops::softmax(logits);
    for slot in 0..chosen.len() {
        let best = (0..logits.len())
            .filter(|e| !chosen[..slot].contains(e))
            .fold(None, |best: Option<usize>, e| match best {
                Some(b) if logits[b] >= logits[e] => Some(b),
                _ => Some(e),
            });
        // `chosen.len() <= logits.len()` (checked at load), so an expert is always left.
        let e = best.unwrap_or(0);
        chosen[slot] = e;
        weights[slot] = logits[e];
    }
    if norm {
        let sum: f32 = weights.iter().sum();
        if sum > 0.0 {
            weights.iter_mut().for_each(|w| *w /= sum);
        }
    }
}

/// Which experts each token of a step chose and with what weights: the routing of one MoE
/// block, kept between the router and the experts (which may run from units of their own).
#[derive(Debug, Default, Clone)]
pub struct Routes {
    /// Tokens routed.
    pub n: usize,
    /// Experts per token.
    pub k: usize,
    /// `[n, k]`: each token's experts, best first.
    pub chosen: Vec<usize>,
    /// `[n, k]`: their weights.
    pub weights: Vec<f32>,
}

impl Routes {
    /// Each token's choice from router logits `[n, n_expert]` (turned into probabilities in
    /// place), as [`route`] makes it.
    pub fn from_logits(&mut self, logits: &mut [f32], n_expert: usize, k: usize, norm: bool) {
        let n = logits.len() / n_expert.max(1);
        self.n = n;
        self.k = k;
        self.chosen.clear();
        self.chosen.resize(n * k, 0);
        self.weights.clear();
        self.weights.resize(n * k, 0.0);
        for ((l, c), w) in logits
            .chunks_exact_mut(n_expert.max(1))
            .zip(self.chosen.chunks_exact_mut(k.max(1)))
            .zip(self.weights.chunks_exact_mut(k.max(1)))
        {
            route(l, norm, c, w);
        }
    }

    /// The experts at least one token chose, ascending: the order the experts run in.
    pub fn experts(&self) -> Vec<usize> {
        let mut e = self.chosen.clone();
        e.sort_unstable();
        e.dedup();
        e
    }

    /// The tokens routed to expert `e` and their weights, in token order.
    pub fn tokens_of(&self, e: usize, tokens: &mut Vec<usize>, weights: &mut Vec<f32>) {
        tokens.clear();
        weights.clear();
        let k = self.k.max(1);
        for (i, (c, w)) in self
            .chosen
            .chunks_exact(k)
            .zip(self.weights.chunks_exact(k))
            .enumerate()
        {
            if let Some(slot) = c.iter().position(|&x| x == e) {
                tokens.push(i);
                weights.push(w[slot]);
            }
        }
    }
}

/// One expert's three matrices: gate and up `[n_ff_exp, d]`, down `[d, n_ff_exp]` (its rows of
/// the stacked tensors, or the tensors of its own unit).
pub struct ExpertWeights<'a> {
    pub gate: &'a WeightView<'a>,
    pub up: &'a WeightView<'a>,
    pub down: &'a WeightView<'a>,
}

/// Runs `f` with this thread's MoE scratch (private buffers when re-entered).
fn with_scratch<T>(f: impl FnOnce(&mut Scratch) -> T) -> T {
    SCRATCH.with(|cell| {
        let mut own = Scratch::default();
        let mut guard = cell.try_borrow_mut();
        let s = match guard.as_deref_mut() {
            Ok(s) => s,
            // Re-entered (a nested parallel caller on this thread): private buffers.
            Err(_) => &mut own,
        };
        f(s)
    })
}

/// The MoE FFN of `n` tokens: `out` (`[n, d]`) = sum over each token's chosen experts of
/// `weight * down_e(act(gate_e(x)) * up_e(x))`, for the normed inputs `xn` (`[n, d]`): the
/// router ([`route_block`]), then each chosen expert ([`expert_ffn`]) in ascending order, as a
/// step whose experts are units of their own runs them.
#[allow(clippy::too_many_arguments)]
pub fn moe_ffn(
    moe: &Moe,
    activation: FfnActivation,
    layer: usize,
    w: &MoeWeights,
    xn: &[f32],
    n: usize,
    out: &mut [f32],
    precision: Precision,
) -> Result<(), ModelError> {
    let mut routes = Routes::default();
    route_block(
        moe,
        activation,
        layer,
        w.router,
        w.shared.as_ref(),
        xn,
        n,
        out,
        precision,
        &mut routes,
    )?;
    let (fe, d) = (moe.n_ff_exp, w.router.cols);
    for e in routes.experts() {
        let (gate, up) = (w.gate.rows(e * fe, fe), w.up.rows(e * fe, fe));
        let down = w.down.rows(e * d, d);
        let ew = ExpertWeights {
            gate: &gate,
            up: &up,
            down: &down,
        };
        expert_ffn(activation, layer, e, &ew, &routes, xn, out, precision)?;
    }
    Ok(())
}

/// The first part of a MoE block over `n` tokens: the router's choice into `routes`, and
/// `out` (`[n, d]`) set to the shared expert's output (zero without one), which the chosen
/// experts then add to.
#[allow(clippy::too_many_arguments)]
pub fn route_block(
    moe: &Moe,
    activation: FfnActivation,
    layer: usize,
    router: &WeightView,
    shared: Option<&SharedExpert>,
    xn: &[f32],
    n: usize,
    out: &mut [f32],
    precision: Precision,
    routes: &mut Routes,
) -> Result<(), ModelError> {
    let d = router.cols;
    let id = |kind| TensorId {
        kind,
        layer: Some(layer),
    };
    with_scratch(|s| {
        resize(&mut s.logits, n * moe.n_expert);
        ops::linear(
            router,
            &id(TensorKind::FfnGateInp),
            xn,
            n,
            &mut s.logits,
            precision,
        )?;
        routes.from_logits(
            &mut s.logits,
            moe.n_expert,
            moe.n_expert_used,
            moe.norm_top_k,
        );
        out[..n * d].fill(0.0);
        if let Some(sh) = shared {
            shared_expert(
                sh,
                activation,
                &id,
                xn,
                n,
                d,
                &mut out[..n * d],
                precision,
                s,
            )?;
        }
        Ok(())
    })
}

/// Expert `e` of a MoE block on the tokens `routes` sent to it: their rows of `xn` gathered,
/// its gated FFN, each result added to the token's row of `out` with the token's weight.
#[allow(clippy::too_many_arguments)]
pub fn expert_ffn(
    activation: FfnActivation,
    layer: usize,
    e: usize,
    w: &ExpertWeights,
    routes: &Routes,
    xn: &[f32],
    out: &mut [f32],
    precision: Precision,
) -> Result<(), ModelError> {
    let (d, fe) = (w.gate.cols, w.gate.rows);
    let id = |kind| TensorId {
        kind,
        layer: Some(layer),
    };
    let name = |kind| ExpertName {
        tensor: id(kind),
        expert: e,
    };
    with_scratch(|s| {
        routes.tokens_of(e, &mut s.tokens, &mut s.token_w);
        let m = s.tokens.len();
        if m == 0 {
            return Ok(());
        }
        if s.tokens
            .iter()
            .any(|&i| (i + 1) * d > xn.len().min(out.len()))
        {
            return Err(ModelError::TensorShape {
                name: format!("the input of {}", name(TensorKind::FfnGateExps)),
                expected: vec![routes.n as u64, d as u64],
                found: vec![(xn.len().min(out.len()) / d.max(1)) as u64, d as u64],
            });
        }
        resize(&mut s.xs, m * d);
        for (dst, &i) in s.xs.chunks_exact_mut(d).zip(&s.tokens) {
            dst.copy_from_slice(&xn[i * d..(i + 1) * d]);
        }
        let (ng, nu, nd) = (
            name(TensorKind::FfnGateExps),
            name(TensorKind::FfnUpExps),
            name(TensorKind::FfnDownExps),
        );
        resize(&mut s.gate, m * fe);
        resize(&mut s.up, m * fe);
        ops::linear_fused(
            &[(w.gate, &ng), (w.up, &nu)],
            &s.xs,
            m,
            &mut [&mut s.gate[..], &mut s.up[..]],
            precision,
        )?;
        ops::gated(activation, &mut s.gate, &s.up, precision);
        resize(&mut s.ys, m * d);
        ops::linear(w.down, &nd, &s.gate, m, &mut s.ys, precision)?;
        for ((y, &i), &wt) in s.ys.chunks_exact(d).zip(&s.tokens).zip(&s.token_w) {
            ops::axpy(&mut out[i * d..(i + 1) * d], wt, y);
        }
        Ok(())
    })
}

/// Adds the shared expert's gated output of every token to `out` (`[n, d]`).
#[allow(clippy::too_many_arguments)]
fn shared_expert(
    sh: &SharedExpert,
    activation: FfnActivation,
    id: &dyn Fn(TensorKind) -> TensorId,
    xn: &[f32],
    n: usize,
    d: usize,
    out: &mut [f32],
    precision: Precision,
    s: &mut Scratch,
) -> Result<(), ModelError> {
    let fs = sh.gate.rows;
    resize(&mut s.gate, n * fs);
    resize(&mut s.up, n * fs);
    let (ng, nu) = (id(TensorKind::FfnGateShexp), id(TensorKind::FfnUpShexp));
    ops::linear_fused(
        &[(sh.gate, &ng), (sh.up, &nu)],
        xn,
        n,
        &mut [&mut s.gate[..], &mut s.up[..]],
        precision,
    )?;
    ops::gated(activation, &mut s.gate, &s.up, precision);
    resize(&mut s.ys, n * d);
    ops::linear(
        sh.down,
        &id(TensorKind::FfnDownShexp),
        &s.gate,
        n,
        &mut s.ys,
        precision,
    )?;
    // One gate logit per token (the router's logits are no longer needed).
    resize(&mut s.logits, n);
    let ng = id(TensorKind::FfnGateInpShexp);
    ops::linear(sh.gate_inp, &ng, xn, n, &mut s.logits, precision)?;
    for ((o, y), &g) in out
        .chunks_exact_mut(d)
        .zip(s.ys.chunks_exact(d))
        .zip(&s.logits)
    {
        ops::axpy(o, 1.0 / (1.0 + (-g).exp()), y);
    }
    Ok(())
}

/// Sizes a scratch vector to exactly `len` (the kernels check lengths exactly).
fn resize(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_to_the_top_k_and_renormalises() {
        let mut l = [0.0f32, 2.0, 1.0, 2.0];
        let (mut c, mut w) = ([0usize; 2], [0f32; 2]);
        route(&mut l, true, &mut c, &mut w);
        // Experts 1 and 3 tie: both chosen, the lower index first, half the weight each.
        assert_eq!(c, [1, 3]);
        assert!(
            (w[0] - 0.5).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6,
            "{w:?}"
        );
        let mut l = [0.0f32, 2.0, 1.0, 3.0];
        route(&mut l, false, &mut c, &mut w);
        assert_eq!(c, [3, 1]);
        // Without renormalisation the weights are the softmax over all four experts.
        let z: f32 = [0.0f32, 2.0, 1.0, 3.0].iter().map(|v| v.exp()).sum();
        assert!((w[0] - 3f32.exp() / z).abs() < 1e-6, "{w:?}");
        assert!((w[1] - 2f32.exp() / z).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn experts_run_on_their_tokens_only() {
        use crate::quant::GgmlType;
        // d = 1, one-wide experts: expert e's FFN is `silu(g_e x) * (u_e x) * down_e`. The
        // router sends token 0 to expert 0 and token 1 to expert 1 (top-1).
        let f = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let (router, gate, up, down) = (
            f(&[1.0, -1.0]),
            f(&[1.0, 2.0]),
            f(&[3.0, 5.0]),
            f(&[7.0, 11.0]),
        );
        fn view(data: &[u8], rows: usize) -> WeightView<'_> {
            WeightView {
                ty: GgmlType::F32,
                rows,
                cols: 1,
                data,
            }
        }
        let (r, g, u, dn) = (
            view(&router, 2),
            view(&gate, 2),
            view(&up, 2),
            view(&down, 2),
        );
        let w = MoeWeights {
            router: &r,
            gate: &g,
            up: &u,
            down: &dn,
            shared: None,
        };
        let moe = Moe {
            n_expert: 2,
            n_expert_used: 1,
            n_ff_exp: 1,
            norm_top_k: true,
            n_ff_shexp: None,
        };
        let xn = [2.0f32, -3.0];
        let mut out = [0f32; 2];
        moe_ffn(
            &moe,
            FfnActivation::Silu,
            0,
            &w,
            &xn,
            2,
            &mut out,
            Precision::Exact,
        )
        .unwrap();
        let silu = |x: f32| x / (1.0 + (-x).exp());
        let want0 = silu(1.0 * 2.0) * (3.0 * 2.0) * 7.0;
        let want1 = silu(2.0 * -3.0) * (5.0 * -3.0) * 11.0;
        assert!((out[0] - want0).abs() < 1e-4, "{out:?} vs {want0}");
        assert!((out[1] - want1).abs() < 1e-4, "{out:?} vs {want1}");
    }
}
