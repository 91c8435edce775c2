//! matvec / matmul against an f64 reference, with a tolerance per quant class.
//!
//! The weights are exact in both (the reference dequantizes them with `dequantize_ref`); what
//! differs is the activations and the summation:
//! - FLOAT class (F32/F16/BF16; Q2_K until it gets an int8 kernel): f32 activations; only f32 summation error,
//!   bounded by n * 2^-24 * sum|w_i x_i| (the classic recursive-summation bound; our blocked
//!   sums do better).
//! - Q8 class (legacy weights, Q3_K, Q4_K, Q5_K and Q6_K, with 32-element Q8 activations): each activation
//!   is rounded to a multiple of its block's step amax_b/127, so it moves by at most half a step,
//!   plus headroom for an f16 rounding of the step (2^-11 relative). So
//!   |err| <= sum_i |w_i| * (amax_b(i)/254 + |x_i| * 2^-10) + the summation bound above.
//!   This is a worst-case bound (errors of opposite sign do not cancel in it), so it cannot
//!   fail spuriously, yet a wrong scale, a wrong block pairing or a lost sub-block breaks it.

use rocmforge::quant::{dequantize_ref, matmul, matmul_exact, matvec, quantize, GgmlType};

const WEIGHT_TYPES: [GgmlType; 14] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
];

fn lcg(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|i| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / 16777216.0 - 0.5;
            if i % 61 == 0 {
                u * scale * 8.0
            } else {
                u * scale
            }
        })
        .collect()
}

/// The activation block size the fast path quantizes with, or None where activations stay f32.
fn act_block(ty: GgmlType) -> Option<usize> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => None,
        // Q3_K..Q6_K int8 kernels use 32-element activation blocks; Q2_K stays f32.
        GgmlType::Q2_K => None,
        _ => Some(32),
    }
}

fn bound(ty: GgmlType, w: &[f32], x: &[f32]) -> f64 {
    let n = w.len() as f64;
    let sum_abs: f64 = w
        .iter()
        .zip(x)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum();
    let mut tol = n * 2f64.powi(-24) * sum_abs * 2.0;
    if let Some(blk) = act_block(ty) {
        for (wb, xb) in w.chunks(blk).zip(x.chunks(blk)) {
            let amax = xb.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
            for (a, b) in wb.iter().zip(xb) {
                tol += (*a as f64).abs() * (amax / 254.0 + (*b as f64).abs() * 2f64.powi(-10));
            }
        }
    }
    tol + 1e-30
}

#[test]
fn matvec_and_matmul_within_named_tolerance_of_f64() {
    let (rows, cols, batch) = (45, 1536, 4);
    for ty in WEIGHT_TYPES {
        for scale in [1.0f32, 1e-3, 300.0] {
            let w = quantize(ty, &lcg(11, rows * cols, 1.0)).unwrap();
            let mut wd = vec![0.0; rows * cols];
            dequantize_ref(ty, &w, &mut wd).unwrap();
            let x = lcg(12, batch * cols, scale);
            let mut y = vec![0.0; batch * rows];
            matmul(ty, &w, rows, cols, &x, batch, &mut y).unwrap();
            let mut ye = vec![0.0; batch * rows];
            matmul_exact(ty, &w, rows, cols, &x, batch, &mut ye).unwrap();
            for b in 0..batch {
                let xb = &x[b * cols..(b + 1) * cols];
                let mut yv = vec![0.0; rows];
                matvec(ty, &w, rows, cols, xb, &mut yv).unwrap();
                for r in 0..rows {
                    let wr = &wd[r * cols..(r + 1) * cols];
                    let exact: f64 = wr.iter().zip(xb).map(|(a, c)| *a as f64 * *c as f64).sum();
                    let tol = bound(ty, wr, xb);
                    for (what, v) in [("matvec", yv[r]), ("matmul", y[b * rows + r])] {
                        let err = (v as f64 - exact).abs();
                        assert!(err <= tol, "{ty} {what} scale={scale} b={b} r={r}: {v} vs {exact}, err {err:e} > {tol:e}");
                    }
                    // The oracle itself: f64 sum rounded once to f32.
                    assert!(
                        (ye[b * rows + r] as f64 - exact).abs()
                            <= exact.abs() * 2f64.powi(-23) + 1e-30
                    );
                }
            }
        }
    }
}

#[test]
fn zero_activations_give_zero() {
    for ty in WEIGHT_TYPES {
        let cols = 512;
        let w = quantize(ty, &lcg(5, 3 * cols, 1.0)).unwrap();
        let mut y = vec![1.0; 3];
        matvec(ty, &w, 3, cols, &vec![0.0; cols], &mut y).unwrap();
        assert_eq!(y, vec![0.0; 3], "{ty}");
    }
}
