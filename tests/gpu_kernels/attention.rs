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
