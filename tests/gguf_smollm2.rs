//! The real test model through our reader: structure, hyper-parameters, and metadata + tensor
//! infos + tensor bytes equal to what the `gguf` Python package reads
//! (tests/data/gguf/smollm2_metadata.json, made by scripts/gguf_dump_metadata.py).

mod common;
mod gguf_support;

use rocmforge::gguf::GgufFile;
use rocmforge::model::names::{arch_key, keys, tensor_name, ArchKey, TensorKind};
use serde_json::Value as Json;

fn open() -> GgufFile {
    let p = common::smollm2_path();
    match GgufFile::open(&p) {
        Ok(f) => f,
        Err(e) => panic!("cannot read {}: {e}", p.display()),
    }
}

fn reference() -> Json {
    let p = common::data_dir().join("gguf/smollm2_metadata.json");
    let text =
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()))
}

#[test]
fn structure_and_hparams() {
    let f = open();
    let m = f.metadata();
    assert_eq!(f.version(), 3);
    assert_eq!(f.tensors().len(), 272);
    let arch = m.architecture().expect("general.architecture");
    assert_eq!(arch, "llama");
    let u = |k: ArchKey| m.require_u64(&arch_key(arch, k)).expect("hparam");
    assert_eq!(u(ArchKey::BlockCount), 30);
    assert_eq!(u(ArchKey::EmbeddingLength), 576);
    assert_eq!(u(ArchKey::VocabSize), 49152);
    assert_eq!(u(ArchKey::FeedForwardLength), 1536);
    assert_eq!(u(ArchKey::HeadCount), 9);
    assert_eq!(u(ArchKey::HeadCountKv), 3);
    let tokens = m.get_str_array(keys::TOK_TOKENS).unwrap().unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(m.get_str(keys::TOK_MODEL).unwrap(), Some("gpt2"));

    // Every llama tensor of every layer is there with the expected shape.
    let emb = f
        .require_tensor(&tensor_name(TensorKind::TokenEmbd, None))
        .unwrap();
    assert_eq!(emb.shape, vec![576, 49152]);
    for l in 0..30 {
        for k in TensorKind::LAYER {
            let t = f.require_tensor(&tensor_name(k, Some(l))).unwrap();
            assert_eq!(t.layer(), Some(l));
        }
        let q = f.tensor(&tensor_name(TensorKind::AttnQ, Some(l))).unwrap();
        assert_eq!(q.shape, vec![576, 576]);
        let k = f.tensor(&tensor_name(TensorKind::AttnK, Some(l))).unwrap();
        assert_eq!(k.shape, vec![576, 192]);
    }
    // 30 layers of 9 tensors + token_embd + output_norm (the head is tied to the embedding).
    assert_eq!(30 * 9 + 2, 272);
    assert!(f.tensor(&tensor_name(TensorKind::Output, None)).is_none());

    // Layer groups: the global group then 30 layers, totals adding up, streaming order.
    let groups = f.layer_groups();
    assert_eq!(groups.len(), 31);
    assert_eq!(groups[0].layer, None);
    for (i, g) in groups[1..].iter().enumerate() {
        assert_eq!(g.layer, Some(i));
        assert_eq!(g.tensors.len(), 9);
        let sum: u64 = g.tensors.iter().map(|&t| f.tensors()[t].n_bytes).sum();
        assert_eq!(g.bytes, sum);
        assert!(g.start < g.end);
        let offs: Vec<u64> = g.tensors.iter().map(|&t| f.tensors()[t].offset).collect();
        assert!(
            offs.windows(2).all(|w| w[0] < w[1]),
            "layer {i} not in file order"
        );
    }
    let total: u64 = groups.iter().map(|g| g.bytes).sum();
    assert_eq!(total, f.tensor_bytes());
    assert!(f.data_offset() + f.tensor_bytes() <= f.file_len());
}

#[test]
fn metadata_and_tensors_equal_gguf_py() {
    let f = open();
    let want = reference();
    let summary = want["summary_len"].as_u64().expect("summary_len") as usize;
    let got = gguf_support::dump(&f, summary, true);
    for k in [
        "version",
        "tensor_count",
        "kv_count",
        "alignment",
        "data_offset",
    ] {
        assert_eq!(got[k], want[k], "header field {k}");
    }
    let (gm, wm) = (
        got["metadata"].as_array().unwrap(),
        want["metadata"].as_array().expect("metadata list"),
    );
    assert_eq!(gm.len(), wm.len(), "number of metadata keys");
    for (g, w) in gm.iter().zip(wm) {
        assert_eq!(g, w, "metadata entry differs from gguf-py");
    }
    // Long arrays were really summarised, so the vocabulary went through the hash.
    let tokens = wm
        .iter()
        .find(|e| e["key"] == "tokenizer.ggml.tokens")
        .expect("tokens in reference");
    assert_eq!(tokens["len"], 49152);
    let (gt, wt) = (
        got["tensors"].as_array().unwrap(),
        want["tensors"].as_array().expect("tensor list"),
    );
    assert_eq!(gt.len(), wt.len());
    for (g, w) in gt.iter().zip(wt) {
        assert_eq!(g, w, "tensor info or bytes differ from gguf-py");
    }
}

/// The canonical form is sensitive: a one-token change alters the digest, so the comparison
/// above can fail.
#[test]
fn summary_digest_detects_changes() {
    let f = open();
    let m = f.metadata();
    let v = m.get(keys::TOK_TOKENS).unwrap().clone();
    let a = gguf_support::entry(keys::TOK_TOKENS, &v, 16);
    let mut changed = v.clone();
    if let rocmforge::gguf::Value::Array(arr) = &mut changed {
        if let rocmforge::gguf::ArrayItems::String(s) = &mut arr.items {
            s[100].push('x');
        }
    }
    let b = gguf_support::entry(keys::TOK_TOKENS, &changed, 16);
    assert_eq!(a["len"], b["len"]);
    assert_ne!(a["sha256"], b["sha256"]);
}
