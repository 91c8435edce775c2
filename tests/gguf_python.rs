//! Files written by our GgufWriter are read back identically by the `gguf` Python package
//! (scripts/gguf_check_roundtrip.py). Needs `python3` with `pip install gguf`; CI installs
//! both, and this test fails (rather than skips) without them so a gap cannot pass silently.

mod gguf_support;

use gguf_support::all_types_metadata;
use rocmforge::gguf::{GgufFile, GgufWriter, Metadata, TensorInfo, TensorSpec, Value};
use rocmforge::quant::GgmlType;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/gguf_check_roundtrip.py")
}

fn write_file(path: &Path, version: u32, m: &Metadata) {
    let specs: Vec<(TensorSpec, GgmlType)> = [
        ("token_embd.weight", vec![64u64, 4], GgmlType::Q8_0),
        ("blk.0.attn_norm.weight", vec![64], GgmlType::F32),
        ("blk.0.attn_q.weight", vec![256, 2], GgmlType::Q4_K),
        ("blk.0.ffn_up.weight", vec![96, 3], GgmlType::Q5_1),
        ("blk.0.odd", vec![3, 5, 7], GgmlType::F16),
        ("blk.1.four_d", vec![2, 3, 1, 2], GgmlType::BF16),
        ("blk.1.ints", vec![5], GgmlType::I32),
        ("output.weight", vec![256, 1], GgmlType::Q6_K),
    ]
    .into_iter()
    .map(|(n, shape, ty)| {
        (
            TensorSpec {
                name: n.into(),
                shape,
                ggml_type: ty,
            },
            ty,
        )
    })
    .collect();
    let only: Vec<TensorSpec> = specs.iter().map(|(s, _)| s.clone()).collect();
    let file = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let mut w = GgufWriter::with_version(file, version, m, &only).expect("header");
    for (i, s) in only.iter().enumerate() {
        let n = TensorInfo::new(s.name.clone(), s.shape.clone(), s.ggml_type, 0, 0)
            .expect("shape")
            .n_bytes;
        let data: Vec<u8> = (0..n)
            .map(|j| (j as u8).wrapping_mul(7) ^ i as u8)
            .collect();
        w.write_tensor(&data).expect("tensor");
    }
    w.finish().expect("finish");
}

fn check_with_python(version: u32, align: Option<u32>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("rt.gguf");
    let expected = dir.path().join("rt.json");
    let mut m = all_types_metadata();
    if let Some(a) = align {
        m.insert("general.alignment", Value::U32(a));
    }
    write_file(&gguf, version, &m);
    let f = GgufFile::open(&gguf).expect("our reader");
    let dump = gguf_support::dump(&f, gguf_support::SUMMARY_LEN, true);
    std::fs::write(&expected, serde_json::to_vec_pretty(&dump).unwrap()).expect("write json");

    let out = Command::new("python3")
        .arg(script())
        .arg(&gguf)
        .arg(&expected)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run python3 ({e}): install Python 3 and `pip install gguf`")
        });
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "gguf-py disagrees with our writer (version {version}, alignment {align:?}); \
         exit {:?}\n{stdout}\n{stderr}\n(exit 2 means `pip install gguf` is missing)",
        out.status.code()
    );
    assert!(
        stdout.contains("gguf-py agrees"),
        "unexpected output: {stdout}"
    );
}

#[test]
fn gguf_py_reads_our_v3_files() {
    check_with_python(3, None);
    check_with_python(3, Some(64));
    check_with_python(3, Some(4096));
}

#[test]
fn gguf_py_reads_our_v2_files() {
    check_with_python(2, Some(1));
    check_with_python(2, Some(8));
}

/// The check can fail: a file whose expected dump is wrong by one value is rejected.
#[test]
fn python_check_detects_a_difference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = dir.path().join("rt.gguf");
    let expected = dir.path().join("rt.json");
    let m = all_types_metadata();
    write_file(&gguf, 3, &m);
    let f = GgufFile::open(&gguf).expect("our reader");
    let mut dump = gguf_support::dump(&f, gguf_support::SUMMARY_LEN, true);
    dump["metadata"][1]["value"] = serde_json::json!(254);
    std::fs::write(&expected, serde_json::to_vec(&dump).unwrap()).unwrap();
    let out = Command::new("python3")
        .arg(script())
        .arg(&gguf)
        .arg(&expected)
        .output()
        .expect("python3 runs");
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("t.u8")
            || String::from_utf8_lossy(&out.stderr).contains("metadata[1]")
    );
}
