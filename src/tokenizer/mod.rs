//! Tokenizers built from GGUF metadata, matching llama.cpp token for token.
//!
//! - `bpe`: byte-level BPE (`tokenizer.ggml.model = gpt2`), rank-ordered merges.
//! - `pretok`: the pre-tokenizer regexes named by `tokenizer.ggml.pre` (smollm, llama-bpe, qwen2, ...).
//! - `spm`: SentencePiece (`llama`): score-ordered merges, `▁` spaces, `<0xXX>` byte fallback.
//! - `chat`: chat templates rendered with `minijinja`.
//! - `stream`: incremental decoding that holds back incomplete UTF-8.
//!
//! Special tokens (control, user-defined, unknown) are cut out of the text first, longest first,
//! as llama.cpp's `tokenizer_st_partition` does; only the text between them is tokenized.
//!
//! Not (yet) done, compared with llama.cpp: the per-model `lstrip`/`rstrip` attributes some
//! special tokens get by model name (e.g. `<mask>`; Phi-3's `rstrip` is done), pre-tokenizers
//! other than those in [`pretok::SUPPORTED_NAMES`] (an unknown name is an error), and the
//! WPM/UGM/RWKV vocabularies.
//! Chat templates cannot use `{% break %}`/`{% continue %}` (minijinja's `loop_controls` feature
//! is off) or `strftime_now`.

mod bpe;
mod chat;
mod error;
mod fxhash;
mod gpt2split;
pub mod pretok;
mod spm;
mod stream;

pub use chat::{ChatMessage, ChatTemplate, ChatTemplateError, TemplateLimits};
pub use error::TokenizerError;
pub use pretok::PreKind;
pub use stream::StreamDecoder;

use crate::gguf::Metadata;
use crate::model::names::keys;
use bpe::Bpe;
use fxhash::TokenMap;
use pretok::PreTokenizer;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Tokenizer keys not (yet) in `model::names::keys`; they only matter here.
pub mod extra_keys {
    pub const EOT: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM: &str = "tokenizer.ggml.eom_token_id";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
}

/// GGUF token types (llama.cpp's `llama_token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_i32(v: i32) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

/// Texts llama.cpp treats as end-of-turn/end-of-generation whatever the metadata says.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<｜end▁of▁sentence｜>",
];

/// Fill-in-the-middle pad / repo / file-separator texts; llama.cpp ends generation on them too
/// (that is why SmolLM2's `<reponame>`, id 4, is end-of-generation).
const FIM_EOG_TEXTS: &[&str] = &[
    "<|fim_pad|>",
    "<fim-pad>",
    "<fim_pad>",
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
    "<|file_sep|>",
];

#[derive(Debug)]
enum Model {
    Bpe {
        bpe: Box<Bpe>,
        pre: PreTokenizer,
    },
    Spm {
        byte_tokens: Box<[Option<u32>; 256]>,
    },
}

/// Bound on the word cache; cleared when reached (simple, and long prompts rarely hit it).
const CACHE_CAP: usize = 1 << 16;
/// Longest piece (bytes) the word cache keeps.
const CACHE_MAX_PIECE: usize = 64;

#[derive(Debug)]
struct Inner {
    model: Model,
    model_name: String,
    pre_name: Option<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    /// The texts, and text -> id.
    token_to_id: TokenMap,
    /// Decoded bytes of every token, concatenated; token `i` is `bytes[offsets[i]..offsets[i+1]]`.
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<u32>,
    /// Specials that swallow the whitespace after them when cut out of text (llama.cpp's
    /// `RSTRIP` attribute), ascending.
    rstrip: Vec<u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    eog: Vec<u32>,
    chat_template: Option<String>,
    /// Pre-tokenized piece -> ids (BPE only).
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

/// A tokenizer; cheap to clone (shared, immutable vocabulary plus a shared word cache).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

fn special_id(
    md: &Metadata,
    key: &'static str,
    n: usize,
    default: Option<u32>,
) -> Result<Option<u32>, TokenizerError> {
    match md.get_u64(key)? {
        None => Ok(default),
        Some(id) if (id as usize) < n && id <= u32::MAX as u64 => Ok(Some(id as u32)),
        Some(id) => Err(TokenizerError::SpecialIdOutOfRange {
            key,
            id,
            vocab_size: n,
        }),
    }
}

impl Tokenizer {
    pub fn from_metadata(md: &Metadata) -> Result<Self, TokenizerError> {
        let model_name = md
            .get_str(keys::TOK_MODEL)?
            .ok_or(TokenizerError::MissingKey(keys::TOK_MODEL))?
            .to_string();
        let is_spm = match model_name.as_str() {
            "gpt2" => false,
            "llama" => true,
            other => return Err(TokenizerError::UnknownModel(other.to_string())),
        };
        let texts = md
            .get_str_array(keys::TOK_TOKENS)?
            .ok_or(TokenizerError::MissingKey(keys::TOK_TOKENS))?;
        let n = texts.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        if n > u32::MAX as usize / 2 {
            return Err(TokenizerError::LengthMismatch {
                key: keys::TOK_TOKENS,
                found: n,
                expected: u32::MAX as usize / 2,
            });
        }
        let mut types = match md.get_i32_array(keys::TOK_TYPES)? {
            None => vec![TokenType::Normal; n],
            Some(t) if t.len() == n => t.iter().map(|&v| TokenType::from_i32(v)).collect(),
            Some(t) => {
                return Err(TokenizerError::LengthMismatch {
                    key: keys::TOK_TYPES,
                    found: t.len(),
                    expected: n,
                })
            }
        };
        let scores = match md.get_f32_array(keys::TOK_SCORES)? {
            None => vec![0.0; n],
            Some(s) if s.len() == n => s.to_vec(),
            Some(s) => {
                return Err(TokenizerError::LengthMismatch {
                    key: keys::TOK_SCORES,
                    found: s.len(),
                    expected: n,
                })
            }
        };
        // Later duplicates win, as in llama.cpp's `token_to_id[text] = id`.
        let token_to_id = TokenMap::new(texts.iter().map(String::as_str));

        let pre_name = md.get_str(keys::TOK_PRE)?.map(str::to_string);
        // SentencePiece defaults are Llama 2's; BPE has no usable defaults.
        let (def_bos, def_eos, def_unk) = if is_spm {
            (Some(1), Some(2), Some(0))
        } else {
            (None, None, None)
        };
        let bos = special_id(md, keys::TOK_BOS, n, def_bos.filter(|&i| (i as usize) < n))?;
        let eos = special_id(md, keys::TOK_EOS, n, def_eos.filter(|&i| (i as usize) < n))?;
        let unk = special_id(md, keys::TOK_UNK, n, def_unk.filter(|&i| (i as usize) < n))?;
        let eot = special_id(md, extra_keys::EOT, n, None)?;
        let eom = special_id(md, extra_keys::EOM, n, None)?;

        let model = if is_spm {
            let mut byte_tokens = Box::new([None; 256]);
            for (i, t) in texts.iter().enumerate() {
                if types[i] == TokenType::Byte {
                    if let Some(b) = spm::parse_byte_token(t) {
                        byte_tokens[b as usize] = Some(i as u32);
                    }
                }
            }
            Model::Spm { byte_tokens }
        } else {
            let kind = PreKind::from_name(pre_name.as_deref())?;
            if pre_name.is_none() {
                tracing::warn!("tokenizer.ggml.pre is missing; using the `default` pre-tokenizer");
            }
            let merges = md
                .get_str_array(keys::TOK_MERGES)?
                .ok_or(TokenizerError::MissingKey(keys::TOK_MERGES))?;
            Model::Bpe {
                bpe: Box::new(Bpe::new(n, &token_to_id, merges)?),
                pre: PreTokenizer::new(kind)?,
            }
        };
        let default_add_bos = match &model {
            Model::Spm { .. } => true,
            Model::Bpe { pre, .. } => pre.kind() == PreKind::Llama3,
        };
        // A default never asks for a BOS the vocabulary lacks; only an explicit flag is an error.
        let add_bos = md
            .get_bool(keys::TOK_ADD_BOS)?
            .unwrap_or(default_add_bos && bos.is_some());
        let add_eos = md.get_bool(keys::TOK_ADD_EOS)?.unwrap_or(false);
        let add_space_prefix = is_spm && md.get_bool(extra_keys::ADD_SPACE_PREFIX)?.unwrap_or(true);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::MissingSpecial(keys::TOK_BOS));
        }
        if add_eos && eos.is_none() {
            return Err(TokenizerError::MissingSpecial(keys::TOK_EOS));
        }

        // End of generation: eos/eot/eom plus llama.cpp's text heuristics. A token with an
        // end-of-turn text is made a control token, as llama.cpp does, so it is parsed as special.
        let mut eog: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
        for t in EOG_TEXTS.iter().chain(FIM_EOG_TEXTS) {
            if let Some(&id) = token_to_id.get(t) {
                eog.push(id);
                if EOG_TEXTS.contains(t) {
                    types[id as usize] = TokenType::Control;
                }
            }
        }
        eog.sort_unstable();
        eog.dedup();

        let char_to_byte = bpe::char_to_byte_table();
        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(n + 1);
        offsets.push(0);
        for (i, t) in texts.iter().enumerate() {
            match types[i] {
                TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                    bytes.extend_from_slice(t.as_bytes())
                }
                TokenType::Normal if is_spm => {
                    bytes.extend_from_slice(t.replace(spm::SPACE, " ").as_bytes())
                }
                TokenType::Normal => {
                    // Chars outside the GPT-2 byte map (malformed vocabularies) pass through as UTF-8.
                    for c in t.chars() {
                        match char_to_byte.get(c as usize).copied().flatten() {
                            Some(b) => bytes.push(b),
                            None => {
                                bytes.extend_from_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes())
                            }
                        }
                    }
                }
                TokenType::Byte => match spm::parse_byte_token(t) {
                    Some(b) => bytes.push(b),
                    None => bytes.extend_from_slice(t.as_bytes()),
                },
                TokenType::Unused | TokenType::Undefined => {}
            }
            offsets.push(bytes.len());
        }

        let mut specials: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    TokenType::Control | TokenType::UserDefined | TokenType::Unknown
                ) && !texts[i as usize].is_empty()
            })
            .collect();
        specials.sort_by(|&a, &b| {
            texts[b as usize]
                .len()
                .cmp(&texts[a as usize].len())
                .then(a.cmp(&b))
        });

        // llama.cpp sets token attributes by model name; the one that changes chat prompts of a
        // supported family: Phi-3's special tokens strip the whitespace after them (as its
        // Hugging Face tokenizer's `rstrip` does), all but `<unk>`, `<s>`, `<|endoftext|>`.
        let general_name = md.get_str(keys::NAME)?.unwrap_or("").to_lowercase();
        let mut rstrip: Vec<u32> = Vec::new();
        if general_name.contains("phi-3") || general_name.contains("phi3") {
            let id_of = |t: &str| texts.iter().position(|x| x == t).map(|i| i as u32);
            let keep: Vec<u32> = ["<unk>", "<s>", "<|endoftext|>"]
                .into_iter()
                .filter_map(id_of)
                .collect();
            rstrip = specials
                .iter()
                .copied()
                .chain(id_of("</s>"))
                .filter(|id| !keep.contains(id))
                .collect();
            rstrip.sort_unstable();
            rstrip.dedup();
        }

        let chat_template = md.get_str(keys::TOK_CHAT_TEMPLATE)?.map(str::to_string);
        Ok(Self {
            inner: Arc::new(Inner {
                model,
                model_name,
                pre_name,
                types,
                scores,
                token_to_id,
                bytes,
                offsets,
                specials,
                rstrip,
                bos,
                eos,
                unk,
                add_bos,
                add_eos,
                add_space_prefix,
                eog,
                chat_template,
                cache: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Cuts special-token text out of `text`, longest token first (llama.cpp's partition).
    /// Without `parse_special` only user-defined tokens are cut out.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let inner = &*self.inner;
        // Empty text has no fragment at all (so SentencePiece adds no lone `▁`), as in llama.cpp.
        let mut frags = Vec::new();
        if !text.is_empty() {
            frags.push(Fragment::Text(text));
        }
        for &id in &inner.specials {
            let ty = inner.types[id as usize];
            if !parse_special && ty != TokenType::UserDefined {
                continue;
            }
            let needle = inner.token_to_id.text(id).unwrap_or_default();
            if !text.contains(needle) {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(s) if s.contains(needle) => {
                        let mut rest = s;
                        while let Some(pos) = rest.find(needle) {
                            if pos > 0 {
                                next.push(Fragment::Text(&rest[..pos]));
                            }
                            next.push(Fragment::Token(id));
                            rest = &rest[pos + needle.len()..];
                            if inner.rstrip.binary_search(&id).is_ok() {
                                // C's isspace, as llama.cpp trims.
                                rest = rest
                                    .trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
                            }
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    other => next.push(other),
                }
            }
            frags = next;
        }
        frags
    }

    /// Whether the whitespace right after special token `id` is dropped when text is encoded
    /// with special parsing (llama.cpp's `rstrip` attribute: Phi-3's specials).
    pub fn rstrips_after(&self, id: u32) -> bool {
        self.inner.rstrip.binary_search(&id).is_ok()
    }

    /// Token ids of `text`.
    ///
    /// `add_special` prepends BOS / appends EOS as `tokenizer.ggml.add_bos_token` /
    /// `add_eos_token` say; `parse_special` turns special-token text (`<|im_start|>`) into that token.
    pub fn encode(
        &self,
        text: &str,
        add_special: bool,
        parse_special: bool,
    ) -> Result<Vec<u32>, TokenizerError> {
        let inner = &*self.inner;
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && inner.add_bos {
            out.extend(inner.bos);
        }
        let frags = self.partition(text, parse_special);
        match &inner.model {
            Model::Bpe { bpe, pre } => {
                for f in frags {
                    match f {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(s) => self.encode_bpe(bpe, pre, s, &mut out)?,
                    }
                }
            }
            Model::Spm { byte_tokens } => {
                let vocab = spm::SpmVocab {
                    token_to_id: &inner.token_to_id,
                    scores: &inner.scores,
                    byte_tokens,
                    unk: inner.unk,
                };
                // A space is prefixed to text at the start and after every special token.
                let mut prev_special = true;
                for f in frags {
                    match f {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(s) => {
                            let mut t = String::with_capacity(s.len() + 3);
                            if inner.add_space_prefix && prev_special {
                                t.push(spm::SPACE);
                            }
                            t.push_str(&spm::escape_whitespace(s));
                            spm::encode(&vocab, &t, &mut out)?;
                            prev_special = false;
                        }
                    }
                }
            }
        }
        if add_special && inner.add_eos {
            out.extend(inner.eos);
        }
        Ok(out)
    }

    fn encode_bpe(
        &self,
        bpe: &Bpe,
        pre: &PreTokenizer,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), TokenizerError> {
        let inner = &*self.inner;
        for r in pre.split(text)? {
            let piece = &text[r];
            if pre.kind().ignore_merges() {
                if let Some(&id) = inner.token_to_id.get(&bpe.byte_encode(piece.as_bytes())) {
                    out.push(id);
                    continue;
                }
            }
            {
                let cache = inner.cache.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(ids) = cache.get(piece) {
                    out.extend_from_slice(ids);
                    continue;
                }
            }
            let start = out.len();
            bpe.encode_piece(piece.as_bytes(), &inner.token_to_id, out);
            // Long pieces rarely repeat; keeping them out bounds the cache's memory.
            if piece.len() > CACHE_MAX_PIECE {
                continue;
            }
            let mut cache = inner.cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= CACHE_CAP {
                cache.clear();
            }
            cache.insert(piece.to_string(), out[start..].to_vec());
        }
        Ok(())
    }

    /// Empties the word cache shared by this tokenizer and its clones (benchmarks of cold encoding).
    pub fn clear_cache(&self) {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// The bytes `ids` stand for, concatenated (special tokens as their text).
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, TokenizerError> {
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let b = self
                .token_bytes(id)
                .ok_or(TokenizerError::TokenOutOfRange {
                    id,
                    vocab_size: self.vocab_size(),
                })?;
            // SentencePiece: the space the encoder prefixed is removed again (llama.cpp's lstrip).
            if i == 0 && self.inner.add_space_prefix && b.first() == Some(&b' ') {
                out.extend_from_slice(&b[1..]);
            } else {
                out.extend_from_slice(b);
            }
        }
        Ok(out)
    }

    /// The text of `ids`: special tokens as their text, no clean-up, so
    /// `decode(encode(x)) == x`. Bytes that are not valid UTF-8 (an id list that ends inside a
    /// char) become U+FFFD; `decode_bytes` and `StreamDecoder` give the raw bytes.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let bytes = self.decode_bytes(ids)?;
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    /// The raw bytes a token stands for (its text for special tokens).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let o = &self.inner.offsets;
        let i = id as usize;
        if i + 1 >= o.len() {
            return None;
        }
        Some(&self.inner.bytes[o[i]..o[i + 1]])
    }

    /// The bytes a generated token shows a user: like `token_bytes`, except that a control token
    /// (`<|im_end|>`, `<|eot_id|>`, every end-of-generation token) is empty unless `special` asks
    /// for its text (llama.cpp's `token_to_piece(.., special)`). `None`: out of range.
    pub fn piece_bytes(&self, id: u32, special: bool) -> Option<&[u8]> {
        let b = self.token_bytes(id)?;
        if !special && self.token_type(id) == Some(TokenType::Control) {
            return Some(&[]);
        }
        Some(b)
    }

    /// The token's text as stored in the vocabulary (`Ġthe`, `▁the`, `<|im_end|>`).
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.inner.token_to_id.text(id)
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.inner.types.get(id as usize).copied()
    }

    /// The id of a token by its stored text.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.inner.token_to_id.get(text).copied()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.token_to_id.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.inner.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.inner.eos
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.inner.unk
    }

    pub fn add_bos(&self) -> bool {
        self.inner.add_bos
    }

    pub fn add_eos(&self) -> bool {
        self.inner.add_eos
    }

    /// End of generation: eos, eot, eom, and the end-of-turn / FIM texts llama.cpp recognises.
    pub fn is_eog(&self, id: u32) -> bool {
        self.inner.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, ascending.
    pub fn eog_ids(&self) -> &[u32] {
        &self.inner.eog
    }

    /// `"gpt2"` or `"llama"` (`tokenizer.ggml.model`).
    pub fn model_kind(&self) -> &str {
        &self.inner.model_name
    }

    /// `tokenizer.ggml.pre`, as stored.
    pub fn pre(&self) -> Option<&str> {
        self.inner.pre_name.as_deref()
    }

    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    /// Renders the model's chat template; the result is meant for `encode(.., add_special =
    /// true, parse_special = true)`. A template that writes the BOS text itself (Phi-3, Llama 3,
    /// Mistral) would then start with two BOS tokens where the tokenizer adds one, so that
    /// leading BOS text is dropped, as llama.cpp's `common_chat_templates_apply` does.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let tmpl = self.chat_template().ok_or(TokenizerError::NoChatTemplate)?;
        let text_of = |id: Option<u32>| id.and_then(|i| self.token_text(i)).unwrap_or("");
        let bos = text_of(self.inner.bos);
        let text = chat::render(
            tmpl,
            messages,
            add_generation_prompt,
            bos,
            text_of(self.inner.eos),
        )?;
        Ok(match text.strip_prefix(bos) {
            Some(rest) if self.inner.add_bos && !bos.is_empty() && self.inner.bos.is_some() => {
                rest.to_string()
            }
            _ => text,
        })
    }
}
