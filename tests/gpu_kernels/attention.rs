//! The split decode attention (`attn_decode_part_f16kv_f32` + `attn_merge_f32`): a long
//! context's positions spread over blocks, their partial softmax sums merged.

use super::*;
use rocmforge::backend::gpu::ops::{attn_part_bytes, ATTN_MAX_SPLITS, ATTN_SPLIT_CHUNK};

/// f64 reference of one decode query per head over cache positions `first..len`
/// (`k`, `v`: `[kv_head, seq_cap, head_dim]`).
fn decode_ref(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    kv: KvLayout,
    n_heads: usize,
    first: usize,
    len: usize,
) -> Vec<f32> {
    let (hd, gqa) = (kv.head_dim, n_heads / kv.n_kv_heads);
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; n_heads * hd];
    for h in 0..n_heads {
        let row = |p: usize| ((h / gqa) * kv.seq_cap + p) * hd;
        let scores: Vec<f64> = (first..len)
            .map(|p| {
                (0..hd)
                    .map(|e| f64::from(q[h * hd + e]) * f64::from(k[row(p) + e]))
                    .sum::<f64>()
                    * scale
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for e in 0..hd {
            let o: f64 = (first..len)
                .map(|p| (scores[p - first] - m).exp() / z * f64::from(v[row(p) + e]))
                .sum();
            out[h * hd + e] = o as f32;
        }
    }
    out
}

/// Decode at contexts long enough to split (a few blocks, and the most splits with longer
/// chunks; a sliding window that splits and one that does not): within 1e-4 of the f64
/// reference, the one-block kernel's result within 1e-5 of the split one, and the fused
/// q8a output the same bits as the split output quantized by quantize_q8a.
pub(super) fn check_split_decode<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    t: &mut Table,
    rng: &mut ChaCha8Rng,
    head_dim: usize,
) {
    let n_heads = 8;
    let kv = KvLayout {
        n_kv_heads: 2,
        head_dim,
        seq_cap: 9_100,
    };
    let n = kv.n_kv_heads * kv.seq_cap * kv.head_dim;
    // The cache as f16 values (what the kernels read), random and never zero.
    let k16: Vec<f16> = rand_vec(rng, n, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let v16: Vec<f16> = rand_vec(rng, n, 1.0)
        .into_iter()
        .map(f16::from_f32)
        .collect();
    let (kf, vf): (Vec<f32>, Vec<f32>) = (
        k16.iter().map(|x| x.to_f32()).collect(),
        v16.iter().map(|x| x.to_f32()).collect(),
    );
    let kc = upload(d, &k16, "k cache").expect("upload");
    let vc = upload(d, &v16, "v cache").expect("upload");
    // The same caches 2 bytes into their buffers: not 16-byte aligned, so the split kernel
    // reads them with 2-byte loads (rf_attn_warp) instead of rf_attn_warp_wide's 16-byte ones.
    let shifted = |x: &[f16], what| {
        let mut v = vec![f16::ZERO];
        v.extend_from_slice(x);
        upload(d, &v, what).expect("upload")
    };
    let (kc2, vc2) = (shifted(&k16, "k cache + 2"), shifted(&v16, "v cache + 2"));
    let (kc_odd, vc_odd) = (
        view(&kc2, 2, n * 2).expect("view"),
        view(&vc2, 2, n * 2).expect("view"),
    );
    let part = d
        .alloc(attn_part_bytes(n_heads, head_dim), "partials")
        .expect("alloc");
    let width = n_heads * head_dim;
    let q = rand_vec(rng, width, 1.0);
    let qd = up(d, &q);
    let (o_split, o_one) = (
        d.alloc(width * 4, "o split").expect("alloc"),
        d.alloc(width * 4, "o one").expect("alloc"),
    );
    let o_odd = d.alloc(width * 4, "o unaligned").expect("alloc");
    let read = |b: &D::Buf| b.to_vec::<f32>(width).expect("read");
    // (positions in the cache, window): 2 splits with a short last one; the most splits with
    // chunks longer than ATTN_SPLIT_CHUNK; a window that splits; one that does not.
    let most = ATTN_SPLIT_CHUNK * ATTN_MAX_SPLITS + 700;
    for (len, window) in [
        (ATTN_SPLIT_CHUNK + 1, 0usize),
        (most.min(kv.seq_cap), 0),
        (4_000, 1_000),
        (4_000, 200),
    ] {
        let a = AttnParams {
            n_tokens: 1,
            n_heads,
            kv,
            pos0: len - 1,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window,
        };
        d.attention_q8a(s, &qd, &kc, &vc, &o_split, a, None, Some(&part))
            .expect("split decode");
        d.attention(s, &qd, &kc, &vc, &o_one, a)
            .expect("one-block decode");
        s.synchronize().expect("sync");
        let first = if window > 0 {
            len.saturating_sub(window)
        } else {
            0
        };
        let want = decode_ref(&q, &kf, &vf, kv, n_heads, first, len);
        let got = read(&o_split);
        let label =
            format!("attn_decode_part + attn_merge (d{head_dim}, {len} pos, window {window})");
        t.add(&label, "f16kv", rel_err(&got, &want), 1e-4);
        d.attention_q8a(s, &qd, &kc_odd, &vc_odd, &o_odd, a, None, Some(&part))
            .expect("split decode, unaligned caches");
        s.synchronize().expect("sync");
        t.add(
            &format!("{label}, caches not 16-byte aligned"),
            "f16kv",
            rel_err(&read(&o_odd), &want),
            1e-4,
        );
        t.add(
            &format!("{label} vs one block"),
            "f16kv",
            rel_err(&got, &read(&o_one)),
            1e-5,
        );
        // The merge's q8a output: the same bits as quantize_q8a of its f32 output.
        let sep = d.alloc(q8a_bytes(1, width), "xq").expect("alloc");
        d.quantize_q8a(s, &o_split, &sep, 1, width)
            .expect("quantize");
        let xq = d.alloc(q8a_bytes(1, width), "xq fused").expect("alloc");
        let (quants, scales) = (
            view(&xq, 0, width).expect("view"),
            view(&xq, width, width / 32 * 8).expect("view"),
        );
        let o2 = d.alloc(width * 4, "o2").expect("alloc");
        d.attention_q8a(
            s,
            &qd,
            &kc,
            &vc,
            &o2,
            a,
            Some((&quants, &scales)),
            Some(&part),
        )
        .expect("split decode, quantized");
        s.synchronize().expect("sync");
        let same = o2.to_vec::<u32>(width).expect("read")
            == o_split.to_vec::<u32>(width).expect("read")
            && xq.to_vec::<u8>(q8a_bytes(1, width)).expect("read")
                == sep.to_vec::<u8>(q8a_bytes(1, width)).expect("read");
        t.add(
            &format!("attn_merge q8a == split + quantize_q8a (bits, d{head_dim}, {len} pos)"),
            "f16kv",
            if same { 0.0 } else { 1.0 },
            0.0,
        );
    }
}

/// A test's KV pool on the host, laid out as the device's (`ops::KvBlocks`): `blocks` blocks
/// of `bt` positions, each `n_layer` layers of K and V planes `[n_kv_heads, bt, head_dim]` f16.
struct HostPool {
    kv: KvLayout,
    bt: usize,
    n_layer: usize,
    blocks: usize,
}

impl HostPool {
    fn plane_bytes(&self) -> usize {
        self.kv.plane_bytes(self.bt)
    }

    fn block_bytes(&self) -> usize {
        2 * self.n_layer * self.plane_bytes()
    }

    fn bytes(&self) -> usize {
        self.blocks * self.block_bytes()
    }

    /// `layer`'s K and V planes in block 0 of the device pool `b`, reaching its end.
    fn planes<'b, B: rocmforge::backend::DeviceBuffer>(
        &self,
        b: &'b B,
        layer: usize,
    ) -> (
        rocmforge::backend::gpu::View<'b>,
        rocmforge::backend::gpu::View<'b>,
    ) {
        let (v, plane) = (rocmforge::backend::gpu::View::of(b), self.plane_bytes());
        let at = |off: usize| v.slice(off, self.bytes() - off).expect("plane");
        (at(2 * layer * plane), at((2 * layer + 1) * plane))
    }

    fn geometry(&self) -> rocmforge::backend::gpu::ops::KvBlocks {
        rocmforge::backend::gpu::ops::KvBlocks {
            block_tokens: self.bt,
            block_bytes: self.block_bytes(),
            blocks: self.blocks,
        }
    }

    /// Byte offset of position `p`, head `h` of `layer`'s K (`plane` 0) or V (1) for the
    /// sequence whose blocks are `table`.
    fn at(&self, table: &[u32], layer: usize, plane: usize, h: usize, p: usize) -> usize {
        let hd = self.kv.head_dim;
        table[p / self.bt] as usize * self.block_bytes()
            + (2 * layer + plane) * self.plane_bytes()
            + (h * self.bt + p % self.bt) * hd * 2
    }

    /// `layer`'s K (plane 0) or V (1) of the sequence `table`, gathered as a contiguous
    /// `[n_kv_heads, seq_cap, head_dim]` f16 cache (positions past the table stay 0).
    fn gather(&self, pool: &[u8], table: &[u32], layer: usize, plane: usize) -> Vec<u8> {
        let (hd, cap) = (self.kv.head_dim, self.kv.seq_cap);
        let mut out = vec![0u8; self.kv.bytes()];
        for h in 0..self.kv.n_kv_heads {
            for p in 0..(table.len() * self.bt).min(cap) {
                let src = self.at(table, layer, plane, h, p);
                let dst = (h * cap + p) * hd * 2;
                out[dst..dst + hd * 2].copy_from_slice(&pool[src..src + hd * 2]);
            }
        }
        out
    }

    /// The inverse of [`Self::gather`]: writes a contiguous cache into the sequence's blocks.
    fn scatter(&self, pool: &mut [u8], table: &[u32], layer: usize, plane: usize, c: &[u8]) {
        let (hd, cap) = (self.kv.head_dim, self.kv.seq_cap);
        for h in 0..self.kv.n_kv_heads {
            for p in 0..(table.len() * self.bt).min(cap) {
                let dst = self.at(table, layer, plane, h, p);
                let src = (h * cap + p) * hd * 2;
                pool[dst..dst + hd * 2].copy_from_slice(&c[src..src + hd * 2]);
            }
        }
    }
}

/// Random f16 bytes of `n` values.
fn f16_bytes(rng: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    rand_vec(rng, n, 1.0)
        .iter()
        .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
        .collect()
}

/// `n` distinct block ids below `blocks`, in a random order (a sequence's table in a pool
/// others share).
fn shuffled_blocks(rng: &mut ChaCha8Rng, blocks: usize, n: usize) -> Vec<u32> {
    use rand::seq::SliceRandom;
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    ids.shuffle(rng);
    ids.truncate(n);
    ids
}

/// The paged K/V store and attention (a cache's rows found through a block table in a pool,
/// kernels/common.cuh's RfKvMap) against the contiguous ones over the same rows: a decode in
/// one block, a decode that splits across blocks (flash-decoding), one with a sliding window,
/// and a prefill in tiles, each after storing its new rows both ways; outputs the same bits,
/// and the pool's rows gathered back equal the contiguous caches.
pub(super) fn check_paged_attention<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    t: &mut Table,
    rng: &mut ChaCha8Rng,
    head_dim: usize,
) {
    use rocmforge::backend::gpu::ops::KvPages;
    let n_heads = 8;
    let kv = KvLayout {
        n_kv_heads: 2,
        head_dim,
        seq_cap: 1024,
    };
    let hp = HostPool {
        kv,
        bt: 16,
        n_layer: 2,
        blocks: 1024 / 16 + 9,
    };
    let table = shuffled_blocks(rng, hp.blocks, kv.seq_cap / hp.bt);
    let table_buf = upload(d, &table, "block table").expect("table");
    let part = d
        .alloc(attn_part_bytes(n_heads, head_dim), "partials")
        .expect("alloc");
    // (tokens, first position, window): decode in one block, split decode, windowed split
    // decode, a tiled prefill.
    for (n_tok, pos0, window) in [
        (1usize, 37usize, 0usize),
        (1, 900, 0),
        (1, 700, 37),
        (40, 20, 0),
    ] {
        let (kc_host, vc_host) = (
            f16_bytes(rng, kv.bytes() / 2),
            f16_bytes(rng, kv.bytes() / 2),
        );
        let mut pool_host = f16_bytes(rng, hp.bytes() / 2);
        hp.scatter(&mut pool_host, &table, 1, 0, &kc_host);
        hp.scatter(&mut pool_host, &table, 1, 1, &vc_host);
        let (kc, vc) = (
            upload(d, &kc_host, "k").expect("k"),
            upload(d, &vc_host, "v").expect("v"),
        );
        let pool = upload(d, &pool_host, "pool").expect("pool");
        let plane = hp.plane_bytes();
        let (kp, vp) = hp.planes(&pool, 1);
        let pages = KvPages {
            table: &table_buf,
            pool: hp.geometry(),
        };
        let kd = kv.n_kv_heads * head_dim;
        let (kx, vx) = (
            up(d, &rand_vec(rng, n_tok * kd, 1.0)),
            up(d, &rand_vec(rng, n_tok * kd, 1.0)),
        );
        d.kv_store2(s, &kx, &kc, &vx, &vc, kv, n_tok, pos0)
            .expect("kv_store2");
        d.kv_store2_paged(s, &kx, &kp, &vx, &vp, kv, pages, n_tok, pos0)
            .expect("kv_store2_paged");
        let qn = n_tok * n_heads * head_dim;
        let q = up(d, &rand_vec(rng, qn, 1.0));
        let (oc, op) = (up(d, &vec![0f32; qn]), up(d, &vec![0f32; qn]));
        let a = AttnParams {
            n_tokens: n_tok,
            n_heads,
            kv,
            pos0,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window,
        };
        d.attention_q8a(s, &q, &kc, &vc, &oc, a, None, Some(&part))
            .expect("contiguous");
        d.attention_paged(s, &q, (&kp, &vp), &op, a, Some(pages), None, Some(&part))
            .expect("paged");
        s.synchronize().expect("sync");
        let same_out =
            oc.to_vec::<u8>(qn * 4).expect("read") == op.to_vec::<u8>(qn * 4).expect("read");
        let pool_after = pool.to_vec::<u8>(hp.bytes()).expect("read");
        let same_kv = hp.gather(&pool_after, &table, 1, 0)
            == kc.to_vec::<u8>(kv.bytes()).expect("k")
            && hp.gather(&pool_after, &table, 1, 1) == vc.to_vec::<u8>(kv.bytes()).expect("v");
        // Layer 0's planes and the blocks outside the table: untouched.
        let mut others = pool_after.clone();
        let mut before = pool_host.clone();
        for tb in &table {
            let (b0, b1) = (
                *tb as usize * hp.block_bytes(),
                (*tb as usize + 1) * hp.block_bytes(),
            );
            others[b0 + 2 * plane..b1].fill(0);
            before[b0 + 2 * plane..b1].fill(0);
        }
        let untouched = others == before;
        t.add(
            &format!(
                "paged attention == contiguous (d{head_dim}, {n_tok} at {pos0}, window {window})"
            ),
            "f16",
            if same_out && same_kv && untouched {
                0.0
            } else {
                1.0
            },
            0.0,
        );
    }
}

/// A batched decode step's K/V store and attention (`kv_store2_batch_f32_f16`,
/// `attn_decode_batch_f16kv_f32`) against the per-sequence paged launches: three sequences in
/// one pool of two-layer blocks (their tables shuffled over it; layer 1 runs), rows 0, 2 and 3
/// of a four-row step (row 1 belongs to no table entry and must stay untouched), positions 0,
/// 37 and 200, with and without the quantized output: pools, outputs and q8a bytes the same
/// bits.
pub(super) fn check_batched_decode<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    t: &mut Table,
    rng: &mut ChaCha8Rng,
    head_dim: usize,
) {
    use rocmforge::backend::gpu::ops::{seq_kv_entry, KvPages};
    use rocmforge::backend::gpu::View;
    use rocmforge::backend::DeviceBuffer;
    let (n_heads, rows) = (8usize, 4usize);
    let kv = KvLayout {
        n_kv_heads: 2,
        head_dim,
        seq_cap: 256,
    };
    let hp = HostPool {
        kv,
        bt: 16,
        n_layer: 2,
        blocks: 3 * 256 / 16 + 5,
    };
    let (qd, kd) = (n_heads * head_dim, kv.n_kv_heads * head_dim);
    let seqs = [(0usize, 0usize), (2, 37), (3, 200)]; // (row, position)
    let (q, k, v) = (
        rand_vec(rng, rows * qd, 1.0),
        rand_vec(rng, rows * kd, 1.0),
        rand_vec(rng, rows * kd, 1.0),
    );
    let (qb, kb, vb) = (up(d, &q), up(d, &k), up(d, &v));
    // The sequences' tables: disjoint blocks of the pool, shuffled.
    let ids = shuffled_blocks(rng, hp.blocks, 3 * 16);
    let tl = 16;
    let tables = upload(d, &ids, "block tables").expect("tables");
    let history = f16_bytes(rng, hp.bytes() / 2);
    let (batched, alone) = (
        upload(d, &history, "batched pool").expect("pool"),
        upload(d, &history, "alone pool").expect("pool"),
    );
    let entries: Vec<[u64; 2]> = seqs
        .iter()
        .enumerate()
        .map(|(i, &(row, pos))| seq_kv_entry(tables.device_ptr() + (i * tl * 4) as u64, pos, row))
        .collect();
    let table = upload(d, &entries, "seq table").expect("table");
    let attn = AttnParams {
        n_tokens: 1,
        n_heads,
        kv,
        pos0: 0,
        scale: 1.0 / (head_dim as f32).sqrt(),
        window: 0,
    };
    let qb_bytes = q8a_bytes(rows, qd);
    for quantized in [false, true] {
        let (ob, oa) = (
            up(d, &vec![7.0f32; rows * qd]),
            up(d, &vec![7.0f32; rows * qd]),
        );
        let (xb, xa) = (
            d.alloc(qb_bytes, "q8 out").expect("alloc"),
            d.alloc(qb_bytes, "q8 out").expect("alloc"),
        );
        xb.zero().expect("zero");
        xa.zero().expect("zero");
        fn split<B: DeviceBuffer>(x: &B, rows: usize, qd: usize) -> (View<'_>, View<'_>) {
            let v = View::of(x);
            (
                v.slice(0, rows * qd).expect("quants"),
                v.slice(rows * qd, rows * (qd / 32) * 8).expect("scales"),
            )
        }
        fn row_of<B: DeviceBuffer>(b: &B, row: usize, w: usize) -> View<'_> {
            View::of(b).slice(row * w * 4, w * 4).expect("row")
        }
        let (bq, bm) = split(&xb, rows, qd);
        let (kpb, vpb) = hp.planes(&batched, 1);
        // SAFETY: the table's three entries point at 16-entry rows of `tables` (block ids
        // below the pool's count), positions below seq_cap, rows below `rows`.
        unsafe {
            d.kv_store2_batch(
                s,
                &kb,
                &vb,
                &table,
                seqs.len(),
                rows,
                (&kpb, &vpb),
                hp.geometry(),
                kv,
            )
            .expect("kv_store2_batch");
            d.attention_decode_batch(
                s,
                &qb,
                &table,
                seqs.len(),
                rows,
                (&kpb, &vpb),
                hp.geometry(),
                &ob,
                attn,
                quantized.then_some((&bq as &dyn DeviceBuffer, &bm as &dyn DeviceBuffer)),
            )
            .expect("attention_decode_batch");
        }
        let (aq, am) = split(&xa, rows, qd);
        let (kpa, vpa) = hp.planes(&alone, 1);
        for (i, &(row, pos)) in seqs.iter().enumerate() {
            let tv = View::of(&tables)
                .slice(i * tl * 4, tl * 4)
                .expect("table row");
            let pages = KvPages {
                table: &tv,
                pool: hp.geometry(),
            };
            d.kv_store2_paged(
                s,
                &row_of(&kb, row, kd),
                &kpa,
                &row_of(&vb, row, kd),
                &vpa,
                kv,
                pages,
                1,
                pos,
            )
            .expect("kv_store2_paged");
            let q8 = quantized.then(|| {
                (
                    aq.slice(row * qd, qd).expect("q"),
                    am.slice(row * (qd / 32) * 8, qd / 32 * 8).expect("m"),
                )
            });
            d.attention_paged(
                s,
                &row_of(&qb, row, qd),
                (&kpa, &vpa),
                &row_of(&oa, row, qd),
                AttnParams { pos0: pos, ..attn },
                Some(pages),
                q8.as_ref()
                    .map(|(a, b)| (a as &dyn DeviceBuffer, b as &dyn DeviceBuffer)),
                None,
            )
            .expect("attention_paged");
        }
        s.synchronize().expect("sync");
        let same_out = ob.to_vec::<u8>(rows * qd * 4).expect("read")
            == oa.to_vec::<u8>(rows * qd * 4).expect("read");
        let untouched = ob.to_vec::<f32>(rows * qd).expect("read")[qd..2 * qd]
            .iter()
            .all(|&x| x == 7.0);
        let same_q8 = !quantized
            || xb.to_vec::<u8>(qb_bytes).expect("read") == xa.to_vec::<u8>(qb_bytes).expect("read");
        let same_kv = batched.to_vec::<u8>(hp.bytes()).expect("read")
            == alone.to_vec::<u8>(hp.bytes()).expect("read");
        // The stores reached the pool (the new rows differ from the random history).
        let stored = batched.to_vec::<u8>(hp.bytes()).expect("read") != history;
        t.add(
            &format!(
                "attn_decode_batch + kv_store2_batch == per sequence (d{head_dim}, q8 {quantized})"
            ),
            "f16",
            if same_out && untouched && same_q8 && same_kv && stored {
                0.0
            } else {
                1.0
            },
            0.0,
        );
    }
}
