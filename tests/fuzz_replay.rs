//! The fuzz targets on stable, in every `cargo test` (docs/FUZZING.md): each committed seed in
//! `tests/data/fuzz/<target>/` goes through the target's entry function (`rocmforge::fuzzing`,
//! the code `cargo fuzz` runs), then a fixed number of deterministic mutations of it (bit flips,
//! interesting values, inserted, deleted and repeated bytes, splices with the other seeds). A
//! panic fails the test and leaves the input in the system temp dir to replay with `cargo fuzz`.
//!
//! `cargo test --test fuzz_replay -- --ignored write_seeds` writes the seeds again (needs the
//! SmolLM2 file of `scripts/fetch-model.sh` for its vocabulary and chat template).

use rocmforge::fuzzing;
use std::path::{Path, PathBuf};

/// Mutated runs per seed (on top of the seed itself).
const RUNS_PER_SEED: usize = 1000;

fn seed_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/fuzz")
        .join(target)
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = seed_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// xorshift64*: deterministic, so a failing run is the same run every time.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING_U32: [u32; 8] = [0, 1, 2, 0x7f, 0xff, 0x7fff_ffff, 0x8000_0000, u32::MAX];

/// One to four random edits of `input`, `other` a second seed to splice from.
fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'\n', b' ', b'{', b'%'][rng.below(8)];
            }
            2 if len >= 4 => {
                let i = rng.below(len - 3);
                let x = INTERESTING_U32[rng.below(INTERESTING_U32.len())];
                v[i..i + 4].copy_from_slice(&x.to_le_bytes());
            }
            3 => {
                let i = rng.below(len + 1);
                v.insert(i, rng.next() as u8);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below(16.min(len - i));
                v.drain(i..i + n);
            }
            5 if len > 0 => {
                // Repeat a short run (grows loops, lengths, nesting).
                let i = rng.below(len);
                let n = 1 + rng.below(8.min(len - i));
                let run: Vec<u8> = v[i..i + n].to_vec();
                for _ in 0..1 + rng.below(8) {
                    v.splice(i..i, run.iter().copied());
                }
            }
            6 if !other.is_empty() => {
                let cut = rng.below(len + 1);
                let from = rng.below(other.len());
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ if len > 0 => v.truncate(rng.below(len)),
            _ => v.push(rng.next() as u8),
        }
    }
    v
}

fn replay(target: &str, entry: fn(&[u8])) {
    let seeds = seeds(target);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
    let mut runs = 0;
    for (i, seed) in seeds.iter().enumerate() {
        let other = &seeds[(i + 1) % seeds.len()];
        for r in 0..=RUNS_PER_SEED {
            let input = if r == 0 {
                seed.clone()
            } else {
                mutate(&mut rng, seed, other)
            };
            let ok = std::panic::catch_unwind(|| entry(&input)).is_ok();
            if !ok {
                let p = std::env::temp_dir().join(format!("fuzz-replay-{target}-{i}-{r}.bin"));
                std::fs::write(&p, &input).unwrap();
                panic!(
                    "{target}: seed {i}, run {r} panicked; input saved to {}",
                    p.display()
                );
            }
            runs += 1;
        }
    }
    eprintln!("{target}: {runs} runs from {} seeds", seeds.len());
}

#[test]
fn gguf_parse_seeds_and_mutations() {
    replay("gguf_parse", fuzzing::gguf_parse);
}

#[test]
fn model_load_seeds_and_mutations() {
    replay("model", fuzzing::model);
}

#[test]
fn tokenizer_seeds_and_mutations() {
    replay("tokenizer", fuzzing::tokenizer);
}

#[test]
fn chat_template_seeds_and_mutations() {
    replay("chat_template", fuzzing::chat_template);
}

/// The committed seeds. Small valid inputs, so mutations reach past the first checks.
#[test]
#[ignore = "writes tests/data/fuzz; run by hand when a target's input format changes"]
fn write_seeds() {
    seeds::write_all();
}

mod seeds {
    use super::seed_dir;
    use rocmforge::gguf::{
        write_to_vec, Array, ArrayItems, GgufFile, Metadata, TensorSpec, Value, ValueType,
    };
    use rocmforge::model::names::{arch_key, keys, tensor_name, ArchKey, TensorKind};
    use rocmforge::quant::GgmlType;

    fn smollm2() -> GgufFile {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
        GgufFile::open(&p).expect("the SmolLM2 file (scripts/fetch-model.sh)")
    }

    fn strings(v: Vec<String>) -> Value {
        Value::Array(Array {
            elem: ValueType::String,
            items: ArrayItems::String(v),
        })
    }

    fn put(target: &str, name: &str, bytes: &[u8]) {
        let dir = seed_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }

    /// SmolLM2's first `n` tokens (17 specials, 256 bytes, merged tokens) and the merges among
    /// them: a real byte-level BPE vocabulary, small.
    fn smollm2_vocab(n: usize) -> (Vec<String>, Vec<String>, Vec<i32>) {
        let f = smollm2();
        let md = f.metadata();
        let tokens: Vec<String> =
            md.get_str_array(keys::TOK_TOKENS).unwrap().unwrap()[..n].to_vec();
        let known: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
        let merges: Vec<String> = md
            .get_str_array(keys::TOK_MERGES)
            .unwrap()
            .unwrap()
            .iter()
            .filter(|m| {
                let (l, r) = m.split_once(' ').unwrap_or(("", ""));
                known.contains(l) && known.contains(r) && known.contains(format!("{l}{r}").as_str())
            })
            .cloned()
            .collect();
        let types = md.get_i32_array(keys::TOK_TYPES).unwrap().unwrap()[..n].to_vec();
        (tokens, merges, types)
    }

    /// A SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, some pieces.
    fn spm_vocab() -> (Vec<String>, Vec<i32>) {
        let mut t: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
        let mut ty = vec![2, 3, 3];
        for b in 0..=255u8 {
            t.push(format!("<0x{b:02X}>"));
            ty.push(6);
        }
        for p in [
            "▁", "h", "e", "l", "o", "▁t", "he", "ll", "▁the", "▁hello", "▁w", "or", "ld",
            "▁world", "1", "2", "3",
        ] {
            t.push(p.into());
            ty.push(1);
        }
        (t, ty)
    }

    fn tokenizer_md(
        model: &str,
        pre: Option<&str>,
        tokens: Vec<String>,
        types: Vec<i32>,
        merges: Option<Vec<String>>,
        bos: u32,
        eos: u32,
    ) -> Metadata {
        let n = tokens.len();
        let mut m = Metadata::new();
        m.insert(keys::TOK_MODEL, Value::String(model.into()));
        if let Some(p) = pre {
            m.insert(keys::TOK_PRE, Value::String(p.into()));
        }
        m.insert(keys::TOK_TOKENS, strings(tokens));
        m.insert(
            keys::TOK_TYPES,
            Value::Array(Array {
                elem: ValueType::I32,
                items: ArrayItems::I32(types),
            }),
        );
        m.insert(
            keys::TOK_SCORES,
            Value::Array(Array {
                elem: ValueType::F32,
                items: ArrayItems::F32((0..n).map(|i| -(i as f32)).collect()),
            }),
        );
        if let Some(mg) = merges {
            m.insert(keys::TOK_MERGES, strings(mg));
        }
        m.insert(keys::TOK_BOS, Value::U32(bos));
        m.insert(keys::TOK_EOS, Value::U32(eos));
        m
    }

    /// Deterministic small numbers for weights.
    struct Gen(u64);
    impl Gen {
        fn f(&mut self) -> f32 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        }
    }

    fn tensor_bytes(shape: &[u64], ty: GgmlType, norm: bool, g: &mut Gen) -> Vec<u8> {
        let n: u64 = shape.iter().product();
        let vals: Vec<f32> = (0..n).map(|_| if norm { 1.0 } else { g.f() }).collect();
        match ty {
            GgmlType::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            GgmlType::F16 => vals
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            GgmlType::Q8_0 => vals
                .chunks(32)
                .flat_map(|c| {
                    let amax = c.iter().fold(0f32, |a, &v| a.max(v.abs())).max(1e-6);
                    let d = amax / 127.0;
                    let mut b = half::f16::from_f32(d).to_le_bytes().to_vec();
                    b.extend(c.iter().map(|&v| (v / d).round() as i8 as u8));
                    b
                })
                .collect(),
            other => panic!("no seed weights of type {other}"),
        }
    }

    /// A llama of `n_layer` layers, width 32, 4 heads (2 KV heads), feed-forward 64, context
    /// 64, the vocabulary of `tok`, weights of `ty` (norms F32), the head tied unless `untied`.
    fn tiny_model(tok: Metadata, n_layer: usize, ty: GgmlType, untied: bool) -> Vec<u8> {
        let (e, ff, n_head, n_kv, ctx) = (32u64, 64u64, 4u64, 2u64, 64u32);
        let v = tok.get_str_array(keys::TOK_TOKENS).unwrap().unwrap().len() as u64;
        let kv = e / n_head * n_kv;
        let mut md = Metadata::new();
        md.insert(keys::ARCHITECTURE, Value::String("llama".into()));
        md.insert(keys::NAME, Value::String("fuzz seed".into()));
        let a = |k| arch_key("llama", k);
        md.insert(a(ArchKey::ContextLength), Value::U32(ctx));
        md.insert(a(ArchKey::EmbeddingLength), Value::U32(e as u32));
        md.insert(a(ArchKey::BlockCount), Value::U32(n_layer as u32));
        md.insert(a(ArchKey::FeedForwardLength), Value::U32(ff as u32));
        md.insert(a(ArchKey::HeadCount), Value::U32(n_head as u32));
        md.insert(a(ArchKey::HeadCountKv), Value::U32(n_kv as u32));
        md.insert(a(ArchKey::RmsEps), Value::F32(1e-5));
        md.insert(a(ArchKey::RopeFreqBase), Value::F32(10000.0));
        md.insert(
            a(ArchKey::RopeDimensionCount),
            Value::U32((e / n_head) as u32),
        );
        md.insert(a(ArchKey::VocabSize), Value::U32(v as u32));
        for (k, val) in tok.iter() {
            md.insert(k, val.clone());
        }
        let mut specs: Vec<(TensorKind, Option<usize>, Vec<u64>, bool)> =
            vec![(TensorKind::TokenEmbd, None, vec![e, v], false)];
        for l in 0..n_layer {
            for kind in TensorKind::LAYER {
                let (shape, norm) = match kind {
                    TensorKind::AttnNorm | TensorKind::FfnNorm => (vec![e], true),
                    TensorKind::AttnQ | TensorKind::AttnOutput => (vec![e, e], false),
                    TensorKind::AttnK | TensorKind::AttnV => (vec![e, kv], false),
                    TensorKind::FfnGate | TensorKind::FfnUp => (vec![e, ff], false),
                    TensorKind::FfnDown => (vec![ff, e], false),
                    _ => continue,
                };
                specs.push((kind, Some(l), shape, norm));
            }
        }
        specs.push((TensorKind::OutputNorm, None, vec![e], true));
        if untied {
            specs.push((TensorKind::Output, None, vec![e, v], false));
        }
        let mut g = Gen(7);
        let tensors: Vec<(TensorSpec, Vec<u8>)> = specs
            .into_iter()
            .map(|(kind, layer, shape, norm)| {
                let t = if norm { GgmlType::F32 } else { ty };
                let data = tensor_bytes(&shape, t, norm, &mut g);
                (
                    TensorSpec {
                        name: tensor_name(kind, layer),
                        shape,
                        ggml_type: t,
                    },
                    data,
                )
            })
            .collect();
        write_to_vec(&md, &tensors).unwrap()
    }

    /// The tokenizer target's input (see `rocmforge::fuzzing::tokenizer`).
    fn tok_input(
        header: &[u8],
        tokens: &[String],
        merges: &[String],
        types: &[i32],
        text: &str,
    ) -> Vec<u8> {
        let mut v = header.to_vec();
        v.push(0);
        v.extend_from_slice(tokens.join("\n").as_bytes());
        v.push(0);
        v.extend_from_slice(merges.join("\n").as_bytes());
        v.push(0);
        v.extend(types.iter().map(|&t| t as u8));
        v.push(0);
        v.extend_from_slice(text.as_bytes());
        v
    }

    pub fn write_all() {
        let (bt, bm, bty) = smollm2_vocab(400);
        let (st, sty) = spm_vocab();
        let bpe = tokenizer_md(
            "gpt2",
            Some("smollm"),
            bt.clone(),
            bty.clone(),
            Some(bm.clone()),
            1,
            2,
        );
        let spm = tokenizer_md("llama", None, st.clone(), sty.clone(), None, 1, 2);
        let models = [
            (
                "llama_bpe_f16_untied.gguf",
                tiny_model(bpe.clone(), 1, GgmlType::F16, true),
            ),
            (
                "llama_bpe_q8_tied.gguf",
                tiny_model(bpe, 2, GgmlType::Q8_0, false),
            ),
            (
                "llama_spm_f32.gguf",
                tiny_model(spm, 1, GgmlType::F32, true),
            ),
        ];
        for (name, bytes) in &models {
            // Each loads: a seed the loader rejects would only fuzz the rejection.
            let f = GgufFile::from_bytes(name, bytes).unwrap();
            rocmforge::model::Model::from_file(f.clone()).unwrap();
            rocmforge::tokenizer::Tokenizer::from_metadata(f.metadata()).unwrap();
            put("model", name, bytes);
            put("gguf_parse", name, bytes);
        }
        put(
            "gguf_parse",
            "empty.gguf",
            &write_to_vec(&Metadata::new(), &[]).unwrap(),
        );

        let text =
            "Hello world! It's 2024: <|im_start|>user\nhi<|im_end|> naïve café 東京 🙂  \t\n";
        put(
            "tokenizer",
            "bpe_smollm.bin",
            &tok_input(&[8 | 2, 3, 1, 0, 2, 0], &bt, &bm, &bty, text),
        );
        put(
            "tokenizer",
            "bpe_llama3.bin",
            &tok_input(&[2, 4, 1, 0, 2, 0], &bt, &bm, &bty, text),
        );
        put(
            "tokenizer",
            "bpe_qwen2.bin",
            &tok_input(&[8, 5, 1, 0, 2, 0], &bt, &bm, &bty, text),
        );
        put(
            "tokenizer",
            "spm.bin",
            &tok_input(
                &[1 | 2 | 8 | 16 | 32, 0, 1, 0, 2, 0],
                &st,
                &[],
                &sty,
                " hello the world 123",
            ),
        );
        put(
            "tokenizer",
            "spm_no_prefix.bin",
            &tok_input(&[1 | 16, 0, 1, 0, 2, 0], &st, &[], &sty, "hello\u{0}world"),
        );

        let smol = smollm2();
        let chatml = smol
            .metadata()
            .get_str("tokenizer.chat_template")
            .unwrap()
            .unwrap()
            .to_string();
        let templates = [
            ("smollm2.bin", chatml.as_str()),
            (
                "llama3.bin",
                "{{ bos_token }}{% for message in messages %}{% if loop.index0 == 0 and message['role'] == 'system' %}{% set content = message['content'] | trim %}{% else %}{% set content = message['content'] %}{% endif %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ content | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
            ),
            (
                "mistral.bin",
                "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}",
            ),
            (
                "gemma.bin",
                "{% for message in messages %}{% set role = 'model' if message.role == 'assistant' else message.role %}{{ '<start_of_turn>' ~ role ~ '\n' ~ message.content | trim ~ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}{% for k, v in {'a': 1}.items() %}{{ k.upper() }}{{ v }}{% endfor %}{{ messages[0].content.split(' ') | length }}",
            ),
        ];
        let msgs = [
            "system",
            "Be brief.",
            "user",
            "Hi there",
            "assistant",
            "Hello!",
            "user",
            "2+2?",
        ];
        for (name, src) in templates {
            let mut v = src.as_bytes().to_vec();
            v.push(0);
            v.push(1);
            let msgs: &[&str] = if name == "mistral.bin" {
                &msgs[2..]
            } else {
                &msgs
            };
            for m in msgs {
                v.push(0);
                v.extend_from_slice(m.as_bytes());
            }
            put("chat_template", name, &v);
        }
    }
}
