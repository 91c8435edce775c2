//! Unit tests: quantize -> dequantize round trips, and fast / parallel vs reference on them.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Gaussian-ish data (sum of uniforms) with a few outliers, like real weight rows.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let g: f32 = (0..4).map(|_| rng.gen::<f32>() - 0.5).sum();
            if i % 97 == 0 {
                g * 4.0
            } else {
                g
            }
        })
        .collect()
}

fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// Relative RMS round-trip error bounds per type on `data()`: the measured value (printed by
/// this test with --nocapture) plus ~25% headroom (Q8_K: one scale per 256 values, so the
/// outliers cost more). They follow from the step sizes: 8 bits
/// ~0.5%, 6 bits ~2%, 5 bits ~4%, 4 bits ~9%, 3 bits ~18%, 2 bits ~35% of the RMS.
const ROUND_TRIP_BOUNDS: [(GgmlType, f64); 16] = [
    (GgmlType::F32, 0.0),
    (GgmlType::F16, 0.0003),
    (GgmlType::BF16, 0.0025),
    (GgmlType::Q8_0, 0.0075),
    (GgmlType::Q8_1, 0.0075),
    (GgmlType::Q8_K, 0.0135),
    (GgmlType::Q6_K, 0.025),
    (GgmlType::Q5_0, 0.055),
    (GgmlType::Q5_1, 0.045),
    (GgmlType::Q5_K, 0.045),
    (GgmlType::Q4_0, 0.11),
    (GgmlType::Q4_1, 0.095),
    (GgmlType::Q4_K, 0.095),
    (GgmlType::IQ4_NL, 0.10),
    (GgmlType::Q3_K, 0.22),
    (GgmlType::Q2_K, 0.45),
];

#[test]
fn round_trip_error_within_bounds_and_paths_agree() {
    let n = 256 * 40;
    let x = data(n, 7);
    let mut over = Vec::new();
    for (ty, bound) in ROUND_TRIP_BOUNDS {
        let q = quantize(ty, &x).unwrap();
        assert_eq!(
            q.len(),
            n / ty.block_elems() as usize * ty.block_bytes() as usize
        );
        let mut r = vec![0.0; n];
        dequantize_ref(ty, &q, &mut r).unwrap();
        let e = rel_rms(&x, &r);
        println!("{ty}: relative RMS round-trip error {e:.5}");
        if e > bound {
            over.push(format!("{ty}: error {e} > {bound}"));
        }
        let (mut f, mut p) = (vec![0.0; n], vec![0.0; n]);
        dequantize(ty, &q, &mut f).unwrap();
        dequantize_par(ty, &q, &mut p).unwrap();
        for i in 0..n {
            assert_eq!(r[i].to_bits(), f[i].to_bits(), "{ty} fast at {i}");
            assert_eq!(r[i].to_bits(), p[i].to_bits(), "{ty} par at {i}");
        }
    }
    assert!(over.is_empty(), "{over:?}");
}

#[test]
fn zero_and_constant_blocks_round_trip() {
    for (ty, _) in ROUND_TRIP_BOUNDS {
        let n = 256;
        for v in [0.0f32, 1.5, -3.0] {
            let x = vec![v; n];
            let q = quantize(ty, &x).unwrap();
            let mut r = vec![f32::NAN; n];
            dequantize_ref(ty, &q, &mut r).unwrap();
            for (i, y) in r.iter().enumerate() {
                // Constant blocks: symmetric types hit the value exactly up to the f16 scale.
                assert!(
                    (y - v).abs() <= v.abs() * 0.01 + 1e-6,
                    "{ty} v={v} at {i}: {y}"
                );
            }
        }
    }
}

#[test]
fn legacy_quantizers_match_hand_computed_block() {
    // Q8_0 of 0..32 - 16: amax 16, d = 16/127, q = round(x * 127/16).
    let x: Vec<f32> = (0..32).map(|i| i as f32 - 16.0).collect();
    let q = quantize(GgmlType::Q8_0, &x).unwrap();
    assert_eq!(&q[0..2], &half::f16::from_f32(16.0 / 127.0).to_le_bytes());
    assert_eq!(q[2] as i8, -127);
    assert_eq!(q[2 + 31] as i8, (15.0f32 * 127.0 / 16.0).round() as i8);
    // Q4_0: max-magnitude value -16 maps to q=0, d = -16/-8 = 2.
    let q = quantize(GgmlType::Q4_0, &x).unwrap();
    assert_eq!(&q[0..2], &half::f16::from_f32(2.0).to_le_bytes());
    assert_eq!(q[2] & 0xF, 0);
}

#[test]
fn errors_for_bad_lengths_types_and_values() {
    let mut y = vec![0.0; 32];
    assert!(matches!(
        dequantize_ref(GgmlType::Q4_0, &[0u8; 17], &mut y),
        Err(QuantError::ByteLength {
            expected: 18,
            got: 17,
            ..
        })
    ));
    let mut y33 = vec![0.0; 33];
    assert!(matches!(
        dequantize(GgmlType::Q4_0, &[0u8; 18], &mut y33),
        Err(QuantError::NotWholeBlocks { .. })
    ));
    assert!(matches!(
        dequantize_par(GgmlType::IQ2_XXS, &[0u8; 66], &mut vec![0.0; 256]),
        Err(QuantError::Unsupported {
            ty: GgmlType::IQ2_XXS,
            ..
        })
    ));
    let mut x = vec![0.5f32; 32];
    x[5] = f32::NAN;
    assert!(matches!(
        quantize(GgmlType::Q8_0, &x),
        Err(QuantError::NonFinite { index: 5, .. })
    ));
    let w = quantize(GgmlType::Q8_0, &[1.0; 64]).unwrap();
    let mut out = vec![0.0; 2];
    assert!(matches!(
        matvec(GgmlType::Q8_0, &w, 2, 32, &[1.0; 31], &mut out),
        Err(QuantError::Length { .. })
    ));
    assert!(matches!(
        matvec(GgmlType::Q8_0, &w, 1, 32, &[1.0; 32], &mut out[..1]),
        Err(QuantError::ByteLength { .. })
    ));
}

#[test]
fn matvec_and_matmul_agree_with_exact_oracle() {
    let (rows, cols, batch) = (37, 512, 3);
    let wf = data(rows * cols, 3);
    let x = data(cols * batch, 4);
    for (ty, _) in ROUND_TRIP_BOUNDS {
        let w = quantize(ty, &wf).unwrap();
        let mut exact = vec![0.0; rows * batch];
        matmul_exact(ty, &w, rows, cols, &x, batch, &mut exact).unwrap();
        let mut mm = vec![0.0; rows * batch];
        matmul(ty, &w, rows, cols, &x, batch, &mut mm).unwrap();
        for b in 0..batch {
            let mut mv = vec![0.0; rows];
            matvec(ty, &w, rows, cols, &x[b * cols..(b + 1) * cols], &mut mv).unwrap();
            for r in 0..rows {
                assert_eq!(
                    mv[r].to_bits(),
                    mm[b * rows + r].to_bits(),
                    "{ty} b={b} r={r}"
                );
                // Activation quantization to 8 bits: ~1% of the typical |dot| (sqrt(cols)).
                let tol = 0.02 * (cols as f32).sqrt();
                assert!(
                    (mv[r] - exact[b * rows + r]).abs() <= tol,
                    "{ty} b={b} r={r}"
                );
            }
        }
    }
}
