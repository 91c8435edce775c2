//! Every kernel in `kernels/` against the CPU reference on random non-zero inputs, through the
//! vendor-neutral launchers (`GpuOps` on any `KernelDevice`), so one body runs on CUDA and on
//! HIP (`backend_test!`: `gpu_kernels_match_cpu_reference::cuda` and, with the `hip` feature,
//! `::hip`). Prints one table row per (kernel, type): relative error, tolerance, verdict; fails
//! if any row is over its tolerance. Ignored unless the `gpu-tests` feature is on, and failing
//! without a device when it is (tests/common/gpu.rs).
//!
//! Error measure: max |gpu - ref| / max |ref| over the output (0 for integer outputs, which
//! must match exactly). References: `rocmforge::quant::dequantize_ref` / `matvec_exact`
//! (weights), f64 loops here for the float ops.

#[macro_use]
mod common;
#[path = "gpu_kernels/attention.rs"]
mod attention;
#[path = "gpu_kernels/q8.rs"]
mod q8;

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rocmforge::backend::gpu::ops::{
    AttnParams, GpuOps, KvLayout, QMatrix, RopeParams, SampleParams,
};
use rocmforge::backend::gpu::KernelDevice;
use rocmforge::backend::kernels::{q8a_bytes, q8a_capable, DEVICE_BLOCKS, DEVICE_QTYPES};
use rocmforge::backend::{
    view, BackendError, BufferIo, DeviceEvent, DeviceStream, PinnedHost, Pod,
};
use rocmforge::quant::{dequantize_ref, matvec_exact, GgmlType};

struct Row {
    kernel: String,
    qtype: String,
    err: f64,
    tol: f64,
}

#[derive(Default)]
struct Table(Vec<Row>);

impl Table {
    fn add(&mut self, kernel: &str, qtype: &str, err: f64, tol: f64) {
        self.0.push(Row {
            kernel: kernel.into(),
            qtype: qtype.into(),
            err,
            tol,
        });
    }
    fn print_and_check(&self) {
        println!(
            "{:<26} {:<6} {:>12} {:>10}  result",
            "kernel", "type", "rel.err", "tol"
        );
        for r in &self.0 {
            let ok = r.err <= r.tol && r.err.is_finite();
            println!(
                "{:<26} {:<6} {:>12.3e} {:>10.1e}  {}",
                r.kernel,
                r.qtype,
                r.err,
                r.tol,
                if ok { "ok" } else { "FAIL" }
            );
        }
        let bad: Vec<_> = self
            .0
            .iter()
            .filter(|r| !(r.err <= r.tol && r.err.is_finite()))
            .map(|r| format!("{} {}", r.kernel, r.qtype))
            .collect();
        assert!(bad.is_empty(), "kernels over tolerance: {bad:?}");
    }
}

fn rel_err(gpu: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(gpu.len(), reference.len());
    let scale = reference
        .iter()
        .fold(0f64, |m, v| m.max(f64::from(v.abs())))
        .max(1e-30);
    let diff = gpu
        .iter()
        .zip(reference)
        .fold(0f64, |m, (a, b)| m.max(f64::from((a - b).abs())));
    // NaN anywhere must fail.
    if gpu.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}

fn rand_f16_bytes(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> [u8; 2] {
    let mut v: f32 = rng.gen_range(lo..hi);
    if rng.gen_bool(0.5) {
        v = -v;
    }
    f16::from_f32(v).to_le_bytes()
}

/// Random but valid blocks: random quant bytes, scales set to finite non-zero halves.
fn random_weights(t: GgmlType, rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
    let n = rows * cols;
    match t {
        GgmlType::F32 => {
            return (0..n)
                .flat_map(|_| rng.gen_range(-1.0f32..1.0).to_le_bytes())
                .collect()
        }
        GgmlType::F16 => {
            return (0..n)
                .flat_map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0)).to_le_bytes())
                .collect()
        }
        _ => {}
    }
    let bb = t.block_bytes() as usize;
    let nb = n / t.block_elems() as usize;
    let mut out = vec![0u8; nb * bb];
    rng.fill(&mut out[..]);
    // Offsets of the f16 scale fields in each block (ggml-common.h layouts).
    let halves: &[usize] = match t {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => panic!("no generator for {t}"),
    };
    for b in out.chunks_exact_mut(bb) {
        for &o in halves {
            let h = rand_f16_bytes(rng, 0.001, 0.05);
            b[o..o + 2].copy_from_slice(&h);
        }
    }
    out
}

fn rand_vec(rng: &mut ChaCha8Rng, n: usize, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.gen_range(0.05..1.0) * amp;
            if rng.gen_bool(0.5) {
                -v
            } else {
                v
            }
        })
        .collect()
}

/// A device buffer holding `data` (synchronous write).
fn upload<D: KernelDevice, T: Pod>(d: &D, data: &[T], what: &str) -> Result<D::Buf, BackendError> {
    let b = d.alloc(std::mem::size_of_val(data), what)?;
    b.write(0, data)?;
    Ok(b)
}

fn up<D: KernelDevice>(d: &D, v: &[f32]) -> D::Buf {
    upload(d, v, "test input").expect("upload")
}

fn check_weights<D: KernelDevice>(d: &D, s: &D::Stream, t: &mut Table, rng: &mut ChaCha8Rng) {
    // 67 rows: not a multiple of the 4 rows per block; 512 columns: 2 super-blocks.
    let (rows, cols) = (67usize, 512usize);
    for qt in DEVICE_QTYPES {
        let w = random_weights(qt, rows, cols, rng);
        let mut deq = vec![0f32; rows * cols];
        dequantize_ref(qt, &w, &mut deq).expect("reference dequant");
        let wd = upload(d, &w, "weights").expect("upload w");
        let m = QMatrix {
            qtype: qt,
            nrows: rows,
            ncols: cols,
        };

        // mmvq vs the f64 oracle.
        let x = rand_vec(rng, cols, 1.0);
        let mut yref = vec![0f32; rows];
        matvec_exact(qt, &w, rows, cols, &x, &mut yref).expect("oracle");
        let xd = up(d, &x);
        let yd = d.alloc(rows * 4, "y").expect("alloc");
        d.mmvq(s, &wd, m, &xd, &yd).expect("mmvq");
        s.synchronize().expect("sync");
        t.add(
            &format!("mmvq_{}_f32", qt.name().to_lowercase()),
            qt.name(),
            rel_err(&yd.to_vec::<f32>(rows).expect("read"), &yref),
            1e-5,
        );

        // The batched mmvq: 11 vectors (a launch of 8 and one of 3), each against the oracle.
        let nv = 11usize;
        let xs = rand_vec(rng, nv * cols, 1.0);
        let mut yref = vec![0f32; nv * rows];
        for j in 0..nv {
            matvec_exact(
                qt,
                &w,
                rows,
                cols,
                &xs[j * cols..(j + 1) * cols],
                &mut yref[j * rows..(j + 1) * rows],
            )
            .expect("oracle");
        }
        let xd = up(d, &xs);
        let yd = d.alloc(nv * rows * 4, "y").expect("alloc");
        d.mmvq_n(s, &wd, m, &xd, &yd, nv).expect("mmvq_n");
        s.synchronize().expect("sync");
        t.add(
            &format!("mmvq_{}_f32_n (11 vectors)", qt.name().to_lowercase()),
            qt.name(),
            rel_err(&yd.to_vec::<f32>(nv * rows).expect("read"), &yref),
            1e-5,
        );

        if q8a_capable(qt) {
            q8::check_mmvq_q8(d, s, t, rng, qt, &w, &wd, m);
        }

        // get_rows: repeated ids, first and last row.
        let ids: Vec<i32> = vec![0, 66, 5, 5, 31, 12];
        let idd = upload(d, &ids, "ids").expect("ids");
        let out = d.alloc(ids.len() * cols * 4, "rows").expect("alloc");
        let status = upload(d, &[0i32], "status").expect("status");
        d.get_rows(s, &wd, m, &idd, ids.len(), &out, &status)
            .expect("get_rows");
        s.synchronize().expect("sync");
        let mut want = Vec::new();
        for &i in &ids {
            want.extend_from_slice(&deq[i as usize * cols..(i as usize + 1) * cols]);
        }
        let mut err = rel_err(&out.to_vec::<f32>(ids.len() * cols).expect("read"), &want);
        if status.to_vec::<i32>(1).expect("status")[0] != 0 {
            err = f64::INFINITY;
        }
        t.add(
            &format!("get_rows_{}_f32", qt.name().to_lowercase()),
            qt.name(),
            err,
            1e-6,
        );

        // dequantize a tile (rows 3..40) to f16: reference rounded to f16 as well. Into an
        // aligned buffer (the eight-per-thread form, `dequantize8_*`) and 2 bytes into one
        // (the one-element form); both forms must give the same bits.
        let (r0, tr) = (3usize, 37usize);
        let tile = d.alloc(tr * cols * 2 + 16, "tile").expect("alloc");
        let want: Vec<f32> = deq[r0 * cols..(r0 + tr) * cols]
            .iter()
            .map(|v| f16::from_f32(*v).to_f32())
            .collect();
        let mut forms = Vec::new();
        for (off, form) in [(0usize, "dequantize8"), (2, "dequantize")] {
            let out = view(&tile, off, tr * cols * 2).expect("view");
            d.dequantize_f16(s, &wd, m, r0, tr, &out).expect("dequant");
            s.synchronize().expect("sync");
            let bits: Vec<f16> =
                tile.to_vec::<f16>(tr * cols + 1).expect("read")[off / 2..][..tr * cols].to_vec();
            let got: Vec<f32> = bits.iter().map(|h| h.to_f32()).collect();
            t.add(
                &format!("{form}_{}_f16", qt.name().to_lowercase()),
                qt.name(),
                rel_err(&got, &want),
                1e-3,
            );
            forms.push(bits);
        }
        // The same expression per element: equal bits expected; at most one f16 step allowed
        // (the compiler may contract a multiply-add differently in the two forms).
        let ulps = forms[0]
            .iter()
            .zip(&forms[1])
            .map(|(a, b)| (a.to_bits() as i32 - b.to_bits() as i32).abs())
            .max()
            .unwrap_or(0);
        t.add(
            &format!(
                "dequantize8 vs dequantize, f16 steps ({})",
                qt.name().to_lowercase()
            ),
            qt.name(),
            f64::from(ulps),
            1.0,
        );
    }
    // An out-of-range id is reported, not read.
    let w = random_weights(GgmlType::Q8_0, 4, 64, rng);
    let wd = upload(d, &w, "w").expect("w");
    let idd = upload(d, &[1i32, 4], "ids").expect("ids");
    let out = d.alloc(2 * 64 * 4, "o").expect("o");
    let status = upload(d, &[0i32], "status").expect("status");
    d.get_rows(
        s,
        &wd,
        QMatrix {
            qtype: GgmlType::Q8_0,
            nrows: 4,
            ncols: 64,
        },
        &idd,
        2,
        &out,
        &status,
    )
    .expect("launch");
    s.synchronize().expect("sync");
    let flagged = status.to_vec::<i32>(1).expect("status")[0];
    t.add(
        "get_rows bad id flagged",
        "Q8_0",
        if flagged == 1 { 0.0 } else { 1.0 },
        0.0,
    );
}

/// `ff`: the per-pair frequency divisors (Llama 3.1's `rope_freqs`), if any.
fn rope_ref(x: &[f32], pos: &[i32], r: RopeParams, ff: Option<&[f32]>) -> Vec<f32> {
    let mut out = x.to_vec();
    for (tk, &p) in pos.iter().enumerate().take(r.n_tokens) {
        for h in 0..r.n_heads {
            let base = (tk * r.n_heads + h) * r.head_dim;
            for i in 0..r.n_rot / 2 {
                let theta = f64::from(p)
                    * f64::from(r.freq_scale)
                    * f64::from(r.freq_base).powf(-2.0 * i as f64 / r.n_rot as f64)
                    / ff.map_or(1.0, |f| f64::from(f[i]));
                let (a, b) = if r.neox {
                    (i, i + r.n_rot / 2)
                } else {
                    (2 * i, 2 * i + 1)
                };
                let (x0, x1) = (f64::from(x[base + a]), f64::from(x[base + b]));
                out[base + a] = (x0 * theta.cos() - x1 * theta.sin()) as f32;
                out[base + b] = (x0 * theta.sin() + x1 * theta.cos()) as f32;
            }
        }
    }
    out
}

fn check_float_ops<D: KernelDevice>(d: &D, s: &D::Stream, t: &mut Table, rng: &mut ChaCha8Rng) {
    // rmsnorm: 5 rows of 576 (SmolLM2 width).
    let (nr, nc, eps) = (5usize, 576usize, 1e-5f32);
    let x = rand_vec(rng, nr * nc, 2.0);
    let w = rand_vec(rng, nc, 1.0);
    let want: Vec<f32> = x
        .chunks(nc)
        .flat_map(|row| {
            let ms = row
                .iter()
                .map(|v| f64::from(*v) * f64::from(*v))
                .sum::<f64>()
                / nc as f64;
            let inv = 1.0 / (ms + f64::from(eps)).sqrt();
            row.iter()
                .zip(&w)
                .map(move |(a, b)| (f64::from(*a) * inv * f64::from(*b)) as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let (xd, wd, od) = (
        up(d, &x),
        up(d, &w),
        d.alloc(nr * nc * 4, "o").expect("alloc"),
    );
    d.rmsnorm(s, &xd, &wd, &od, nr, nc, eps).expect("rmsnorm");
    s.synchronize().expect("sync");
    t.add(
        "rmsnorm_f32",
        "f32",
        rel_err(&od.to_vec::<f32>(nr * nc).expect("read"), &want),
        1e-5,
    );

    q8::check_fused_q8a(d, s, t, rng);

    // rope, both pairings, partial rotation on the neox case, frequency factors (Llama 3.1's
    // rope_freqs, divisors in [1, 8]) on a third case; positions up to 1000.
    for (neox, n_rot, factors) in [
        (false, 64usize, false),
        (true, 48usize, false),
        (false, 64, true),
    ] {
        let r = RopeParams {
            n_tokens: 3,
            n_heads: 4,
            head_dim: 64,
            n_rot,
            freq_base: 10000.0,
            freq_scale: 1.0,
            neox,
        };
        let n = r.n_tokens * r.n_heads * r.head_dim;
        let x = rand_vec(rng, n, 1.0);
        let pos = vec![0i32, 17, 1000];
        let ff: Option<Vec<f32>> =
            factors.then(|| (0..n_rot / 2).map(|_| rng.gen_range(1.0f32..8.0)).collect());
        let want = rope_ref(&x, &pos, r, ff.as_deref());
        let ffd = ff.as_ref().map(|f| up(d, f));
        let (xd, pd, od) = (
            up(d, &x),
            upload(d, &pos, "pos").expect("pos"),
            d.alloc(n * 4, "o").expect("alloc"),
        );
        let ffv = ffd
            .as_ref()
            .map(|b| b as &dyn rocmforge::backend::DeviceBuffer);
        d.rope(s, &xd, &od, &pd, ffv, r).expect("rope");
        s.synchronize().expect("sync");
        // theta is formed in f32 as the CPU path does: at 1000 rad one ulp is 6e-5.
        t.add(
            match (neox, factors) {
                (true, _) => "rope_neox_f32",
                (false, false) => "rope_f32",
                (false, true) => "rope_f32 (freq factors)",
            },
            "f32",
            rel_err(&od.to_vec::<f32>(n).expect("read"), &want),
            5e-4,
        );
    }

    // swiglu, geglu, scale, axpy and add.
    let n = 10_007usize;
    let (a, b) = (rand_vec(rng, n, 4.0), rand_vec(rng, n, 2.0));
    let (ad, bd, od) = (up(d, &a), up(d, &b), d.alloc(n * 4, "o").expect("alloc"));
    d.swiglu(s, &ad, &bd, &od, n).expect("swiglu");
    s.synchronize().expect("sync");
    let want: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(g, u)| (f64::from(*g) / (1.0 + (-f64::from(*g)).exp()) * f64::from(*u)) as f32)
        .collect();
    t.add(
        "swiglu_f32",
        "f32",
        rel_err(&od.to_vec::<f32>(n).expect("read"), &want),
        1e-5,
    );
    d.geglu_tanh(s, &ad, &bd, &od, n).expect("geglu");
    s.synchronize().expect("sync");
    let want: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(g, u)| {
            let x = f64::from(*g);
            let t = ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044_715 * x * x * x)).tanh();
            (0.5 * x * (1.0 + t) * f64::from(*u)) as f32
        })
        .collect();
    t.add(
        "geglu_tanh_f32",
        "f32",
        rel_err(&od.to_vec::<f32>(n).expect("read"), &want),
        1e-5,
    );
    d.scale(s, &ad, &od, 7.75, n).expect("scale");
    s.synchronize().expect("sync");
    let want: Vec<f32> = a.iter().map(|x| x * 7.75).collect();
    t.add(
        "scale_f32",
        "f32",
        rel_err(&od.to_vec::<f32>(n).expect("read"), &want),
        1e-7,
    );
    // axpy accumulates into its output: start from b.
    let yd = up(d, &b);
    d.axpy(s, &ad, &yd, -0.375, n).expect("axpy");
    s.synchronize().expect("sync");
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| y + -0.375 * x).collect();
    t.add(
        "axpy_f32",
        "f32",
        rel_err(&yd.to_vec::<f32>(n).expect("read"), &want),
        1e-6,
    );
    d.add(s, &ad, &bd, &od, n).expect("add");
    s.synchronize().expect("sync");
    let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
    t.add(
        "add_f32",
        "f32",
        rel_err(&od.to_vec::<f32>(n).expect("read"), &want),
        1e-7,
    );
}

/// Attention over a cache filled through kv_store, vs an f64 reference on the same f16 values.
/// Attention over an f16 cache of heads `head_dim` wide (64: SmolLM2's; 128: the 8B shape's,
/// the widest the tiled prefill kernel takes).
fn check_attention<D: KernelDevice>(
    d: &D,
    s: &D::Stream,
    t: &mut Table,
    rng: &mut ChaCha8Rng,
    head_dim: usize,
) {
    let kv = KvLayout {
        n_kv_heads: 2,
        head_dim,
        seq_cap: 300,
    };
    let n_heads = 6; // GQA: 3 query heads per kv head
    let len = 257usize; // tokens in the cache after the prefill below
    let k_all = rand_vec(rng, len * kv.n_kv_heads * kv.head_dim, 1.0);
    let v_all = rand_vec(rng, len * kv.n_kv_heads * kv.head_dim, 1.0);
    let kc = d.alloc(kv.bytes(), "k cache").expect("alloc");
    let vc = d.alloc(kv.bytes(), "v cache").expect("alloc");
    kc.zero().expect("zero");
    vc.zero().expect("zero");
    // Store in two chunks to exercise pos0.
    let split = 200usize;
    let row = kv.n_kv_heads * kv.head_dim;
    for (src, cache) in [(&k_all, &kc), (&v_all, &vc)] {
        d.kv_store(s, &up(d, &src[..split * row]), cache, kv, split, 0)
            .expect("kv_store");
        d.kv_store(
            s,
            &up(d, &src[split * row..]),
            cache,
            kv,
            len - split,
            split,
        )
        .expect("kv_store");
    }
    s.synchronize().expect("sync");
    // kv_store check: cache layout [head, pos, dim], f16.
    let kh: Vec<f32> = kc
        .to_vec::<f16>(kv.n_kv_heads * kv.seq_cap * kv.head_dim)
        .expect("read")
        .iter()
        .map(|h| h.to_f32())
        .collect();
    let mut got = Vec::new();
    let mut want = Vec::new();
    for p in 0..len {
        for h in 0..kv.n_kv_heads {
            for e in 0..kv.head_dim {
                got.push(kh[(h * kv.seq_cap + p) * kv.head_dim + e]);
                want.push(f16::from_f32(k_all[(p * kv.n_kv_heads + h) * kv.head_dim + e]).to_f32());
            }
        }
    }
    t.add(
        "kv_store (kv_store2_f32_f16, one cache)",
        "f16",
        rel_err(&got, &want),
        0.0,
    );
    let vh: Vec<f32> = vc
        .to_vec::<f16>(kv.n_kv_heads * kv.seq_cap * kv.head_dim)
        .expect("read")
        .iter()
        .map(|h| h.to_f32())
        .collect();

    let scale = 1.0 / (kv.head_dim as f32).sqrt();
    // `window`: a query sees only the last `window` positions (0: all).
    let reference = |q: &[f32], n_tokens: usize, pos0: usize, window: usize| -> Vec<f32> {
        let mut out = vec![0f32; q.len()];
        for tk in 0..n_tokens {
            for h in 0..n_heads {
                let kvh = h / (n_heads / kv.n_kv_heads);
                let qv = &q[(tk * n_heads + h) * kv.head_dim..][..kv.head_dim];
                let n = pos0 + tk + 1;
                let first = if window > 0 {
                    n.saturating_sub(window)
                } else {
                    0
                };
                let scores: Vec<f64> = (first..n)
                    .map(|p| {
                        (0..kv.head_dim)
                            .map(|e| {
                                f64::from(qv[e])
                                    * f64::from(kh[(kvh * kv.seq_cap + p) * kv.head_dim + e])
                            })
                            .sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
                for e in 0..kv.head_dim {
                    let o: f64 = (first..n)
                        .map(|p| {
                            (scores[p - first] - m).exp() / z
                                * f64::from(vh[(kvh * kv.seq_cap + p) * kv.head_dim + e])
                        })
                        .sum();
                    out[(tk * n_heads + h) * kv.head_dim + e] = o as f32;
                }
            }
        }
        out
    };
    // Decode: one query at the last position.
    let q = rand_vec(rng, n_heads * kv.head_dim, 1.0);
    let (qd, od) = (up(d, &q), d.alloc(q.len() * 4, "o").expect("alloc"));
    let a = AttnParams {
        n_tokens: 1,
        n_heads,
        kv,
        pos0: len - 1,
        scale,
        window: 0,
    };
    d.attention(s, &qd, &kc, &vc, &od, a).expect("decode");
    s.synchronize().expect("sync");
    t.add(
        "attn_decode_f16kv_f32",
        "f16kv",
        rel_err(
            &od.to_vec::<f32>(q.len()).expect("read"),
            &reference(&q, 1, len - 1, 0),
        ),
        1e-4,
    );
    // Decode with the output quantized in the same launch: the same f32 output, and the same
    // quants and scales as quantize_q8a of it (the O product's input).
    {
        let width = q.len();
        let sep = d.alloc(q8a_bytes(1, width), "xq").expect("alloc");
        d.quantize_q8a(s, &od, &sep, 1, width).expect("quantize");
        let (o2, xq) = (
            d.alloc(width * 4, "o2").expect("alloc"),
            d.alloc(q8a_bytes(1, width), "xq fused").expect("alloc"),
        );
        let (quants, scales) = (
            view(&xq, 0, width).expect("view"),
            view(&xq, width, width / 32 * 8).expect("view"),
        );
        d.attention_q8a(s, &qd, &kc, &vc, &o2, a, Some((&quants, &scales)), None)
            .expect("decode, quantized");
        s.synchronize().expect("sync");
        let same_out =
            o2.to_vec::<u32>(width).expect("read") == od.to_vec::<u32>(width).expect("read");
        let same_q8 = xq.to_vec::<u8>(q8a_bytes(1, width)).expect("read")
            == sep.to_vec::<u8>(q8a_bytes(1, width)).expect("read");
        t.add(
            "attn_decode_q8a_f16kv_f32 == attn_decode + quantize_q8a (bits)",
            "f16kv",
            if same_out && same_q8 { 0.0 } else { 1.0 },
            0.0,
        );
    }
    // The same query with a sliding window of 37 positions (Mistral's kind).
    d.attention(s, &qd, &kc, &vc, &od, AttnParams { window: 37, ..a })
        .expect("decode, window");
    s.synchronize().expect("sync");
    t.add(
        "attn_decode_f16kv_f32 (window 37)",
        "f16kv",
        rel_err(
            &od.to_vec::<f32>(q.len()).expect("read"),
            &reference(&q, 1, len - 1, 37),
        ),
        1e-4,
    );
    // Prefill: 9 causal queries at positions 248..257.
    let nt = 9usize;
    let q = rand_vec(rng, nt * n_heads * kv.head_dim, 1.0);
    let (qd, od) = (up(d, &q), d.alloc(q.len() * 4, "o").expect("alloc"));
    let a = AttnParams {
        n_tokens: nt,
        n_heads,
        kv,
        pos0: len - nt,
        scale,
        window: 0,
    };
    d.attention(s, &qd, &kc, &vc, &od, a).expect("prefill");
    s.synchronize().expect("sync");
    t.add(
        "attn_prefill_f16kv_f32",
        "f16kv",
        rel_err(
            &od.to_vec::<f32>(q.len()).expect("read"),
            &reference(&q, nt, len - nt, 0),
        ),
        1e-4,
    );
    d.attention(s, &qd, &kc, &vc, &od, AttnParams { window: 5, ..a })
        .expect("prefill, window");
    s.synchronize().expect("sync");
    t.add(
        "attn_prefill_f16kv_f32 (window 5)",
        "f16kv",
        rel_err(
            &od.to_vec::<f32>(q.len()).expect("read"),
            &reference(&q, nt, len - nt, 5),
        ),
        1e-4,
    );
    // 40 queries at positions 217..257: three token tiles of the tiled kernel (the last one
    // partial), key tiles from 0 (or the window's start) up; then the same prompt in two chunks
    // (17 + 23 tokens), which must give the same bits (a token's result does not depend on the
    // tokens that share its block).
    let nt = 40usize;
    let q = rand_vec(rng, nt * n_heads * kv.head_dim, 1.0);
    let (qd, od) = (up(d, &q), d.alloc(q.len() * 4, "o").expect("alloc"));
    let a = AttnParams {
        n_tokens: nt,
        n_heads,
        kv,
        pos0: len - nt,
        scale,
        window: 0,
    };
    for window in [0, 37] {
        d.attention(s, &qd, &kc, &vc, &od, AttnParams { window, ..a })
            .expect("prefill, 40 tokens");
        s.synchronize().expect("sync");
        let whole = od.to_vec::<f32>(q.len()).expect("read");
        t.add(
            &format!("attention prefill, 40 tokens in tiles (d {head_dim}, window {window})"),
            "f16kv",
            rel_err(&whole, &reference(&q, nt, len - nt, window)),
            1e-4,
        );
        let per = n_heads * kv.head_dim;
        let mut chunked = Vec::new();
        for (start, n) in [(0usize, 17usize), (17, 23)] {
            let qc = up(d, &q[start * per..(start + n) * per]);
            let oc = d.alloc(n * per * 4, "o chunk").expect("alloc");
            let ac = AttnParams {
                n_tokens: n,
                pos0: len - nt + start,
                window,
                ..a
            };
            d.attention(s, &qc, &kc, &vc, &oc, ac)
                .expect("prefill chunk");
            s.synchronize().expect("sync");
            chunked.extend(oc.to_vec::<f32>(n * per).expect("read"));
        }
        let same = chunked
            .iter()
            .zip(&whole)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        t.add(
            &format!("attention prefill, 17 + 23 = 40 tokens bit for bit (d {head_dim}, window {window})"),
            "f16kv",
            if same { 0.0 } else { 1.0 },
            0.0,
        );
    }
}

/// The sampler's algorithm on the host (same candidate order, same cut), in f64.
fn sample_ref(logits: &[f32], sp: SampleParams) -> (i32, f64) {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let k = if sp.top_k == 0 {
        256
    } else {
        sp.top_k.min(256)
    }
    .min(logits.len());
    let vmax = f64::from(logits[idx[0]]);
    let t = f64::from(sp.temperature);
    let z: f64 = logits
        .iter()
        .map(|v| ((f64::from(*v) - vmax) / t).exp())
        .sum();
    let p: Vec<f64> = idx[..k]
        .iter()
        .map(|&i| ((f64::from(logits[i]) - vmax) / t).exp() / z)
        .collect();
    let mut keep = 0;
    let mut cum = 0.0;
    while keep < k {
        cum += p[keep];
        keep += 1;
        if cum >= f64::from(sp.top_p) {
            break;
        }
    }
    let target = f64::from(sp.u) * cum;
    let mut acc = 0.0;
    let mut margin = f64::INFINITY;
    for (c, pc) in p[..keep].iter().enumerate() {
        acc += pc;
        margin = margin.min((target - acc).abs());
        if target < acc {
            return (idx[c] as i32, margin);
        }
    }
    (idx[keep - 1] as i32, margin)
}

fn check_sampling<D: KernelDevice>(d: &D, s: &D::Stream, t: &mut Table, rng: &mut ChaCha8Rng) {
    let n = 49_152usize; // SmolLM2 vocabulary
    let mut logits = rand_vec(rng, n, 8.0);
    logits[31_337] = 12.5; // a clear maximum away from index 0
    let ld = up(d, &logits);
    let out = d.alloc(4, "token").expect("alloc");
    d.argmax(s, &ld, n, 1, &out).expect("argmax");
    s.synchronize().expect("sync");
    let got = out.to_vec::<i32>(1).expect("read")[0];
    t.add(
        "argmax_f32",
        "f32",
        if got == 31_337 { 0.0 } else { 1.0 },
        0.0,
    );
    // Several rows at once (a batched step's greedy tokens), each against the host's
    // `sample::argmax`: a clear maximum, ties (the lowest id wins), NaNs (never chosen; a NaN
    // first logit gives 0), a row of -inf, a maximum in the last place.
    let mut rows: Vec<Vec<f32>> = (0..6).map(|_| rand_vec(rng, n, 8.0)).collect();
    rows[0][777] = 20.0;
    rows[1][40_000] = 20.0;
    rows[1][1_000] = 20.0;
    rows[1][45_000] = 20.0;
    rows[2][5] = f32::NAN;
    rows[2][6] = 30.0;
    rows[2][7] = f32::NAN;
    rows[3][0] = f32::NAN;
    rows[3][9] = 30.0;
    rows[4].iter_mut().for_each(|v| *v = f32::NEG_INFINITY);
    rows[5][n - 1] = 25.0;
    let flat: Vec<f32> = rows.concat();
    // Own names: `ld` and `out` (the one-row logits) are sampled from below.
    let rows_d = up(d, &flat);
    let toks = d.alloc(4 * rows.len(), "tokens").expect("alloc");
    d.argmax(s, &rows_d, n, rows.len(), &toks)
        .expect("argmax rows");
    s.synchronize().expect("sync");
    let got = toks.to_vec::<i32>(rows.len()).expect("read");
    let want: Vec<i32> = rows
        .iter()
        .map(|r| rocmforge::sample::argmax(r) as i32)
        .collect();
    assert_eq!(
        want,
        [777, 1_000, 6, 0, 0, n as i32 - 1],
        "host argmax of the test rows"
    );
    let wrong = got.iter().zip(&want).filter(|(g, w)| g != w).count();
    t.add("argmax_f32 (6 rows)", "f32", wrong as f64, 0.0);

    let mut mismatches = 0;
    let mut cases = 0;
    for (top_k, top_p, temp) in [
        (40usize, 0.95f32, 0.8f32),
        (1, 1.0, 1.0),
        (0, 0.9, 1.0),
        (10, 1.0, 2.0),
        (256, 0.5, 0.7),
    ] {
        for _ in 0..8 {
            let u: f32 = rng.gen_range(0.0..1.0);
            let sp = SampleParams {
                top_k,
                top_p,
                temperature: temp,
                u,
            };
            d.sample(s, &ld, n, sp, &out).expect("sample");
            s.synchronize().expect("sync");
            let got = out.to_vec::<i32>(1).expect("read")[0];
            let (want, margin) = sample_ref(&logits, sp);
            cases += 1;
            // f32 vs f64 cumulative sums may disagree only when u lands within rounding of a
            // boundary between two candidates.
            if got != want && margin > 1e-5 {
                mismatches += 1;
                println!(
                    "sample mismatch k={top_k} p={top_p} T={temp} u={u}: gpu {got}, ref {want}"
                );
            }
        }
    }
    t.add(
        &format!("sample_topk_topp_f32 ({cases})"),
        "f32",
        f64::from(mismatches),
        0.0,
    );
}

fn check_memory_and_events<D: KernelDevice>(d: &D, s: &D::Stream, t: &mut Table) {
    // Recoverable OOM: an impossible allocation is an error and the device keeps working.
    let (free, total) = d.mem_info().expect("mem info");
    println!("device memory: {free} free of {total}");
    let oom = d.alloc(total.saturating_mul(4), "impossible");
    let oom_ok = matches!(oom, Err(BackendError::OutOfMemory { .. }));
    let after = upload(d, &[1.0f32, 2.0], "after oom").and_then(|b| b.to_vec::<f32>(2));
    t.add(
        "OOM is an error, recoverable",
        "-",
        if oom_ok && after.ok() == Some(vec![1.0, 2.0]) {
            0.0
        } else {
            1.0
        },
        0.0,
    );

    // Pinned ring slot -> device on a copy stream; compute stream waits on the event.
    let mut pinned = d.alloc_pinned(1 << 20).expect("pinned");
    for (i, b) in pinned.host_bytes_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let copy = d.new_stream().expect("stream");
    let dst = d.alloc(1 << 20, "dst").expect("dst");
    let (e0, e1) = (
        d.new_event(true).expect("ev"),
        d.new_event(true).expect("ev"),
    );
    copy.record(&e0).expect("record");
    // SAFETY: `pinned` and `dst` outlive the copy: e1 is synchronised below before either drops.
    unsafe { d.copy_htod_async(&copy, &dst, 0, &pinned, 0, 1 << 20) }.expect("copy");
    copy.record(&e1).expect("record");
    s.wait(&e1).expect("wait");
    s.synchronize().expect("sync");
    let done = e1.is_complete().expect("query");
    let ms = e0.elapsed_ms(&e1).expect("elapsed");
    let back = dst.to_vec::<u8>(1 << 20).expect("read");
    println!("1 MiB pinned H2D: {ms:.3} ms");
    t.add(
        "pinned H2D + event wait",
        "-",
        if done && back == pinned.host_bytes() {
            0.0
        } else {
            1.0
        },
        0.0,
    );
}

/// Median milliseconds of `f` (launches on `s`) over 20 timed runs after one untimed warm-up.
fn median_ms<D: KernelDevice>(d: &D, s: &D::Stream, mut f: impl FnMut()) -> f64 {
    let (e0, e1) = (
        d.new_event(true).expect("ev"),
        d.new_event(true).expect("ev"),
    );
    f();
    let mut ms = Vec::new();
    for _ in 0..20 {
        s.record(&e0).expect("rec");
        f();
        s.record(&e1).expect("rec");
        e1.synchronize().expect("sync");
        ms.push(e0.elapsed_ms(&e1).expect("elapsed"));
    }
    ms.sort_by(f32::total_cmp);
    f64::from(ms[ms.len() / 2])
}

/// Informational only (printed, never asserted): effective weight bandwidth of mmvq on an
/// 8B-shape FFN matrix [14336, 4096], median of 20 timed launches after a warm-up.
fn print_mmvq_bandwidth<D: KernelDevice>(d: &D, s: &D::Stream, rng: &mut ChaCha8Rng) {
    let (rows, cols) = (14_336usize, 4096usize);
    for qt in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::F16,
    ] {
        let w = random_weights(qt, rows, cols, rng);
        let wd = upload(d, &w, "bench w").expect("upload");
        let xd = up(d, &rand_vec(rng, 16 * cols, 1.0));
        let yd = d.alloc(16 * rows * 4, "y").expect("alloc");
        let m = QMatrix {
            qtype: qt,
            nrows: rows,
            ncols: cols,
        };
        // n vectors per product: 1 (decode), 8 and 16 (batched decode of that many sequences).
        for n in [1usize, 8, 16] {
            let med = median_ms(d, s, || d.mmvq_n(s, &wd, m, &xd, &yd, n).expect("mmvq"));
            println!(
                "bench mmvq_{:<5} x{n:<2} [{rows}x{cols}] {:>8.1} us  {:>7.1} GB/s of weights  {:>6.1} us per vector",
                qt.name().to_lowercase(),
                med * 1e3,
                w.len() as f64 / (med * 1e-3) / 1e9,
                med * 1e3 / n as f64
            );
            if !q8a_capable(qt) {
                continue;
            }
            // The 8-bit path: quantizing the activations is part of each timed product.
            let xq = d.alloc(q8a_bytes(n, cols), "bench xq").expect("alloc");
            let med = median_ms(d, s, || {
                d.quantize_q8a(s, &xd, &xq, n, cols).expect("quantize");
                d.mmvq_q8(s, &wd, m, &xq, &yd, n).expect("mmvq_q8");
            });
            println!(
                "bench mmvq_{:<5} x{n:<2} q8a [{rows}x{cols}] {:>8.1} us  {:>7.1} GB/s of weights  {:>6.1} us per vector",
                qt.name().to_lowercase(),
                med * 1e3,
                w.len() as f64 / (med * 1e-3) / 1e9,
                med * 1e3 / n as f64
            );
        }
    }
}

backend_test! {
    fn gpu_kernels_match_cpu_reference(dev: &impl KernelDevice) {
        check_every_kernel(dev);
    }
}

fn check_every_kernel<D: KernelDevice>(d: &D) {
    println!("device: {}", d.describe());
    let s = d.new_stream().expect("stream");
    let mut t = Table::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_cafe);

    // Device view of the block sizes vs the Rust table.
    let sizes = d.device_block_sizes(&s).expect("block sizes");
    for ((qt, name), got) in DEVICE_BLOCKS.iter().zip(&sizes) {
        t.add(
            &format!("sizeof({name})"),
            qt.name(),
            if u64::from(*got) == qt.block_bytes() {
                0.0
            } else {
                1.0
            },
            0.0,
        );
    }
    let t0 = std::time::Instant::now();
    for (file, names) in rocmforge::backend::kernels::entry_points_for(D::VENDOR != "HIP") {
        for name in names {
            d.kernel(file, &name).expect("kernel");
        }
    }
    println!(
        "all modules ready in {:.3} s (compile or cache)",
        t0.elapsed().as_secs_f64()
    );

    check_weights(d, &s, &mut t, &mut rng);
    q8::check_mmvq_q8_staged(d, &s, &mut t, &mut rng);
    q8::check_mmvq_q8_mma(d, &s, &mut t, &mut rng);
    check_float_ops(d, &s, &mut t, &mut rng);
    check_attention(d, &s, &mut t, &mut rng, 64);
    check_attention(d, &s, &mut t, &mut rng, 128);
    attention::check_split_decode(d, &s, &mut t, &mut rng, 64);
    attention::check_split_decode(d, &s, &mut t, &mut rng, 128);
    attention::check_batched_decode(d, &s, &mut t, &mut rng, 64);
    attention::check_batched_decode(d, &s, &mut t, &mut rng, 128);
    attention::check_paged_attention(d, &s, &mut t, &mut rng, 64);
    attention::check_paged_attention(d, &s, &mut t, &mut rng, 128);
    check_sampling(d, &s, &mut t, &mut rng);
    check_memory_and_events(d, &s, &mut t);
    print_mmvq_bandwidth(d, &s, &mut rng);
    q8::print_mmvq_q8_shapes(d, &s, &mut rng);
    t.print_and_check();
}
