//! The tokenizers the supported families' files carry, against llama.cpp's own tokenizer test
//! data (`tests/data/family-vocab/README.md`): the vocabulary-only GGUFs of Phi-3
//! (SentencePiece, `llama` model), Qwen2 (byte-level BPE with the `qwen2` pre-tokenizer, as
//! Qwen2.5, Qwen3 and Qwen3-MoE files carry) and Llama 2 SentencePiece (the Mistral 7B
//! tokenizer's kind), each with the inputs and ids llama.cpp's `test-tokenizer-0` checks.
//! Also their chat templates (as transformers renders them, `scripts/family_chat_reference.py`)
//! and special tokens: BOS where the family adds it, the end-of-generation ids.

mod common;

use rocmforge::gguf::GgufFile;
use rocmforge::tokenizer::{ChatMessage, ChatTemplate, TemplateLimits, Tokenizer};
use std::path::PathBuf;

fn dir() -> PathBuf {
    common::data_dir().join("family-vocab")
}

fn tokenizer(name: &str) -> Tokenizer {
    let f = GgufFile::open(dir().join(format!("ggml-vocab-{name}.gguf"))).unwrap();
    Tokenizer::from_metadata(f.metadata()).unwrap()
}

/// `test-tokenizer-0`'s cases: inputs separated by `\n__ggml_vocab_test__\n`, one line of ids
/// per input (tokenized without BOS/EOS and without parsing special-token text).
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(dir().join(format!("ggml-vocab-{name}.gguf.inp"))).unwrap();
    let out = std::fs::read_to_string(dir().join(format!("ggml-vocab-{name}.gguf.out"))).unwrap();
    // The file ends with a separator, after which llama.cpp reads no further input.
    let body = inp.strip_suffix("\n__ggml_vocab_test__\n").unwrap_or(&inp);
    let inputs: Vec<&str> = body.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(inputs.len(), ids.len(), "{name}");
    inputs.into_iter().map(str::to_string).zip(ids).collect()
}

fn check(name: &str) {
    let t = tokenizer(name);
    let mut failures = Vec::new();
    let all = cases(name);
    for (text, want) in &all {
        let got = t.encode(text, false, false).unwrap();
        if &got != want {
            failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} differ: {failures:#?}",
        failures.len(),
        all.len()
    );
}

#[test]
fn phi3_sentencepiece_matches_llama_cpp() {
    check("phi-3");
}

#[test]
fn qwen2_bpe_matches_llama_cpp() {
    check("qwen2");
}

#[test]
fn llama_sentencepiece_matches_llama_cpp() {
    check("llama-spm");
}

#[derive(serde::Deserialize)]
struct ChatRef {
    messages: Vec<Message>,
    cases: std::collections::BTreeMap<String, ChatCase>,
}

#[derive(serde::Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(serde::Deserialize)]
struct ChatCase {
    /// The template in a vocabulary file (`vocab`), or in a file of its own.
    template: Option<String>,
    template_file: Option<String>,
    bos: String,
    eos: String,
    rendered: String,
}

fn chat_ref() -> ChatRef {
    serde_json::from_str(&std::fs::read_to_string(dir().join("chat.json")).unwrap()).unwrap()
}

/// Each family's chat template renders as transformers renders it (jinja2).
#[test]
fn chat_templates_render_as_transformers_does() {
    let r = chat_ref();
    let messages: Vec<ChatMessage> = r
        .messages
        .iter()
        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect();
    assert_eq!(r.cases.len(), 5);
    for (name, c) in &r.cases {
        let tmpl = match (&c.template, &c.template_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(dir().join(f)).unwrap(),
            (None, None) => panic!("{name}: no template"),
        };
        let got = ChatTemplate::new(&tmpl, &c.bos, &c.eos, TemplateLimits::UNLIMITED)
            .unwrap()
            .render(&messages, true)
            .unwrap();
        assert_eq!(got, c.rendered, "{name}");
    }
}

/// `chat`'s path on the files' own templates: the rendered prompt, tokenized with special
/// tokens, has each turn marker as one token, one BOS where the family adds it (the Phi-3
/// template writes `<s>` itself, and llama.cpp drops it when the tokenizer adds one, as
/// `apply_chat_template` does), and the turn end is an end-of-generation token.
#[test]
fn file_chat_templates_tokenize_to_the_family_markers() {
    let r = chat_ref();
    let messages: Vec<ChatMessage> = r
        .messages
        .iter()
        .map(|m| ChatMessage::new(m.role.clone(), m.content.clone()))
        .collect();
    // Phi-3: SentencePiece, BOS added, `<|end|>` ends a turn (its eos is `<|endoftext|>`).
    let t = tokenizer("phi-3");
    let prompt = t.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        Some(prompt.as_str()),
        r.cases["phi-3"].rendered.strip_prefix("<s>")
    );
    let ids = t.encode(&prompt, true, true).unwrap();
    let id = |s| t.token_id(s).unwrap();
    assert_eq!(ids[0], t.bos_id().unwrap());
    assert_eq!(ids.iter().filter(|&&i| Some(i) == t.bos_id()).count(), 1);
    // Phi-3's special tokens swallow the whitespace after them (llama.cpp's RSTRIP attribute
    // for models named phi-3, as the Hugging Face tokenizer's `rstrip`): the newline after each
    // marker goes, and the text after it starts a fresh SentencePiece word (`▁Hello`).
    assert_eq!(ids[1], id("<|user|>"));
    assert_eq!(ids[2], id("▁Hello"));
    assert_eq!(ids.iter().filter(|&&i| i == id("<|end|>")).count(), 3);
    assert_eq!(ids.last(), Some(&id("<|assistant|>")), "{ids:?}");
    assert!(!ids.contains(&13), "no newline token left: {ids:?}");
    assert!(t.is_eog(id("<|end|>")) && t.is_eog(t.eos_id().unwrap()));
    // Qwen2 (and Qwen3 / Qwen3-MoE files): byte-level BPE, no BOS, `<|im_end|>` ends a turn.
    let t = tokenizer("qwen2");
    let prompt = t.apply_chat_template(&messages, true).unwrap();
    assert_eq!(prompt, r.cases["qwen2"].rendered);
    let ids = t.encode(&prompt, true, true).unwrap();
    let id = |s| t.token_id(s).unwrap();
    assert!(!t.add_bos());
    assert_eq!(ids[0], id("<|im_start|>"));
    assert_eq!(ids.iter().filter(|&&i| i == id("<|im_start|>")).count(), 5);
    assert_eq!(ids.iter().filter(|&&i| i == id("<|im_end|>")).count(), 4);
    assert!(t.is_eog(id("<|im_end|>")));
    // Round trip of the text between markers.
    assert_eq!(t.decode(&ids).unwrap(), prompt);
}
