//! On-disk block layouts, byte for byte as ggml's `ggml-common.h` stores them.
//!
//! Every field is a byte array, so every block has alignment 1: a `&[u8]` straight out of an
//! mmap (any alignment) can be viewed as `&[BlockX]` without copying, and every bit pattern is a
//! valid value. Multi-byte scalars are little-endian and read through the helpers below.

use super::GgmlType;

/// A block type that can be viewed in place over raw bytes.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, have alignment 1, no padding, and accept every bit pattern
/// (only `u8` arrays as fields).
pub unsafe trait Block: Copy + Send + Sync + 'static {
    /// The ggml type this block belongs to.
    const TYPE: GgmlType;
    /// Elements per block.
    const ELEMS: usize;
}

macro_rules! block {
    ($(#[$m:meta])* $name:ident, $ty:ident, $elems:expr, $bytes:expr, { $($f:ident : [u8; $n:expr]),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug)]
        pub struct $name { $(pub $f: [u8; $n]),* }
        const _: () = assert!(std::mem::size_of::<$name>() == $bytes);
        const _: () = assert!(std::mem::align_of::<$name>() == 1);
        // SAFETY: repr(C), only u8-array fields (alignment 1, no padding, any bit pattern valid).
        unsafe impl Block for $name {
            const TYPE: GgmlType = GgmlType::$ty;
            const ELEMS: usize = $elems;
        }
    };
}

block!(
    /// 32 weights, 4.5 bits each: `y = d * (q - 8)`. Low nibbles hold elements 0..16, high 16..32.
    BlockQ4_0, Q4_0, 32, 18, { d: [u8; 2], qs: [u8; 16] }
);
block!(
    /// 32 weights, 5 bits each: `y = d * q + m`, q in 0..16.
    BlockQ4_1, Q4_1, 32, 20, { d: [u8; 2], m: [u8; 2], qs: [u8; 16] }
);
block!(
    /// 32 weights, 5.5 bits each: `y = d * (q - 16)`; bit 4 of element j is bit j of `qh`.
    BlockQ5_0, Q5_0, 32, 22, { d: [u8; 2], qh: [u8; 4], qs: [u8; 16] }
);
block!(
    /// 32 weights, 6 bits each: `y = d * q + m`, q in 0..32.
    BlockQ5_1, Q5_1, 32, 24, { d: [u8; 2], m: [u8; 2], qh: [u8; 4], qs: [u8; 16] }
);
block!(
    /// 32 weights, 8.5 bits each: `y = d * q`, q an i8.
    BlockQ8_0, Q8_0, 32, 34, { d: [u8; 2], qs: [u8; 32] }
);
block!(
    /// 32 activations, 9 bits each: `y = d * q`; `s = d * sum(q)` (an f16) serves Q4_1/Q5_1 dots.
    BlockQ8_1, Q8_1, 32, 36, { d: [u8; 2], s: [u8; 2], qs: [u8; 32] }
);
block!(
    /// 256 weights, 2.625 bits each: 16 sub-blocks of 16 with 4-bit scale (low) and min (high)
    /// in `scales`; `y = d * sc * q - dmin * m`, q in 0..4.
    BlockQ2K, Q2_K, 256, 84, { scales: [u8; 16], qs: [u8; 64], d: [u8; 2], dmin: [u8; 2] }
);
block!(
    /// 256 weights, 3.4375 bits each: 16 sub-blocks of 16 with signed 6-bit scales packed in 12
    /// bytes; q = low 2 bits from `qs` minus 4 unless the `hmask` bit is set; `y = d * (sc - 32) * q`.
    BlockQ3K, Q3_K, 256, 110, { hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: [u8; 2] }
);
block!(
    /// 256 weights, 4.5 bits each: 8 sub-blocks of 32 with 6-bit scale and min packed in 12 bytes;
    /// `y = d * sc * q - dmin * m`, q in 0..16.
    BlockQ4K, Q4_K, 256, 144, { d: [u8; 2], dmin: [u8; 2], scales: [u8; 12], qs: [u8; 128] }
);
block!(
    /// 256 weights, 5.5 bits each: as Q4_K plus a fifth bit per weight in `qh`.
    BlockQ5K, Q5_K, 256, 176, { d: [u8; 2], dmin: [u8; 2], scales: [u8; 12], qh: [u8; 32], qs: [u8; 128] }
);
block!(
    /// 256 weights, 6.5625 bits each: 16 sub-blocks of 16 with i8 scales; `y = d * sc * (q - 32)`.
    BlockQ6K, Q6_K, 256, 210, { ql: [u8; 128], qh: [u8; 64], scales: [u8; 16], d: [u8; 2] }
);
block!(
    /// 256 activations, 9.125 bits each: an f32 scale, i8 quants, and i16 sums of each 16.
    BlockQ8K, Q8_K, 256, 292, { d: [u8; 4], qs: [u8; 256], bsums: [u8; 32] }
);
block!(
    /// 32 weights, 4.5 bits each: `y = d * KVALUES_IQ4NL[q]` (a non-linear 16-entry codebook).
    BlockIQ4NL, IQ4_NL, 32, 18, { d: [u8; 2], qs: [u8; 16] }
);

/// The IQ4_NL codebook (ggml's `kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Views `bytes` as blocks; `None` unless the length is a whole number of blocks.
pub fn as_blocks<B: Block>(bytes: &[u8]) -> Option<&[B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: `Block` guarantees alignment 1 and that every bit pattern is valid; the length is
    // a whole number of blocks, and the lifetime is tied to `bytes`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) })
}

/// Views blocks as bytes (for building tensors).
pub fn blocks_as_bytes<B: Block>(blocks: &[B]) -> &[u8] {
    // SAFETY: `Block` types have no padding, so every byte is initialised; alignment 1 <= any.
    unsafe {
        std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks))
    }
}

/// Little-endian f16 to f32 (exact).
#[inline(always)]
pub fn f16(b: [u8; 2]) -> f32 {
    half::f16::from_le_bytes(b).to_f32()
}

/// f32 to little-endian f16, round to nearest even (as ggml's `GGML_FP32_TO_FP16`).
#[inline(always)]
pub fn to_f16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// Scale and min `j` (0..8) of a Q4_K/Q5_K block: 6 bits each, packed in 12 bytes.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Packs 8 scales and 8 mins (each < 64) the way `scale_min_k4` reads them.
pub fn pack_scale_min_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            q[j] = sc[j];
            q[j + 4] = m[j];
        } else {
            q[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            q[j - 4] |= (sc[j] >> 4) << 6;
            q[j] |= (m[j] >> 4) << 6;
        }
    }
    q
}

/// Signed scale `j` (0..16) of a Q3_K block, already offset by -32 (range -32..32).
#[inline(always)]
pub fn scale_q3k(j: usize, s: &[u8; 12]) -> i8 {
    let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
    let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    ((low | (high << 4)) as i8) - 32
}

/// Packs 16 Q3_K scales (each in -32..32) the way `scale_q3k` reads them.
pub fn pack_scale_q3k(sc: &[i8; 16]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for (j, &v) in sc.iter().enumerate() {
        let l = (v as i16 + 32).clamp(0, 63) as u8;
        if j < 8 {
            s[j] |= l & 0xF;
        } else {
            s[j - 8] |= (l & 0xF) << 4;
        }
        s[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k4_scale_packing_round_trips() {
        let sc = [0, 1, 17, 63, 32, 5, 63, 40];
        let m = [63, 2, 0, 31, 7, 63, 1, 44];
        let q = pack_scale_min_k4(&sc, &m);
        for j in 0..8 {
            assert_eq!(scale_min_k4(j, &q), (sc[j], m[j]), "j={j}");
        }
    }

    #[test]
    fn q3k_scale_packing_round_trips() {
        let sc: [i8; 16] = [
            -32, -1, 0, 31, 5, -7, 12, -20, 30, -30, 1, 2, 3, -4, 16, -16,
        ];
        let s = pack_scale_q3k(&sc);
        for (j, &v) in sc.iter().enumerate() {
            assert_eq!(scale_q3k(j, &s), v, "j={j}");
        }
    }

    #[test]
    fn as_blocks_rejects_partial_blocks() {
        assert!(as_blocks::<BlockQ4_0>(&[0u8; 35]).is_none());
        assert_eq!(as_blocks::<BlockQ4_0>(&[0u8; 36]).map(|b| b.len()), Some(2));
    }
}
