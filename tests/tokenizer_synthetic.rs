//! Tokenizer tests on small synthetic vocabularies: SentencePiece (Llama 2 / Mistral style),
//! byte-level BPE pre-tokenizer variants, and metadata errors. Every expected id list below is
//! worked out by hand from the merge rules stated next to it.

use rocmforge::gguf::{parse, write_to_vec, Array, ArrayItems, Metadata, Value, ValueType};
use rocmforge::model::names::keys;
use rocmforge::tokenizer::{StreamDecoder, Tokenizer, TokenizerError};

fn strings(v: &[&str]) -> Value {
    Value::Array(Array {
        elem: ValueType::String,
        items: ArrayItems::String(v.iter().map(|s| s.to_string()).collect()),
    })
}

fn i32s(v: Vec<i32>) -> Value {
    Value::Array(Array {
        elem: ValueType::I32,
        items: ArrayItems::I32(v),
    })
}

fn f32s(v: Vec<f32>) -> Value {
    Value::Array(Array {
        elem: ValueType::F32,
        items: ArrayItems::F32(v),
    })
}

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const BYTE: i32 = 6;

/// A Llama-2-like SentencePiece vocabulary: `<unk>`, `<s>`, `</s>`, 256 byte tokens, then pieces.
/// Single chars score -100; merged pieces score so that the merge order is the one noted.
struct Spm {
    md: Metadata,
    first_piece: u32,
    pieces: Vec<&'static str>,
}

const SPM_PIECES: &[(&str, f32)] = &[
    ("▁", -100.0),
    ("h", -100.0),
    ("e", -100.0),
    ("l", -100.0),
    ("o", -100.0),
    ("w", -100.0),
    ("r", -100.0),
    ("d", -100.0),
    ("a", -100.0),
    ("b", -100.0),
    ("c", -100.0),
    ("ll", -1.0),
    ("he", -2.0),
    ("hell", -3.0),
    ("hello", -4.0),
    ("▁hello", -5.0),
    ("▁w", -6.0),
    ("or", -7.0),
    ("▁wor", -8.0),
    ("ld", -9.0),
    ("▁world", -10.0),
    ("ab", -5.0),
    ("bc", -1.0),
];

fn spm() -> Spm {
    let mut texts: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![UNKNOWN, CONTROL, CONTROL];
    let mut scores = vec![0.0f32; 3];
    for b in 0..=255u8 {
        texts.push(format!("<0x{b:02X}>"));
        types.push(BYTE);
        scores.push(0.0);
    }
    let first_piece = texts.len() as u32;
    for (p, s) in SPM_PIECES {
        texts.push(p.to_string());
        types.push(NORMAL);
        scores.push(*s);
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut md = Metadata::new();
    md.insert(keys::TOK_MODEL, Value::String("llama".into()));
    md.insert(keys::TOK_TOKENS, strings(&refs));
    md.insert(keys::TOK_TYPES, i32s(types));
    md.insert(keys::TOK_SCORES, f32s(scores));
    md.insert(keys::TOK_BOS, Value::U32(1));
    md.insert(keys::TOK_EOS, Value::U32(2));
    md.insert(keys::TOK_UNK, Value::U32(0));
    Spm {
        md,
        first_piece,
        pieces: SPM_PIECES.iter().map(|(p, _)| *p).collect(),
    }
}

impl Spm {
    fn id(&self, piece: &str) -> u32 {
        let i = self.pieces.iter().position(|p| *p == piece);
        self.first_piece + i.unwrap_or_else(|| panic!("no piece {piece:?}")) as u32
    }
    fn tok(&self) -> Tokenizer {
        Tokenizer::from_metadata(&self.md).unwrap()
    }
}

fn byte(b: u8) -> u32 {
    3 + b as u32
}

#[test]
fn spm_merges_by_score_with_space_prefix() {
    let v = spm();
    let t = v.tok();
    assert_eq!(t.model_kind(), "llama");
    // "hello world" -> "▁hello▁world". By score: ll, he, hell, hello, ▁hello, ▁w, or, ▁wor, ld, ▁world.
    assert_eq!(
        t.encode("hello world", false, false).unwrap(),
        [v.id("▁hello"), v.id("▁world")]
    );
    // add_bos defaults to true for SentencePiece; add_eos to false.
    assert_eq!(
        t.encode("hello world", true, false).unwrap(),
        [1, v.id("▁hello"), v.id("▁world")]
    );
    // "bc" (-1) beats "ab" (-5) although "ab" is further left: ▁ a bc (no "▁a", no "abc").
    assert_eq!(
        t.encode("abc", false, false).unwrap(),
        [v.id("▁"), v.id("a"), v.id("bc")]
    );
    // Equal scores merge the leftmost pair first: ▁ ll l, not ▁ l ll.
    assert_eq!(
        t.encode("lll", false, false).unwrap(),
        [v.id("▁"), v.id("ll"), v.id("l")]
    );
}

#[test]
fn spm_byte_fallback_and_stream_decoding() {
    let v = spm();
    let t = v.tok();
    // 'é' is not a piece: its UTF-8 bytes C3 A9 become <0xC3> <0xA9>.
    let ids = t.encode("hé", false, false).unwrap();
    assert_eq!(ids, [v.id("▁"), v.id("h"), byte(0xC3), byte(0xA9)]);
    assert_eq!(t.decode(&ids).unwrap(), "hé");
    // Streaming: the first byte token alone is not text yet.
    let mut d = StreamDecoder::new(&t);
    assert_eq!(d.push(v.id("▁hello")).unwrap(), " hello");
    assert_eq!(d.push(byte(0xC3)).unwrap(), "");
    assert_eq!(d.push(byte(0xA9)).unwrap(), "é");
    assert_eq!(d.push(byte(0xF0)).unwrap(), "");
    // A 4-byte char cut after its first byte: finish() gives what is left, lossily.
    assert_eq!(d.finish(), "\u{FFFD}");
    // A byte that can never start a char is replaced at once, and decoding goes on.
    let mut d = StreamDecoder::new(&t);
    assert_eq!(d.push(byte(0xFF)).unwrap(), "\u{FFFD}");
    assert_eq!(d.push(v.id("h")).unwrap(), "h");
}

#[test]
fn spm_special_tokens_and_round_trip() {
    let v = spm();
    let t = v.tok();
    // parse_special: "<s>" is the control token, and the text after it gets a space prefix again.
    assert_eq!(
        t.encode("<s>hello", false, true).unwrap(),
        [1, v.id("▁hello")]
    );
    // Without parse_special, "<s>" is text: ▁ then bytes of '<' 's' '>' (no pieces), then "hello".
    assert_eq!(
        t.encode("<s>hello", false, false).unwrap(),
        [v.id("▁"), byte(b'<'), byte(b's'), byte(b'>'), v.id("hello")]
    );
    // The decoder drops the one space the encoder prefixed, so text round-trips exactly.
    for text in [
        "hello world",
        "  hello",
        "hello  ",
        "héllo wörld",
        "a\nb\tc",
        "",
    ] {
        let ids = t.encode(text, false, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text, "{text:?} -> {ids:?}");
    }
    // Control tokens decode to their text; only the first piece's leading space is dropped.
    assert_eq!(
        t.decode(&[1, v.id("▁hello"), v.id("▁world"), 2]).unwrap(),
        "<s> hello world</s>"
    );
    assert!(t.is_eog(2) && !t.is_eog(1) && !t.is_eog(0));
}

#[test]
fn spm_without_space_prefix() {
    let mut v = spm();
    v.md.insert("tokenizer.ggml.add_space_prefix", Value::Bool(false));
    let t = v.tok();
    assert_eq!(t.encode("hello", false, false).unwrap(), [v.id("hello")]);
    assert_eq!(t.decode(&[v.id("▁hello")]).unwrap(), " hello");
}

#[test]
fn spm_through_a_gguf_file() {
    let v = spm();
    let mut md = v.md.clone();
    md.insert(keys::ARCHITECTURE, Value::String("llama".into()));
    md.insert(keys::TOK_ADD_EOS, Value::Bool(true));
    let bytes = write_to_vec(&md, &[]).unwrap();
    let layout = parse(&bytes).unwrap();
    let t = Tokenizer::from_metadata(&layout.metadata).unwrap();
    assert_eq!(
        t.encode("hello world", true, false).unwrap(),
        [1, v.id("▁hello"), v.id("▁world"), 2]
    );
}

/// A tiny byte-level BPE vocabulary. Tokens are byte-encoded (`Ġ` is a space).
fn bpe_md(pre: Option<&str>, tokens: &[&str], merges: &[&str]) -> Metadata {
    let mut md = Metadata::new();
    md.insert(keys::TOK_MODEL, Value::String("gpt2".into()));
    if let Some(p) = pre {
        md.insert(keys::TOK_PRE, Value::String(p.into()));
    }
    md.insert(keys::TOK_TOKENS, strings(tokens));
    md.insert(keys::TOK_MERGES, strings(merges));
    md
}

const BPE_TOKENS: &[&str] = &[
    "<|end|>", "Ġ", "h", "e", "l", "o", "1", "2", "3", "4", "he", "ll", "hell", "hello", "Ġhello",
    "12",
];
const BPE_MERGES: &[&str] = &["l l", "h e", "he ll", "hell o", "1 2"];

#[test]
fn bpe_pre_tokenizers_differ_on_digits_and_ignore_merges() {
    let pos = |s: &str| BPE_TOKENS.iter().position(|t| *t == s).unwrap() as u32;
    let tok = |pre| Tokenizer::from_metadata(&bpe_md(Some(pre), BPE_TOKENS, BPE_MERGES)).unwrap();
    // "Ġhello" has no merge path ("Ġ hello" is not a merge): GPT-2 gives Ġ + hello, Llama 3
    // looks the whole piece up first (ignore_merges) and gives the single token.
    assert_eq!(
        tok("gpt2").encode(" hello", false, false).unwrap(),
        [pos("Ġ"), pos("hello")]
    );
    assert_eq!(
        tok("llama-bpe").encode(" hello", false, false).unwrap(),
        [pos("Ġhello")]
    );
    // Digits: GPT-2 keeps "1234" one piece (merge "1 2" -> 12, 3, 4); smollm and qwen2 split
    // every digit; Llama 3 cuts runs of three ("123", "4") and merges inside each.
    let digits = |pre| tok(pre).encode("1234", false, false).unwrap();
    assert_eq!(digits("gpt2"), [pos("12"), pos("3"), pos("4")]);
    assert_eq!(digits("smollm"), [pos("1"), pos("2"), pos("3"), pos("4")]);
    assert_eq!(digits("qwen2"), [pos("1"), pos("2"), pos("3"), pos("4")]);
    assert_eq!(digits("llama-bpe"), [pos("12"), pos("3"), pos("4")]);
    // default: llama.cpp's fallback list ends with [0-9]{3}: "1234" -> "123" + "4".
    assert_eq!(digits("default"), [pos("12"), pos("3"), pos("4")]);
}

#[test]
fn bpe_control_tokens_need_parse_special() {
    let mut md = bpe_md(Some("gpt2"), BPE_TOKENS, BPE_MERGES);
    let mut types = vec![NORMAL; BPE_TOKENS.len()];
    types[0] = CONTROL;
    md.insert(keys::TOK_TYPES, i32s(types));
    let t = Tokenizer::from_metadata(&md).unwrap();
    assert_eq!(t.encode("hello<|end|>", false, true).unwrap(), [13, 0]);
    // As text, '<', '|' ... have no tokens in this vocabulary and are dropped, as llama.cpp does.
    assert_eq!(t.encode("hello<|end|>", false, false).unwrap(), [13, 3]);
    // "<|end|>" is an end-of-turn text llama.cpp recognises.
    assert!(t.is_eog(0));
    assert_eq!(t.decode(&[13, 0]).unwrap(), "hello<|end|>");
}

#[test]
fn bad_metadata_gives_typed_errors() {
    let err = |md: &Metadata| Tokenizer::from_metadata(md).unwrap_err();
    assert!(matches!(
        err(&bpe_md(Some("no-such-pre"), BPE_TOKENS, BPE_MERGES)),
        TokenizerError::UnknownPreTokenizer(p) if p == "no-such-pre"
    ));
    let msg = err(&bpe_md(Some("no-such-pre"), BPE_TOKENS, BPE_MERGES)).to_string();
    assert!(
        msg.contains("no-such-pre") && msg.contains("smollm"),
        "{msg}"
    );

    let mut md = bpe_md(Some("gpt2"), BPE_TOKENS, BPE_MERGES);
    md.insert(keys::TOK_MODEL, Value::String("bert".into()));
    assert!(matches!(err(&md), TokenizerError::UnknownModel(m) if m == "bert"));

    let mut md = bpe_md(Some("gpt2"), BPE_TOKENS, BPE_MERGES);
    md.insert(keys::TOK_TYPES, i32s(vec![NORMAL; 3]));
    assert!(matches!(
        err(&md),
        TokenizerError::LengthMismatch {
            found: 3,
            expected: 16,
            ..
        }
    ));

    let mut md = bpe_md(Some("gpt2"), BPE_TOKENS, BPE_MERGES);
    md.insert(keys::TOK_BOS, Value::U32(16));
    assert!(matches!(
        err(&md),
        TokenizerError::SpecialIdOutOfRange {
            id: 16,
            vocab_size: 16,
            ..
        }
    ));

    let mut md = bpe_md(Some("gpt2"), BPE_TOKENS, BPE_MERGES);
    md.insert(keys::TOK_ADD_BOS, Value::Bool(true));
    assert!(matches!(err(&md), TokenizerError::MissingSpecial(_)));

    assert!(matches!(
        err(&bpe_md(Some("gpt2"), BPE_TOKENS, &["l l", "nospace"])),
        TokenizerError::BadMerge { index: 1, .. }
    ));
    assert!(matches!(
        err(&bpe_md(Some("gpt2"), &[], &[])),
        TokenizerError::EmptyVocab
    ));

    let mut md = bpe_md(Some("gpt2"), BPE_TOKENS, BPE_MERGES);
    md.insert(keys::TOK_TOKENS, Value::U32(7));
    assert!(matches!(err(&md), TokenizerError::Metadata(_)));

    let t = Tokenizer::from_metadata(&bpe_md(Some("gpt2"), BPE_TOKENS, BPE_MERGES)).unwrap();
    assert!(matches!(
        t.decode(&[2, 99]),
        Err(TokenizerError::TokenOutOfRange {
            id: 99,
            vocab_size: 16
        })
    ));
    assert!(matches!(
        t.apply_chat_template(&[], true),
        Err(TokenizerError::NoChatTemplate)
    ));
}

#[test]
fn chat_templates_with_python_methods_and_errors() {
    use rocmforge::tokenizer::ChatMessage;
    let mut md = bpe_md(Some("gpt2"), BPE_TOKENS, BPE_MERGES);
    md.insert(keys::TOK_BOS, Value::U32(0));
    // Llama-2/Mistral-like: bos_token variable, strip(), raise_exception on a bad role order.
    let tmpl = "{{ bos_token }}{% for m in messages %}\
        {% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}\
        {{ raise_exception('roles must alternate') }}{% endif %}\
        {% if m['role'] == 'user' %}[INST] {{ m['content'].strip() }} [/INST]\
        {% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}";
    md.insert(keys::TOK_CHAT_TEMPLATE, Value::String(tmpl.into()));
    let t = Tokenizer::from_metadata(&md).unwrap();
    let msgs = vec![
        ChatMessage::new("user", "  hi  "),
        ChatMessage::new("assistant", "hello"),
    ];
    // No eos_token_id in this vocabulary, so eos_token renders empty.
    assert_eq!(
        t.apply_chat_template(&msgs, false).unwrap(),
        "<|end|>[INST] hi [/INST]hello"
    );
    let bad = vec![ChatMessage::new("assistant", "x")];
    let e = t.apply_chat_template(&bad, false).unwrap_err();
    assert!(
        matches!(&e, TokenizerError::Template(m) if m.contains("roles must alternate")),
        "{e}"
    );
}

#[test]
fn long_inputs_have_no_step_limit() {
    // A backtracking regex gives up on `\s+(?!\S)` over huge whitespace runs; the hand-written
    // matchers are linear. Every variant but `default` uses one.
    let text = format!(
        "{}hello{}1234{}",
        " ".repeat(300_000),
        "\n".repeat(50_000),
        "\t".repeat(1000)
    );
    for pre in ["gpt2", "smollm", "llama-bpe", "qwen2"] {
        let mut tokens: Vec<&str> = BPE_TOKENS.to_vec();
        tokens.extend(["ĊĊ", "ĉ", "Ċ"]);
        let t = Tokenizer::from_metadata(&bpe_md(Some(pre), &tokens, BPE_MERGES)).unwrap();
        let ids = t.encode(&text, false, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text, "{pre}");
    }
}

#[test]
fn tokenizer_is_shareable_across_threads() {
    fn assert_shareable<T: Send + Sync + Clone + 'static>() {}
    assert_shareable::<Tokenizer>();
    // Clones share the word cache; encoding from several threads gives the same ids.
    let t = Tokenizer::from_metadata(&bpe_md(Some("smollm"), BPE_TOKENS, BPE_MERGES)).unwrap();
    let want = t.encode("hello 1234 hello", false, false).unwrap();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let t = t.clone();
            std::thread::spawn(move || t.encode("hello 1234 hello", false, false).unwrap())
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), want);
    }
}
