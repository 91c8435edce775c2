//! Malformed inputs: NaN/Inf/subnormal scales give documented IEEE values (never a panic or UB),
//! wrong lengths and shapes give typed errors.

use rocmforge::quant::{
    dequantize, dequantize_par, dequantize_ref, matmul, matmul_exact, matvec, matvec_exact,
    quantize, GgmlType, QuantError,
};

fn f16_bytes(bits: u16) -> [u8; 2] {
    bits.to_le_bytes()
}

#[test]
fn nan_and_inf_scales_poison_only_their_block() {
    // Q4_0: block 0 scale NaN, block 1 scale +Inf, block 2 scale 1.0.
    let mut raw = vec![0x99u8; 3 * 18]; // every nibble 9 -> q - 8 = 1
    raw[0..2].copy_from_slice(&f16_bytes(0x7E00));
    raw[18..20].copy_from_slice(&f16_bytes(0x7C00));
    raw[36..38].copy_from_slice(&f16_bytes(0x3C00));
    for f in [dequantize_ref, dequantize, dequantize_par] {
        let mut y = vec![0.0f32; 96];
        f(GgmlType::Q4_0, &raw, &mut y).unwrap();
        assert!(y[..32].iter().all(|v| v.is_nan()));
        assert!(y[32..64].iter().all(|v| *v == f32::INFINITY));
        assert!(y[64..].iter().all(|v| *v == 1.0));
    }
    // Inf scale times a zero quant is NaN (IEEE), as in ggml.
    let mut z = vec![0x88u8; 18];
    z[0..2].copy_from_slice(&f16_bytes(0x7C00));
    let mut y = vec![0.0f32; 32];
    dequantize(GgmlType::Q4_0, &z, &mut y).unwrap();
    assert!(y.iter().all(|v| v.is_nan()));
    // matvec: the NaN block makes its row NaN, other rows stay finite.
    let mut w = raw[36..54].to_vec();
    w.extend_from_slice(&raw[0..18]);
    let mut out = vec![0.0f32; 2];
    matvec(GgmlType::Q4_0, &w, 2, 32, &[1.0; 32], &mut out).unwrap();
    assert_eq!(out[0], 32.0);
    assert!(out[1].is_nan());
}

#[test]
fn arbitrary_bytes_never_panic_for_any_type() {
    let raw: Vec<u8> = (0..292 * 4).map(|i| (i * 37 % 256) as u8).collect();
    for ty in GgmlType::ALL {
        let bb = ty.block_bytes() as usize;
        let blocks = raw.len() / bb;
        let n = blocks * ty.block_elems() as usize;
        let mut y = vec![0.0f32; n];
        let r = dequantize(ty, &raw[..blocks * bb], &mut y);
        assert_eq!(r.is_ok(), ty.is_supported(), "{ty}");
        if !ty.is_supported() {
            assert!(matches!(r, Err(QuantError::Unsupported { .. })), "{ty}");
            assert!(r.unwrap_err().to_string().contains(ty.name()));
        }
    }
}

#[test]
fn wrong_lengths_are_errors_everywhere() {
    let ty = GgmlType::Q4_1;
    let w = quantize(ty, &vec![0.5f32; 4 * 64]).unwrap(); // 4 rows x 64 cols
    let x = vec![1.0f32; 64];
    let mut y = vec![0.0f32; 4];
    assert!(matvec(ty, &w[1..], 4, 64, &x, &mut y).is_err());
    assert!(matvec(ty, &w, 4, 48, &x[..48], &mut y).is_err()); // not whole blocks
    assert!(matvec(ty, &w, 4, 64, &x[..63], &mut y).is_err());
    assert!(matvec(ty, &w, 4, 64, &x, &mut y[..3]).is_err());
    assert!(matvec_exact(ty, &w, 4, 64, &x, &mut y[..3]).is_err());
    let mut y2 = vec![0.0f32; 8];
    assert!(matmul(ty, &w, 4, 64, &x, 2, &mut y2).is_err()); // x too short for batch 2
    assert!(matmul_exact(
        ty,
        &w,
        4,
        64,
        &[x.clone(), x.clone()].concat(),
        2,
        &mut y2[..7]
    )
    .is_err());
    assert!(matches!(
        matvec(ty, &w, usize::MAX, 64, &x, &mut y),
        Err(QuantError::Overflow { .. })
    ));
    let e = dequantize(ty, &w[..19], &mut [0.0f32; 32]).unwrap_err();
    assert!(e.to_string().contains("expected 20 bytes, got 19"), "{e}");
    assert!(quantize(GgmlType::Q4_K, &[0.0; 255]).is_err());
    assert!(quantize(GgmlType::Q6_K, &[f32::INFINITY; 256]).is_err());
    assert!(quantize(GgmlType::IQ2_XXS, &[0.0; 256]).is_err());
}

#[test]
fn empty_shapes_are_fine() {
    let mut y: Vec<f32> = vec![];
    matvec(GgmlType::Q8_0, &[], 0, 64, &[0.0; 64], &mut y).unwrap();
    let mut y = vec![7.0f32; 3];
    matvec(GgmlType::Q8_0, &[], 3, 0, &[], &mut y).unwrap();
    assert_eq!(y, vec![0.0; 3]);
    matmul(GgmlType::Q8_0, &[], 3, 0, &[], 0, &mut []).unwrap();
    dequantize_par(GgmlType::Q6_K, &[], &mut []).unwrap();
    assert!(quantize(GgmlType::Q4_0, &[]).unwrap().is_empty());
}

#[test]
fn non_finite_activations_propagate_to_their_rows() {
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::F32,
    ] {
        let cols = 256;
        let w = quantize(ty, &vec![0.25f32; 2 * cols]).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![1.0f32; cols];
            x[100] = bad;
            let mut y = vec![0.0f32; 2];
            matvec(ty, &w, 2, cols, &x, &mut y).unwrap();
            assert!(y.iter().all(|v| !v.is_finite()), "{ty} {bad}: {y:?}");
        }
    }
}
