//! The runtime builder's tuning knobs change what the runtime does (CPU, SmolLM2): a KV limit
//! caps the context or refuses the model at `build`, the CPU ISA cap reaches the kernels'
//! choice. (The third knob, `vendor_gemm`, only acts on a GPU: `LayeredOptions::use_blas`.)

use rocmforge::gguf::GgufFile;
use rocmforge::model::{bytes_per_token, HParams, KvType};
use rocmforge::quant::CpuIsa;
use rocmforge_actors::{GenerateRequest, Runtime, RuntimeError};
use std::path::PathBuf;

fn smollm2() -> PathBuf {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.exists(),
        "test model {} is missing: run scripts/fetch-model.sh",
        p.display()
    );
    p
}

/// Bytes one context position of SmolLM2 costs with the default (f16) KV cache.
fn per_token() -> u64 {
    let file = GgufFile::open(smollm2()).expect("open");
    let hp = HParams::try_from(file.metadata()).expect("hparams");
    bytes_per_token(&hp, KvType::F16) as u64
}

#[test]
fn a_kv_limit_on_the_builder_caps_the_context() {
    // Room for 300 positions (the default context is 4096, the model's 8192).
    let limit = per_token() * 300 + per_token() / 2;
    let rt = Runtime::builder()
        .model(smollm2())
        .device(rocmforge::backend::BackendKind::Cpu)
        .kv_limit(limit)
        .build()
        .expect("a capped context still builds");
    let r = rt
        .generate(GenerateRequest::tokens(vec![28; 301], 1))
        .collect_tokens();
    match r {
        Err(RuntimeError::BadRequest(m)) => {
            assert!(m.contains("the context holds 300"), "{m}")
        }
        other => panic!("a 301-token prompt in a 300-token context: {other:?}"),
    }
    rt.shutdown().expect("shutdown");
}

#[test]
fn a_kv_limit_below_the_minimum_context_refuses_the_model() {
    // 1 MiB holds ~45 SmolLM2 positions: below the 256 a capped context keeps.
    let r = Runtime::builder()
        .model(smollm2())
        .device(rocmforge::backend::BackendKind::Cpu)
        .kv_limit(1 << 20)
        .build();
    match r {
        Err(RuntimeError::Compute {
            layer: None,
            message,
        }) => {
            assert!(message.contains("KV cache of 4096 tokens"), "{message}");
            assert!(
                message.contains("over the limit of 1048576 bytes"),
                "{message}"
            );
            assert!(message.contains("the configured KV limit"), "{message}");
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("built although the KV cache cannot fit"),
    }
}

#[test]
fn the_cpu_isa_cap_reaches_the_kernel_choice() {
    let rt = Runtime::builder()
        .model(smollm2())
        .device(rocmforge::backend::BackendKind::Cpu)
        .cpu_isa(CpuIsa::Avx2)
        .build()
        .expect("build");
    assert_eq!(rocmforge::quant::cpu_isa(), CpuIsa::Avx2);
    // Never the VNNI kernels under the cap; AVX2 wherever the CPU has it.
    #[cfg(target_arch = "x86_64")]
    let has_avx2 = std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let has_avx2 = false;
    let want = if has_avx2 { "avx2" } else { "portable" };
    assert_eq!(rocmforge::quant::tile_kernels(), want);
    rt.shutdown().expect("shutdown");
    rocmforge::quant::set_cpu_isa(CpuIsa::Best);
}
