//! Activation rows quantized to 32-element Q8 blocks for the integer dot kernels (`dot`,
//! `simd`, `simd_tile`), in a buffer reused across calls.

#[cfg(target_arch = "x86_64")]
use super::{simd, simd_tile};
use rayon::prelude::*;
use std::cell::RefCell;

/// Per 32-element activation block: what the kernels need besides the quants.
#[derive(Clone, Copy, Debug, Default)]
pub struct ActBlock {
    /// The scale d (x ~ d * q).
    pub d: f32,
    /// Sum of the quants, as f32 (exact: |sum| <= 32 * 127). Serves the min terms.
    pub sum: f32,
    /// `d * sum`: the Q4_1 min term is `m_w * ds`.
    pub ds: f32,
    /// Sum of the quants as i32 (the Q4_0/Q8_0 kernels fold offsets in integers).
    pub isum: i32,
}

/// One activation row quantized to 32-element Q8 blocks, as ggml's Q8_0/Q8_1 but with f32
/// scales (ggml rounds them to f16; keeping f32 is slightly more accurate and costs nothing).
#[derive(Clone, Copy)]
pub struct ActQ8<'a> {
    pub blk: &'a [ActBlock],
    /// The quants, 32 per block, in -127..=127 (never -128, which `maddubs` could not take).
    pub qs: &'a [i8],
}

/// Quantized activation rows `[batch, cols / 32]`, kept between calls so that decode does not
/// allocate.
#[derive(Default)]
pub struct ActsQ8 {
    nb: usize,
    batch: usize,
    blk: Vec<ActBlock>,
    qs: Vec<i8>,
    /// The rows interleaved in groups of up to [`LANES`] (see [`Self::fill_lanes`]).
    lanes: Vec<ActLanes>,
    lane_groups: usize,
}

/// Quantizes one 32-element block; returns its metadata.
pub(super) fn quantize_act_block(xb: &[f32], qb: &mut [i8]) -> ActBlock {
    let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    // A NaN/Inf activation makes the block's scale NaN, so it propagates to the output as in
    // the f32 path instead of being silently quantized to some finite value.
    let finite = xb.iter().all(|v| v.is_finite());
    let d = if finite { amax / 127.0 } else { f32::NAN };
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0i32;
    for (q, v) in qb.iter_mut().zip(xb) {
        // With a NaN d, id is NaN and the quants become 0 (valid); d carries the NaN.
        *q = (v * id).round().clamp(-127.0, 127.0) as i8;
        sum += *q as i32;
    }
    ActBlock {
        d,
        sum: sum as f32,
        ds: d * sum as f32,
        isum: sum,
    }
}

impl ActsQ8 {
    /// Quantizes `x` (`[batch, cols]`, cols a multiple of 32), reusing the buffers.
    pub fn fill(&mut self, x: &[f32], cols: usize) {
        let nb = cols / 32;
        let batch = x.len() / cols.max(1);
        self.nb = nb;
        self.batch = batch;
        self.lane_groups = 0;
        self.blk.resize(batch * nb, ActBlock::default());
        self.qs.resize(batch * nb * 32, 0);
        #[cfg(target_arch = "x86_64")]
        let avx2 = simd::has_avx2();
        let row = |((xr, blk), qs): ((&[f32], &mut [ActBlock]), &mut [i8])| {
            for ((xb, qb), m) in xr.chunks_exact(32).zip(qs.chunks_exact_mut(32)).zip(blk) {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2 checked above; both chunks hold exactly 32 elements.
                    if let Some((d, sum)) = unsafe { simd_tile::quantize_act_block(xb, qb) } {
                        *m = ActBlock {
                            d,
                            sum: sum as f32,
                            ds: d * sum as f32,
                            isum: sum,
                        };
                        continue;
                    }
                }
                *m = quantize_act_block(xb, qb);
            }
        };
        let (blk, qs) = (&mut self.blk[..batch * nb], &mut self.qs[..batch * nb * 32]);
        // Quantizing is ~1% of a product; parallel only where a prompt makes it worth a join.
        if batch >= 16 {
            x.par_chunks(cols)
                .zip(blk.par_chunks_mut(nb))
                .zip(qs.par_chunks_mut(nb * 32))
                .for_each(row);
        } else {
            x.chunks(cols)
                .zip(blk.chunks_mut(nb))
                .zip(qs.chunks_mut(nb * 32))
                .for_each(row);
        }
    }

    /// Interleaves the rows of the last `fill` for the lanes kernels: groups of [`LANES`]
    /// rows, and a last group of the rows left if there are at least `min_rows` of them (fewer
    /// are left to the one-row kernels). Returns the rows the groups cover.
    pub fn fill_lanes(&mut self, min_rows: usize) -> usize {
        let mut lanes = std::mem::take(&mut self.lanes);
        let mut covered = 0;
        let mut g = 0;
        while covered < self.batch {
            let n = LANES.min(self.batch - covered);
            if n < LANES && n < min_rows {
                break;
            }
            if lanes.len() == g {
                lanes.push(ActLanes::default());
            }
            let rows: Vec<ActQ8> = (covered..covered + n).map(|b| self.row(b)).collect();
            lanes[g].fill(&rows);
            covered += n;
            g += 1;
        }
        self.lanes = lanes;
        self.lane_groups = g;
        covered
    }

    /// The groups built by the last [`Self::fill_lanes`] (none after a `fill`), in row order.
    pub fn lanes(&self) -> &[ActLanes] {
        &self.lanes[..self.lane_groups]
    }

    pub fn row(&self, b: usize) -> ActQ8<'_> {
        let nb = self.nb;
        ActQ8 {
            blk: &self.blk[b * nb..(b + 1) * nb],
            qs: &self.qs[b * nb * 32..(b + 1) * nb * 32],
        }
    }
}

/// Activation rows the lanes kernels take at once (one f32 lane each).
pub const LANES: usize = 8;

/// One 32-element block of [`ActLanes`]: everything the lanes kernels read for it, together.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct LaneBlock {
    /// 8 groups of 4 quants, each group holding the 4 quants of every lane side by side
    /// (`[group][lane][4]`).
    pub qs: [i8; 32 * LANES],
    /// Each lane's scale `d`, `d * sum` and quant sum.
    pub d: [f32; LANES],
    pub ds: [f32; LANES],
    pub isum: [i32; LANES],
    /// Each lane's quant sums over elements 0..16 and 16..32, as two i16 (low half, high
    /// half; |sum| <= 16 * 127): Q6_K scales each 16 elements on its own, and its -32 offset
    /// meets these sums.
    pub hsums: [i32; LANES],
}

impl Default for LaneBlock {
    fn default() -> Self {
        Self {
            qs: [0; 32 * LANES],
            d: [0.0; LANES],
            ds: [0.0; LANES],
            isum: [0; LANES],
            hsums: [0; LANES],
        }
    }
}

/// The quant sums of a block's two 16-element halves, packed as [`LaneBlock::hsums`] keeps
/// them.
pub fn half_sums(qs: &[i8]) -> i32 {
    let sum = |h: &[i8]| h.iter().map(|&q| i32::from(q)).sum::<i32>() as i16 as u16;
    (u32::from(sum(&qs[..16])) | u32::from(sum(&qs[16..32])) << 16) as i32
}

/// Up to [`LANES`] activation rows interleaved for the lanes kernels (`simd_tile::*_lanes`),
/// so that one 32-byte load meets a broadcast group of 4 weight quants with all rows at once.
/// Lanes past the rows given repeat the last of them.
#[derive(Default)]
pub struct ActLanes {
    /// Rows given (the other lanes copy the last one).
    rows: usize,
    /// `[nb]`.
    pub blocks: Vec<LaneBlock>,
}

impl ActLanes {
    /// Interleaves `rows` (1..=LANES rows of the same width), reusing the buffers.
    pub fn fill(&mut self, rows: &[ActQ8]) {
        assert!(!rows.is_empty() && rows.len() <= LANES);
        let nb = rows[0].blk.len();
        self.rows = rows.len();
        self.blocks.resize(nb, LaneBlock::default());
        for t in 0..LANES {
            let a = &rows[t.min(rows.len() - 1)];
            for (i, lb) in self.blocks.iter_mut().enumerate() {
                let b = a.blk[i];
                lb.d[t] = b.d;
                lb.ds[t] = b.ds;
                lb.isum[t] = b.isum;
                lb.hsums[t] = half_sums(&a.qs[32 * i..32 * i + 32]);
                for g in 0..8 {
                    let at = g * 4 * LANES + 4 * t;
                    lb.qs[at..at + 4].copy_from_slice(&a.qs[32 * i + 4 * g..32 * i + 4 * g + 4]);
                }
            }
        }
    }

    /// Blocks per row.
    pub fn nb(&self) -> usize {
        self.blocks.len()
    }

    /// Rows given to `fill`.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

impl ActQ8<'static> {
    /// An empty row for paths that do not quantize activations.
    pub(super) const EMPTY: Self = ActQ8 { blk: &[], qs: &[] };
}

thread_local! {
    /// The calling thread's activation buffer (decode calls this ~150 times per token).
    pub(super) static ACTS: RefCell<ActsQ8> = RefCell::default();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 activation quantizer is bit-identical to the scalar one, ties and clamps
    /// included, and leaves non-finite blocks to it.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_act_quantization_matches_scalar() {
        if !simd::has_avx2() {
            return;
        }
        let mut blocks: Vec<Vec<f32>> = vec![
            // Exact .5 ties after scaling (amax 127 gives id = 1), both signs, and zeros.
            (0..32).map(|i| (i as f32 - 16.0) + 0.5).chain([]).collect(),
            vec![0.0; 32],
            vec![-0.0; 32],
            (0..32)
                .map(|i| {
                    if i == 5 {
                        127.0
                    } else {
                        (i as f32) * 2.5 - 40.0
                    }
                })
                .collect(),
            (0..32).map(|i| 1e-30 * (i as f32 - 7.0)).collect(),
        ];
        blocks[0][31] = 127.0;
        let mut s = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..2000 {
            blocks.push(
                (0..32)
                    .map(|_| {
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        ((s >> 40) as f32 / 8388608.0 - 1.0) * 10f32.powi((s % 7) as i32 - 3)
                    })
                    .collect(),
            );
        }
        for xb in &blocks {
            let (mut q1, mut q2) = ([0i8; 32], [0i8; 32]);
            let m = quantize_act_block(xb, &mut q1);
            // SAFETY: AVX2 checked above; 32-element block.
            let (d, sum) = unsafe { simd_tile::quantize_act_block(xb, &mut q2) }.unwrap();
            assert_eq!(q1, q2, "{xb:?}");
            assert_eq!((m.d.to_bits(), m.isum), (d.to_bits(), sum), "{xb:?}");
        }
        let mut nan = vec![1.0f32; 32];
        nan[3] = f32::NAN;
        // SAFETY: as above.
        assert!(unsafe { simd_tile::quantize_act_block(&nan, &mut [0; 32]) }.is_none());
        nan[3] = f32::NEG_INFINITY;
        // SAFETY: as above.
        assert!(unsafe { simd_tile::quantize_act_block(&nan, &mut [0; 32]) }.is_none());
    }
}
