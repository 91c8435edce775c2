//! The pipelined runtime on a GPU backend (`Runtime::builder().device(..)`, `run --pipeline
//! --backend cuda|hip`). Without a GPU: the no-device paths give clear errors and `auto` falls
//! back to the CPU. On every backend (`pipeline_matches_the_exact_cpu::{cpu,cuda,hip}`):
//! SmolLM2 through the actors gives the exact CPU's greedy tokens, unbounded and with a 40%
//! budget that keeps weights under it.
//!
//! Gating (tests/common/gpu.rs): the CUDA and HIP instances are ignored unless the `gpu-tests`
//! feature is on and fail without a device when it is. The no-device tests are compiled out
//! with `gpu-tests` (a device is then expected) and fail where a device is present anyway.
// With `hip` and `gpu-tests` every no-device test is compiled out, and some imports with them.
#![cfg_attr(all(feature = "hip", feature = "gpu-tests"), allow(unused_imports))]

#[macro_use]
#[path = "../../tests/common/gpu.rs"]
#[allow(dead_code)]
mod gpu;

use rocmforge::backend::{BackendError, BackendKind};
use rocmforge::model::{Precision, SequenceConfig};
use rocmforge_actors::compute::llama::LlamaCompute;
use rocmforge_actors::{GenerateRequest, MemoryBudget, Runtime, RuntimeError};
use std::path::PathBuf;
use std::process::Command;

/// SmolLM2 from the checkout, or `ROCMFORGE_TEST_MODEL` (the GPU machine has no checkout).
fn smollm2() -> PathBuf {
    let p = std::env::var_os("ROCMFORGE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

const PROMPT: [u32; 6] = [504, 3575, 282, 4649, 314, 1];

fn request(n: usize) -> GenerateRequest {
    let mut r = GenerateRequest::tokens(PROMPT.to_vec(), n);
    r.stop_at_eos = false;
    r
}

fn tokens(builder: rocmforge_actors::RuntimeBuilder, n: usize) -> (Vec<u32>, u64, u64) {
    let rt = builder.build().expect("runtime");
    let ids = rt
        .generate(request(n))
        .into_blocking()
        .map(|e| e.expect("token").token)
        .collect();
    let st = rt.stats();
    rt.shutdown().expect("shutdown");
    (ids, st.peak_allocated_bytes, st.budget_bytes)
}

#[cfg(not(feature = "gpu-tests"))]
#[test]
fn cuda_without_a_device_is_a_clear_error() {
    gpu::assert_no_cuda_device("cuda_without_a_device_is_a_clear_error");
    let e = Runtime::builder()
        .model(smollm2())
        .device(BackendKind::Cuda)
        .build()
        .expect_err("no CUDA here");
    assert!(
        matches!(
            e,
            RuntimeError::Device(BackendError::NoDevice {
                backend: "CUDA",
                ..
            })
        ),
        "{e}"
    );
    assert!(e.to_string().starts_with("no CUDA driver/device"), "{e}");
}

#[cfg(not(feature = "hip"))]
#[test]
fn hip_without_the_feature_is_not_compiled() {
    let e = Runtime::builder()
        .model(smollm2())
        .device(BackendKind::Hip)
        .build()
        .expect_err("HIP not compiled in");
    assert!(
        matches!(
            e,
            RuntimeError::Device(BackendError::NotCompiled { backend: "HIP", .. })
        ),
        "{e}"
    );
}

/// With the feature and no AMD GPU (every machine this project has): a typed "no HIP device".
/// Compiled out when a HIP GPU run requests a device (the `hip` instance of
/// `pipeline_matches_the_exact_cpu` runs there instead).
#[cfg(all(feature = "hip", not(feature = "gpu-tests")))]
#[test]
fn hip_without_a_device_is_a_typed_error() {
    let Err(e) = Runtime::builder()
        .model(smollm2())
        .device(BackendKind::Hip)
        .build()
    else {
        panic!("a HIP device opened here, so the no-device path cannot be checked");
    };
    assert!(
        matches!(
            e,
            RuntimeError::Device(BackendError::NoDevice { backend: "HIP", .. })
        ),
        "{e}"
    );
}

#[cfg(not(feature = "gpu-tests"))]
#[test]
fn auto_without_a_gpu_runs_on_the_cpu() {
    gpu::assert_no_cuda_device("auto_without_a_gpu_runs_on_the_cpu");
    let (auto, _, _) = tokens(
        Runtime::builder()
            .model(smollm2())
            .device(BackendKind::Auto),
        4,
    );
    let (cpu, _, _) = tokens(Runtime::builder().model(smollm2()), 4);
    assert_eq!(auto.len(), 4);
    assert_eq!(auto, cpu);
}

#[cfg(not(feature = "gpu-tests"))]
#[test]
fn cli_pipeline_on_cuda_without_a_device_says_why() {
    gpu::assert_no_cuda_device("cli_pipeline_on_cuda_without_a_device_says_why");
    let out = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args([
            "run",
            "--pipeline",
            "--backend",
            "cuda",
            "-n",
            "2",
            "-p",
            "Hi",
        ])
        .arg("-m")
        .arg(smollm2())
        .output()
        .expect("run the CLI");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no CUDA driver/device"), "{err}");
}

/// `run --backend hip` without `--pipeline` takes the pipelined runtime (the only path that runs a
/// model on HIP): without the feature it says so, with it and no AMD GPU it says there is none
/// (compiled out when a HIP GPU run requests a device; failing where one is present anyway).
#[cfg(not(all(feature = "hip", feature = "gpu-tests")))]
#[test]
fn cli_run_on_hip_routes_to_the_pipeline_and_says_why_it_cannot() {
    assert!(
        !(cfg!(feature = "hip") && rocmforge::backend::hip::HipDevice::open(0).is_ok()),
        "a HIP device is present, so the no-device path cannot be checked"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args(["run", "--backend", "hip", "-n", "2", "-p", "Hi"])
        .arg("-m")
        .arg(smollm2())
        .output()
        .expect("run the CLI");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let why = if cfg!(feature = "hip") {
        "no HIP driver/device"
    } else {
        "the HIP backend is not compiled into this build"
    };
    assert!(err.contains(why), "{err}");
    // The old direct-path refusal is gone: HIP is routed, not rejected.
    assert!(!err.contains("not implemented"), "{err}");
}

/// The exact CPU's greedy tokens through the pipelined runtime on `kind` (exact precision),
/// unbounded and at a 40% weight budget that the peak of allocated weights stays under. On the CPU the pipeline runs
/// the exact compute too (its default precision quantizes activations, so its tokens are not the
/// oracle's): there the instance checks the budget path against the unbounded run.
fn check_pipeline_matches_the_exact_cpu(kind: BackendKind) {
    const N: usize = 32;
    let exact = SequenceConfig {
        precision: Precision::Exact,
        ..SequenceConfig::default()
    };
    // The GPU in its exact precision too (f32 activations; its default quantizes them as the
    // CPU's fast path does, checked against the oracle with a bound in gpu_forward.rs).
    let on_kind = |b: rocmforge_actors::RuntimeBuilder| match kind {
        BackendKind::Cpu => b.compute(LlamaCompute::factory(exact)),
        gpu => b.device_with(
            gpu,
            rocmforge_actors::compute::gpu::GpuPipelineOptions {
                precision: Precision::Exact,
                ..Default::default()
            },
        ),
    };
    let (cpu, _, _) = tokens(
        Runtime::builder()
            .model(smollm2())
            .compute(LlamaCompute::factory(exact)),
        N,
    );
    let (got, _, _) = tokens(on_kind(Runtime::builder().model(smollm2())), N);
    assert_eq!(got, cpu, "{kind} pipeline vs CPU (exact), greedy");
    let (streamed, peak, budget) = tokens(
        on_kind(Runtime::builder().model(smollm2()))
            .memory_budget(MemoryBudget::FractionOfWeights(0.4)),
        N,
    );
    assert_eq!(streamed, cpu, "{kind} pipeline at a 40% budget vs CPU");
    assert!(peak <= budget, "peak {peak} > budget {budget}");
    // The CPU computes from the mapped file: it allocates no weight memory to count.
    assert!(
        kind == BackendKind::Cpu || peak > 0,
        "{kind}: no weight memory counted"
    );
}

backend_test! {
    fn pipeline_matches_the_exact_cpu(kind: BackendKind) {
        check_pipeline_matches_the_exact_cpu(kind);
    }
}

/// `serve --backend cuda` without a device: the server does not start, and says why.
#[cfg(not(feature = "gpu-tests"))]
#[test]
fn serve_on_cuda_without_a_device_fails_to_start_with_the_reason() {
    gpu::assert_no_cuda_device("serve_on_cuda_without_a_device_fails_to_start_with_the_reason");
    let mut cfg = rocmforge_actors::serve::ServeConfig::new(smollm2());
    cfg.port = 0;
    cfg.backend = BackendKind::Cuda;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let e = rt
        .block_on(rocmforge_actors::serve::Server::start(cfg))
        .err()
        .expect("no CUDA here");
    assert!(e.to_string().starts_with("no CUDA driver/device"), "{e}");
}

// A device out of memory while weights load (issue 15): with a budget larger than the memory
// left, the load is a typed out-of-memory error for the runtime's build or for the requests
// that needed the weights; once memory is back, the runtime answers as before.
// `runtime_out_of_memory.rs` runs the same path on the CPU through a starved backend.
gpu_test!(cuda: fn out_of_device_memory_fails_the_load_and_the_runtime_recovers() {
    use rocmforge::backend::cuda::CudaDevice;
    use rocmforge::backend::ComputeDevice;
    const N: usize = 8;
    let cuda = || {
        Runtime::builder()
            .model(smollm2())
            .device(BackendKind::Cuda)
            .memory_budget(MemoryBudget::Bytes(2 << 30))
    };
    let (baseline, _, _) = tokens(cuda(), N);
    let generate = |rt: &rocmforge_actors::RuntimeHandle| -> Result<Vec<u32>, RuntimeError> {
        rt.generate(request(N))
            .into_blocking()
            .map(|e| e.map(|e| e.token))
            .collect()
    };
    let oom = |e: &dyn std::fmt::Display| e.to_string().contains("out of device memory");
    let dev = CudaDevice::open(0).expect("device");
    let (free, total) = dev.mem_info().expect("memory info");
    // Leave 48 MiB: less than SmolLM2's weights (98 MB) under a 2 GiB budget.
    let hog = dev
        .alloc(free.saturating_sub(48 << 20), "test: fill the device")
        .expect("fill the device");
    println!("filled {} of {total} bytes free", free.saturating_sub(48 << 20));
    let rt = match cuda().build() {
        Err(e) => {
            assert!(oom(&e), "build on a full device: {e}");
            drop(hog);
            cuda().build().expect("build after the memory came back")
        }
        Ok(rt) => {
            let e = generate(&rt).expect_err("tokens from a full device");
            assert!(oom(&e), "request on a full device: {e}");
            drop(hog);
            rt
        }
    };
    assert_eq!(generate(&rt).expect("tokens after the memory came back"), baseline);
    rt.shutdown().expect("shutdown");
});
