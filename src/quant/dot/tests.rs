//! The dot kernels against their references: every integer path and ISA against the scalar
//! code, the tile kernels bit for bit.

use super::*;

/// Every type with tile kernels.
const TILE_TYPES: [GgmlType; 9] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q3_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Raw blocks of `ty` with random quants over their whole range (Q8_0's -128 included,
/// which no quantizer writes but a file may hold) and finite random scales (and mins); the
/// first row's quants are all at the top of the range (15, 31, -128), the worst case for
/// the i16 sums.
#[cfg(target_arch = "x86_64")]
fn raw_rows(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let bb = ty.block_bytes() as usize;
    let mut s = seed;
    let mut next = || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let per_row = cols / ty.block_elems() as usize;
    let mut w = vec![0u8; rows * per_row * bb];
    for (k, blk) in w.chunks_exact_mut(bb).enumerate() {
        for b in blk.iter_mut() {
            *b = next() as u8;
        }
        if k < per_row && ty == GgmlType::Q6_K {
            // Every quant 63 and every scale -128.
            blk[..192].fill(0xFF);
            blk[192..208].fill(0x80);
        } else if k < per_row && ty == GgmlType::Q3_K {
            // Every quant 7 (3 - 4 + 4: the high bit set) and every scale -32.
            blk[..96].fill(0xFF);
            blk[96..108].fill(0);
        } else if k < per_row {
            let qs = blk.len()
                - match ty {
                    GgmlType::Q8_0 => 32,
                    GgmlType::Q4_K => 128,
                    // The nibbles and the fifth bits before them.
                    GgmlType::Q5_K => 160,
                    _ => 16,
                };
            let top = if ty == GgmlType::Q8_0 { 0x80 } else { 0xFF };
            blk[qs..].fill(top);
            if matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1) {
                // The fifth bits (the 4 bytes before the nibbles) set too: every quant 31.
                blk[qs - 4..qs].fill(0xFF);
            }
        }
        let scale = |v: f32| half::f16::from_f32(v).to_le_bytes();
        let r = next();
        // Q6_K and Q3_K keep their d last.
        let d_at = if matches!(ty, GgmlType::Q6_K | GgmlType::Q3_K) {
            bb - 2
        } else {
            0
        };
        blk[d_at..d_at + 2].copy_from_slice(&scale((r % 1000) as f32 / 3e4 - 0.01));
        if matches!(
            ty,
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K
        ) {
            blk[2..4].copy_from_slice(&scale(((r >> 20) % 1000) as f32 / 2e4 - 0.025));
        }
    }
    w
}

/// The tile kernels (one-row and lanes, both ISAs where the CPU has them, any split of the
/// activation rows into lane groups) equal the scalar reference bit for bit, so `matmul`
/// row b equals `matvec(X[b])` whatever the batch, the tiles and the threads.
#[cfg(target_arch = "x86_64")]
#[test]
fn tile_kernels_match_the_scalar_reference() {
    let Some(best) = Isa::detect() else { return };
    let (rows, batch) = (13, 11);
    // 768: 24 sub-blocks, more than a chunk of the lanes kernel, cut inside a Q4_K block.
    for cols in [64, 256, 576, 768] {
        let mut x: Vec<f32> = (0..batch * cols)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.55)
            .collect();
        // Row 0: every activation quant at +127, the other extreme of the i16 sums.
        x[..cols].fill(0.75);
        let mut acts = ActsQ8::default();
        acts.fill(&x, cols);
        for ty in TILE_TYPES {
            if cols % ty.block_elems() as usize != 0 {
                continue;
            }
            let w = raw_rows(ty, rows, cols, 0x9e37_79b9_7f4a_7c15 ^ cols as u64);
            let rb = w.len() / rows;
            let want: Vec<Vec<u32>> = (0..batch)
                .map(|b| {
                    let a = acts.row(b);
                    (0..rows)
                        .map(|r| dot_tile_scalar(ty, &w[r * rb..(r + 1) * rb], &a).to_bits())
                        .collect()
                })
                .collect();
            for isa in [Isa::Avx2, best] {
                // One activation row at a time, rows split 5 + 8 (a full tile and a padded one, two
                // full ones).
                for (b, want_b) in want.iter().enumerate() {
                    let mut one = vec![0.0f32; rows];
                    let (lo, hi) = one.split_at_mut(5);
                    rows4_kernel(ty, isa, &w[..5 * rb], cols, &acts.row(b), lo);
                    rows4_kernel(ty, isa, &w[5 * rb..], cols, &acts.row(b), hi);
                    let got: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(&got, want_b, "{ty} {isa:?} one row b={b} cols={cols}");
                }
                // Lane groups: 8 + 3 (a padded group), and groups of every size from 1.
                for min_rows in [1, LANES_MIN_ROWS, LANES] {
                    let covered = acts.fill_lanes(min_rows);
                    let mut b0 = 0;
                    for g in acts.lanes() {
                        let mut tile = vec![[0.0f32; LANES]; rows];
                        lanes_kernel(ty, isa, &w, cols, std::slice::from_ref(g), &mut tile);
                        for t in 0..g.rows() {
                            let got: Vec<u32> = tile.iter().map(|o| o[t].to_bits()).collect();
                            assert_eq!(
                                got,
                                want[b0 + t],
                                "{ty} {isa:?} lanes b={} cols={cols}",
                                b0 + t
                            );
                        }
                        b0 += g.rows();
                    }
                    assert_eq!(b0, covered);
                }
            }
        }
    }
}

/// The portable integer kernel and the tiled kernels (both ISAs where the CPU has them)
/// compute the same integer sums in different float orders, so they agree
/// to float rounding (1e-5 of the sum of |terms|) with the f64 dot of the dequantized weights
/// and the quantized activations.
#[test]
fn integer_kernels_agree() {
    let cols = 1024;
    let wf: Vec<f32> = (0..4 * cols)
        .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.4)
        .collect();
    let x: Vec<f32> = (0..cols)
        .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.6)
        .collect();
    let mut acts = ActsQ8::default();
    acts.fill(&x, cols);
    let act = acts.row(0);
    let xq: Vec<f32> = (0..cols)
        .map(|i| act.blk[i / 32].d * act.qs[i] as f32)
        .collect();
    for ty in TILE_TYPES {
        let w = crate::quant::quantize(ty, &wf).unwrap();
        let rb = w.len() / 4;
        let mut wd = vec![0.0; 4 * cols];
        crate::quant::dequantize_ref(ty, &w, &mut wd).unwrap();
        for r in 0..4 {
            let wr = &w[r * rb..(r + 1) * rb];
            let wdr = &wd[r * cols..(r + 1) * cols];
            let exact: f64 = wdr
                .iter()
                .zip(&xq)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            let mag: f64 = wdr
                .iter()
                .zip(&xq)
                .map(|(a, b)| (*a as f64 * *b as f64).abs())
                .sum();
            let mut got = vec![("tile reference", dot_tile_scalar(ty, wr, &act))];
            if ty.block_elems() == 32 {
                got.push(("scalar", dot_legacy_scalar::<1>(ty, wr, [&act])[0]));
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(best) = Isa::detect() {
                for isa in [Isa::Avx2, best] {
                    let mut one = [0.0f32; 4];
                    rows4_kernel(ty, isa, &w, cols, &act, &mut one);
                    got.push(("one-row tile", one[r]));
                    let mut lanes = ActsQ8::default();
                    lanes.fill(&x.repeat(5), cols);
                    lanes.fill_lanes(1);
                    let mut tile = [[0.0f32; LANES]; 4];
                    lanes_kernel(ty, isa, &w, cols, &lanes.lanes()[..1], &mut tile);
                    got.push(("lanes tile", tile[r][4]));
                }
            }
            for (what, v) in got {
                assert!(
                    (v as f64 - exact).abs() <= 1e-5 * mag,
                    "{ty} row {r} {what}: {v} vs {exact}"
                );
            }
        }
    }
}

/// The lanes kernels with their AMX form (16-row groups where the CPU has AMX, the AVX kernel
/// for the rest) equal the scalar reference bit for bit; without AMX this checks the AVX
/// kernel on the same shapes.
#[cfg(target_arch = "x86_64")]
#[test]
fn amx_lanes_match_the_scalar_reference() {
    let Some(best) = Isa::detect() else { return };
    eprintln!(
        "AMX kernels: {}",
        if simd_tile::amx::enabled() {
            "in use"
        } else {
            "absent (AVX only)"
        }
    );
    // 37 rows: two 16-row tile groups and 5 rows for the AVX kernel.
    let rows = 37;
    // 19 activation rows: groups of 8, 8 and 3, one call for all of them (each tile unpacked
    // once for the three).
    for (cols, batch) in [(64, 8), (576, 3), (1024, 19)] {
        let x: Vec<f32> = (0..batch * cols)
            .map(|i| ((i * 7877) % 991) as f32 / 991.0 - 0.48)
            .collect();
        let mut acts = ActsQ8::default();
        acts.fill(&x, cols);
        acts.fill_lanes(1);
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let w = raw_rows(ty, rows, cols, 0x51ed_270b_a3c1_ee11 ^ cols as u64);
            let rb = w.len() / rows;
            let groups = acts.lanes();
            let mut tile = vec![[0.0f32; LANES]; rows * groups.len()];
            lanes_kernel(ty, best, &w, cols, groups, &mut tile);
            let mut b0 = 0;
            for (g, tg) in groups.iter().zip(tile.chunks_exact(rows)) {
                for t in 0..g.rows() {
                    let a = acts.row(b0 + t);
                    for (r, o) in tg.iter().enumerate() {
                        let want = dot_tile_scalar(ty, &w[r * rb..(r + 1) * rb], &a);
                        assert_eq!(
                            o[t].to_bits(),
                            want.to_bits(),
                            "{ty} row {r} row {} cols {cols}: {} vs {want}",
                            b0 + t,
                            o[t]
                        );
                    }
                }
                b0 += g.rows();
            }
            assert_eq!(b0, batch);
        }
    }
}
