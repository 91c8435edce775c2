//! The `rocmforge` binary: `inspect --json` on SmolLM2, `inspect --dequant`, and `synth` output
//! that `inspect` validates.

use serde_json::Value as Json;
use std::path::PathBuf;
use std::process::Command;

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

fn rocmforge(args: &[&str]) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args(args)
        .output()
        .expect("run rocmforge");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "rocmforge {args:?} failed:\n{so}\n{se}"
    );
    (so, se)
}

fn inspect_json(path: &str) -> Json {
    let (so, _) = rocmforge(&["inspect", path, "--json"]);
    serde_json::from_str(&so).unwrap_or_else(|e| panic!("not JSON ({e}):\n{so}"))
}

#[test]
fn inspect_json_smollm2() {
    let p = smollm2();
    let j = inspect_json(p.to_str().unwrap());
    assert_eq!(j["architecture"], "llama");
    assert_eq!(j["version"], 3);
    assert_eq!(j["hparams"]["llama.block_count"], 30);
    assert_eq!(j["hparams"]["llama.embedding_length"], 576);
    assert_eq!(j["hparams"]["llama.attention.head_count"], 9);
    assert_eq!(j["hparams"]["llama.attention.head_count_kv"], 3);
    assert_eq!(j["hparams"]["llama.vocab_size"], 49152);
    let t = &j["tokenizer"];
    assert_eq!(t["model"], "gpt2");
    assert_eq!(t["pre"], "smollm");
    assert_eq!(t["vocab_size"], 49152);
    assert_eq!(t["bos_id"], 1);
    assert_eq!(t["eos_id"], 2);
    assert_eq!(t["unk_id"], 0);
    assert_eq!(t["pad_id"], 2);
    assert_eq!(t["add_bos"], false);
    let tensors = j["tensors"].as_array().expect("tensor table");
    assert_eq!(tensors.len(), 272);
    let emb = tensors
        .iter()
        .find(|t| t["name"] == "token_embd.weight")
        .expect("token_embd");
    assert_eq!(emb["shape"], serde_json::json!([576, 49152]));
    assert!(emb["type"].is_string() && emb["bytes"].as_u64().unwrap() > 0);
    let sum: u64 = tensors.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    assert_eq!(j["total_bytes"].as_u64(), Some(sum));
    let layers = j["layers"].as_array().expect("layer totals");
    assert_eq!(layers.len(), 31);
    assert!(layers[0]["layer"].is_null());
    assert_eq!(layers[30]["layer"], 29);
    let lsum: u64 = layers.iter().map(|l| l["bytes"].as_u64().unwrap()).sum();
    assert_eq!(lsum, sum);
    assert_eq!(j["validation"]["ok"], true, "{}", j["validation"]);
}

#[test]
fn inspect_table_mentions_the_essentials() {
    let p = smollm2();
    let (so, _) = rocmforge(&["inspect", p.to_str().unwrap()]);
    for s in [
        "llama",
        "blk.29.ffn_down.weight",
        "validation: OK",
        "llama.block_count",
        "gpt2",
    ] {
        assert!(so.contains(s), "table lacks {s:?}");
    }
}

#[test]
fn dequant_writes_little_endian_f32() {
    let p = smollm2();
    let dir = tempfile::tempdir().unwrap();
    // An F32 norm comes out byte-identical to the file's bytes.
    let out = dir.path().join("norm.f32");
    rocmforge(&[
        "inspect",
        p.to_str().unwrap(),
        "--dequant",
        "output_norm.weight",
        "--out",
        out.to_str().unwrap(),
    ]);
    let norm = std::fs::read(&out).unwrap();
    assert_eq!(norm.len(), 576 * 4);
    let f = rocmforge::gguf::GgufFile::open(&p).unwrap();
    let t = f.require_tensor("output_norm.weight").unwrap();
    assert_eq!(&norm[..], f.tensor_data(t));
    // A Q4_1 matrix: the right count of finite values equal to the library's dequantization.
    let out = dir.path().join("q.f32");
    rocmforge(&[
        "inspect",
        p.to_str().unwrap(),
        "--dequant",
        "blk.0.attn_q.weight",
        "--out",
        out.to_str().unwrap(),
    ]);
    let q = std::fs::read(&out).unwrap();
    assert_eq!(q.len(), 576 * 576 * 4);
    let t = f.require_tensor("blk.0.attn_q.weight").unwrap();
    let mut want = vec![0f32; 576 * 576];
    rocmforge::quant::dequantize_ref(t.ggml_type, f.tensor_data(t), &mut want).unwrap();
    let got: Vec<f32> = q
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(got.iter().all(|x| x.is_finite()));
    assert_eq!(got, want);
}

#[test]
fn unknown_tensor_is_an_error() {
    let p = smollm2();
    let out = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
        .args([
            "inspect",
            p.to_str().unwrap(),
            "--dequant",
            "nope",
            "--out",
            "/dev/null",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
}

#[test]
fn synth_output_validates() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.gguf");
    let (so, _) = rocmforge(&[
        "synth",
        "--preset",
        "tiny",
        "--qtype",
        "q4_k",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(so.contains("wrote"), "{so}");
    let j = inspect_json(out.to_str().unwrap());
    assert_eq!(j["validation"]["ok"], true, "{}", j["validation"]);
    assert_eq!(j["hparams"]["llama.block_count"], 4);
    assert_eq!(j["tensors"].as_array().unwrap().len(), 39);
    assert_eq!(j["tokenizer"]["model"], "gpt2");
    // Unknown presets and types are errors, not panics.
    for args in [["--preset", "3b"], ["--qtype", "q2_k"]] {
        let r = Command::new(env!("CARGO_BIN_EXE_rocmforge"))
            .args(["synth", "--out", out.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap();
        assert!(!r.status.success(), "{args:?} accepted");
    }
}
