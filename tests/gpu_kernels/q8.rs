//! The 8-bit activation path of `kernels/mmvq_q8.cu` and the kernels that fuse its quantization
//! (a child module of gpu_kernels.rs: the shared helpers and table come from there).

use super::*;
use rocmforge::backend::gpu::ops::{
    mma_pack_bytes, mma_pair_capable, mmvq8_mma_ks, mmvq8_wpr, MmaTiles, MMA_MAXN, MMA_PACKED_MAXN,
    MMVQN_MAX,
};

/// `x` quantized as `quantize_q8a_f32` does (32-element blocks, d = amax / 127 in f32,
/// q = round(x / d) via the f32 reciprocal): the quants, (d, quant sum) per block, and `d * q`.
fn quantize_q8a_ref(x: &[f32]) -> (Vec<i8>, Vec<[f32; 2]>, Vec<f32>) {
    let (mut qs, mut meta, mut deq) = (Vec::new(), Vec::new(), Vec::new());
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0f32;
        for v in b {
            let q = (v * id).round().clamp(-127.0, 127.0) as i8;
            qs.push(q);
            deq.push(d * f32::from(q));
            sum += f32::from(q);
        }
        meta.push([d, sum]);
    }
    (qs, meta, deq)
}

/// The 8-bit activation path: `quantize_q8a` must give the reference's quants and scales
/// bit for bit, and `mmvq_q8` the exact product of the weights with the quantized
/// activations (1 vector, and 11: a launch of 8 and one of 3); its distance to the f32
/// product (the quantization of the activations) is bounded loosely.
#[allow(clippy::too_many_arguments)]
pub(super) fn check_mmvq_q8<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    t: &mut Table,
    rng: &mut ChaCha8Rng,
    qt: GgmlType,
    w: &[u8],
    wd: &D::Buf,
    m: QMatrix,
) {
    let (rows, cols) = (m.nrows, m.ncols);
    let name = qt.name().to_lowercase();
    for nv in [1usize, 11] {
        let x = rand_vec(rng, nv * cols, 1.0);
        let (qs, meta, deq) = quantize_q8a_ref(&x);
        let xd = up(d, &x);
        let xq = d.alloc(q8a_bytes(nv, cols), "xq").expect("alloc");
        d.quantize_q8a(s, &xd, &xq, nv, cols).expect("quantize_q8a");
        let yd = d.alloc(nv * rows * 4, "y").expect("alloc");
        d.mmvq_q8(s, wd, m, &xq, &yd, nv).expect("mmvq_q8");
        s.synchronize().expect("sync");
        if nv == 1 {
            let bytes = xq.to_vec::<u8>(q8a_bytes(nv, cols)).expect("read xq");
            let (gq, gm) = bytes.split_at(nv * cols);
            let same_q = gq.iter().zip(&qs).all(|(a, b)| *a as i8 == *b);
            let same_m = gm
                .chunks_exact(8)
                .zip(&meta)
                .all(|(c, r)| c[..4] == r[0].to_le_bytes() && c[4..] == r[1].to_le_bytes());
            t.add(
                "quantize_q8a_f32 bit-equal",
                "F32",
                if same_q && same_m { 0.0 } else { 1.0 },
                0.0,
            );
        }
        let (mut yq, mut yf) = (vec![0f32; nv * rows], vec![0f32; nv * rows]);
        for j in 0..nv {
            let r = j * rows..(j + 1) * rows;
            let c = j * cols..(j + 1) * cols;
            matvec_exact(qt, w, rows, cols, &deq[c.clone()], &mut yq[r.clone()]).expect("oracle");
            matvec_exact(qt, w, rows, cols, &x[c], &mut yf[r]).expect("oracle");
        }
        let got = yd.to_vec::<f32>(nv * rows).expect("read");
        if nv == 1 {
            // The kernel's other shapes (warps per row) compute the same products.
            for wpr in [1u32, 2, 4, 8] {
                let yw = d.alloc(rows * 4, "y").expect("alloc");
                d.mmvq_q8_wpr(s, wd, m, &xq, &yw, 1, wpr, false)
                    .expect("mmvq_q8_wpr");
                s.synchronize().expect("sync");
                t.add(
                    &format!("mmvq_{name}_q8a_w{wpr} (vs quantized x)"),
                    qt.name(),
                    rel_err(&yw.to_vec::<f32>(rows).expect("read"), &yq),
                    1e-5,
                );
            }
        }
        t.add(
            &format!("mmvq_{name}_q8a x{nv} (vs quantized x)"),
            qt.name(),
            rel_err(&got, &yq),
            1e-5,
        );
        t.add(
            &format!("mmvq_{name}_q8a x{nv} (vs f32 x)"),
            qt.name(),
            rel_err(&got, &yf),
            2e-2,
        );
    }
}

/// The staged q8 products (`_s1/_s2/_s4`, `_sn`: rows copied through shared memory with 16-byte
/// loads) on rows of several chunks and a short last one (4,864 columns: 2 chunks of 2,048 and
/// 768 more; Q6_K, whose 4,864-column rows are not 16-byte multiples, 6,144): each form against
/// the product with the quantized activations, 1 vector and 11 (the `_sn` launches), and on
/// CUDA one warp per row the same bits as the GGUF-layout kernel (`_w1`: the same items in the
/// same order).
pub(super) fn check_mmvq_q8_staged<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    t: &mut Table,
    rng: &mut ChaCha8Rng,
) {
    let rows = 37usize;
    for qt in DEVICE_QTYPES.into_iter().filter(|&q| q8a_capable(q)) {
        let cols = if qt == GgmlType::Q6_K { 6144 } else { 4864 };
        let name = qt.name().to_lowercase();
        let w = random_weights(qt, rows, cols, rng);
        let wd = upload(d, &w, "weights").expect("upload w");
        let m = QMatrix {
            qtype: qt,
            nrows: rows,
            ncols: cols,
        };
        for nv in [1usize, 11] {
            let x = rand_vec(rng, nv * cols, 1.0);
            let (_, _, deq) = quantize_q8a_ref(&x);
            let xd = up(d, &x);
            let xq = d.alloc(q8a_bytes(nv, cols), "xq").expect("alloc");
            d.quantize_q8a(s, &xd, &xq, nv, cols).expect("quantize_q8a");
            let mut yq = vec![0f32; nv * rows];
            for j in 0..nv {
                let r = j * rows..(j + 1) * rows;
                matvec_exact(
                    qt,
                    &w,
                    rows,
                    cols,
                    &deq[j * cols..(j + 1) * cols],
                    &mut yq[r],
                )
                .expect("oracle");
            }
            if nv == 1 {
                let yw = d.alloc(rows * 4, "y").expect("alloc");
                d.mmvq_q8_wpr(s, &wd, m, &xq, &yw, 1, 1, false)
                    .expect("mmvq_q8_wpr");
                s.synchronize().expect("sync");
                let unstaged = yw.to_vec::<f32>(rows).expect("read");
                for wpr in [1u32, 2, 4] {
                    let ys = d.alloc(rows * 4, "y").expect("alloc");
                    d.mmvq_q8_wpr(s, &wd, m, &xq, &ys, 1, wpr, true)
                        .expect("staged mmvq_q8_wpr");
                    s.synchronize().expect("sync");
                    let got = ys.to_vec::<f32>(rows).expect("read");
                    t.add(
                        &format!("mmvq_{name}_q8a_s{wpr} [{rows}x{cols}] (vs quantized x)"),
                        qt.name(),
                        rel_err(&got, &yq),
                        1e-5,
                    );
                    if wpr == 1 && d.warp_size() == 32 {
                        t.add(
                            &format!("mmvq_{name}_q8a_s1 == _w1 bits [{rows}x{cols}]"),
                            qt.name(),
                            if got == unstaged { 0.0 } else { 1.0 },
                            0.0,
                        );
                    }
                }
            } else {
                // 16-byte aligned rows: the launcher takes the staged `_sn` kernel.
                let yd = d.alloc(nv * rows * 4, "y").expect("alloc");
                d.mmvq_q8(s, &wd, m, &xq, &yd, nv).expect("mmvq_q8");
                // The first MMVQN_MAX vectors by `_n` (GGUF layout) and by `_sn` directly, from
                // a buffer of exactly that many (`mmvq_q8_wpr` finds the scales after `n`
                // vectors' quants; the first device run read them from the 11-vector buffer,
                // at the wrong place).
                let k = MMVQN_MAX;
                let xqk = d.alloc(q8a_bytes(k, cols), "xq").expect("alloc");
                d.quantize_q8a(s, &xd, &xqk, k, cols).expect("quantize_q8a");
                let (yn, ysn) = (
                    d.alloc(k * rows * 4, "y").expect("alloc"),
                    d.alloc(k * rows * 4, "y").expect("alloc"),
                );
                d.mmvq_q8_wpr(s, &wd, m, &xqk, &yn, k, 1, false)
                    .expect("_n");
                d.mmvq_q8_wpr(s, &wd, m, &xqk, &ysn, k, 1, true)
                    .expect("_sn");
                s.synchronize().expect("sync");
                let got = yd.to_vec::<f32>(nv * rows).expect("read");
                t.add(
                    &format!("mmvq_{name}_q8a_sn x{nv} [{rows}x{cols}] (vs quantized x)"),
                    qt.name(),
                    rel_err(&got, &yq),
                    1e-5,
                );
                let (gn, gsn) = (
                    yn.to_vec::<f32>(k * rows).expect("read"),
                    ysn.to_vec::<f32>(k * rows).expect("read"),
                );
                // The launcher's kernel for a batch: the tensor-core tiles where the device
                // has int8 MMA, `_sn` otherwise; its first launch is those k vectors.
                let picked = if d.int8_mma() {
                    // These rows are 16-byte aligned: the staged tiles.
                    let ym = d.alloc(k * rows * 4, "y").expect("alloc");
                    d.mmvq_q8_mma(s, &wd, m, &xqk, &ym, k, MmaTiles::Staged)
                        .expect("_ms");
                    s.synchronize().expect("sync");
                    ym.to_vec::<f32>(k * rows).expect("read")
                } else {
                    gsn.clone()
                };
                t.add(
                    &format!("mmvq_{name}_q8a batch kernel == launcher bits x{k} [{rows}x{cols}]"),
                    qt.name(),
                    if picked[..] == got[..k * rows] {
                        0.0
                    } else {
                        1.0
                    },
                    0.0,
                );
                if d.warp_size() == 32 {
                    t.add(
                        &format!("mmvq_{name}_q8a_sn == _n bits x{k} [{rows}x{cols}]"),
                        qt.name(),
                        if gn == gsn { 0.0 } else { 1.0 },
                        0.0,
                    );
                }
            }
        }
    }
}

/// The fused producers of 8-bit activations give the same bits as the op then
/// `quantize_q8a`: RMSNorm (5 rows of 576), SwiGLU and GeGLU (3 rows of 1,536); and the
/// product with the residual add in its epilogue the same bits as the product then `add`.
pub(super) fn check_fused_q8a<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    t: &mut Table,
    rng: &mut ChaCha8Rng,
) {
    let read = |b: &D::Buf, n: usize| b.to_vec::<u8>(n).expect("read");
    // 576 columns: one block a row; 4,096 (an 8B model's decode row): split over 4 blocks.
    for (nr, nc) in [(5usize, 576usize), (2, 4096)] {
        let eps = 1e-5f32;
        let (xd, wd) = (
            up(d, &rand_vec(rng, nr * nc, 2.0)),
            up(d, &rand_vec(rng, nc, 1.0)),
        );
        let qb = q8a_bytes(nr, nc);
        let (o1, o2) = (
            d.alloc(nr * nc * 4, "o").expect("alloc"),
            d.alloc(nr * nc * 4, "o").expect("alloc"),
        );
        let (q1, q2) = (
            d.alloc(qb, "q").expect("alloc"),
            d.alloc(qb, "q").expect("alloc"),
        );
        d.rmsnorm(s, &xd, &wd, &o1, nr, nc, eps).expect("rmsnorm");
        d.quantize_q8a(s, &o1, &q1, nr, nc).expect("quantize");
        d.rmsnorm_q8a(s, &xd, &wd, &o2, &q2, nr, nc, eps)
            .expect("rmsnorm_q8a");
        s.synchronize().expect("sync");
        let same =
            read(&o1, nr * nc * 4) == read(&o2, nr * nc * 4) && read(&q1, qb) == read(&q2, qb);
        t.add(
            &format!("rmsnorm_q8a_f32 = rmsnorm + quantize, {nr} x {nc}"),
            "f32",
            if same { 0.0 } else { 1.0 },
            0.0,
        );
    }

    let n = 3 * 1536;
    let qb = q8a_bytes(1, n);
    let (gd, ud) = (up(d, &rand_vec(rng, n, 4.0)), up(d, &rand_vec(rng, n, 2.0)));
    for gelu in [false, true] {
        let (o1, o2) = (
            d.alloc(n * 4, "o").expect("alloc"),
            d.alloc(n * 4, "o").expect("alloc"),
        );
        let (q1, q2) = (
            d.alloc(qb, "q").expect("alloc"),
            d.alloc(qb, "q").expect("alloc"),
        );
        if gelu {
            d.geglu_tanh(s, &gd, &ud, &o1, n).expect("geglu");
        } else {
            d.swiglu(s, &gd, &ud, &o1, n).expect("swiglu");
        }
        d.quantize_q8a(s, &o1, &q1, 1, n).expect("quantize");
        d.glu_q8a(s, gelu, &gd, &ud, &o2, &q2, n).expect("glu_q8a");
        s.synchronize().expect("sync");
        let same = read(&o1, n * 4) == read(&o2, n * 4) && read(&q1, qb) == read(&q2, qb);
        t.add(
            if gelu {
                "geglu_tanh_q8a_f32 = geglu + quantize"
            } else {
                "swiglu_q8a_f32 = swiglu + quantize"
            },
            "f32",
            if same { 0.0 } else { 1.0 },
            0.0,
        );
    }

    // RoPE of q and k in one launch = two launches (both pairings); K and V stored in one.
    for neox in [false, true] {
        let r = RopeParams {
            n_tokens: 3,
            n_heads: 8,
            head_dim: 64,
            n_rot: 64,
            freq_base: 10000.0,
            freq_scale: 1.0,
            neox,
        };
        let hk = 2usize;
        let (nq, nk) = (3 * 8 * 64, 3 * hk * 64);
        let (qv, kv) = (rand_vec(rng, nq, 1.0), rand_vec(rng, nk, 1.0));
        let pd = upload(d, &[3i32, 40, 999], "pos").expect("pos");
        let (q1, k1, q2, k2) = (up(d, &qv), up(d, &kv), up(d, &qv), up(d, &kv));
        d.rope(s, &q1, &q1, &pd, None, r).expect("rope q");
        d.rope(s, &k1, &k1, &pd, None, RopeParams { n_heads: hk, ..r })
            .expect("rope k");
        d.rope_qk(s, &q2, &k2, &pd, None, r, hk).expect("rope_qk");
        s.synchronize().expect("sync");
        let same = read(&q1, nq * 4) == read(&q2, nq * 4) && read(&k1, nk * 4) == read(&k2, nk * 4);
        t.add(
            if neox {
                "rope_qk_neox_f32 = 2 x rope"
            } else {
                "rope_qk_f32 = 2 x rope"
            },
            "f32",
            if same { 0.0 } else { 1.0 },
            0.0,
        );
    }
    let kvl = KvLayout {
        n_kv_heads: 2,
        head_dim: 64,
        seq_cap: 16,
    };
    let (kx, vx) = (
        up(d, &rand_vec(rng, 3 * 128, 1.0)),
        up(d, &rand_vec(rng, 3 * 128, 1.0)),
    );
    let caches: Vec<D::Buf> = (0..4)
        .map(|_| {
            let b = d.alloc(kvl.bytes(), "cache").expect("alloc");
            b.zero().expect("zero");
            b
        })
        .collect();
    d.kv_store(s, &kx, &caches[0], kvl, 3, 5).expect("kv k");
    d.kv_store(s, &vx, &caches[1], kvl, 3, 5).expect("kv v");
    d.kv_store2(s, &kx, &caches[2], &vx, &caches[3], kvl, 3, 5)
        .expect("kv_store2");
    s.synchronize().expect("sync");
    let same = read(&caches[0], kvl.bytes()) == read(&caches[2], kvl.bytes())
        && read(&caches[1], kvl.bytes()) == read(&caches[3], kvl.bytes());
    t.add(
        "kv_store2_f32_f16 = 2 x kv_store",
        "f16",
        if same { 0.0 } else { 1.0 },
        0.0,
    );

    // Three matrices of one type over one input in one launch = three launches.
    for nv in [1usize, 3] {
        let cols = 512usize;
        let shapes = [67usize, 33, 5];
        let ws: Vec<Vec<u8>> = shapes
            .iter()
            .map(|&r| random_weights(GgmlType::Q4_0, r, cols, rng))
            .collect();
        let wds: Vec<D::Buf> = ws.iter().map(|w| upload(d, w, "w").expect("w")).collect();
        let ms: Vec<QMatrix> = shapes
            .iter()
            .map(|&r| QMatrix {
                qtype: GgmlType::Q4_0,
                nrows: r,
                ncols: cols,
            })
            .collect();
        let xd = up(d, &rand_vec(rng, nv * cols, 1.0));
        let xq = d.alloc(q8a_bytes(nv, cols), "xq").expect("alloc");
        d.quantize_q8a(s, &xd, &xq, nv, cols).expect("quantize");
        let alone: Vec<D::Buf> = shapes
            .iter()
            .map(|&r| d.alloc(nv * r * 4, "y").expect("alloc"))
            .collect();
        let multi: Vec<D::Buf> = shapes
            .iter()
            .map(|&r| d.alloc(nv * r * 4, "y").expect("alloc"))
            .collect();
        for i in 0..3 {
            d.mmvq_q8(s, &wds[i], ms[i], &xq, &alone[i], nv)
                .expect("mmvq_q8");
        }
        let mats: Vec<_> = (0..3)
            .map(|i| {
                (
                    &wds[i] as &dyn rocmforge::backend::DeviceBuffer,
                    ms[i],
                    &multi[i] as &dyn rocmforge::backend::DeviceBuffer,
                )
            })
            .collect();
        d.mmvq_q8_multi(s, &mats, &xq, nv, false)
            .expect("mmvq_q8_multi");
        s.synchronize().expect("sync");
        let same = (0..3)
            .all(|i| read(&alone[i], nv * shapes[i] * 4) == read(&multi[i], nv * shapes[i] * 4));
        t.add(
            &format!("mmvq_q4_0_q8a 3 matrices x{nv} = 3 launches"),
            "Q4_0",
            if same { 0.0 } else { 1.0 },
            0.0,
        );
    }

    // y += W x in the epilogue, one vector and three (the `_n` kernel).
    let (rows, cols) = (300usize, 512usize);
    let w = random_weights(GgmlType::Q4_K, rows, cols, rng);
    let wd = upload(d, &w, "w").expect("w");
    let m = QMatrix {
        qtype: GgmlType::Q4_K,
        nrows: rows,
        ncols: cols,
    };
    for nv in [1usize, 3] {
        let xd = up(d, &rand_vec(rng, nv * cols, 1.0));
        let xq = d.alloc(q8a_bytes(nv, cols), "xq").expect("alloc");
        d.quantize_q8a(s, &xd, &xq, nv, cols).expect("quantize");
        let r = rand_vec(rng, nv * rows, 3.0);
        let (y1, y2, p) = (
            up(d, &r),
            up(d, &r),
            d.alloc(nv * rows * 4, "p").expect("alloc"),
        );
        d.mmvq_q8(s, &wd, m, &xq, &p, nv).expect("mmvq_q8");
        d.add(s, &y1, &p, &y1, nv * rows).expect("add");
        d.mmvq_q8_into(s, &wd, m, &xq, &y2, nv, true)
            .expect("mmvq_q8 acc");
        s.synchronize().expect("sync");
        let same = read(&y1, nv * rows * 4) == read(&y2, nv * rows * 4);
        t.add(
            &format!("mmvq_q4_k_q8a acc x{nv} = product + add"),
            "Q4_K",
            if same { 0.0 } else { 1.0 },
            0.0,
        );
    }
}

/// The tensor-core batch products (`_m2/_m4/_m8`, `_mm*` past 8 vectors, and the staged
/// `_ms`/`_mms`; each also on packed activations, `p`, bit for bit, the packed-only `_mq*p`
/// past 16 vectors, and the staged packed tiles two a block, `_m{,m,q}s2p`, bit for bit with
/// one a block, every type but Q6_K): every q8 weight type, 37 rows (three 16-row tiles, the last one short) of
/// 4,864 columns (Q6_K 6,144, so its rows are 16-byte multiples: two chunks of 2,048 weights
/// and a short one), 1, 3, 8, 13, 16, 27 and 32 vectors, each form against the product with the
/// quantized activations. On a device without int8 MMA the same kernels compute with dp4a, and
/// the rows say so.
pub(super) fn check_mmvq_q8_mma<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    t: &mut Table,
    rng: &mut ChaCha8Rng,
) {
    if D::VENDOR == "HIP" {
        // HIP builds have no tensor-core forms (mmvq_q8.cu's RF_MMVQ8_TC): nothing to check.
        println!("check_mmvq_q8_mma: no tensor-core forms in a HIP build");
        return;
    }
    let rows = 37usize;
    let how = if d.int8_mma() { "mma" } else { "dp4a" };
    for qt in DEVICE_QTYPES.into_iter().filter(|&q| q8a_capable(q)) {
        let cols = if qt == GgmlType::Q6_K { 6144 } else { 4864 };
        let name = qt.name().to_lowercase();
        let w = random_weights(qt, rows, cols, rng);
        let wd = upload(d, &w, "weights").expect("upload w");
        let m = QMatrix {
            qtype: qt,
            nrows: rows,
            ncols: cols,
        };
        for nv in [1usize, 3, MMVQN_MAX, 13, MMA_MAXN, 27, MMA_PACKED_MAXN] {
            let x = rand_vec(rng, nv * cols, 1.0);
            let (_, _, deq) = quantize_q8a_ref(&x);
            let xd = up(d, &x);
            // Past MMA_MAXN vectors only the packed forms exist.
            let in_place = nv <= MMA_MAXN;
            let xq = d.alloc(q8a_bytes(nv, cols), "xq").expect("alloc");
            d.quantize_q8a(s, &xd, &xq, nv, cols).expect("quantize_q8a");
            let mut yq = vec![0f32; nv * rows];
            for j in 0..nv {
                matvec_exact(
                    qt,
                    &w,
                    rows,
                    cols,
                    &deq[j * cols..(j + 1) * cols],
                    &mut yq[j * rows..(j + 1) * rows],
                )
                .expect("oracle");
            }
            // The same q8a with room past it: the launcher packs it (q8a_pack_mma) and runs
            // the `p` forms, which must give the very bits of the in-place forms.
            let xqp = d
                .alloc(q8a_bytes(nv, cols) + mma_pack_bytes(cols) + 16, "xq packed")
                .expect("alloc");
            d.quantize_q8a(s, &xd, &xqp, nv, cols)
                .expect("quantize_q8a");
            let mut staged_packed = None;
            for tiles in [
                MmaTiles::Direct(2),
                MmaTiles::Direct(4),
                MmaTiles::Direct(8),
                MmaTiles::Staged,
            ] {
                let y = d.alloc(nv * rows * 4, "y").expect("alloc");
                let yp = d.alloc(nv * rows * 4, "y packed").expect("alloc");
                if in_place {
                    d.mmvq_q8_mma(s, &wd, m, &xq, &y, nv, tiles)
                        .expect("mmvq_q8_mma");
                }
                d.mmvq_q8_mma(s, &wd, m, &xqp, &yp, nv, tiles)
                    .expect("mmvq_q8_mma packed");
                s.synchronize().expect("sync");
                let form = match tiles {
                    MmaTiles::Direct(ks) => format!("m{ks}"),
                    MmaTiles::Staged => "ms".into(),
                    MmaTiles::StagedPair => "ms2".into(),
                };
                let yp = yp.to_vec::<f32>(nv * rows).expect("read");
                if tiles == MmaTiles::Staged {
                    staged_packed = Some(yp.clone());
                }
                t.add(
                    &format!(
                        "mmvq_{name}_q8a_{form}p x{nv} [{rows}x{cols}] {how} (vs quantized x)"
                    ),
                    qt.name(),
                    rel_err(&yp, &yq),
                    1e-5,
                );
                if !in_place {
                    continue;
                }
                let y = y.to_vec::<f32>(nv * rows).expect("read");
                t.add(
                    &format!("mmvq_{name}_q8a_{form} x{nv} [{rows}x{cols}] {how} (vs quantized x)"),
                    qt.name(),
                    rel_err(&y, &yq),
                    1e-5,
                );
                let same = y
                    .iter()
                    .map(|v| v.to_bits())
                    .eq(yp.iter().map(|v| v.to_bits()));
                t.add(
                    &format!("mmvq_{name}_q8a_{form}p x{nv} {how} packed = in place (bits)"),
                    qt.name(),
                    if same { 0.0 } else { 1.0 },
                    0.0,
                );
            }
            // Two tiles a block (packed only, not Q6_K): each tile's sums are the one-tile
            // form's bits (the same warp takes the same blocks in the same order).
            if mma_pair_capable(qt) {
                let y2 = d.alloc(nv * rows * 4, "y pair").expect("alloc");
                d.mmvq_q8_mma(s, &wd, m, &xqp, &y2, nv, MmaTiles::StagedPair)
                    .expect("mmvq_q8_mma pair");
                s.synchronize().expect("sync");
                let y2 = y2.to_vec::<f32>(nv * rows).expect("read");
                t.add(
                    &format!("mmvq_{name}_q8a_ms2p x{nv} [{rows}x{cols}] {how} (vs quantized x)"),
                    qt.name(),
                    rel_err(&y2, &yq),
                    1e-5,
                );
                let same = staged_packed.as_ref().is_some_and(|y1| {
                    y1.iter()
                        .map(|v| v.to_bits())
                        .eq(y2.iter().map(|v| v.to_bits()))
                });
                t.add(
                    &format!("mmvq_{name}_q8a_ms2p x{nv} {how} two tiles = one (bits)"),
                    qt.name(),
                    if same { 0.0 } else { 1.0 },
                    0.0,
                );
            }
        }
    }
}

/// Informational only (printed, never asserted): the one-vector q8 product alone (activations
/// quantized once) over the 8B shapes' matrices with 1, 2, 4 and 8 warps per row on the GGUF
/// layout (`w`) and 1, 2, 4 staged (`s`), and the launcher's choice (`mmvq8_wpr`); batches on
/// the tensor-core tiles in place (`m`, `ms`) and packed (`mp`, `msp`, two tiles a block
/// `ms2p`: the pack launch included). Each launch
/// reads the next of enough copies of the matrix (>= 160 MB together) that its weights come
/// from HBM, not from the 50 MB L2 the previous launch left them in, as in a decode step.
pub(super) fn print_mmvq_q8_shapes<D: KernelDevice>(d: &D, s: &D::Stream, rng: &mut ChaCha8Rng) {
    for qt in [
        GgmlType::Q4_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::Q8_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q5_K,
    ] {
        for (rows, cols) in [
            (1024usize, 4096usize),
            (4096, 4096),
            (14_336, 4096),
            (4096, 14_336),
        ] {
            let w = random_weights(qt, rows, cols, rng);
            let copies = (160usize << 20).div_ceil(w.len());
            let wds: Vec<_> = (0..copies)
                .map(|_| upload(d, &w, "bench w").expect("upload"))
                .collect();
            let nv = MMVQN_MAX;
            let xd = up(d, &rand_vec(rng, nv * cols, 1.0));
            let xd16 = up(d, &rand_vec(rng, MMA_MAXN * cols, 1.0));
            // One vector, and MMVQN_MAX (each layout has its scales after its quants).
            let (xq1, xqn, xq16) = (
                d.alloc(q8a_bytes(1, cols), "bench xq").expect("alloc"),
                d.alloc(q8a_bytes(nv, cols), "bench xq").expect("alloc"),
                d.alloc(q8a_bytes(MMA_MAXN, cols), "bench xq")
                    .expect("alloc"),
            );
            // The same with room past them: the tensor-core forms pack them (`msp`, `mp`);
            // and 32 vectors (packed only).
            let pack = mma_pack_bytes(cols) + 16;
            let xd32 = up(d, &rand_vec(rng, MMA_PACKED_MAXN * cols, 1.0));
            let (xqnp, xq16p, xq32p) = (
                d.alloc(q8a_bytes(nv, cols) + pack, "bench xq")
                    .expect("alloc"),
                d.alloc(q8a_bytes(MMA_MAXN, cols) + pack, "bench xq")
                    .expect("alloc"),
                d.alloc(q8a_bytes(MMA_PACKED_MAXN, cols) + pack, "bench xq")
                    .expect("alloc"),
            );
            d.quantize_q8a(s, &xd32, &xq32p, MMA_PACKED_MAXN, cols)
                .expect("quantize");
            let yd = d.alloc(MMA_PACKED_MAXN * rows * 4, "y").expect("alloc");
            d.quantize_q8a(s, &xd, &xq1, 1, cols).expect("quantize");
            d.quantize_q8a(s, &xd, &xqn, nv, cols).expect("quantize");
            d.quantize_q8a(s, &xd, &xqnp, nv, cols).expect("quantize");
            d.quantize_q8a(s, &xd16, &xq16, MMA_MAXN, cols)
                .expect("quantize");
            d.quantize_q8a(s, &xd16, &xq16p, MMA_MAXN, cols)
                .expect("quantize");
            let m = QMatrix {
                qtype: qt,
                nrows: rows,
                ncols: cols,
            };
            let mut line = format!(
                "bench q8a shapes {:<5} [{rows}x{cols}] pick w{} m{}:",
                qt.name().to_lowercase(),
                mmvq8_wpr(rows),
                mmvq8_mma_ks(rows)
            );
            // One vector with each shape; then MMVQN_MAX vectors (`n`, `sn`: a batched step);
            // the tensor-core tiles (`m`: warps per tile) with one vector and with MMVQN_MAX.
            for (form, wpr, n) in [
                ("w", 1u32, 1usize),
                ("w", 2, 1),
                ("w", 4, 1),
                ("w", 8, 1),
                ("s", 1, 1),
                ("s", 2, 1),
                ("s", 4, 1),
                ("n", 1, nv),
                ("sn", 1, nv),
                ("m", 2, 1),
                ("m", 4, 1),
                ("m", 8, 1),
                ("m", 2, nv),
                ("m", 4, nv),
                ("m", 8, nv),
                ("m", 2, MMA_MAXN),
                ("m", 4, MMA_MAXN),
                ("m", 8, MMA_MAXN),
                ("ms", 8, 1),
                ("ms", 8, nv),
                ("ms", 8, MMA_MAXN),
                ("mp", 8, nv),
                ("mp", 8, MMA_MAXN),
                ("msp", 8, nv),
                ("msp", 8, MMA_MAXN),
                ("mp", 8, MMA_PACKED_MAXN),
                ("msp", 8, MMA_PACKED_MAXN),
                ("ms2p", 8, nv),
                ("ms2p", 8, MMA_MAXN),
                ("ms2p", 8, MMA_PACKED_MAXN),
            ] {
                if (form == "ms2p" && !mma_pair_capable(qt))
                    || (form.starts_with('m') && D::VENDOR == "HIP")
                {
                    continue;
                }
                let staged = form.starts_with('s');
                let mut next = 0usize;
                let wm = median_ms(d, s, || {
                    next += 1;
                    let xq = match (n, form.ends_with('p')) {
                        (1, _) => &xq1,
                        (MMA_MAXN, false) => &xq16,
                        (MMA_MAXN, true) => &xq16p,
                        (MMA_PACKED_MAXN, _) => &xq32p,
                        (_, false) => &xqn,
                        (_, true) => &xqnp,
                    };
                    if form.starts_with('m') {
                        let tiles = if form.starts_with("ms2") {
                            MmaTiles::StagedPair
                        } else if form.starts_with("ms") {
                            MmaTiles::Staged
                        } else {
                            MmaTiles::Direct(wpr)
                        };
                        d.mmvq_q8_mma(s, &wds[next % copies], m, xq, &yd, n, tiles)
                            .expect("mmvq_q8_mma")
                    } else {
                        d.mmvq_q8_wpr(s, &wds[next % copies], m, xq, &yd, n, wpr, staged)
                            .expect("mmvq_q8_wpr")
                    }
                });
                let label = match (form, n) {
                    ("ms" | "msp" | "ms2p", _) => format!("{form}x{n}"),
                    (_, 1) => format!("{form}{wpr}"),
                    ("m" | "mp", _) => format!("{form}{wpr}x{n}"),
                    _ => format!("{form}x{n}"),
                };
                line += &format!(
                    "  {label} {:.1} us {:.0} GB/s",
                    wm * 1e3,
                    w.len() as f64 / (wm * 1e-3) / 1e9
                );
            }
            println!("{line}");
        }
    }
}
