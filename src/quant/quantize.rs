//! Quantizers f32 -> block, one block at a time.
//!
//! The legacy types and Q8_K follow ggml's `quantize_row_*_ref` exactly (same rounding), so
//! activations quantized here match what ggml feeds its dot products. The K-quants and IQ4_NL use
//! simpler scale searches than ggml's iterative `make_qkx2_quants` (one min/max pass, scales
//! rounded to their bit width, then weights re-quantized against the rounded scales): the blocks
//! are valid and decode with any GGUF reader, with somewhat higher error than llama-quantize.
//! Measured round-trip errors per type are in `tests/quant_roundtrip.rs`.
//!
//! Inputs are finite (the caller checks); every block function is total on finite input.

// Index loops mirror the ggml formulas element for element; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

use super::blocks::*;

fn nearest(x: f32) -> i32 {
    // ggml's `nearest_int` rounds half to even.
    x.round_ties_even() as i32
}

fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The element with the largest magnitude (first one on ties), and that magnitude.
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((f32::MAX, -f32::MAX), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

pub fn q4_0(x: &[f32]) -> BlockQ4_0 {
    let (max, _) = signed_absmax(x);
    let d = max / -8.0;
    let id = inv(d);
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let a = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let b = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        qs[j] = a | (b << 4);
    }
    BlockQ4_0 { d: to_f16(d), qs }
}

pub fn q4_1(x: &[f32]) -> BlockQ4_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inv(d);
    let mut qs = [0u8; 16];
    for j in 0..16 {
        let a = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let b = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        qs[j] = a | (b << 4);
    }
    BlockQ4_1 {
        d: to_f16(d),
        m: to_f16(min),
        qs,
    }
}

pub fn q5_0(x: &[f32]) -> BlockQ5_0 {
    let (max, _) = signed_absmax(x);
    let d = max / -16.0;
    let id = inv(d);
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        let a = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let b = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        qs[j] = (a & 0xF) | ((b & 0xF) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    BlockQ5_0 {
        d: to_f16(d),
        qh: qh.to_le_bytes(),
        qs,
    }
}

pub fn q5_1(x: &[f32]) -> BlockQ5_1 {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inv(d);
    let mut qs = [0u8; 16];
    let mut qh = 0u32;
    for j in 0..16 {
        let a = (((x[j] - min) * id + 0.5) as i8).min(31) as u8;
        let b = (((x[j + 16] - min) * id + 0.5) as i8).min(31) as u8;
        qs[j] = (a & 0xF) | ((b & 0xF) << 4);
        qh |= (((a & 0x10) >> 4) as u32) << j;
        qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
    }
    BlockQ5_1 {
        d: to_f16(d),
        m: to_f16(min),
        qh: qh.to_le_bytes(),
        qs,
    }
}

/// Q8_0 quants and the f32 scale before f16 rounding (ggml quantizes with the unrounded scale).
fn q8_quants(x: &[f32]) -> ([u8; 32], f32) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inv(d);
    let mut qs = [0u8; 32];
    for j in 0..32 {
        qs[j] = ((x[j] * id).round() as i8) as u8;
    }
    (qs, d)
}

pub fn q8_0(x: &[f32]) -> BlockQ8_0 {
    let (qs, d) = q8_quants(x);
    BlockQ8_0 { d: to_f16(d), qs }
}

pub fn q8_1(x: &[f32]) -> BlockQ8_1 {
    let (qs, d) = q8_quants(x);
    let sum: i32 = qs.iter().map(|&q| q as i8 as i32).sum();
    BlockQ8_1 {
        d: to_f16(d),
        s: to_f16(sum as f32 * d),
        qs,
    }
}

pub fn q8_k(x: &[f32]) -> BlockQ8K {
    let (max, amax) = signed_absmax(x);
    let mut b = BlockQ8K {
        d: [0; 4],
        qs: [0; 256],
        bsums: [0; 32],
    };
    if amax == 0.0 {
        return b;
    }
    let iscale = -127.0 / max;
    for j in 0..256 {
        b.qs[j] = (nearest(iscale * x[j]).min(127) as i8) as u8;
    }
    for g in 0..16 {
        let s: i16 = b.qs[16 * g..16 * g + 16]
            .iter()
            .map(|&q| q as i8 as i16)
            .sum();
        b.bsums[2 * g..2 * g + 2].copy_from_slice(&s.to_le_bytes());
    }
    b.d = (1.0 / iscale).to_le_bytes();
    b
}

pub fn iq4_nl(x: &[f32]) -> BlockIQ4NL {
    let (max, amax) = signed_absmax(x);
    let mut b = BlockIQ4NL {
        d: [0; 2],
        qs: [0; 16],
    };
    if amax == 0.0 {
        return b;
    }
    let best = |d: f32, v: f32| -> usize {
        let t = v / d;
        (0..16)
            .min_by(|&a, &c| {
                let ea = (KVALUES_IQ4NL[a] as f32 - t).abs();
                let ec = (KVALUES_IQ4NL[c] as f32 - t).abs();
                ea.total_cmp(&ec)
            })
            .unwrap_or(0)
    };
    let mut d = max / KVALUES_IQ4NL[0] as f32;
    let mut idx = [0usize; 32];
    // Two passes: pick codes for the absmax scale, then refit the scale by least squares.
    for _ in 0..2 {
        let (mut sxq, mut sqq) = (0.0f32, 0.0f32);
        for j in 0..32 {
            idx[j] = best(d, x[j]);
            let q = KVALUES_IQ4NL[idx[j]] as f32;
            sxq += x[j] * q;
            sqq += q * q;
        }
        if sqq > 0.0 && sxq != 0.0 {
            d = sxq / sqq;
        }
    }
    let d = half::f16::from_f32(d).to_f32();
    for j in 0..16 {
        b.qs[j] = (best(d, x[j]) | (best(d, x[j + 16]) << 4)) as u8;
    }
    b.d = to_f16(d);
    b
}

/// Per sub-block affine fits for the "scale + min" K-quants: returns (scale, min) with the
/// sub-block's values approximated as `scale * q - min`, q in 0..=nmax, min >= 0.
fn affine_fits<const N: usize>(x: &[f32], sub: usize, nmax: f32) -> ([f32; N], [f32; N]) {
    let (mut sc, mut mn) = ([0.0f32; N], [0.0f32; N]);
    for i in 0..N {
        let (lo, hi) = min_max(&x[sub * i..sub * i + sub]);
        let lo = lo.min(0.0); // ggml does the same: the min term only ever shifts down
        sc[i] = (hi - lo) / nmax;
        mn[i] = -lo;
    }
    (sc, mn)
}

/// Rounds sub-block scales to `bits`-bit multiples of a super-block f16 scale.
/// Returns the f16 super-scale bytes and the integer sub-scales.
fn super_scale<const N: usize>(v: &[f32; N], levels: f32) -> ([u8; 2], [u8; N]) {
    let vmax = v.iter().fold(0.0f32, |a, &b| a.max(b));
    let d = half::f16::from_f32(vmax / levels).to_f32();
    let id = inv(d);
    let mut q = [0u8; N];
    for i in 0..N {
        q[i] = nearest(v[i] * id).clamp(0, levels as i32) as u8;
    }
    (to_f16(d), q)
}

fn requant(x: f32, d: f32, m: f32, nmax: i32) -> u8 {
    nearest((x + m) * inv(d)).clamp(0, nmax) as u8
}

pub fn q2_k(x: &[f32]) -> BlockQ2K {
    let (sc, mn) = affine_fits::<16>(x, 16, 3.0);
    let (d, qsc) = super_scale(&sc, 15.0);
    let (dmin, qmn) = super_scale(&mn, 15.0);
    let mut b = BlockQ2K {
        scales: [0; 16],
        qs: [0; 64],
        d,
        dmin,
    };
    let (df, mf) = (f16(d), f16(dmin));
    for e in 0..256 {
        let is = e / 16;
        b.scales[is] = qsc[is] | (qmn[is] << 4);
        let q = requant(x[e], df * qsc[is] as f32, mf * qmn[is] as f32, 3);
        // Element e: 128-half n, shift slot s, 16-group h, lane l (the order `reference::q2_k` reads).
        let (n, s, h, l) = (e / 128, (e / 32) % 4, (e / 16) % 2, e % 16);
        b.qs[32 * n + 16 * h + l] |= q << (2 * s);
    }
    b
}

pub fn q3_k(x: &[f32]) -> BlockQ3K {
    let mut s = [0.0f32; 16];
    for (i, si) in s.iter_mut().enumerate() {
        *si = signed_absmax(&x[16 * i..16 * i + 16]).0 / -4.0;
    }
    let (smax, samax) = signed_absmax(&s);
    let mut b = BlockQ3K {
        hmask: [0; 32],
        qs: [0; 64],
        scales: [0; 12],
        d: [0; 2],
    };
    if samax == 0.0 {
        return b;
    }
    let iscale = -32.0 / smax;
    let mut qsc = [0i8; 16];
    for i in 0..16 {
        qsc[i] = nearest(iscale * s[i]).clamp(-32, 31) as i8;
    }
    b.scales = pack_scale_q3k(&qsc);
    b.d = to_f16(1.0 / iscale);
    let d = f16(b.d);
    for e in 0..256 {
        let dl = d * qsc[e / 16] as f32;
        let q = (nearest(x[e] * inv(dl)).clamp(-4, 3) + 4) as u8;
        let (n, sh, h, l) = (e / 128, (e / 32) % 4, (e / 16) % 2, e % 16);
        b.qs[32 * n + 16 * h + l] |= (q & 3) << (2 * sh);
        if q & 4 != 0 {
            b.hmask[16 * h + l] |= 1 << (4 * n + sh);
        }
    }
    b
}

pub fn q4_k(x: &[f32]) -> BlockQ4K {
    let (sc, mn) = affine_fits::<8>(x, 32, 15.0);
    let (d, qsc) = super_scale(&sc, 63.0);
    let (dmin, qmn) = super_scale(&mn, 63.0);
    let mut b = BlockQ4K {
        d,
        dmin,
        scales: pack_scale_min_k4(&qsc, &qmn),
        qs: [0; 128],
    };
    let (df, mf) = (f16(d), f16(dmin));
    for e in 0..256 {
        let is = e / 32;
        let q = requant(x[e], df * qsc[is] as f32, mf * qmn[is] as f32, 15);
        let (j, hi, l) = (e / 64, (e / 32) % 2, e % 32);
        b.qs[32 * j + l] |= q << (4 * hi);
    }
    b
}

pub fn q5_k(x: &[f32]) -> BlockQ5K {
    let (sc, mn) = affine_fits::<8>(x, 32, 31.0);
    let (d, qsc) = super_scale(&sc, 63.0);
    let (dmin, qmn) = super_scale(&mn, 63.0);
    let mut b = BlockQ5K {
        d,
        dmin,
        scales: pack_scale_min_k4(&qsc, &qmn),
        qh: [0; 32],
        qs: [0; 128],
    };
    let (df, mf) = (f16(d), f16(dmin));
    for e in 0..256 {
        let is = e / 32;
        let q = requant(x[e], df * qsc[is] as f32, mf * qmn[is] as f32, 31);
        let (j, hi, l) = (e / 64, (e / 32) % 2, e % 32);
        b.qs[32 * j + l] |= (q & 0xF) << (4 * hi);
        if q & 0x10 != 0 {
            b.qh[l] |= 1 << (2 * j + hi);
        }
    }
    b
}

pub fn q6_k(x: &[f32]) -> BlockQ6K {
    let mut s = [0.0f32; 16];
    for (i, si) in s.iter_mut().enumerate() {
        *si = signed_absmax(&x[16 * i..16 * i + 16]).0 / -32.0;
    }
    let (smax, samax) = signed_absmax(&s);
    let mut b = BlockQ6K {
        ql: [0; 128],
        qh: [0; 64],
        scales: [0; 16],
        d: [0; 2],
    };
    if samax == 0.0 {
        return b;
    }
    let iscale = -128.0 / smax;
    let mut qsc = [0i8; 16];
    for i in 0..16 {
        qsc[i] = nearest(iscale * s[i]).min(127) as i8;
        b.scales[i] = qsc[i] as u8;
    }
    b.d = to_f16(1.0 / iscale);
    let d = f16(b.d);
    for e in 0..256 {
        let dl = d * qsc[e / 16] as f32;
        let q = (nearest(x[e] * inv(dl)).clamp(-32, 31) + 32) as u8;
        // Element e: 128-half n, 32-slot k (0..4), lane l.
        let (n, k, l) = (e / 128, (e / 32) % 4, e % 32);
        let ql = &mut b.ql[64 * n + 32 * (k % 2) + l];
        *ql |= (q & 0xF) << (4 * (k / 2));
        b.qh[32 * n + l] |= (q >> 4) << (2 * k);
    }
    b
}
