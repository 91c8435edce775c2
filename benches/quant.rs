//! Quant kernel throughput: dequantization and matvec in GB/s of weight bytes, one thread and
//! all threads, plus a streaming-read memory bandwidth reference and prefill-style matmul.
//!
//!     cargo bench -p rocmforge --bench quant -- --warm-up-time 0.5 --measurement-time 2
//!
//! Weight tensors are 32 MiB (matvec) / 8 MiB (dequant) so that they do not sit in the caches:
//! decode streams every weight once per token, and that is what these kernels must keep up with.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rocmforge::quant::{dequantize, dequantize_par, matmul, matvec, quantize, GgmlType};

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool")
}

fn threads_all() -> usize {
    rayon::current_num_threads()
}

fn data(n: usize) -> Vec<f32> {
    let mut s = 0x1234_5678_9abc_def0u64;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / 16777216.0 - 0.5
        })
        .collect()
}

/// A weight matrix of about `bytes` bytes with `cols` columns.
fn weights(ty: GgmlType, cols: usize, bytes: usize) -> (Vec<u8>, usize) {
    let rb = ty.row_bytes(cols as u64).expect("whole blocks") as usize;
    let rows = (bytes / rb).max(1);
    // Quantize one 64-row slab and repeat it: realistic blocks without quantizing 32 MiB.
    let slab = quantize(ty, &data(64 * cols)).expect("quantize");
    let mut w = Vec::with_capacity(rows * rb);
    while w.len() < rows * rb {
        let take = (rows * rb - w.len()).min(slab.len());
        w.extend_from_slice(&slab[..take]);
    }
    (w, rows)
}

fn membw(c: &mut Criterion) {
    let buf: Vec<u64> = (0..(64usize << 20) / 8).map(|i| i as u64).collect();
    let mut g = c.benchmark_group("membw");
    g.throughput(Throughput::Bytes((buf.len() * 8) as u64));
    let read = |s: &[u64]| {
        s.chunks_exact(8).fold([0u64; 8], |mut a, c| {
            for k in 0..8 {
                a[k] = a[k].wrapping_add(c[k]);
            }
            a
        })
    };
    g.bench_function("read_1t", |b| b.iter(|| black_box(read(&buf))));
    g.bench_function("read_1t_cputime", |b| {
        b.iter_custom(|iters| {
            let t0 = thread_cpu_time();
            for _ in 0..iters {
                black_box(read(&buf));
            }
            thread_cpu_time() - t0
        })
    });
    g.bench_function(BenchmarkId::new("read_all", threads_all()), |b| {
        use rayon::prelude::*;
        b.iter(|| {
            black_box(
                buf.par_chunks(1 << 16)
                    .map(|c| read(c)[0])
                    .reduce(|| 0, u64::wrapping_add),
            )
        })
    });
    g.finish();
}

const MATVEC_TYPES: [GgmlType; 6] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::F16,
];

fn bench_matvec(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec");
    let cols = 4096;
    let one = pool(1);
    for ty in MATVEC_TYPES {
        let (w, rows) = weights(ty, cols, 32 << 20);
        let x = data(cols);
        let mut y = vec![0.0f32; rows];
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_function(BenchmarkId::new(ty.name(), "1t"), |b| {
            b.iter(|| {
                one.install(|| matvec(ty, &w, rows, cols, &x, &mut y))
                    .expect("matvec")
            })
        });
        g.bench_function(
            BenchmarkId::new(ty.name(), format!("{}t", threads_all())),
            |b| b.iter(|| matvec(ty, &w, rows, cols, &x, &mut y).expect("matvec")),
        );
    }
    g.finish();
}

/// CPU time of the calling thread: on a shared machine (other jobs on the same 2 cores) wall
/// time measures the queue, not the kernel, so single-thread kernels are also timed in CPU time.
fn thread_cpu_time() -> std::time::Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer; the clock id is a constant.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    std::time::Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn bench_matvec_cputime(c: &mut Criterion) {
    let mut g = c.benchmark_group("matvec_cputime");
    let cols = 4096;
    let one = pool(1);
    for ty in MATVEC_TYPES {
        let (w, rows) = weights(ty, cols, 32 << 20);
        let x = data(cols);
        let mut y = vec![0.0f32; rows];
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_function(BenchmarkId::new(ty.name(), "1t"), |b| {
            b.iter_custom(|iters| {
                one.install(|| {
                    let t0 = thread_cpu_time();
                    for _ in 0..iters {
                        matvec(ty, &w, rows, cols, &x, &mut y).expect("matvec");
                    }
                    thread_cpu_time() - t0
                })
            })
        });
    }
    g.finish();
}

fn bench_matmul(c: &mut Criterion) {
    // Prefill shape of the test model's FFN: [1536, 576] weights, 32 prompt tokens.
    let mut g = c.benchmark_group("matmul_b32");
    let (rows, cols, batch) = (1536, 576, 32);
    for ty in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_0] {
        let w = quantize(ty, &data(rows * cols)).expect("quantize");
        let x = data(batch * cols);
        let mut y = vec![0.0f32; batch * rows];
        g.throughput(Throughput::Elements((2 * rows * cols * batch) as u64)); // flops
        g.bench_function(
            BenchmarkId::new(ty.name(), format!("{}t", threads_all())),
            |b| b.iter(|| matmul(ty, &w, rows, cols, &x, batch, &mut y).expect("matmul")),
        );
    }
    g.finish();
}

/// The products of one SmolLM2-135M layer (Q4_1 [rows, cols]) and its Q8_0 output head, in
/// thread CPU time on one thread: decode (batch 1), a batched decode step of 8 sequences
/// (batch 8) and prefill (batch 128) per shape. Stable on a
/// shared machine where wall time is not; the sum over shapes x 30 layers approximates the
/// kernel share of a token (see docs/PERFORMANCE.md, "CPU inference").
/// `ROCMFORGE_CPU_ISA=avx2` caps the kernels as it does for `rocmforge` (AVX2 against AVX-512
/// VNNI on one machine).
fn bench_model_shapes(c: &mut Criterion) {
    if let Ok(v) = std::env::var("ROCMFORGE_CPU_ISA") {
        rocmforge::quant::set_cpu_isa(v.parse().expect("ROCMFORGE_CPU_ISA: best, vnni or avx2"));
    }
    let mut g = c.benchmark_group("smollm2_shapes_cputime");
    let one = pool(1);
    let shapes = [
        ("q4_1_576x576", GgmlType::Q4_1, 576, 576),
        ("q4_1_192x576", GgmlType::Q4_1, 192, 576),
        ("q4_1_1536x576", GgmlType::Q4_1, 1536, 576),
        ("q4_1_576x1536", GgmlType::Q4_1, 576, 1536),
        ("q8_0_49152x576", GgmlType::Q8_0, 49152, 576),
    ];
    for (name, ty, rows, cols) in shapes {
        // The head sees one row per sequence of a step, never a whole prompt.
        let batches: &[usize] = if rows > 4096 { &[1, 8] } else { &[1, 8, 128] };
        shape_cputime(&mut g, &one, (name, ty, rows, cols), batches, 1);
    }
    g.finish();
}

/// `matmul` of a `[rows, cols]` matrix of `ty` by each batch size, in thread CPU time on `one`;
/// each call reads the next of `copies` copies of the matrix.
fn shape_cputime(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    one: &rayon::ThreadPool,
    (name, ty, rows, cols): (&str, GgmlType, usize, usize),
    batches: &[usize],
    copies: usize,
) {
    let w = quantize(ty, &data(rows * cols)).expect("quantize");
    let ws: Vec<Vec<u8>> = (0..copies.max(1)).map(|_| w.clone()).collect();
    for &batch in batches {
        let x = data(batch * cols);
        let mut y = vec![0.0f32; batch * rows];
        g.throughput(Throughput::Elements((rows * cols * batch) as u64)); // MACs
        g.bench_function(BenchmarkId::new(name, format!("b{batch}")), |b| {
            b.iter_custom(|iters| {
                one.install(|| {
                    let t0 = thread_cpu_time();
                    for i in 0..iters as usize {
                        let w = &ws[i % ws.len()];
                        matmul(ty, w, rows, cols, &x, batch, &mut y).expect("matmul");
                    }
                    thread_cpu_time() - t0
                })
            })
        });
    }
}

/// As [`bench_model_shapes`] for the FFN's two Q4_1 shapes, but each call reads the next of
/// enough copies of the matrix (>= 96 MiB together) that its weights come from DRAM, as in a
/// served model, not from the caches the previous call filled.
fn bench_model_shapes_cold(c: &mut Criterion) {
    let mut g = c.benchmark_group("smollm2_shapes_cold_cputime");
    let one = pool(1);
    for (name, rows, cols) in [("q4_1_1536x576", 1536, 576), ("q4_1_576x1536", 576, 1536)] {
        let ty = GgmlType::Q4_1;
        let bytes = ty.row_bytes(cols as u64).expect("whole blocks") as usize * rows;
        let copies = (96usize << 20).div_ceil(bytes);
        shape_cputime(&mut g, &one, (name, ty, rows, cols), &[1, 8], copies);
    }
    g.finish();
}

const DEQUANT_TYPES: [GgmlType; 14] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
];

fn bench_dequant(c: &mut Criterion) {
    let mut g = c.benchmark_group("dequant");
    for ty in DEQUANT_TYPES {
        let (w, rows) = weights(ty, 4096, 8 << 20);
        let mut y = vec![0.0f32; rows * 4096];
        g.throughput(Throughput::Bytes(w.len() as u64));
        g.bench_function(BenchmarkId::new(ty.name(), "1t"), |b| {
            b.iter(|| dequantize(ty, &w, &mut y).expect("dequantize"))
        });
        g.bench_function(
            BenchmarkId::new(ty.name(), format!("{}t", threads_all())),
            |b| b.iter(|| dequantize_par(ty, &w, &mut y).expect("dequantize")),
        );
    }
    g.finish();
}

criterion_group!(
    benches,
    membw,
    bench_matvec,
    bench_matvec_cputime,
    bench_matmul,
    bench_model_shapes,
    bench_model_shapes_cold,
    bench_dequant
);
criterion_main!(benches);
