//! Loading refuses what would fail later (issue #15): a vocabulary the embedding table does not
//! cover is a typed error at load, and a KV cache sized by a hostile file is fitted to a limit or
//! refused, and its allocation failing is an error, never an abort.

use rocmforge::gguf::{write_to_vec, GgufFile, Metadata, TensorSpec, Value};
use rocmforge::model::{
    names::arch_key, ArchKey, HParams, KvCache, KvLimit, KvType, Model, ModelError, Sequence,
    SequenceConfig, TensorKind, MIN_CTX,
};
use rocmforge::quant::GgmlType;
use rocmforge::synth::{plan, Preset, SynthConfig};

/// Built-in tokenizer size of the tiny preset (256 bytes, bos, eos).
const TOKENS: u64 = 258;

/// A one-layer tiny-preset llama with zero f16 weights: `embd_rows` embedding rows, an output
/// head of `output_rows`, `<arch>.vocab_size` = `vocab_size`, and `extra` keys on top.
fn tiny(embd_rows: u64, output_rows: u64, vocab_size: u64, extra: &[(ArchKey, u32)]) -> Vec<u8> {
    let cfg = SynthConfig {
        preset: Preset::Tiny,
        qtype: GgmlType::F16,
        seed: 1,
        tokenizer: None,
    };
    let (mut md, specs) = plan(&cfg).unwrap();
    let key = |k| arch_key("llama", k);
    md.insert(key(ArchKey::BlockCount), Value::U32(1));
    md.insert(key(ArchKey::VocabSize), Value::U32(vocab_size as u32));
    for &(k, v) in extra {
        md.insert(key(k), Value::U32(v));
    }
    let embd = rocmforge::model::tensor_name(TensorKind::TokenEmbd, None);
    let out = rocmforge::model::tensor_name(TensorKind::Output, None);
    let tensors: Vec<(TensorSpec, Vec<u8>)> = specs
        .into_iter()
        .filter(|s| !s.name.starts_with("blk.") || s.name.starts_with("blk.0."))
        .map(|mut s| {
            if s.name == embd {
                s.shape[1] = embd_rows;
            } else if s.name == out {
                s.shape[1] = output_rows;
            }
            let n: u64 = s.shape.iter().product();
            let bytes = n as usize * if s.ggml_type == GgmlType::F32 { 4 } else { 2 };
            (s, vec![0u8; bytes])
        })
        .collect();
    write_to_vec(&md, &tensors).unwrap()
}

fn load(bytes: Vec<u8>) -> Result<Model, ModelError> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    std::fs::write(&p, bytes).unwrap();
    Model::from_file(GgufFile::open(&p)?)
}

#[test]
fn agreeing_and_padded_vocabularies_load() {
    load(tiny(TOKENS, TOKENS, TOKENS, &[])).unwrap();
    // More rows than tokens: padding, as llama.cpp accepts.
    let m = load(tiny(300, 300, 300, &[])).unwrap();
    assert_eq!(m.n_vocab(), 300);
}

#[test]
fn more_tokens_than_embedding_rows_is_a_vocab_mismatch() {
    // vocab_size agrees with the table, but 58 tokens have no row: text would fail at lookup.
    match load(tiny(200, 200, 200, &[])) {
        Err(ModelError::VocabMismatch {
            found, embd_rows, ..
        }) => assert_eq!((found, embd_rows), (TOKENS as usize, 200)),
        other => panic!("expected VocabMismatch, got {other:?}"),
    }
}

#[test]
fn vocab_size_and_output_rows_must_match_the_embedding() {
    let e = load(tiny(300, 300, TOKENS, &[])).unwrap_err();
    assert!(
        matches!(e, ModelError::VocabMismatch { found: 258, embd_rows: 300, ref of, .. } if of.contains("vocab_size")),
        "{e}"
    );
    let e = load(tiny(TOKENS, 300, TOKENS, &[])).unwrap_err();
    assert!(
        matches!(e, ModelError::VocabMismatch { found: 300, embd_rows: 258, ref of, .. } if of.contains("output.weight")),
        "{e}"
    );
    assert!(e.to_string().contains("300"), "{e}");
}

fn hparams(ctx_train: u32) -> HParams {
    let mut md = Metadata::new();
    md.insert("general.architecture", Value::String("llama".into()));
    for (k, v) in [
        ("context_length", ctx_train),
        ("embedding_length", 64),
        ("block_count", 2),
        ("feed_forward_length", 128),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
    ] {
        md.insert(format!("llama.{k}"), Value::U32(v));
    }
    md.insert("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5));
    HParams::try_from(&md).unwrap()
}

#[test]
fn context_is_capped_to_the_limit_or_refused() {
    let hp = hparams(1 << 20);
    let cfg = SequenceConfig {
        ctx: Some(1 << 20),
        ..SequenceConfig::default()
    };
    // f16: 2 layers * 2 heads * (16 + 16) * 2 B + 4 heads * 4 B of scores = 272 B per token.
    let per = rocmforge::model::bytes_per_token(&hp, KvType::F16);
    assert_eq!(per, 272);
    let limit = |bytes| KvLimit {
        bytes,
        from: "test".into(),
    };
    let fit = cfg.fit_context(&hp, None).unwrap();
    assert_eq!((fit.ctx, fit.capped()), (1 << 20, false));
    let fit = cfg.fit_context(&hp, Some(&limit(272 * 1000))).unwrap();
    assert_eq!(
        (fit.ctx, fit.requested, fit.capped()),
        (1000, 1 << 20, true)
    );
    let e = cfg
        .fit_context(&hp, Some(&limit(272 * (MIN_CTX as u64 - 1))))
        .unwrap_err();
    assert!(
        matches!(e, ModelError::KvTooLarge { ctx, min_ctx, .. } if ctx == 1 << 20 && min_ctx == MIN_CTX),
        "{e}"
    );
    assert!(e.to_string().contains("ROCMFORGE_KV_LIMIT"), "{e}");
}

#[test]
fn kv_allocation_failure_is_an_error_not_an_abort() {
    let mut hp = hparams(1 << 24);
    // Overflows usize: an error before the allocator is asked.
    hp.n_layer = 4096;
    hp.n_head_kv = 4096;
    hp.head_dim = 1 << 20;
    hp.head_dim_v = 1 << 20;
    let e = KvCache::new(&hp, 1 << 24, KvType::F16).unwrap_err();
    assert!(matches!(e, ModelError::Alloc { .. }), "{e}");
    // 2^62 bytes: a valid layout no allocator can give (48-bit address spaces).
    let mut hp = hparams(1 << 24);
    hp.n_layer = 1 << 11;
    hp.n_head_kv = 1 << 10;
    hp.head_dim = 1 << 14;
    hp.head_dim_v = 1 << 14;
    let cfg = SequenceConfig {
        ctx: Some(1 << 16),
        kv_type: Some(KvType::F16),
        ..SequenceConfig::default()
    };
    let e = Sequence::new(&hp, cfg).unwrap_err();
    assert!(
        matches!(
            e,
            ModelError::Alloc {
                what: "KV cache",
                ..
            }
        ),
        "{e}"
    );
}
