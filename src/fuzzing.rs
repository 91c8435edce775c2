//! Entry points of the fuzz targets (`fuzz/fuzz_targets/`, run with `cargo fuzz` on nightly),
//! kept in the library so that `tests/fuzz_replay.rs` runs the very same code on stable over
//! the committed seeds (`tests/data/fuzz/<target>/`) and a fixed number of mutations of them,
//! in every `cargo test`. docs/FUZZING.md tells how to run them and what they found.
//!
//! Each function takes arbitrary bytes and must return normally: a hostile model file, vocabulary
//! or chat template is an `Err` somewhere inside, never a panic, an abort, an allocation the
//! input does not justify, or a loop without end. The functions also assert what loading
//! promises (tensors inside the file, token ids inside the embedding table, output within the
//! template limits); a failed assertion is a bug found.

use crate::gguf::{group_by_layer, parse, Array, ArrayItems, GgufFile, Metadata, Value, ValueType};
use crate::model::names::keys;
use crate::model::{HParams, KvLimit, Model, Sequence, SequenceConfig};
use crate::sample::{Sampler, SamplingParams};
use crate::tokenizer::{ChatMessage, ChatTemplate, TemplateLimits, Tokenizer};

/// The GGUF container: `parse` of any bytes is a layout or an error; a layout's tensors lie
/// inside the buffer and grouping by layer keeps every tensor.
pub fn gguf_parse(data: &[u8]) {
    if let Ok(layout) = parse(data) {
        for t in &layout.tensors {
            let start = (layout.data_offset + t.offset) as usize;
            let end = start + t.n_bytes as usize;
            assert!(end <= data.len(), "tensor {} past the end", t.name);
        }
        let groups = group_by_layer(&layout.tensors);
        let n: usize = groups.iter().map(|g| g.tensors.len()).sum();
        assert_eq!(n, layout.tensors.len());
    }
}

/// KV bytes the model target may size a sequence for (a loader sizes against the host).
const KV_LIMIT: u64 = 4 << 20;
/// Tensor bytes below which the model target also runs one forward step and samples.
const FORWARD_MAX_BYTES: u64 = 2 << 20;

/// The model-level load of a GGUF file, as `run`, `serve` and `inspect` do it: hyper-parameters,
/// tokenizer construction, every tensor's shape and type, the vocabulary checks, the KV cache
/// sized against a limit; then, for a small model that loads, one forward step over the
/// tokens of a short text and a sampled token.
pub fn model(data: &[u8]) {
    let Ok(file) = GgufFile::from_bytes("fuzz.gguf", data) else {
        return;
    };
    let md = file.metadata();
    let tokenizer = Tokenizer::from_metadata(md).ok();
    if let Some(t) = &tokenizer {
        exercise_tokenizer(t, "Hello, world! 123 <|im_start|>", true);
    }
    let limit = KvLimit {
        bytes: KV_LIMIT,
        from: "fuzz".into(),
    };
    if let Ok(hp) = HParams::try_from(md) {
        let _ = SequenceConfig::default().fit_context(&hp, Some(&limit));
    }
    let Ok(model) = Model::from_file(file.clone()) else {
        return;
    };
    let hp = model.hparams();
    let n_vocab = model.n_vocab();
    // The vocabulary checks at load: every id the tokenizer can emit has an embedding row.
    let tokens: Vec<u32> = match &tokenizer {
        Some(t) => {
            assert!(
                t.vocab_size() <= n_vocab,
                "{} tokens, {n_vocab} embedding rows, and the model loaded",
                t.vocab_size()
            );
            t.encode("Hi there", true, false).unwrap_or_default()
        }
        None => vec![0],
    };
    let tokens: Vec<u32> = tokens.into_iter().take(4).collect();
    if tokens.is_empty() || file.tensor_bytes() > FORWARD_MAX_BYTES {
        return;
    }
    let cfg = SequenceConfig {
        ctx: Some(8),
        ..SequenceConfig::default()
    };
    let Ok(fit) = cfg.fit_context(hp, Some(&limit)) else {
        return;
    };
    let cfg = SequenceConfig {
        ctx: Some(fit.ctx),
        ..cfg
    };
    let Ok(mut seq) = Sequence::new(hp, cfg) else {
        return;
    };
    let Ok(logits) = model.forward(&tokens, &mut seq) else {
        return;
    };
    assert_eq!(logits.len(), n_vocab);
    let logits = logits.to_vec();
    for params in [
        SamplingParams::greedy(),
        SamplingParams {
            seed: Some(1),
            ..SamplingParams::default()
        },
    ] {
        let t = Sampler::new(params).sample(&logits, &tokens);
        assert!((t as usize) < n_vocab, "sampled {t} of {n_vocab}");
    }
}

/// Encodes and decodes `text`; every id is inside the vocabulary and decodes.
fn exercise_tokenizer(t: &Tokenizer, text: &str, parse_special: bool) {
    let n = t.vocab_size();
    for add_special in [false, true] {
        if let Ok(ids) = t.encode(text, add_special, parse_special) {
            assert!(
                ids.iter().all(|&i| (i as usize) < n),
                "an id outside the vocabulary of {n}: {ids:?}"
            );
            let _ = t.decode(&ids);
            let _ = t.decode_bytes(&ids);
        }
    }
    // Ids a client may send: out of range is an error, never a panic.
    let _ = t.decode(&[0, n as u32, u32::MAX]);
    for id in [0, n.saturating_sub(1) as u32, n as u32] {
        let _ = t.piece_bytes(id, true);
        let _ = t.token_text(id);
    }
}

/// Pre-tokenizers the tokenizer target picks from (by a header byte), plus unknown ones.
const PRE: [Option<&str>; 8] = [
    None,
    Some("default"),
    Some("gpt2"),
    Some("smollm"),
    Some("llama-bpe"),
    Some("qwen2"),
    Some("no-such-pre"),
    Some(""),
];

fn strings(v: Vec<String>) -> Value {
    Value::Array(Array {
        elem: ValueType::String,
        items: ArrayItems::String(v),
    })
}

/// Tokenizer construction from vocabulary metadata, then encoding and decoding. The input is
/// five fields separated by NUL bytes: a header (`[flags, pre, bos lo, bos hi, eos lo, eos hi]`;
/// flags: bit 0 SentencePiece `llama` else `gpt2`, bit 1 `add_bos`, bit 2 `add_eos`, bit 3
/// parse special tokens in the text, bit 4 write `add_space_prefix` with bit 5 its value, bit 6
/// leave the merges out, bit 7 leave the token types out), the tokens (one a line), the merges
/// (one a line), the token types (one byte a token, as llama.cpp numbers them), the text.
pub fn tokenizer(data: &[u8]) {
    let mut f = data.splitn(5, |&b| b == 0);
    let header = f.next().unwrap_or_default();
    let lines = |b: &[u8]| -> Vec<String> {
        String::from_utf8_lossy(b)
            .split('\n')
            .map(str::to_string)
            .collect()
    };
    let tokens = lines(f.next().unwrap_or_default());
    let merges = lines(f.next().unwrap_or_default());
    let types = f.next().unwrap_or_default();
    let text = String::from_utf8_lossy(f.next().unwrap_or_default());
    let h = |i: usize| header.get(i).copied().unwrap_or(0);
    let flags = h(0);
    let n = tokens.len();
    let mut md = Metadata::new();
    md.insert(
        keys::TOK_MODEL,
        Value::String(if flags & 1 != 0 { "llama" } else { "gpt2" }.into()),
    );
    if let Some(pre) = PRE[h(1) as usize % PRE.len()] {
        md.insert(keys::TOK_PRE, Value::String(pre.into()));
    }
    md.insert(keys::TOK_TOKENS, strings(tokens));
    if flags & 64 == 0 {
        md.insert(keys::TOK_MERGES, strings(merges));
    }
    if flags & 128 == 0 {
        let t: Vec<i32> = (0..n)
            .map(|i| types.get(i).map_or(1, |&b| i32::from(b % 8)))
            .collect();
        md.insert(
            keys::TOK_TYPES,
            Value::Array(Array {
                elem: ValueType::I32,
                items: ArrayItems::I32(t),
            }),
        );
        // Scores make SentencePiece merge; a falling score keeps the vocabulary's order.
        md.insert(
            keys::TOK_SCORES,
            Value::Array(Array {
                elem: ValueType::F32,
                items: ArrayItems::F32((0..n).map(|i| -(i as f32)).collect()),
            }),
        );
    }
    md.insert(
        keys::TOK_BOS,
        Value::U32(u32::from(h(2)) | u32::from(h(3)) << 8),
    );
    md.insert(
        keys::TOK_EOS,
        Value::U32(u32::from(h(4)) | u32::from(h(5)) << 8),
    );
    md.insert(keys::TOK_ADD_BOS, Value::Bool(flags & 2 != 0));
    md.insert(keys::TOK_ADD_EOS, Value::Bool(flags & 4 != 0));
    if flags & 16 != 0 {
        md.insert(
            "tokenizer.ggml.add_space_prefix",
            Value::Bool(flags & 32 != 0),
        );
    }
    if let Ok(t) = Tokenizer::from_metadata(&md) {
        exercise_tokenizer(&t, &text, flags & 8 != 0);
    }
}

/// Limits the chat template target renders under: the server's kind of limits, smaller.
pub const TEMPLATE_LIMITS: TemplateLimits = TemplateLimits {
    fuel: Some(20_000),
    max_output_bytes: Some(64 << 10),
    timeout: Some(std::time::Duration::from_secs(2)),
};

/// Chat template parsing and rendering under limits, as `serve` renders a client's messages.
/// The input is NUL-separated: the template, a flags byte (bit 0 `add_generation_prompt`),
/// then role and content, alternately, for each message. A render ends with the prompt or an
/// error; its output is never over the limit.
pub fn chat_template(data: &[u8]) {
    let mut f = data.split(|&b| b == 0);
    let source = String::from_utf8_lossy(f.next().unwrap_or_default());
    let flags = f.next().and_then(|b| b.first().copied()).unwrap_or(1);
    let fields: Vec<String> = f.map(|b| String::from_utf8_lossy(b).into_owned()).collect();
    let messages: Vec<ChatMessage> = fields
        .chunks(2)
        .map(|c| ChatMessage::new(c[0].clone(), c.get(1).cloned().unwrap_or_default()))
        .collect();
    let Ok(t) = ChatTemplate::new(&source, "<s>", "</s>", TEMPLATE_LIMITS) else {
        return;
    };
    if let Ok(out) = t.render(&messages, flags & 1 != 0) {
        let max = TEMPLATE_LIMITS.max_output_bytes.unwrap_or(usize::MAX);
        assert!(out.len() <= max, "{} bytes rendered", out.len());
    }
}
