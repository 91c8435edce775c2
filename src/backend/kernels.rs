//! The contract between the Rust side and the sources in `kernels/`: which file holds which
//! entry point, how quant types name kernels, and the device block layouts. Vendor-neutral:
//! CUDA and HIP compile the same files, and `backend::gpu` launches them on either.

use crate::quant::GgmlType;

/// Every weight type the device kernels read directly (mmvq, get_rows, dequantize).
pub const DEVICE_QTYPES: [GgmlType; 10] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// The part of a kernel name that names the weight type (`mmvq_{suffix}_f32`).
pub fn qtype_suffix(t: GgmlType) -> Option<&'static str> {
    Some(match t {
        GgmlType::F32 => "f32",
        GgmlType::F16 => "f16",
        GgmlType::Q4_0 => "q4_0",
        GgmlType::Q4_1 => "q4_1",
        GgmlType::Q5_0 => "q5_0",
        GgmlType::Q5_1 => "q5_1",
        GgmlType::Q8_0 => "q8_0",
        GgmlType::Q4_K => "q4_k",
        GgmlType::Q5_K => "q5_k",
        GgmlType::Q6_K => "q6_k",
        _ => return None,
    })
}

/// The device struct mirroring each block type in `kernels/quant_blocks.cuh`, in the order the
/// `quant_block_sizes` kernel writes their sizes (index 0 and 1: the f32 and f16 "blocks").
pub const DEVICE_BLOCKS: [(GgmlType, &str); 11] = [
    (GgmlType::F32, "float"),
    (GgmlType::F16, "rf_half"),
    (GgmlType::Q4_0, "block_q4_0"),
    (GgmlType::Q4_1, "block_q4_1"),
    (GgmlType::Q5_0, "block_q5_0"),
    (GgmlType::Q5_1, "block_q5_1"),
    (GgmlType::Q8_0, "block_q8_0"),
    (GgmlType::Q8_1, "block_q8_1"),
    (GgmlType::Q4_K, "block_q4_K"),
    (GgmlType::Q5_K, "block_q5_K"),
    (GgmlType::Q6_K, "block_q6_K"),
];

/// A translation unit that checks at compile time that every device block has the size the
/// Rust table gives (`static_assert(sizeof(block_q4_0) == 18, ...)`). Compiling it proves the
/// host and device views agree without running anything.
pub fn block_size_asserts() -> String {
    block_size_asserts_with(|t| t.block_bytes())
}

/// As [`block_size_asserts`] with the expected sizes from `size_of` (tests use a wrong table to
/// show the check can fail).
pub fn block_size_asserts_with(size_of: impl Fn(GgmlType) -> u64) -> String {
    let mut s = String::from("#include \"quant_blocks.cuh\"\n");
    for (t, name) in DEVICE_BLOCKS {
        s.push_str(&format!(
            "static_assert(sizeof({name}) == {}, \"{name} must be {} bytes like GgmlType::{}\");\n",
            size_of(t),
            size_of(t),
            t.name()
        ));
    }
    s
}

/// Every compilable kernel file and the entry points it must export in a CUDA build
/// ([`entry_points_for`] `(true)`).
pub fn entry_points() -> Vec<(&'static str, Vec<String>)> {
    entry_points_for(true)
}

/// The q8 products' tensor-core forms (suffixes after `mmvq_<type>_q8a`); two-tile forms
/// (`_ms2p`, `_mms2p`, `_mqs2p`) only for [`crate::backend::gpu::ops::mma_pair_capable`] types.
const TENSOR_CORE_FORMS: [&str; 23] = [
    "_m2", "_m4", "_m8", "_mm2", "_mm4", "_mm8", "_ms", "_mms", "_m2p", "_m4p", "_m8p", "_mm2p",
    "_mm4p", "_mm8p", "_msp", "_mmsp", "_mq2p", "_mq4p", "_mq8p", "_mqsp", "_ms2p", "_mms2p",
    "_mqs2p",
];

/// Every compilable kernel file and the entry points it must export: `tensor_cores` for a CUDA
/// build (mmvq_q8.cu's tensor-core forms exist only there: `RF_MMVQ8_TC`), `false` for HIP
/// ([`KernelDevice::VENDOR`](crate::backend::gpu::KernelDevice::VENDOR) `"HIP"`).
pub fn entry_points_for(tensor_cores: bool) -> Vec<(&'static str, Vec<String>)> {
    let per_type = |op: &str, out: &str| -> Vec<String> {
        DEVICE_QTYPES
            .iter()
            .filter_map(|t| qtype_suffix(*t))
            .map(|s| format!("{op}_{s}_{out}"))
            .collect()
    };
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        (
            "mmvq.cu",
            per_type("mmvq", "f32")
                .into_iter()
                .flat_map(|n| [format!("{n}_n"), n])
                .collect(),
        ),
        (
            "mmvq_q8.cu",
            DEVICE_QTYPES
                .iter()
                .filter(|t| q8a_capable(**t))
                .filter_map(|t| Some((*t, qtype_suffix(*t)?)))
                .flat_map(|(t, s)| {
                    let pair = crate::backend::gpu::ops::mma_pair_capable(t);
                    let tc = TENSOR_CORE_FORMS
                        .iter()
                        .copied()
                        .filter(move |v| pair || !v.ends_with("s2p"))
                        .filter(move |_| tensor_cores);
                    ["_n", "_w1", "_w2", "_w4", "_w8", "_sn", "_s1", "_s2", "_s4"]
                        .into_iter()
                        .chain(tc)
                        .map(move |v| format!("mmvq_{s}_q8a{v}"))
                })
                .chain(["quantize_q8a_f32".to_string(), "q8a_pack_mma".to_string()])
                .collect(),
        ),
        ("get_rows.cu", per_type("get_rows", "f32")),
        (
            "dequant.cu",
            [
                per_type("dequantize", "f16"),
                per_type("dequantize8", "f16"),
            ]
            .concat(),
        ),
        ("norm.cu", names(&["rmsnorm_f32", "rmsnorm_q8a_f32"])),
        (
            "rope.cu",
            names(&[
                "rope_f32",
                "rope_neox_f32",
                "rope_qk_f32",
                "rope_qk_neox_f32",
            ]),
        ),
        (
            "elementwise.cu",
            names(&[
                "swiglu_f32",
                "geglu_tanh_f32",
                "swiglu_q8a_f32",
                "geglu_tanh_q8a_f32",
                "scale_f32",
                "axpy_f32",
                "add_f32",
                "kv_store2_f32_f16",
                "kv_store2_batch_f32_f16",
            ]),
        ),
        (
            "attention.cu",
            names(&[
                "attn_decode_f16kv_f32",
                "attn_decode_q8a_f16kv_f32",
                "attn_decode_batch_f16kv_f32",
                "attn_decode_part_f16kv_f32",
                "attn_merge_f32",
                "attn_prefill_f16kv_f32",
                "attn_prefill_tiled_f16kv_f32",
            ]),
        ),
        ("sample.cu", names(&["argmax_f32", "sample_topk_topp_f32"])),
        ("gemm.cu", names(&["gemm_f16_nt_f32"])),
        ("quant_sizes.cu", names(&["quant_block_sizes"])),
    ]
}

/// Embedded headers (`*.cuh`) as (include name, text), handed to the run-time compiler.
pub fn headers() -> Vec<(&'static str, &'static str)> {
    crate::kernels::KERNEL_SOURCES
        .iter()
        .filter(|(n, _)| n.ends_with(".cuh"))
        .copied()
        .collect()
}

/// Elements per block and bytes per block of a device weight type.
pub fn block_geometry(t: GgmlType) -> (usize, usize) {
    (t.block_elems() as usize, t.block_bytes() as usize)
}

/// Whether `kernels/mmvq_q8.cu` has a product of this weight type with 8-bit activations
/// (every quantized device type; F32/F16 weights keep f32 activations).
pub fn q8a_capable(t: GgmlType) -> bool {
    qtype_suffix(t).is_some() && !matches!(t, GgmlType::F32 | GgmlType::F16)
}

/// Bytes of `n` vectors of `ncols` (a multiple of 32) in the q8a activation layout of
/// `kernels/mmvq_q8.cu`: int8 quants, then one (scale, quant sum) f32 pair per 32.
pub fn q8a_bytes(n: usize, ncols: usize) -> usize {
    n * ncols + n * (ncols / 32) * 8
}

/// Elements a matrix-vector lane step consumes: `ncols` must be a multiple of this.
pub fn mmvq_col_multiple(t: GgmlType) -> usize {
    match t {
        GgmlType::F32 | GgmlType::F16 => 4,
        other => other.block_elems() as usize,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_file_is_embedded_and_names_its_entries() {
        for (file, names) in entry_points() {
            let src = crate::kernels::source(file);
            assert!(src.is_some(), "{file} is not embedded");
            assert!(!names.is_empty());
        }
        assert!(crate::kernels::source("quant_blocks.cuh").is_some());
    }

    #[test]
    fn hip_builds_list_no_tensor_core_forms() {
        let names = |tc: bool| -> Vec<String> {
            entry_points_for(tc)
                .into_iter()
                .find(|(f, _)| *f == "mmvq_q8.cu")
                .map(|(_, n)| n)
                .unwrap_or_default()
        };
        let (cuda, hip) = (names(true), names(false));
        for n in [
            "mmvq_q4_0_q8a_mqs2p",
            "mmvq_q6_k_q8a_mqsp",
            "mmvq_q4_k_q8a_m8",
        ] {
            assert!(
                cuda.iter().any(|x| x == n),
                "{n} missing from the CUDA list"
            );
            assert!(!hip.iter().any(|x| x == n), "{n} listed for HIP");
        }
        assert!(!cuda.iter().any(|x| x == "mmvq_q6_k_q8a_mqs2p"));
        for n in [
            "mmvq_q4_0_q8a_s1",
            "mmvq_q6_k_q8a_sn",
            "q8a_pack_mma",
            "quantize_q8a_f32",
        ] {
            assert!(hip.iter().any(|x| x == n), "{n} missing from the HIP list");
        }
        // HIP's list is CUDA's without the tensor-core forms.
        let tc = cuda.iter().filter(|x| !hip.contains(x)).count();
        assert_eq!(hip.len() + tc, cuda.len());
        assert!(hip.iter().all(|x| cuda.contains(x)));
        assert_eq!(entry_points(), entry_points_for(true));
    }

    #[test]
    fn asserts_cover_every_device_block() {
        let s = block_size_asserts();
        assert!(s.contains("sizeof(block_q4_0) == 18"));
        assert!(s.contains("sizeof(block_q6_K) == 210"));
        assert_eq!(s.matches("static_assert").count(), DEVICE_BLOCKS.len());
        for t in DEVICE_QTYPES {
            assert!(qtype_suffix(t).is_some());
            assert!(DEVICE_BLOCKS.iter().any(|(b, _)| *b == t));
        }
    }
}
