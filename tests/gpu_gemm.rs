//! The prefill GEMM (`y[t * ldy + r] = sum_j x[t, j] * w[r, j]`, f16 in, f32 out) against a CPU
//! reference on random data, through the vendor-neutral `GemmF16` seam: the portable kernel
//! (`kernels/gemm.cu`) on CUDA and, with the `hip` feature, on HIP; cuBLAS on CUDA for
//! comparison. Shapes are chosen so rows, k and n are not multiples of the 64 x 64 x 32 tile, one
//! writes a column range of a wider output (`ldy > rows`, the weight-tile case) and checks that
//! the columns around it are untouched. Needs a GPU: ignored unless the `gpu-tests` feature is
//! on, and failing without a device when it is (tests/common/gpu.rs).

#[macro_use]
mod common;

use half::f16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rocmforge::backend::gpu::{view, BufferIo, GemmF16, GemmF16Nt, KernelDevice, PortableGemm};
use rocmforge::backend::DeviceStream;

/// (rows, k, n, ldy, first output column): odd sizes around the 64 x 64 x 32 tile, a single
/// element, exact tiles, a tile inside a wider output, SmolLM2's FFN down shape.
const SHAPES: [(usize, usize, usize, usize, usize); 7] = [
    (1, 1, 1, 1, 0),
    (67, 50, 9, 67, 0),
    (130, 77, 65, 130, 0),
    (64, 64, 64, 64, 0),
    (200, 300, 70, 233, 20),
    (3, 33, 129, 5, 1),
    (576, 1536, 33, 576, 0),
];

/// Sentinel in output columns the GEMM must not write.
const UNTOUCHED: f32 = -12345.0;

/// Largest |gpu - cpu| relative to sum_j |x w| of that output (the scale of f32 rounding), over
/// every shape; panics if a column outside the tile changed.
fn max_rel_err<D: KernelDevice>(dev: &D, gemm: &mut dyn GemmF16<D>, seed: u64) -> f64 {
    let st = dev.new_stream().expect("stream");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut worst = 0f64;
    for (rows, k, n, ldy, col0) in SHAPES {
        let rand_f16 = |rng: &mut ChaCha8Rng, len: usize| -> Vec<f16> {
            (0..len)
                .map(|_| f16::from_f32(rng.gen_range(-1.0f32..1.0)))
                .collect()
        };
        let w = rand_f16(&mut rng, rows * k);
        let x = rand_f16(&mut rng, n * k);
        let y_len = n * ldy;
        let wb = dev.alloc(w.len() * 2, "w16").expect("alloc");
        let xb = dev.alloc(x.len() * 2, "x16").expect("alloc");
        let yb = dev.alloc(y_len * 4, "y").expect("alloc");
        wb.write(0, &w).expect("write w");
        xb.write(0, &x).expect("write x");
        yb.write(0, &vec![UNTOUCHED; y_len]).expect("write y");
        // The tile's output starts at column col0 of rows ldy apart (as `linear` passes it).
        let yv = view(&yb, col0 * 4, (y_len - col0) * 4).expect("view");
        let op = GemmF16Nt {
            w16: &wb,
            rows,
            k,
            x16: &xb,
            n,
            y: &yv,
            ldy,
        };
        gemm.gemm_f16_nt(dev, &st, &op).expect("gemm");
        st.synchronize().expect("sync");
        let y: Vec<f32> = yb.to_vec(y_len).expect("read y");
        for t in 0..n {
            for c in 0..ldy {
                let got = y[t * ldy + c];
                if c < col0 || c >= col0 + rows {
                    assert_eq!(
                        got, UNTOUCHED,
                        "{rows}x{k}x{n}: column {c} of token {t} is outside the tile but changed"
                    );
                    continue;
                }
                let r = c - col0;
                let (mut exact, mut scale) = (0f64, 0f64);
                for j in 0..k {
                    let p = f64::from(x[t * k + j].to_f32()) * f64::from(w[r * k + j].to_f32());
                    exact += p;
                    scale += p.abs();
                }
                let e = (f64::from(got) - exact).abs() / scale.max(1e-30);
                assert!(
                    e.is_finite(),
                    "{rows}x{k}x{n}: y[{t}, {r}] = {got}, expected {exact}"
                );
                worst = worst.max(e);
            }
        }
        println!(
            "{} {rows} x {k} x {n} (ldy {ldy}, col {col0}): cumulative worst rel err {worst:.2e}",
            gemm.name()
        );
    }
    worst
}

/// f32 accumulation of up to 1536 products: rounding stays near k * 2^-24 of sum |x w| in the
/// worst case (9e-5 at k = 1536) and far below it in practice.
const PORTABLE_TOL: f64 = 1e-4;
/// cuBLAS may use tensor-core paths whose intermediate rounding is its own; it is only compared
/// here, the portable kernel is what this test checks tightly.
const CUBLAS_TOL: f64 = 2e-3;

/// The portable kernel on `dev` against the CPU; then the vendor's own GEMM, if it has one,
/// under its looser tolerance.
fn check_device<D: KernelDevice>(dev: &D) {
    let e = max_rel_err(dev, &mut PortableGemm, 7);
    println!(
        "portable gemm.cu on {}: worst rel err {e:.2e}",
        dev.describe()
    );
    assert!(e < PORTABLE_TOL, "portable GEMM error {e}");
    match dev.vendor_gemm() {
        Ok(mut blas) => {
            let e = max_rel_err(dev, blas.as_mut(), 7);
            println!(
                "{} on {}: worst rel err {e:.2e}",
                blas.name(),
                dev.describe()
            );
            assert!(e < CUBLAS_TOL, "{} error {e}", blas.name());
        }
        Err(why) => println!("no vendor GEMM compared: {why}"),
    }
}

backend_test! {
    /// `portable_gemm_matches_cpu::cuda` and, with the `hip` feature, `::hip`.
    fn portable_gemm_matches_cpu(dev: &impl KernelDevice) {
        check_device(dev);
    }
}
