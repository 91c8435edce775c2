//! Rotary position embedding: per-pair base frequencies with linear or YaRN scaling (the ggml
//! conventions, so GGUF models behave as in llama.cpp), applied in the normal (adjacent pairs)
//! or NeoX (split halves) layout.

use super::hparams::{HParams, RopeLayout, RopeScaling};

/// YaRN's ramp bounds in rotations (the values every YaRN model was trained with).
const YARN_BETA_FAST: f32 = 32.0;
const YARN_BETA_SLOW: f32 = 1.0;

#[derive(Debug, Clone)]
pub struct Rope {
    layout: RopeLayout,
    n_rot: usize,
    /// Unscaled angle per position of pair i: `base^(-2i/n_rot) / freq_factor[i]`.
    theta: Vec<f32>,
    /// Multiplier on positions: 1/factor under linear or YaRN scaling.
    freq_scale: f32,
    /// YaRN: per-pair mix between extrapolated (1) and interpolated (0) angles.
    yarn_mix: Option<Vec<f32>>,
    /// Magnitude correction on cos/sin (YaRN), 1 otherwise.
    mscale: f32,
}

impl Rope {
    /// `freq_factors` are the optional `rope_freqs.weight` divisors (`[n_rot / 2]`).
    pub fn new(hp: &HParams, freq_factors: Option<&[f32]>) -> Self {
        let n_rot = hp.n_rot;
        let half = n_rot / 2;
        let base = hp.rope_freq_base;
        let theta = (0..half)
            .map(|i| {
                let t = base.powf(-2.0 * i as f32 / n_rot as f32);
                t / freq_factors.and_then(|f| f.get(i).copied()).unwrap_or(1.0)
            })
            .collect();
        let (freq_scale, yarn_mix, mscale) = match hp.rope_scaling {
            RopeScaling::None => (1.0, None, 1.0),
            RopeScaling::Linear { factor } => (1.0 / factor, None, 1.0),
            RopeScaling::Yarn { factor, orig_ctx } => {
                // Dimensions whose wavelength fits in the original context many times keep
                // extrapolating; long wavelengths interpolate; a linear ramp joins them.
                let corr = |beta: f32| {
                    n_rot as f32 * (orig_ctx as f32 / (beta * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let low = corr(YARN_BETA_FAST).floor().max(0.0);
                let high = corr(YARN_BETA_SLOW).ceil().min(n_rot as f32 - 1.0);
                let mix = (0..half)
                    .map(|i| {
                        let y = (i as f32 - low) / (high - low).max(0.001);
                        1.0 - y.clamp(0.0, 1.0)
                    })
                    .collect();
                let freq_scale = 1.0 / factor;
                (freq_scale, Some(mix), 1.0 + 0.1 * (1.0 / freq_scale).ln())
            }
        };
        Self {
            layout: hp.arch.rope_layout(),
            n_rot,
            theta,
            freq_scale,
            yarn_mix,
            mscale,
        }
    }

    /// The same rotation with cos/sin multiplied by `attn_factor` (LongRoPE's magnitude
    /// correction, `rope.scaling.attn_factor`).
    pub fn scaled(mut self, attn_factor: f32) -> Self {
        self.mscale *= attn_factor;
        self
    }

    /// The RoPE of sliding-window layers with their own `base` (Gemma 3: 10000): no scaling
    /// and no frequency factors, which llama.cpp applies to the global layers only.
    pub fn new_local(hp: &HParams, base: f32) -> Self {
        let mut local = hp.clone();
        local.rope_freq_base = base;
        local.rope_scaling = RopeScaling::None;
        Self::new(&local, None)
    }

    /// Fills `cs` (`[n_rot/2, 2]`: cos, sin) for position `pos`.
    pub fn cos_sin(&self, pos: usize, cs: &mut [f32]) {
        let p = pos as f32;
        for (i, (&t, out)) in self.theta.iter().zip(cs.chunks_exact_mut(2)).enumerate() {
            let extrap = p * t;
            let interp = extrap * self.freq_scale;
            let angle = match &self.yarn_mix {
                Some(mix) => interp * (1.0 - mix[i]) + extrap * mix[i],
                None => interp,
            };
            let (s, c) = angle.sin_cos();
            out[0] = c * self.mscale;
            out[1] = s * self.mscale;
        }
    }

    /// Rotates one head vector (`[head_dim]`, only the first `n_rot` dims) by the angles in `cs`.
    pub fn apply(&self, x: &mut [f32], cs: &[f32]) {
        let half = self.n_rot / 2;
        match self.layout {
            RopeLayout::Normal => {
                for (pair, c) in x[..self.n_rot].chunks_exact_mut(2).zip(cs.chunks_exact(2)) {
                    let (a, b) = (pair[0], pair[1]);
                    pair[0] = a * c[0] - b * c[1];
                    pair[1] = a * c[1] + b * c[0];
                }
            }
            RopeLayout::NeoX => {
                for i in 0..half {
                    let (c, s) = (cs[2 * i], cs[2 * i + 1]);
                    let (a, b) = (x[i], x[i + half]);
                    x[i] = a * c - b * s;
                    x[i + half] = a * s + b * c;
                }
            }
        }
    }

    pub fn n_rot(&self) -> usize {
        self.n_rot
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::hparams::Arch;

    fn hp(arch: Arch, scaling: RopeScaling) -> HParams {
        HParams {
            arch,
            n_ctx_train: 4096,
            n_embd: 8,
            n_layer: 1,
            n_ff: 8,
            n_head: 1,
            n_head_kv: 1,
            head_dim: 8,
            head_dim_v: 8,
            n_rot: 8,
            rms_eps: 1e-5,
            rope_freq_base: 10_000.0,
            rope_scaling: scaling,
            rope_orig_ctx: None,
            rope_attn_factor: 1.0,
            n_vocab: None,
            attn_scale: 1.0 / 8f32.sqrt(),
            embed_scale: 1.0,
            attn_softcap: None,
            final_softcap: None,
            local_attention: None,
            moe: None,
        }
    }

    #[test]
    fn rotation_preserves_norm_and_layouts_differ() {
        let x0: Vec<f32> = (1..=8).map(|i| i as f32).collect();
        let mut cs = vec![0.0; 8];
        for arch in [Arch::Llama, Arch::Qwen2] {
            let r = Rope::new(&hp(arch, RopeScaling::None), None);
            r.cos_sin(7, &mut cs);
            let mut x = x0.clone();
            r.apply(&mut x, &cs);
            let n0: f32 = x0.iter().map(|v| v * v).sum();
            let n1: f32 = x.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
            // Pair 0 rotates by exactly `pos` radians.
            let (a, b) = if arch == Arch::Llama { (0, 1) } else { (0, 4) };
            let expect = x0[a] * 7f32.cos() - x0[b] * 7f32.sin();
            assert!((x[a] - expect).abs() < 1e-4, "{arch:?}");
        }
    }

    #[test]
    fn linear_scaling_divides_positions() {
        let plain = Rope::new(&hp(Arch::Llama, RopeScaling::None), None);
        let lin = Rope::new(&hp(Arch::Llama, RopeScaling::Linear { factor: 4.0 }), None);
        let (mut a, mut b) = (vec![0.0; 8], vec![0.0; 8]);
        plain.cos_sin(3, &mut a);
        lin.cos_sin(12, &mut b);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5);
        }
        let yarn = Rope::new(
            &hp(
                Arch::Llama,
                RopeScaling::Yarn {
                    factor: 4.0,
                    orig_ctx: 1024,
                },
            ),
            None,
        );
        yarn.cos_sin(0, &mut b);
        // At position 0 only the magnitude correction remains.
        assert!((b[0] - (1.0 + 0.1 * 4f32.ln())).abs() < 1e-6);
    }
}
