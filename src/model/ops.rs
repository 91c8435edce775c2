//! The CPU ops of the forward pass: projections through the quant kernels, RMSNorm, SwiGLU,
//! softmax. Everything writes into caller-provided buffers so decode allocates nothing.

use super::error::ModelError;
use super::hparams::FfnActivation;
use super::weights::WeightView;
use crate::quant::{self, QuantError};
use serde::{Deserialize, Serialize};
use std::fmt::Display;

/// Numerical mode of the forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Weights dequantized exactly, f32 activations, f32 KV cache: the oracle for every faster
    /// path and every GPU kernel.
    Exact,
    /// Quantized dot products with activations quantized to Q8 (as ggml does); f16 KV allowed.
    #[default]
    Fast,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(Self::Exact),
            "fast" => Ok(Self::Fast),
            other => Err(format!("unknown precision {other:?} (exact | fast)")),
        }
    }
}

fn kernel_err<'a, N: Display + ?Sized>(
    op: &'static str,
    tensor: &'a N,
) -> impl FnOnce(QuantError) -> ModelError + 'a {
    move |source| ModelError::Kernel {
        op,
        tensor: tensor.to_string(),
        source,
    }
}

/// `y[b, r] = sum_c W[r, c] * x[b, c]` for `batch` rows of `x` (`[batch, w.cols]`), giving
/// `y` as `[batch, w.rows]`. One row uses the matrix-vector kernel (decode), more the
/// matrix-matrix one (prefill). `name` only labels errors (formatted only then: no allocation
/// on the hot path).
pub fn linear(
    w: &WeightView,
    name: &(impl Display + ?Sized),
    x: &[f32],
    batch: usize,
    y: &mut [f32],
    precision: Precision,
) -> Result<(), ModelError> {
    let (rows, cols) = (w.rows, w.cols);
    debug_assert_eq!(x.len(), batch * cols);
    debug_assert_eq!(y.len(), batch * rows);
    let r = match (precision, batch) {
        (Precision::Exact, 1) => quant::matvec_exact(w.ty, w.data, rows, cols, x, y),
        (Precision::Exact, _) => quant::matmul_exact(w.ty, w.data, rows, cols, x, batch, y),
        (Precision::Fast, 1) => quant::matvec(w.ty, w.data, rows, cols, x, y),
        (Precision::Fast, _) => quant::matmul(w.ty, w.data, rows, cols, x, batch, y),
    };
    r.map_err(kernel_err("matmul", name))
}

/// Several projections of the same input in one pass (Q/K/V, or gate/up): for each `(w, name)`
/// of `ws`, `ys[i] = x W_i^T` as [`linear`] computes it (bit for bit: fusing only shares the
/// activation quantization and the fork-join). Every `w` must have `cols == x.len() / batch`.
pub fn linear_fused(
    ws: &[(&WeightView, &dyn Display)],
    x: &[f32],
    batch: usize,
    ys: &mut [&mut [f32]],
    precision: Precision,
) -> Result<(), ModelError> {
    if precision == Precision::Exact || ws.len() != ys.len() {
        // The oracle stays one product at a time (and a length mismatch, a caller bug, gets
        // each tensor's own error from there).
        for ((w, name), y) in ws.iter().zip(ys.iter_mut()) {
            linear(w, *name, x, batch, y, precision)?;
        }
        return Ok(());
    }
    let cols = ws.first().map_or(0, |(w, _)| w.cols);
    let mut mats = Vec::with_capacity(ws.len());
    for ((w, name), y) in ws.iter().zip(ys.iter()) {
        // Per-tensor checks first, so an error names the tensor at fault (a `w` of other
        // width than the first fails its byte-length check).
        quant::check_product(w.ty, w.data, w.rows, cols, x, batch, y)
            .map_err(kernel_err("matmul", *name))?;
        mats.push(quant::WeightMatrix {
            ty: w.ty,
            data: w.data,
            rows: w.rows,
        });
    }
    quant::matmul_fused(&mats, cols, x, batch, ys).map_err(kernel_err("matmul", "fused"))
}

/// Dequantizes a whole vector tensor (norm weights, biases) or selected rows (embeddings).
pub fn dequantize(
    w: &WeightView,
    name: &(impl Display + ?Sized),
    dst: &mut [f32],
) -> Result<(), ModelError> {
    quant::dequantize(w.ty, w.data, dst).map_err(kernel_err("dequantize", name))
}

/// Dequantizes row `r` of `w` into `dst` (`[w.cols]`).
pub fn dequantize_row(
    w: &WeightView,
    r: usize,
    name: &(impl Display + ?Sized),
    dst: &mut [f32],
) -> Result<(), ModelError> {
    quant::dequantize(w.ty, w.row(r), dst).map_err(kernel_err("dequantize", name))
}

/// `out = x / rms(x) * weight`, row by row over `[n, d]`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        // Accumulate in f64: d is small and it keeps the exact path close to a float64 oracle.
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = (1.0 / (ss / d as f64 + eps as f64).sqrt()) as f32;
        for ((o, &v), &w) in or.iter_mut().zip(xr).zip(weight) {
            *o = v * scale * w;
        }
    }
}

/// [`rms_norm`] in place (the per-head QK-norm and the post-norms).
pub fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    let d = weight.len();
    for xr in x.chunks_exact_mut(d) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let scale = (1.0 / (ss / d as f64 + eps as f64).sqrt()) as f32;
        for (v, &w) in xr.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// GeGLU in place with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`):
/// `gate = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * up`.
pub fn geglu_tanh(gate: &mut [f32], up: &[f32]) {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        let t = (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh();
        *g = 0.5 * x * (1.0 + t) * u;
    }
}

/// `gate = act(gate) * up`: the family's gated activation. `Precision::Fast` takes the
/// vectorized form where the CPU has AVX2 and FMA (`gated_fast`); `Exact` the libm one.
pub fn gated(act: FfnActivation, gate: &mut [f32], up: &[f32], precision: Precision) {
    #[cfg(target_arch = "x86_64")]
    if precision == Precision::Fast
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
    {
        // SAFETY: AVX2 and FMA checked above.
        return unsafe { gated_fast(act, gate, up) };
    }
    let _ = precision;
    match act {
        FfnActivation::Silu => swiglu(gate, up),
        FfnActivation::GeluTanh => geglu_tanh(gate, up),
    }
}

/// Both activations as `x * sigmoid(z) = x / (1 + exp(-z))` with an 8-lane exp: SiLU with
/// `z = x`, tanh-GELU with `z = 2 sqrt(2/pi) (x + 0.044715 x^3)` (since `(1 + tanh(v)) / 2 =
/// sigmoid(2v)`). Within a few ulp of the libm forms (`tests::fast_activations_track_libm`);
/// the exp and the GELU cubic took ~6% of Gemma 3 270M's CPU decode through libm's
/// `tanhf`. A last partial vector goes through a padded copy, so every element takes the same
/// instructions wherever it falls (a batched step's rows equal the one-row step's).
///
/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gated_fast(act: FfnActivation, gate: &mut [f32], up: &[f32]) {
    use std::arch::x86_64::*;
    assert_eq!(gate.len(), up.len());
    // -z as a multiple of x: -x (SiLU), or -x (c1 + c2 x^2) (GELU).
    const C1: f32 = -2.0 * 0.797_884_6;
    const C2: f32 = C1 * 0.044_715;
    let silu = act == FfnActivation::Silu;
    let one = _mm256_set1_ps(1.0);
    let eight = |g: *mut f32, u: *const f32| {
        // SAFETY (of the loads and the store): the callers pass 8 floats at `g` and `u`.
        let x = _mm256_loadu_ps(g);
        let neg_z = if silu {
            _mm256_sub_ps(_mm256_setzero_ps(), x)
        } else {
            let x2 = _mm256_mul_ps(x, x);
            _mm256_mul_ps(
                x,
                _mm256_fmadd_ps(_mm256_set1_ps(C2), x2, _mm256_set1_ps(C1)),
            )
        };
        let s = _mm256_div_ps(x, _mm256_add_ps(one, exp8(neg_z)));
        _mm256_storeu_ps(g, _mm256_mul_ps(s, _mm256_loadu_ps(u)));
    };
    let n = gate.len() / 8 * 8;
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    for i in (0..n).step_by(8) {
        eight(g.add(i), u.add(i));
    }
    if n < gate.len() {
        let (mut gt, mut ut) = ([0f32; 8], [0f32; 8]);
        let k = gate.len() - n;
        gt[..k].copy_from_slice(&gate[n..]);
        ut[..k].copy_from_slice(&up[n..]);
        eight(gt.as_mut_ptr(), ut.as_ptr());
        gate[n..].copy_from_slice(&gt[..k]);
    }
}

/// `exp(x)` in 8 lanes: `2^n * p(r)` with `n = round(x / ln 2)`, `r = x - n ln 2` (ln 2 in two
/// parts) and a degree-6 polynomial for `e^r` on `|r| <= ln(2) / 2` (relative error ~2e-7).
/// `x` is clamped to [-87, 88] first (the result stays a normal float; the activations only
/// need it to saturate); NaN lanes come out as some finite value, so callers keep the NaN in
/// another operand (`gated_fast` divides `x` by it).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.0)),
        _mm256_set1_ps(88.0),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    // Taylor-like coefficients of e^r (the Cephes expf minimax set).
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let p = _mm256_fmadd_ps(
        p,
        _mm256_mul_ps(r, r),
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    // 2^n by the exponent bits (n in -126..=127).
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(p, _mm256_castsi256_ps(e))
}

/// Soft-capping in place: `x = cap * tanh(x / cap)` (Gemma's attention and logit caps).
pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

/// SwiGLU in place: `gate = silu(gate) * up`.
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let s = *g / (1.0 + (-*g).exp());
        *g = s * u;
    }
}

/// Softmax in place, stable (max subtracted).
#[inline(always)]
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// [`softmax`] with the exp 8 lanes at a time where the CPU has AVX2 and FMA (`exp8`, within a
/// few ulp of libm's; the sum in 8 lanes): `Precision::Fast`'s attention. A NaN score still makes
/// every output NaN. The same scores give the same bits wherever they come from (a batched
/// step's rows equal the one-row step's).
pub fn softmax_fast(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA checked above.
        return unsafe { softmax_avx2(x) };
    }
    softmax(x)
}

/// # Safety
/// AVX2 and FMA must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let m = _mm256_set1_ps(max);
    // exp(v - max) of 8 values; a NaN lane stays NaN (`exp8` clamps it to a finite value).
    let e8 = |v: __m256| {
        let e = exp8(_mm256_sub_ps(v, m));
        _mm256_blendv_ps(e, v, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v))
    };
    let n = x.len() / 8 * 8;
    let mut sum = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        // SAFETY: i + 8 <= n <= x.len().
        let e = e8(_mm256_loadu_ps(x.as_ptr().add(i)));
        _mm256_storeu_ps(x.as_mut_ptr().add(i), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut tail = 0.0f32;
    if n < x.len() {
        let k = x.len() - n;
        let mut t = [max; 8];
        t[..k].copy_from_slice(&x[n..]);
        let mut e = [0f32; 8];
        _mm256_storeu_ps(e.as_mut_ptr(), e8(_mm256_loadu_ps(t.as_ptr())));
        x[n..].copy_from_slice(&e[..k]);
        tail = e[..k].iter().sum();
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    let total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail;
    let inv = 1.0 / total;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `y += x`.
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// One attention head's inputs: `n = out.len() / hdv` queries at positions `pos0 ..`, query i at
/// `q[i * q_stride ..][..hd]`, and the cached rows `[pos0 + n, hd]` / `[pos0 + n, hdv]` as f32.
pub struct AttnHead<'a> {
    pub q: &'a [f32],
    pub q_stride: usize,
    pub hd: usize,
    pub hdv: usize,
    pub pos0: usize,
    pub scale: f32,
    /// Sliding window: the query at position p sees keys `p - window + 1 ..= p` only.
    pub window: Option<usize>,
    /// `cap * tanh(score / cap)` on the scaled scores.
    pub softcap: Option<f32>,
    pub keys: &'a [f32],
    pub vals: &'a [f32],
    /// `Precision::Fast`: the softmax's exp 8 lanes at a time ([`softmax_fast`]).
    pub fast: bool,
}

/// Causal softmax attention of one head: `out[i] = sum_j softmax_j(q_i . k_j * scale) v_j` over
/// positions `j <= pos0 + i` (and within the window, if any). `scores` holds at least `pos0 + n`
/// floats.
pub fn attend(h: &AttnHead, scores: &mut [f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { attend_avx2(h, scores, out) };
    }
    attend_body(h, scores, out)
}

/// The same code compiled for AVX2: the compiler vectorises `dot` and `axpy` 8 lanes wide
/// instead of 4. Rust never contracts `a * b + c` into an FMA, and each lane keeps its own
/// accumulator in the same order, so the results are bit-identical to the portable build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2(h: &AttnHead, scores: &mut [f32], out: &mut [f32]) {
    attend_body(h, scores, out)
}

#[inline(always)]
fn attend_body(h: &AttnHead, scores: &mut [f32], out: &mut [f32]) {
    let (hd, hdv) = (h.hd, h.hdv);
    for (i, o) in out.chunks_exact_mut(hdv).enumerate() {
        let len = h.pos0 + i + 1;
        let first = h.window.map_or(0, |w| len.saturating_sub(w));
        let qi = &h.q[i * h.q_stride..i * h.q_stride + hd];
        let sc = &mut scores[first..len];
        for (sj, kj) in sc.iter_mut().zip(h.keys[first * hd..].chunks_exact(hd)) {
            *sj = dot(qi, kj) * h.scale;
        }
        if let Some(cap) = h.softcap {
            softcap(sc, cap);
        }
        if h.fast {
            softmax_fast(sc);
        } else {
            softmax(sc);
        }
        o.fill(0.0);
        for (&p, vj) in sc.iter().zip(h.vals[first * hdv..].chunks_exact(hdv)) {
            axpy(o, p, vj);
        }
    }
}

#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight accumulators let the compiler vectorise without reassociation flags.
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a * x`.
#[inline(always)]
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o += a * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_softmax_swiglu() {
        let mut out = [0f32; 4];
        rms_norm(
            &[1.0, -1.0, 1.0, -1.0],
            &[1.0, 2.0, 3.0, 4.0],
            0.0,
            &mut out,
        );
        assert_eq!(out, [1.0, -2.0, 3.0, -4.0]);
        let mut s = [0.0f32, 0.0, f32::ln(2.0)];
        softmax(&mut s);
        assert!((s[2] - 0.5).abs() < 1e-6 && (s[0] - 0.25).abs() < 1e-6);
        let mut g = [0.0f32, 100.0];
        swiglu(&mut g, &[3.0, 2.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 200.0).abs() < 1e-3);
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(dot(&a, &a), (0..19).map(|i| (i * i) as f32).sum::<f32>());
        let mut x = [1.0f32, -1.0, 1.0, -1.0, 2.0, 2.0, 2.0, 2.0];
        rms_norm_in_place(&mut x, &[1.0, 2.0, 3.0, 4.0], 0.0);
        assert_eq!(x, [1.0, -2.0, 3.0, -4.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn geglu_and_softcap() {
        // GELU(0) = 0; GELU(x) -> x for large x, -> 0 for very negative x; GELU(1) = 0.8412
        // with the tanh approximation (0.8413 exact).
        let mut g = [0.0f32, 10.0, -10.0, 1.0];
        geglu_tanh(&mut g, &[5.0, 2.0, 2.0, 1.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 20.0).abs() < 1e-4 && g[2].abs() < 1e-4);
        assert!((g[3] - 0.841_192).abs() < 1e-5, "{}", g[3]);
        let mut x = [0.0f32, 1.0, 1e6];
        softcap(&mut x, 30.0);
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 30.0 * (1.0f32 / 30.0).tanh()).abs() < 1e-6 && x[2] == 30.0);
    }

    /// The vectorized activations stay within a few ulp-scale relative error of the libm forms
    /// over the range activations take (and saturate beyond it), keep NaN, and give an element
    /// the same bits whether it falls in a full vector or in the padded tail.
    #[test]
    fn fast_activations_track_libm() {
        let xs: Vec<f32> = (-4000..=4000)
            .map(|i| i as f32 / 200.0)
            .chain([-1e4, -200.0, -90.0, 90.0, 200.0, 1e4, 1e-30, -1e-30, 0.0])
            .collect();
        let up: Vec<f32> = (0..xs.len()).map(|i| 0.5 + (i % 7) as f32).collect();
        for act in [FfnActivation::Silu, FfnActivation::GeluTanh] {
            let (mut exact, mut fast) = (xs.clone(), xs.clone());
            gated(act, &mut exact, &up, Precision::Exact);
            gated(act, &mut fast, &up, Precision::Fast);
            for ((&x, &e), &f) in xs.iter().zip(&exact).zip(&fast) {
                // Relative to the value, with an absolute floor where the activation is ~0
                // (GELU's tail below -5 is ~1e-7 and smaller).
                let tol = 4e-6 * e.abs() + 1e-6;
                assert!((e - f).abs() <= tol, "{act:?}({x}): libm {e}, fast {f}");
            }
            // Tails: a 13-element slice (one vector, five in the tail) gives the same bits as
            // the same elements inside full vectors.
            for start in [0, 3, 8, 4001] {
                let mut part = xs[start..start + 13].to_vec();
                gated(act, &mut part, &up[start..start + 13], Precision::Fast);
                let mut whole = xs[start..start + 16].to_vec();
                gated(act, &mut whole, &up[start..start + 16], Precision::Fast);
                assert_eq!(
                    part.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    whole[..13].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{act:?} from {start}"
                );
            }
            let mut nan = [1.0, f32::NAN, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, f32::NAN];
            gated(act, &mut nan, &[1.0; 9], Precision::Fast);
            assert!(
                nan[1].is_nan() && nan[8].is_nan() && nan[0].is_finite(),
                "{nan:?}"
            );
        }
    }

    /// The vectorized softmax stays within float rounding of the libm one, sums to 1, keeps a
    /// NaN, and gives the same bits for the same scores whatever the length around them.
    #[test]
    fn fast_softmax_tracks_libm() {
        for n in [1usize, 7, 8, 13, 64, 1000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 211) as f32 / 9.0 - 11.0)
                .collect();
            let (mut exact, mut fast) = (x.clone(), x.clone());
            softmax(&mut exact);
            softmax_fast(&mut fast);
            for (e, f) in exact.iter().zip(&fast) {
                assert!((e - f).abs() <= 4e-6 * e + 1e-12, "n={n}: {e} vs {f}");
            }
            let sum: f32 = fast.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "n={n}: sum {sum}");
        }
        let mut nan = vec![0.5f32; 11];
        nan[9] = f32::NAN;
        softmax_fast(&mut nan);
        assert!(nan.iter().all(|v| v.is_nan()), "{nan:?}");
        let a: Vec<f32> = (0..20).map(|i| i as f32 * 0.3).collect();
        let (mut one, mut two) = (a.clone(), a.clone());
        softmax_fast(&mut one);
        softmax_fast(&mut two);
        assert_eq!(one, two);
    }

    #[test]
    fn window_limits_attention_to_recent_keys() {
        // One query at position 3 over 4 keys: with a window of 2 it sees keys 2 and 3 only,
        // equal here, so the output is the mean of their values.
        let keys = [9.0f32, 9.0, 1.0, 1.0];
        let vals = [100.0f32, 100.0, 1.0, 3.0];
        let head = |window| AttnHead {
            q: &[1.0],
            q_stride: 1,
            hd: 1,
            hdv: 1,
            pos0: 3,
            scale: 1.0,
            window,
            softcap: None,
            keys: &keys,
            vals: &vals,
            fast: false,
        };
        let (mut scores, mut out) = ([0f32; 4], [0f32; 1]);
        attend(&head(Some(2)), &mut scores, &mut out);
        assert!((out[0] - 2.0).abs() < 1e-6, "{out:?}");
        attend(&head(None), &mut scores, &mut out);
        assert!(out[0] > 50.0, "{out:?}");
    }
}
