//! Dequantization against the `gguf` Python package's `gguf.quants.dequantize`, bit for bit:
//! random valid blocks of every storage type and real SmolLM2 tensors (see
//! tests/data/quant/README.md for provenance).

mod common;

use rocmforge::gguf::GgufFile;
use rocmforge::quant::{dequantize, dequantize_par, dequantize_ref, GgmlType};

const TYPES: [&str; 14] = [
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
    "Q6_K", "IQ4_NL",
];

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn assert_bits_eq(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: value {i}: got {g:e}, gguf-py {w:e}"
        );
    }
}

#[test]
fn random_blocks_match_gguf_py_bit_for_bit() {
    let dir = common::data_dir().join("quant");
    for name in TYPES {
        let ty = GgmlType::from_name(name).unwrap();
        let raw = std::fs::read(dir.join(format!("random_{name}.bin"))).unwrap();
        let want = read_f32(&dir.join(format!("random_{name}.f32")));
        assert!(!want.is_empty(), "{name}: empty reference");
        let mut got = vec![0.0f32; want.len()];
        dequantize_ref(ty, &raw, &mut got).unwrap();
        assert_bits_eq(&format!("{name} reference"), &got, &want);
        got.fill(0.0);
        dequantize(ty, &raw, &mut got).unwrap();
        assert_bits_eq(&format!("{name} fast"), &got, &want);
        got.fill(0.0);
        dequantize_par(ty, &raw, &mut got).unwrap();
        assert_bits_eq(&format!("{name} parallel"), &got, &want);
    }
}

/// Same formula as `tensor_hash` in scripts/quant_reference.py.
fn tensor_hash(v: &[f32]) -> String {
    let h = v.iter().enumerate().fold(0u64, |h, (i, x)| {
        h.wrapping_add((x.to_bits() as u64).wrapping_mul(2 * i as u64 + 1))
    });
    format!("{h:016x}")
}

#[test]
fn smollm2_tensors_match_gguf_py() {
    let json = std::fs::read_to_string(common::data_dir().join("quant/smollm2.json")).unwrap();
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    let file = GgufFile::open(common::smollm2_path()).unwrap();
    let tensors = doc["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 5);
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let info = file
            .tensor(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(info.ggml_type.name(), t["type"].as_str().unwrap(), "{name}");
        let n = t["elements"].as_u64().unwrap() as usize;
        let mut got = vec![0.0f32; n];
        dequantize_par(info.ggml_type, file.tensor_data(info), &mut got).unwrap();
        let stride = t["sample_stride"].as_u64().unwrap() as usize;
        let sample: Vec<f32> = t["sample"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let picked: Vec<f32> = got
            .iter()
            .step_by(stride)
            .take(sample.len())
            .copied()
            .collect();
        assert_bits_eq(name, &picked, &sample);
        assert_eq!(
            tensor_hash(&got),
            t["hash"].as_str().unwrap(),
            "{name}: whole-tensor hash"
        );
        // The single-thread fast path must agree too (cheap check on the first rows).
        let rows = n.min(64 * 576);
        let bytes = info.ggml_type.row_bytes(rows as u64).unwrap() as usize;
        let mut fast = vec![0.0f32; rows];
        dequantize(info.ggml_type, &file.tensor_data(info)[..bytes], &mut fast).unwrap();
        assert_bits_eq(name, &fast, &got[..rows]);
    }
}
