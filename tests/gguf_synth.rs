//! `synth`: every weight type of the tiny preset reads back with our reader, with the right
//! shapes, deterministically per seed, and with dequantized weights of std ~0.02 and mean ~0.

mod common;

use rocmforge::gguf::{parse, GgufFile, GgufLayout};
use rocmforge::model::names::{arch_key, keys, tensor_name, ArchKey, TensorKind};
use rocmforge::quant::{dequantize, GgmlType};
use rocmforge::synth::{
    plan, tokenizer_from, write_synth, write_synth_file, Preset, SynthConfig, SUPPORTED, WEIGHT_STD,
};

fn cfg(preset: Preset, qtype: GgmlType, seed: u64) -> SynthConfig {
    SynthConfig {
        preset,
        qtype,
        seed,
        tokenizer: None,
    }
}

fn tiny(qtype: GgmlType, seed: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    write_synth(&mut buf, &cfg(Preset::Tiny, qtype, seed)).expect("synth tiny");
    buf
}

fn tensor<'a>(l: &GgufLayout, buf: &'a [u8], name: &str) -> (GgmlType, Vec<u64>, &'a [u8]) {
    let t = l
        .tensors
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no tensor {name}"));
    let s = (l.data_offset + t.offset) as usize;
    (
        t.ggml_type,
        t.shape.clone(),
        &buf[s..s + t.n_bytes as usize],
    )
}

fn stats(ty: GgmlType, bytes: &[u8], n: usize) -> (f64, f64) {
    let mut out = vec![0f32; n];
    dequantize(ty, bytes, &mut out).expect("dequantize");
    assert!(out.iter().all(|x| x.is_finite()));
    let mean = out.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = out.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    (mean, var.sqrt())
}

#[test]
fn tiny_every_type_reads_back_with_sane_weights() {
    for q in SUPPORTED {
        let buf = tiny(q, 7);
        let l = parse(&buf).unwrap_or_else(|e| panic!("{q}: {e}"));
        let m = &l.metadata;
        assert_eq!(m.architecture().unwrap(), "llama");
        let hp = |k| m.require_u64(&arch_key("llama", k)).unwrap();
        assert_eq!(hp(ArchKey::BlockCount), 4);
        assert_eq!(hp(ArchKey::EmbeddingLength), 256);
        assert_eq!(hp(ArchKey::HeadCount), 4);
        assert_eq!(hp(ArchKey::HeadCountKv), 2);
        let n_vocab = m.get_str_array(keys::TOK_TOKENS).unwrap().unwrap().len() as u64;
        assert_eq!(hp(ArchKey::VocabSize), n_vocab);
        assert_eq!(l.tensors.len(), 4 * 9 + 3);

        let (ty, shape, _) = tensor(&l, &buf, &tensor_name(TensorKind::TokenEmbd, None));
        assert_eq!((ty, shape), (q, vec![256, n_vocab]));
        let (_, shape, _) = tensor(&l, &buf, &tensor_name(TensorKind::Output, None));
        assert_eq!(shape, vec![256, n_vocab]);
        for layer in 0..4 {
            let name = |k| tensor_name(k, Some(layer));
            let (ty, shape, data) = tensor(&l, &buf, &name(TensorKind::AttnNorm));
            assert_eq!((ty, shape), (GgmlType::F32, vec![256]));
            let (mean, std) = stats(ty, data, 256);
            assert_eq!((mean, std), (1.0, 0.0), "norms are ones");
            assert_eq!(tensor(&l, &buf, &name(TensorKind::AttnK)).1, vec![256, 128]);
            assert_eq!(
                tensor(&l, &buf, &name(TensorKind::FfnDown)).1,
                vec![768, 256]
            );
            for k in [TensorKind::AttnQ, TensorKind::FfnUp] {
                let (ty, shape, data) = tensor(&l, &buf, &name(k));
                assert_eq!(ty, q);
                let n = (shape[0] * shape[1]) as usize;
                let (mean, std) = stats(ty, data, n);
                let want = WEIGHT_STD as f64;
                assert!(
                    (std - want).abs() < 0.15 * want,
                    "{q} {}: std {std} (want ~{want})",
                    name(k)
                );
                assert!(mean.abs() < 0.05 * want, "{q} {}: mean {mean}", name(k));
            }
        }
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    for q in [GgmlType::Q4_0, GgmlType::Q6_K, GgmlType::F16] {
        let a = tiny(q, 1);
        assert_eq!(a, tiny(q, 1), "{q}: not deterministic");
        let b = tiny(q, 2);
        assert_eq!(a.len(), b.len());
        assert_ne!(a, b, "{q}: seed ignored");
    }
}

#[test]
fn thread_count_does_not_change_the_bytes() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let one = pool.install(|| tiny(GgmlType::Q8_0, 3));
    assert_eq!(one, tiny(GgmlType::Q8_0, 3));
}

#[test]
fn presets_have_the_documented_shapes() {
    for (p, layers, embd, ff, heads, kv, bytes_min) in [
        (Preset::B1, 16, 2048, 8192, 32, 8, 0.6e9),
        (Preset::B8, 32, 4096, 14336, 32, 8, 4.0e9),
        (Preset::B70, 80, 8192, 28672, 64, 8, 38.0e9),
    ] {
        let (m, specs) = plan(&cfg(p, GgmlType::Q4_0, 0)).unwrap();
        let hp = |k| m.require_u64(&arch_key("llama", k)).unwrap();
        assert_eq!(hp(ArchKey::BlockCount), layers);
        assert_eq!(hp(ArchKey::EmbeddingLength), embd);
        assert_eq!(hp(ArchKey::FeedForwardLength), ff);
        assert_eq!(hp(ArchKey::HeadCount), heads);
        assert_eq!(hp(ArchKey::HeadCountKv), kv);
        assert_eq!(hp(ArchKey::VocabSize), 128256);
        assert_eq!(specs.len() as u64, layers * 9 + 3);
        let bytes: u64 = specs
            .iter()
            .map(|s| {
                let n: u64 = s.shape.iter().product();
                n / s.ggml_type.block_elems() * s.ggml_type.block_bytes()
            })
            .sum();
        assert!(bytes as f64 > bytes_min, "{p:?}: {bytes} bytes");
    }
}

#[test]
fn tokenizer_copied_from_smollm2() {
    let src = common::smollm2_path();
    let tok = tokenizer_from(&src).expect("tokenizer keys");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.gguf");
    let mut c = cfg(Preset::Tiny, GgmlType::Q4_K, 5);
    c.tokenizer = Some(tok);
    write_synth_file(&out, &c).expect("synth");
    let f = GgufFile::open(&out).expect("read back");
    let orig = GgufFile::open(&src).unwrap();
    let mut n = 0;
    for (k, v) in orig
        .metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        assert_eq!(f.metadata().get(k), Some(v), "{k}");
        n += 1;
    }
    assert!(n >= 10, "copied {n} tokenizer keys");
    let emb = f
        .require_tensor(&tensor_name(TensorKind::TokenEmbd, None))
        .unwrap();
    assert_eq!(emb.shape, vec![256, 49152]);
}

#[test]
fn builtin_tokenizer_is_complete() {
    let buf = tiny(GgmlType::Q8_0, 0);
    let l = parse(&buf).unwrap();
    let m = &l.metadata;
    let toks = m.get_str_array(keys::TOK_TOKENS).unwrap().unwrap();
    let types = m.get_i32_array(keys::TOK_TYPES).unwrap().unwrap();
    assert_eq!(toks.len(), types.len());
    assert_eq!(m.get_str(keys::TOK_MODEL).unwrap(), Some("gpt2"));
    assert!(m.get_str_array(keys::TOK_MERGES).unwrap().is_some());
    let bos = m.require_u64(keys::TOK_BOS).unwrap() as usize;
    let eos = m.require_u64(keys::TOK_EOS).unwrap() as usize;
    assert!(bos < toks.len() && eos < toks.len() && bos != eos);
    let set: std::collections::HashSet<&String> = toks.iter().collect();
    assert_eq!(set.len(), toks.len(), "tokens are unique");
}
