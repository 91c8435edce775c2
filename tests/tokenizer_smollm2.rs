//! Golden tokenizer tests on the real SmolLM2 GGUF against llama.cpp's prompt ids
//! (tests/data/smollm2/cases.json; provenance in tests/data/smollm2/README.md).

mod common;

use rocmforge::gguf::GgufFile;
use rocmforge::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    messages: Option<Vec<ChatMessage>>,
    add_bos: bool,
    llamacpp_prompt_ids: Vec<u32>,
}

fn tokenizer() -> Tokenizer {
    let f = GgufFile::open(common::smollm2_path()).expect("open SmolLM2");
    Tokenizer::from_metadata(f.metadata()).expect("tokenizer from SmolLM2 metadata")
}

fn cases() -> Vec<Case> {
    let path = common::data_dir().join("smollm2/cases.json");
    let text = std::fs::read_to_string(&path).expect("read cases.json");
    serde_json::from_str(&text).expect("parse cases.json")
}

#[test]
fn metadata_facts() {
    let t = tokenizer();
    assert_eq!(t.model_kind(), "gpt2");
    assert_eq!(t.pre(), Some("smollm"));
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.bos_id(), Some(1));
    assert_eq!(t.eos_id(), Some(2));
    // The reference (and llama.cpp) stop on exactly these ids.
    let eog: Vec<u32> = (0..t.vocab_size() as u32)
        .filter(|&i| t.is_eog(i))
        .collect();
    assert_eq!(eog, [0, 2, 4]);
}

#[test]
fn prompt_ids_match_llamacpp_for_every_case() {
    let t = tokenizer();
    let cases = cases();
    assert_eq!(cases.len(), 6);
    for c in &cases {
        // add_bos is false in this GGUF, so add_special must not change anything.
        assert!(!c.add_bos);
        let ids = t.encode(&c.prompt, true, true).unwrap();
        assert_eq!(ids, c.llamacpp_prompt_ids, "case {}", c.name);
        assert_eq!(
            t.decode(&ids).unwrap(),
            c.prompt,
            "round trip of case {}",
            c.name
        );
    }
}

#[test]
fn chat_case_renders_the_gguf_template() {
    let t = tokenizer();
    let cases = cases();
    let c = cases
        .iter()
        .find(|c| c.messages.is_some())
        .expect("a chat case");
    let messages = c.messages.as_ref().unwrap();
    let text = t.apply_chat_template(messages, true).unwrap();
    assert_eq!(text, c.prompt);
    assert_eq!(t.encode(&text, false, true).unwrap(), c.llamacpp_prompt_ids);
    // Without parse_special the markers are plain text and tokenize into several pieces.
    let plain = t.encode(&text, false, false).unwrap();
    assert!(!plain.contains(&1) && plain.len() > c.llamacpp_prompt_ids.len());
    assert_eq!(t.decode(&plain).unwrap(), text);
}

/// Whitespace runs before digits, where llama.cpp's `smollm` and transformers' GGUF loader
/// disagree (reference README, "Tokenizer note"). llama.cpp splits every digit off first and
/// then applies the GPT-2 regex to what is left, so the whole whitespace run before a digit is
/// one piece and becomes one token when the vocabulary has it (`ĠĠ` = 256, `ĊĊ` = 1116, both
/// given in the README). The expected ids are built from those rules: the ids of the run and of
/// the single digits are looked up in the vocabulary by their stored text, not by encoding.
#[test]
fn whitespace_runs_before_digits_follow_llamacpp() {
    let t = tokenizer();
    let id = |s: &str| t.token_id(s).unwrap_or_else(|| panic!("no token {s:?}"));
    // The README's two examples, verbatim.
    assert_eq!(t.encode("  42", false, true).unwrap(), [256, 36, 34]);
    assert_eq!(t.encode("\n\n1.", false, true).unwrap(), [1116, 33, 30]);
    // Derived: the run stays one piece (one token when the vocabulary has it), every digit alone.
    let cases: &[(&str, Vec<u32>)] = &[
        ("   7", vec![id("ĠĠĠ"), id("7")]),
        ("\t\t3", vec![id("ĉĉ"), id("3")]),
        ("x  12", vec![id("x"), id("ĠĠ"), id("1"), id("2")]),
        ("a\n\n\n9", vec![id("a"), id("ĊĊĊ"), id("9")]),
        // A single space before a digit stays its own token too (digits never merge with Ġ).
        (" 5", vec![id("Ġ"), id("5")]),
    ];
    for (text, want) in cases {
        let got = t.encode(text, false, true).unwrap();
        assert_eq!(&got, want, "{text:?}");
        assert_eq!(t.decode(&got).unwrap(), *text);
    }
}

#[test]
fn round_trips_arbitrary_text() {
    let t = tokenizer();
    for text in [
        "",
        " ",
        "Hello, world!",
        "  leading and trailing  ",
        "tabs\tand\r\nCRLF\n\n\n",
        "日本語のテキスト と 中文 and Ελληνικά",
        "emoji 🙂🚀👩‍👩‍👧 zero-width\u{200b}joiner",
        "x = [1, 22, 333, 4444]; y = x**2 # 3.14159",
        "it's we'll they'd I'M",
        "<|im_start|> not at start <|im_end|><|endoftext|>",
        "<|im_start<|im_end|>|>",
    ] {
        let ids = t.encode(text, false, true).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text, "{text:?} -> {ids:?}");
    }
}

#[test]
fn stream_decoder_holds_back_split_chars() {
    let t = tokenizer();
    // "🏫" is split across two tokens in the reference case (…, 233, 121, …).
    let text = "Les élèves étudient à l'école 🏫. Ils";
    let ids = t.encode(text, false, true).unwrap();
    let mut d = StreamDecoder::new(&t);
    let mut out = String::new();
    let mut held_back = false;
    for &id in &ids {
        let piece = d.push(id).unwrap();
        // A token's bytes that are not valid UTF-8 on their own produce nothing yet.
        if std::str::from_utf8(t.token_bytes(id).unwrap()).is_err() {
            held_back = true;
        }
        out.push_str(&piece);
    }
    out.push_str(&d.finish());
    assert!(held_back, "the test text must split a char across tokens");
    assert_eq!(out, text);
}

#[test]
fn out_of_range_ids_are_errors() {
    let t = tokenizer();
    assert!(matches!(
        t.decode(&[5, 49152]),
        Err(rocmforge::tokenizer::TokenizerError::TokenOutOfRange {
            id: 49152,
            vocab_size: 49152
        })
    ));
    assert!(t.token_bytes(u32::MAX).is_none());
    let mut d = StreamDecoder::new(&t);
    assert!(d.push(1 << 20).is_err());
}

#[test]
fn encode_is_deterministic_with_a_warm_cache() {
    // The word cache must not change results: encode twice, and through a clone.
    let t = tokenizer();
    let t2 = t.clone();
    for c in cases() {
        let a = t.encode(&c.prompt, false, true).unwrap();
        let b = t2.encode(&c.prompt, false, true).unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn control_tokens_show_no_text_unless_asked() {
    // `<|im_end|>` ends a chat turn: a user must never see its text in a reply.
    let t = tokenizer();
    let im_end = t.token_id("<|im_end|>").expect("SmolLM2 has <|im_end|>");
    assert!(t.is_eog(im_end));
    assert_eq!(t.piece_bytes(im_end, false), Some(&b""[..]));
    assert_eq!(t.piece_bytes(im_end, true), Some(&b"<|im_end|>"[..]));
    let ids = t.encode("Hello<|im_end|>", false, true).unwrap();
    assert!(ids.contains(&im_end));
    let mut plain = StreamDecoder::new(&t);
    let mut special = StreamDecoder::new(&t).with_special(true);
    let (mut a, mut b) = (String::new(), String::new());
    for &id in &ids {
        a.push_str(&plain.push(id).unwrap());
        b.push_str(&special.push(id).unwrap());
    }
    assert_eq!(a, "Hello");
    assert_eq!(b, "Hello<|im_end|>");
}
