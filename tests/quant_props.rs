//! Property tests: fast and parallel dequantization are bit-exact with the scalar reference on
//! arbitrary block bytes (scales included, so NaN/Inf/subnormal scales occur), for sizes that do
//! not divide evenly into threads or parallel chunks; matvec/matmul do not depend on the thread count.

// Index loops keep the (b, r) coordinates visible in the failure messages.
#![allow(clippy::needless_range_loop)]

use proptest::prelude::*;
use rocmforge::quant::{dequantize, dequantize_par, dequantize_ref, matmul, matvec, GgmlType};

const TYPES: [GgmlType; 16] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q8_1,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_K,
    GgmlType::IQ4_NL,
];

/// Equal bit patterns, except that any NaN equals any NaN: x86 propagates the payload of one
/// operand and which one depends on instruction operand order, which the contract does not fix.
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

fn tensor() -> impl Strategy<Value = (GgmlType, Vec<u8>)> {
    (0..TYPES.len(), 0usize..400, any::<bool>()).prop_flat_map(|(t, blocks, big)| {
        let ty = TYPES[t];
        // Sometimes large enough to span several parallel chunks (65536 elements each).
        let blocks = if big {
            blocks * 700 / ty.block_elems() as usize * 4 + 1
        } else {
            blocks
        };
        let bytes = blocks * ty.block_bytes() as usize;
        (Just(ty), proptest::collection::vec(any::<u8>(), bytes))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn fast_and_parallel_equal_reference((ty, raw) in tensor(), threads in 1usize..4) {
        let n = raw.len() / ty.block_bytes() as usize * ty.block_elems() as usize;
        let mut r = vec![0.0f32; n];
        dequantize_ref(ty, &raw, &mut r).unwrap();
        let mut f = vec![1.0f32; n];
        dequantize(ty, &raw, &mut f).unwrap();
        let mut p = vec![2.0f32; n];
        pool(threads).install(|| dequantize_par(ty, &raw, &mut p)).unwrap();
        for i in 0..n {
            prop_assert!(same(r[i], f[i]), "{} fast at {}: {:e} vs {:e}", ty, i, f[i], r[i]);
            prop_assert!(same(r[i], p[i]), "{} par at {}: {:e} vs {:e}", ty, i, p[i], r[i]);
        }
    }

    #[test]
    fn products_do_not_depend_on_thread_count(
        t in 0..TYPES.len(), rows in 1usize..70, cblocks in 1usize..4, batch in 1usize..6, seed in any::<u64>()
    ) {
        let ty = TYPES[t];
        let cols = cblocks * ty.block_elems().max(32) as usize;
        let wf: Vec<f32> = (0..rows * cols).map(|i| ((i as u64 ^ seed).wrapping_mul(0x9E3779B97F4A7C15) >> 40) as f32 / 8388608.0 - 1.0).collect();
        let x: Vec<f32> = (0..batch * cols).map(|i| ((i as u64 + seed).wrapping_mul(0xD1B54A32D192ED03) >> 40) as f32 / 8388608.0 - 1.0).collect();
        let w = rocmforge::quant::quantize(ty, &wf).unwrap();
        let mut y1 = vec![0.0; batch * rows];
        let mut y3 = vec![0.0; batch * rows];
        pool(1).install(|| matmul(ty, &w, rows, cols, &x, batch, &mut y1)).unwrap();
        pool(3).install(|| matmul(ty, &w, rows, cols, &x, batch, &mut y3)).unwrap();
        for b in 0..batch {
            let mut v = vec![0.0; rows];
            pool(2).install(|| matvec(ty, &w, rows, cols, &x[b * cols..(b + 1) * cols], &mut v)).unwrap();
            for r in 0..rows {
                let i = b * rows + r;
                prop_assert!(same(y1[i], y3[i]), "{} matmul 1 vs 3 threads at b={} r={}", ty, b, r);
                prop_assert!(same(y1[i], v[r]), "{} matmul vs matvec at b={} r={}", ty, b, r);
            }
        }
    }
}
