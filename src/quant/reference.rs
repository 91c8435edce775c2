//! Scalar reference dequantizers, one per block type, written to follow ggml's
//! `dequantize_row_*` arithmetic operation for operation (same products, same order, no fused
//! multiply-add), so the results are bit-identical to ggml and to `gguf.quants.dequantize`.
//! The fast paths in `fast`/`simd` are tested bit-exact against these.

// Index loops mirror the ggml formulas element for element; iterator chains would hide them.
#![allow(clippy::needless_range_loop)]

use super::blocks::*;

#[inline(always)]
pub fn q4_0(b: &BlockQ4_0, y: &mut [f32]) {
    let d = f16(b.d);
    for j in 0..16 {
        y[j] = d * ((b.qs[j] & 0xF) as i32 - 8) as f32;
        y[j + 16] = d * ((b.qs[j] >> 4) as i32 - 8) as f32;
    }
}

#[inline(always)]
pub fn q4_1(b: &BlockQ4_1, y: &mut [f32]) {
    let (d, m) = (f16(b.d), f16(b.m));
    for j in 0..16 {
        y[j] = d * (b.qs[j] & 0xF) as f32 + m;
        y[j + 16] = d * (b.qs[j] >> 4) as f32 + m;
    }
}

#[inline(always)]
pub fn q5_0(b: &BlockQ5_0, y: &mut [f32]) {
    let d = f16(b.d);
    let qh = u32::from_le_bytes(b.qh);
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = d * (((b.qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32;
        y[j + 16] = d * (((b.qs[j] >> 4) as u32 | h1) as i32 - 16) as f32;
    }
}

#[inline(always)]
pub fn q5_1(b: &BlockQ5_1, y: &mut [f32]) {
    let (d, m) = (f16(b.d), f16(b.m));
    let qh = u32::from_le_bytes(b.qh);
    for j in 0..16 {
        let h0 = ((qh >> j) << 4) & 0x10;
        let h1 = (qh >> (j + 12)) & 0x10;
        y[j] = d * ((b.qs[j] & 0xF) as u32 | h0) as f32 + m;
        y[j + 16] = d * ((b.qs[j] >> 4) as u32 | h1) as f32 + m;
    }
}

#[inline(always)]
pub fn q8_0(b: &BlockQ8_0, y: &mut [f32]) {
    let d = f16(b.d);
    for j in 0..32 {
        y[j] = (b.qs[j] as i8) as f32 * d;
    }
}

#[inline(always)]
pub fn q8_1(b: &BlockQ8_1, y: &mut [f32]) {
    let d = f16(b.d);
    for j in 0..32 {
        y[j] = (b.qs[j] as i8) as f32 * d;
    }
}

#[inline(always)]
pub fn iq4_nl(b: &BlockIQ4NL, y: &mut [f32]) {
    let d = f16(b.d);
    for j in 0..16 {
        y[j] = d * KVALUES_IQ4NL[(b.qs[j] & 0xF) as usize] as f32;
        y[j + 16] = d * KVALUES_IQ4NL[(b.qs[j] >> 4) as usize] as f32;
    }
}

pub fn q2_k(b: &BlockQ2K, y: &mut [f32]) {
    let (d, dmin) = (f16(b.d), f16(b.dmin));
    let mut is = 0;
    let mut out = 0;
    for n in 0..2 {
        let q = &b.qs[32 * n..32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = b.scales[is];
                is += 1;
                let dl = d * (sc & 0xF) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for l in 0..16 {
                    y[out] = dl * ((q[16 * half + l] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

pub fn q3_k(b: &BlockQ3K, y: &mut [f32]) {
    let d_all = f16(b.d);
    let mut is = 0;
    let mut out = 0;
    let mut m = 1u8;
    for n in 0..2 {
        let q = &b.qs[32 * n..32 * n + 32];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * scale_q3k(is, &b.scales) as f32;
                is += 1;
                for l in 0..16 {
                    let i = 16 * half + l;
                    let low = ((q[i] >> shift) & 3) as i32;
                    let sub = if b.hmask[i] & m != 0 { 0 } else { 4 };
                    y[out] = dl * (low - sub) as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

pub fn q4_k(b: &BlockQ4K, y: &mut [f32]) {
    let (d, dmin) = (f16(b.d), f16(b.dmin));
    for j in 0..4 {
        let q = &b.qs[32 * j..32 * j + 32];
        let (sc1, m1) = scale_min_k4(2 * j, &b.scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let y = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0xF) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

pub fn q5_k(b: &BlockQ5K, y: &mut [f32]) {
    let (d, dmin) = (f16(b.d), f16(b.dmin));
    for j in 0..4 {
        let ql = &b.qs[32 * j..32 * j + 32];
        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
        let (sc1, m1) = scale_min_k4(2 * j, &b.scales);
        let (sc2, m2) = scale_min_k4(2 * j + 1, &b.scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let y = &mut y[64 * j..64 * j + 64];
        for l in 0..32 {
            let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
    }
}

pub fn q6_k(b: &BlockQ6K, y: &mut [f32]) {
    let d = f16(b.d);
    for n in 0..2 {
        let ql = &b.ql[64 * n..64 * n + 64];
        let qh = &b.qh[32 * n..32 * n + 32];
        let sc = &b.scales[8 * n..8 * n + 8];
        let y = &mut y[128 * n..128 * n + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
        }
    }
}

#[inline(always)]
pub fn q8_k(b: &BlockQ8K, y: &mut [f32]) {
    let d = f32::from_le_bytes(b.d);
    for j in 0..256 {
        y[j] = d * (b.qs[j] as i8) as f32;
    }
}
