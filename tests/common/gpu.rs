//! How a test that needs a GPU is gated, shared by the core crate's tests (`mod common`) and the
//! actors crate's (`#[path = "../../tests/common/gpu.rs"] mod gpu;`).
//!
//! A GPU test never reports "passed" without a GPU. Without the cargo feature `gpu-tests` it is
//! `#[ignore]`d with the reason, so a machine without a device (CI) counts it as ignored. With the
//! feature (or `-- --include-ignored`) it runs, and a missing driver or device fails it with the
//! error that says what is missing. `scripts/device-check.sh` runs them all on the GPU machine.
//!
//! - [`backend_test!`] turns one body into a test per backend, in a module named after it:
//!   `fn name(kind: BackendKind)` gives `name::cpu` (always runs), `name::cuda` and, with the
//!   `hip` feature, `name::hip`; `fn name(dev: &impl KernelDevice)` gives `name::cuda` and
//!   `name::hip` over an opened device (the CPU is the reference inside such a body).
//! - [`gpu_test!`] is one test for one vendor (`cuda:` or `hip:`), for APIs of that vendor only.
//! - [`require_device!`] opens device 0 or panics with the reason.
//! - [`assert_no_cuda_device`] guards the opposite kind of test, one of the no-device path: such
//!   a test is `#[cfg(not(feature = "gpu-tests"))]` (a GPU run expects a device) and fails where a
//!   device is present anyway, since there it would prove nothing.
//!
//! The macros name everything by absolute path, so they work from any module that imports them.
// Each test file uses some of them.
#![allow(unused_macros)]

/// Device 0 of `cuda` or `hip` (an `Arc` of the device), or a panic that names what is missing
/// (no driver library, no device, device unusable).
macro_rules! require_device {
    (cuda) => {
        match ::rocmforge::backend::cuda::CudaDevice::open(0) {
            Ok(d) => d,
            Err(e) => panic!(
                "this test needs a CUDA device and none is usable: {e}\n\
                 (GPU tests run on the GPU machine: scripts/device-build.sh, then \
                 scripts/device-check.sh there)"
            ),
        }
    };
    (hip) => {
        match ::rocmforge::backend::hip::HipDevice::open(0) {
            Ok(d) => d,
            Err(e) => panic!("this test needs a HIP device and none is usable: {e}"),
        }
    };
}

/// One test that needs a device of one vendor: ignored unless `gpu-tests` is on, failing when
/// the device is missing. `hip:` tests exist only with the `hip` feature.
macro_rules! gpu_test {
    (cuda: $(#[$m:meta])* fn $name:ident() $body:block) => {
        $(#[$m])*
        #[test]
        #[cfg_attr(
            not(feature = "gpu-tests"),
            ignore = "needs a CUDA device: run with --features gpu-tests (scripts/device-check.sh)"
        )]
        fn $name() $body
    };
    (hip: $(#[$m:meta])* fn $name:ident() $body:block) => {
        $(#[$m])*
        #[cfg(feature = "hip")]
        #[test]
        #[cfg_attr(
            not(feature = "gpu-tests"),
            ignore = "needs a HIP device: run with --features hip,gpu-tests on an AMD GPU"
        )]
        fn $name() $body
    };
}

/// The same test on every backend (candle's `test_device!`), as module `$name` with one test per
/// backend. Two forms:
///
/// `fn $name($kind: BackendKind) { .. }`: `cpu` always runs; `cuda` and `hip` (feature `hip`)
/// first require the device, then run the body with their `BackendKind`.
///
/// `fn $name($dev: &impl KernelDevice) { .. }`: `cuda` and `hip` run the body with `$dev` bound
/// to `&CudaDevice` / `&HipDevice`; no CPU instance (the CPU has no `KernelDevice`, it is the
/// body's reference).
macro_rules! backend_test {
    ($(#[$m:meta])* fn $name:ident($kind:ident: BackendKind) $body:block) => {
        $(#[$m])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn body($kind: ::rocmforge::backend::BackendKind) $body

            #[test]
            fn cpu() {
                body(::rocmforge::backend::BackendKind::Cpu);
            }

            gpu_test!(cuda: fn cuda() {
                drop(require_device!(cuda));
                body(::rocmforge::backend::BackendKind::Cuda);
            });

            gpu_test!(hip: fn hip() {
                drop(require_device!(hip));
                body(::rocmforge::backend::BackendKind::Hip);
            });
        }
    };
    ($(#[$m:meta])* fn $name:ident($dev:ident: &impl KernelDevice) $body:block) => {
        $(#[$m])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            gpu_test!(cuda: fn cuda() {
                let device = require_device!(cuda);
                let $dev = &*device;
                $body
            });

            gpu_test!(hip: fn hip() {
                let device = require_device!(hip);
                let $dev = &*device;
                $body
            });
        }
    };
}

/// For a test of the no-CUDA-device path (compiled only without `gpu-tests`): fails where a
/// device is present, because the test would then prove nothing.
pub fn assert_no_cuda_device(test: &str) {
    if rocmforge::backend::cuda::CudaDevice::open(0).is_ok() {
        panic!(
            "{test} checks behaviour without a CUDA device, but one is present here; \
             on a GPU machine run the GPU tests instead (--features gpu-tests compiles this out)"
        );
    }
}
