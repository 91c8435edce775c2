//! One transformer block, written once: the weights of a layer by role ([`LayerSet`]) and the
//! block's math ([`run_block`]) over a backend's ops ([`BlockOps`]).
//!
//! Every backend runs the same sequence of steps (norm, Q/K/V, biases, QK-norm, RoPE,
//! attention, output projection, post-norm, residual; norm, gated FFN or experts, post-norm,
//! residual); what differs is only how each op runs (CPU slices, device kernels). The weights
//! of a layer are one generic type whatever holds them: file locations ([`TensorRef`]), host
//! views ([`WeightView`]) or device tensors. A new tensor role is one line of the
//! `layer_set!` list below, its lookup in [`ModelLayout::from_file`] and its use in
//! [`run_block`].
//!
//! [`TensorRef`]: super::TensorRef
//! [`WeightView`]: super::WeightView
//! [`ModelLayout::from_file`]: super::ModelLayout::from_file

use super::hparams::{FfnActivation, HParams};
use super::names::TensorKind;
use std::convert::Infallible;
use std::fmt;

/// Declares [`Role`] and [`LayerSet`] from one list: `field: Role = TensorKind` for the
/// tensors every layer has, then those only some families have (`Option` fields).
macro_rules! layer_set {
    (
        required { $($r:ident: $rrole:ident = $rkind:ident,)* }
        optional { $($o:ident: $orole:ident = $okind:ident,)* }
    ) => {
        /// What a tensor does in a block: one field of [`LayerSet`] each.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Role {
            $($rrole,)*
            $($orole,)*
        }

        impl Role {
            /// The file tensor this role usually comes from (a fused or stacked tensor may
            /// hold it: Phi-3's `attn_qkv`, the experts' `ffn_*_exps`).
            pub fn kind(self) -> TensorKind {
                match self {
                    $(Self::$rrole => TensorKind::$rkind,)*
                    $(Self::$orole => TensorKind::$okind,)*
                }
            }
        }

        /// One layer's weights by role, whatever holds them (`T`: a file location, a host
        /// view, a device tensor). Optional roles are `None` where the family lacks them.
        #[derive(Debug, Clone, Copy)]
        pub struct LayerSet<T> {
            $(pub $r: T,)*
            $(pub $o: Option<T>,)*
        }

        impl<T> LayerSet<T> {
            /// The same roles over another holder; the first error stops it.
            pub fn try_map<U, E>(
                &self,
                mut f: impl FnMut(Role, &T) -> Result<U, E>,
            ) -> Result<LayerSet<U>, E> {
                Ok(LayerSet {
                    $($r: f(Role::$rrole, &self.$r)?,)*
                    $($o: match &self.$o {
                        Some(t) => Some(f(Role::$orole, t)?),
                        None => None,
                    },)*
                })
            }

            /// Every present tensor with its role, required roles first.
            pub fn iter(&self) -> impl Iterator<Item = (Role, &T)> {
                [
                    $((Role::$rrole, Some(&self.$r)),)*
                    $((Role::$orole, self.$o.as_ref()),)*
                ]
                .into_iter()
                .filter_map(|(role, t)| Some((role, t?)))
            }
        }
    };
}

layer_set! {
    required {
        attn_norm: AttnNorm = AttnNorm,
        wq: Q = AttnQ,
        wk: K = AttnK,
        wv: V = AttnV,
        wo: AttnOutput = AttnOutput,
        ffn_norm: FfnNorm = FfnNorm,
        w_gate: Gate = FfnGate,
        w_up: Up = FfnUp,
        w_down: Down = FfnDown,
    }
    optional {
        bq: QBias = AttnQBias,
        bk: KBias = AttnKBias,
        bv: VBias = AttnVBias,
        // Per-head norms of queries and keys, `[head_dim]` (Qwen3, Gemma 3), before RoPE.
        q_norm: QNorm = AttnQNorm,
        k_norm: KNorm = AttnKNorm,
        // Norms of the attention and FFN outputs `[d]`, before the residual add (Gemma 3).
        attn_post_norm: AttnPostNorm = AttnPostNorm,
        ffn_post_norm: FfnPostNorm = FfnPostNorm,
        // MoE router `[n_expert, d]`: with it, gate, up and down are the experts stacked
        // (expert e is its block of rows).
        router: Router = FfnGateInp,
        // A shared expert every token runs through beside the routed ones, scaled by
        // sigmoid(x . shexp_gate_inp) (Qwen2-MoE).
        shexp_gate_inp: ShexpGateInp = FfnGateInpShexp,
        shexp_gate: ShexpGate = FfnGateShexp,
        shexp_up: ShexpUp = FfnUpShexp,
        shexp_down: ShexpDown = FfnDownShexp,
    }
}

impl<T> LayerSet<T> {
    /// The same roles over another holder.
    pub fn map<U>(&self, mut f: impl FnMut(Role, &T) -> U) -> LayerSet<U> {
        match self.try_map(|role, t| Ok::<U, Infallible>(f(role, t))) {
            Ok(set) => set,
            Err(never) => match never {},
        }
    }
}

impl fmt::Display for Role {
    /// The role's usual tensor name without the layer (`attn_q`, `attn_q.bias`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = super::names::tensor_name(self.kind(), None);
        f.write_str(name.strip_suffix(".weight").unwrap_or(&name))
    }
}

/// The activations of one step, `[n, width]` f32 each; every backend maps the names to its
/// own storage (CPU vectors, device buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// The residual stream, `[n, d]`: the step's input and output.
    Hidden,
    /// A normalised copy of `Hidden`, `[n, d]`.
    Xn,
    Q,
    K,
    V,
    /// The attention output, `[n, n_head * head_dim_v]`.
    Attn,
    /// A projection back to `[n, d]` before the residual add.
    Proj,
    /// The FFN's gate and up projections, `[n, n_ff]`.
    Gate,
    Up,
}

impl Act {
    /// Values per row.
    pub fn width(self, hp: &HParams) -> usize {
        match self {
            Self::Hidden | Self::Xn | Self::Proj => hp.n_embd,
            Self::Q => hp.q_dim(),
            Self::K => hp.k_dim(),
            Self::V => hp.v_dim(),
            Self::Attn => hp.n_head * hp.head_dim_v,
            Self::Gate | Self::Up => hp.n_ff,
        }
    }
}

/// The ops a block is made of, as a backend runs them over the step's rows (every sequence's
/// tokens of the step, in order; the backend knows which rows belong to which sequence and at
/// which positions). `W` is one weight as the backend holds it.
pub trait BlockOps {
    type W;
    type Error;
    /// `out = x / rms(x) * w` row by row (`out == x`: in place).
    fn norm(&mut self, x: Act, w: &Self::W, role: Role, out: Act) -> Result<(), Self::Error>;
    /// The same over each head-wide slice of `x`, in place (QK-norm).
    fn head_norm(&mut self, x: Act, w: &Self::W, role: Role) -> Result<(), Self::Error>;
    /// `out_i = x W_i^T` for each `(W_i, role, out_i)`: projections of one input, which a
    /// backend may run as one pass.
    fn linear(&mut self, x: Act, outs: &[(&Self::W, Role, Act)]) -> Result<(), Self::Error>;
    /// Adds the bias `b` to every row of `x`.
    fn add_bias(&mut self, x: Act, b: &Self::W, role: Role) -> Result<(), Self::Error>;
    /// RoPE on `Q` and `K`, each row at its own position.
    fn rope(&mut self) -> Result<(), Self::Error>;
    /// Stores `K` and `V` in each sequence's cache and attends with `Q` over it, into `Attn`.
    fn attention(&mut self) -> Result<(), Self::Error>;
    /// `acc += x`.
    fn add(&mut self, acc: Act, x: Act) -> Result<(), Self::Error>;
    /// `Gate = act(Gate) * Up`.
    fn glu(&mut self, act: FfnActivation) -> Result<(), Self::Error>;
    /// The mixture-of-experts FFN of `Xn` into `Proj` (the layer has a router), with the
    /// shared expert where the layer has one.
    fn experts(&mut self, w: &LayerSet<Self::W>) -> Result<(), Self::Error>;
    /// The first part of [`Self::experts`] for a layer whose experts are units of their own:
    /// the router over `Xn`, its choice kept by the backend for the experts that follow, and
    /// `Proj` set to the shared expert's output (zero without one).
    fn route(&mut self, w: &LayerSet<Self::W>) -> Result<(), Self::Error>;
}

/// Whether a layer with these weights can run its experts apart from the layer
/// ([`run_block_routed`]): a router, and no norm after the FFN (the experts' sum goes
/// straight into the residual).
pub fn experts_separable<W>(w: &LayerSet<W>) -> bool {
    w.router.is_some() && w.ffn_post_norm.is_none()
}

/// A mixture-of-experts block up to its experts: [`run_block`]'s attention half, the FFN norm
/// and [`BlockOps::route`]. The chosen experts then run one by one (each from its own unit),
/// and `Hidden += Proj` ends the block. Only for [`experts_separable`] layers.
pub fn run_block_routed<O: BlockOps>(ops: &mut O, w: &LayerSet<O::W>) -> Result<(), O::Error> {
    attention_half(ops, w)?;
    ops.norm(Act::Hidden, &w.ffn_norm, Role::FfnNorm, Act::Xn)?;
    ops.route(w)
}

/// One block over the step's rows: `Hidden` is updated in place, and the rows' keys and values
/// land in their sequences' caches.
pub fn run_block<O: BlockOps>(
    ops: &mut O,
    hp: &HParams,
    w: &LayerSet<O::W>,
) -> Result<(), O::Error> {
    attention_half(ops, w)?;
    // --- feed-forward: gated (SwiGLU, GeGLU), or a mixture of experts where there is a router
    ops.norm(Act::Hidden, &w.ffn_norm, Role::FfnNorm, Act::Xn)?;
    if w.router.is_some() {
        ops.experts(w)?;
    } else {
        ops.linear(
            Act::Xn,
            &[
                (&w.w_gate, Role::Gate, Act::Gate),
                (&w.w_up, Role::Up, Act::Up),
            ],
        )?;
        ops.glu(hp.arch.ffn_activation())?;
        ops.linear(Act::Gate, &[(&w.w_down, Role::Down, Act::Proj)])?;
    }
    if let Some(pn) = &w.ffn_post_norm {
        ops.norm(Act::Proj, pn, Role::FfnPostNorm, Act::Proj)?;
    }
    ops.add(Act::Hidden, Act::Proj)
}

/// The attention half of a block: norm, Q/K/V, biases, QK-norm, RoPE, attention, output
/// projection, post-norm, residual.
fn attention_half<O: BlockOps>(ops: &mut O, w: &LayerSet<O::W>) -> Result<(), O::Error> {
    ops.norm(Act::Hidden, &w.attn_norm, Role::AttnNorm, Act::Xn)?;
    ops.linear(
        Act::Xn,
        &[
            (&w.wq, Role::Q, Act::Q),
            (&w.wk, Role::K, Act::K),
            (&w.wv, Role::V, Act::V),
        ],
    )?;
    let biases = [
        (&w.bq, Role::QBias, Act::Q),
        (&w.bk, Role::KBias, Act::K),
        (&w.bv, Role::VBias, Act::V),
    ];
    for (b, role, x) in biases {
        if let Some(b) = b {
            ops.add_bias(x, b, role)?;
        }
    }
    for (nw, role, x) in [
        (&w.q_norm, Role::QNorm, Act::Q),
        (&w.k_norm, Role::KNorm, Act::K),
    ] {
        if let Some(nw) = nw {
            ops.head_norm(x, nw, role)?;
        }
    }
    ops.rope()?;
    ops.attention()?;
    ops.linear(Act::Attn, &[(&w.wo, Role::AttnOutput, Act::Proj)])?;
    if let Some(pn) = &w.attn_post_norm {
        ops.norm(Act::Proj, pn, Role::AttnPostNorm, Act::Proj)?;
    }
    ops.add(Act::Hidden, Act::Proj)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Arch;

    /// Records the ops a block issues, to check the one step's order and its optional parts.
    #[derive(Default)]
    struct Trace(Vec<String>);

    impl BlockOps for Trace {
        type W = &'static str;
        type Error = Infallible;
        fn norm(&mut self, x: Act, w: &&str, _: Role, out: Act) -> Result<(), Infallible> {
            self.0.push(format!("norm {x:?} {w} -> {out:?}"));
            Ok(())
        }
        fn head_norm(&mut self, x: Act, w: &&str, _: Role) -> Result<(), Infallible> {
            self.0.push(format!("head_norm {x:?} {w}"));
            Ok(())
        }
        fn linear(&mut self, x: Act, outs: &[(&&str, Role, Act)]) -> Result<(), Infallible> {
            let outs: Vec<String> = outs.iter().map(|(w, _, o)| format!("{w}->{o:?}")).collect();
            self.0.push(format!("linear {x:?} {}", outs.join(",")));
            Ok(())
        }
        fn add_bias(&mut self, x: Act, b: &&str, _: Role) -> Result<(), Infallible> {
            self.0.push(format!("bias {x:?} {b}"));
            Ok(())
        }
        fn rope(&mut self) -> Result<(), Infallible> {
            self.0.push("rope".into());
            Ok(())
        }
        fn attention(&mut self) -> Result<(), Infallible> {
            self.0.push("attention".into());
            Ok(())
        }
        fn add(&mut self, acc: Act, x: Act) -> Result<(), Infallible> {
            self.0.push(format!("add {acc:?} += {x:?}"));
            Ok(())
        }
        fn glu(&mut self, act: FfnActivation) -> Result<(), Infallible> {
            self.0.push(format!("glu {act:?}"));
            Ok(())
        }
        fn experts(&mut self, w: &LayerSet<&str>) -> Result<(), Infallible> {
            self.0.push(format!("experts {}", w.router.unwrap_or("?")));
            Ok(())
        }
        fn route(&mut self, w: &LayerSet<&str>) -> Result<(), Infallible> {
            self.0.push(format!("route {}", w.router.unwrap_or("?")));
            Ok(())
        }
    }

    fn llama_set() -> LayerSet<&'static str> {
        LayerSet {
            attn_norm: "an",
            wq: "q",
            wk: "k",
            wv: "v",
            wo: "o",
            ffn_norm: "fn",
            w_gate: "g",
            w_up: "u",
            w_down: "d",
            bq: None,
            bk: None,
            bv: None,
            q_norm: None,
            k_norm: None,
            attn_post_norm: None,
            ffn_post_norm: None,
            router: None,
            shexp_gate_inp: None,
            shexp_gate: None,
            shexp_up: None,
            shexp_down: None,
        }
    }

    fn hp(arch: Arch) -> HParams {
        let md = crate::model::hparams::tests::md("llama");
        let mut hp = HParams::try_from(&md).expect("tiny hparams");
        hp.arch = arch;
        hp
    }

    #[test]
    fn llama_block_runs_the_plain_pre_norm_step() {
        let mut t = Trace::default();
        let Ok(()) = run_block(&mut t, &hp(Arch::Llama), &llama_set());
        assert_eq!(
            t.0,
            [
                "norm Hidden an -> Xn",
                "linear Xn q->Q,k->K,v->V",
                "rope",
                "attention",
                "linear Attn o->Proj",
                "add Hidden += Proj",
                "norm Hidden fn -> Xn",
                "linear Xn g->Gate,u->Up",
                "glu Silu",
                "linear Gate d->Proj",
                "add Hidden += Proj",
            ]
        );
    }

    #[test]
    fn optional_roles_add_their_ops_in_place() {
        let mut w = llama_set();
        w.bq = Some("bq");
        w.bv = Some("bv");
        w.k_norm = Some("kn");
        w.attn_post_norm = Some("apn");
        w.ffn_post_norm = Some("fpn");
        let mut t = Trace::default();
        let Ok(()) = run_block(&mut t, &hp(Arch::Gemma3), &w);
        let ops: Vec<&str> = t.0.iter().map(String::as_str).collect();
        let at = |op: &str| ops.iter().position(|o| *o == op).expect(op);
        assert!(at("bias Q bq") < at("bias V bv"));
        assert!(at("bias V bv") < at("head_norm K kn"));
        assert!(at("head_norm K kn") < at("rope"));
        assert!(at("linear Attn o->Proj") < at("norm Proj apn -> Proj"));
        assert!(at("norm Proj apn -> Proj") < at("add Hidden += Proj"));
        assert!(ops.contains(&"glu GeluTanh"));
        assert_eq!(ops[ops.len() - 2], "norm Proj fpn -> Proj");
    }

    #[test]
    fn a_router_replaces_the_gated_ffn_with_the_experts() {
        let mut w = llama_set();
        w.router = Some("r");
        let mut t = Trace::default();
        let Ok(()) = run_block(&mut t, &hp(Arch::Llama), &w);
        assert!(t.0.contains(&"experts r".to_string()));
        assert!(!t.0.iter().any(|o| o.starts_with("glu")));
    }

    #[test]
    fn a_routed_block_stops_at_the_router_after_the_attention_half() {
        let mut w = llama_set();
        w.router = Some("r");
        assert!(experts_separable(&w));
        let (mut whole, mut routed) = (Trace::default(), Trace::default());
        let Ok(()) = run_block(&mut whole, &hp(Arch::Llama), &w);
        let Ok(()) = run_block_routed(&mut routed, &w);
        // The same ops up to the experts, the router instead of them, nothing after.
        let at = whole
            .0
            .iter()
            .position(|o| o == "experts r")
            .expect("experts");
        assert_eq!(routed.0[..at], whole.0[..at]);
        assert_eq!(routed.0[at..], ["route r".to_string()]);
        w.ffn_post_norm = Some("fpn");
        assert!(!experts_separable(&w));
        assert!(!experts_separable(&llama_set()));
    }

    #[test]
    fn map_keeps_every_role_and_iter_lists_present_ones() {
        let mut w = llama_set();
        w.router = Some("r");
        let lens = w.map(|_, s| s.len());
        assert_eq!((lens.ffn_norm, lens.router, lens.bq), (2, Some(1), None));
        let roles: Vec<Role> = w.iter().map(|(r, _)| r).collect();
        assert_eq!(roles.len(), 10);
        assert_eq!(roles[0], Role::AttnNorm);
        assert_eq!(roles[9], Role::Router);
        let failed = w.try_map(|role, _| if role == Role::Up { Err(role) } else { Ok(()) });
        assert_eq!(failed.err(), Some(Role::Up));
        assert_eq!(Role::QBias.to_string(), "attn_q.bias");
        assert_eq!(Role::Down.to_string(), "ffn_down");
    }
}
