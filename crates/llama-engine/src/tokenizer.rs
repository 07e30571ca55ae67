//! The Llama tokenizer: `tokenizer.json` through the Hugging Face `tokenizers`
//! crate (or, for checkpoints that ship only SentencePiece's `tokenizer.model`,
//! the `tokenizer.json` transformers would convert it to), plus the
//! special-token facts the engine and the chat template need.
//!
//! Two encoders are kept. The *full* one is `tokenizer.json` as published and
//! gives exactly the ids transformers gives. The *plain* one is the same
//! pipeline with the special added tokens taken out of the added vocabulary, so
//! a literal `<s>`, `</s>` or `<unk>` in user text is tokenized as ordinary text
//! the way Meta's SentencePiece model does it. Chat prompts are built from plain
//! pieces plus explicit BOS/EOS ids, so user text can never inject a control
//! token.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use crate::sentencepiece;

/// SentencePiece's word-boundary marker (U+2581), which stands for a space.
const SPIECE_UNDERLINE: char = '\u{2581}';

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot load tokenizer from {}: {message}", path.display())]
    Load { path: PathBuf, message: String },
    #[error("{} has neither tokenizer.json nor tokenizer.model", dir.display())]
    Missing { dir: PathBuf },
    #[error("tokenizer encode failed: {0}")]
    Encode(String),
    #[error("tokenizer decode failed: {0}")]
    Decode(String),
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    plain: Arc<tokenizers::Tokenizer>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    infill: Option<InfillTokens>,
}

/// Code Llama's fill-in-the-middle pieces: a prompt
/// `<PRE> prefix <SUF>suffix <MID>` is answered with the middle, ended by
/// `<EOT>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InfillTokens {
    pub prefix: u32,
    pub suffix: u32,
    pub middle: u32,
    pub end: u32,
}

/// The pieces as Code Llama's tokenizer names them (Meta's `piece_to_id`).
const INFILL_PIECES: [&str; 4] = [
    "\u{2581}<PRE>",
    "\u{2581}<SUF>",
    "\u{2581}<MID>",
    "\u{2581}<EOT>",
];

/// A character that is one piece of its own, encoded before text that must
/// not get SentencePiece's dummy-prefix space and then dropped (Meta's
/// `encode_infilling` trick).
const NO_PREFIX_MARK: &str = "\u{263A}";

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("add_bos", &self.add_bos)
            .finish()
    }
}

/// Turns off the BPE model's word cache. `tokenizers` keeps it per thread
/// (up to 10,000 words under 256 bytes each, on every thread that ever
/// encoded), so a server's memory would grow with the number of distinct
/// short prompts it has seen. It buys nothing for Llama: SentencePiece-style
/// tokenizers do not split text into words first, so the "word" it caches is
/// the whole prompt, found again only when the very same prompt comes back.
fn without_word_cache(tokenizer: &mut tokenizers::Tokenizer) {
    let mut model = tokenizer.get_model().clone();
    model.resize_cache(0);
    model.clear_cache();
    tokenizer.with_model(model);
}

/// What `tokenizer_config.json` / `special_tokens_map.json` say about the
/// special tokens; every field is optional because fine-tunes omit freely.
#[derive(Default)]
struct SpecialTokenConfig {
    bos: Option<String>,
    eos: Option<String>,
    add_bos: Option<bool>,
    add_eos: Option<bool>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory (else converts
    /// `tokenizer.model`), with the BOS/EOS tokens and `add_bos_token` from
    /// `tokenizer_config.json` (then `special_tokens_map.json`) when those
    /// files exist. A GGUF file (or a directory holding only one) gives the
    /// tokenizer its metadata describes.
    pub fn from_model_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let gguf = llama_model::gguf_path(dir).map_err(|e| TokenizerError::Load {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        if let Some(path) = gguf {
            return Self::from_gguf(&path);
        }
        let mut config = SpecialTokenConfig::default();
        // tokenizer_config.json wins over special_tokens_map.json, as in transformers.
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let json = read_json(&path)?;
            config.bos = config.bos.or_else(|| token_content(json.get("bos_token")));
            config.eos = config.eos.or_else(|| token_content(json.get("eos_token")));
            config.add_bos = config
                .add_bos
                .or_else(|| json.get("add_bos_token").and_then(Value::as_bool));
            config.add_eos = config
                .add_eos
                .or_else(|| json.get("add_eos_token").and_then(Value::as_bool));
        }
        let json_path = dir.join("tokenizer.json");
        let model_path = dir.join("tokenizer.model");
        if !model_path.is_file() || json_path.exists() {
            // Neither file: say so, unless the directory itself is missing
            // (then the read below names the path).
            if dir.is_dir() && !json_path.exists() {
                return Err(TokenizerError::Missing {
                    dir: dir.to_path_buf(),
                });
            }
            return Self::build(&json_path, read_json(&json_path)?, config);
        }
        let bytes = std::fs::read(&model_path).map_err(|source| TokenizerError::Io {
            path: model_path.clone(),
            source,
        })?;
        let use_special = sentencepiece::SpecialTokenUse {
            add_bos: config.add_bos.unwrap_or(true),
            add_eos: config.add_eos.unwrap_or(false),
        };
        let json = sentencepiece::tokenizer_json(&bytes, use_special).map_err(|e| {
            TokenizerError::Load {
                path: model_path.clone(),
                message: e.to_string(),
            }
        })?;
        tracing::info!(path = %model_path.display(), "no tokenizer.json: converted the SentencePiece model");
        Self::build(&model_path, json, config)
    }

    /// The SentencePiece vocabulary of a GGUF file's metadata, converted as
    /// a `tokenizer.model` would be.
    pub fn from_gguf(path: &Path) -> Result<Self, TokenizerError> {
        let load_error = |message: String| TokenizerError::Load {
            path: path.to_path_buf(),
            message,
        };
        let vocab = llama_model::GgufFile::open(path)
            .and_then(|g| g.vocab())
            .map_err(|e| load_error(e.to_string()))?;
        let piece = |id: Option<u32>| id.and_then(|i| vocab.tokens.get(i as usize)).cloned();
        let config = SpecialTokenConfig {
            bos: piece(vocab.bos_id),
            eos: piece(vocab.eos_id),
            add_bos: vocab.add_bos,
            add_eos: vocab.add_eos,
        };
        let use_special = sentencepiece::SpecialTokenUse {
            add_bos: config.add_bos.unwrap_or(true),
            add_eos: config.add_eos.unwrap_or(false),
        };
        let json = sentencepiece::SentencePieceVocab::from_gguf(&vocab)
            .and_then(|v| v.tokenizer_json(use_special))
            .map_err(|e| load_error(e.to_string()))?;
        Self::build(path, json, config)
    }

    /// Loads a bare `tokenizer.json`; BOS/EOS are looked up as `<s>` / `</s>`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        Self::build(path, read_json(path)?, SpecialTokenConfig::default())
    }

    /// `path` is where `json` came from, for error messages.
    fn build(
        path: &Path,
        mut json: Value,
        config: SpecialTokenConfig,
    ) -> Result<Self, TokenizerError> {
        let load_error = |message: String| TokenizerError::Load {
            path: path.to_path_buf(),
            message,
        };
        let mut inner: tokenizers::Tokenizer =
            serde_json::from_value(json.clone()).map_err(|e| load_error(e.to_string()))?;
        without_word_cache(&mut inner);

        // Only the special added tokens go: ordinary added tokens are part of
        // how the model segments text and would change the plain ids.
        if let Some(Value::Array(added)) = json.get_mut("added_tokens") {
            added.retain(|t| !t.get("special").and_then(Value::as_bool).unwrap_or(false));
        }
        let mut plain: tokenizers::Tokenizer =
            serde_json::from_value(json).map_err(|e| load_error(e.to_string()))?;
        without_word_cache(&mut plain);

        let lookup = |configured: Option<String>, fallback: &str| {
            configured
                .as_deref()
                .and_then(|t| inner.token_to_id(t))
                .or_else(|| inner.token_to_id(fallback))
        };
        let bos_id = lookup(config.bos, "<s>");
        let eos_id = lookup(config.eos, "</s>");
        let infill = match INFILL_PIECES.map(|piece| inner.token_to_id(piece)) {
            [Some(prefix), Some(suffix), Some(middle), Some(end)] => Some(InfillTokens {
                prefix,
                suffix,
                middle,
                end,
            }),
            _ => None,
        };
        Ok(Self {
            inner: Arc::new(inner),
            plain: Arc::new(plain),
            bos_id,
            eos_id,
            add_bos: config.add_bos.unwrap_or(true),
            infill,
        })
    }

    /// The fill-in-the-middle pieces, for models that have them (Code Llama).
    pub fn infill_tokens(&self) -> Option<InfillTokens> {
        self.infill
    }

    /// Meta's infilling prompt (`infilling_prompt_tokens` of codellama):
    /// BOS, `<PRE>`, the prefix as text, `<SUF>`, the suffix without the
    /// space SentencePiece would put before it, `<MID>`. Both texts are
    /// untrusted, so they are encoded plain. `None` without infill pieces.
    pub fn encode_infill(
        &self,
        prefix: &str,
        suffix: &str,
    ) -> Result<Option<Vec<u32>>, TokenizerError> {
        let Some(infill) = self.infill else {
            return Ok(None);
        };
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos_id);
        }
        ids.push(infill.prefix);
        ids.extend(self.encode_plain(prefix)?);
        ids.push(infill.suffix);
        let mark = self.encode_plain(NO_PREFIX_MARK)?;
        let marked = self.encode_plain(&format!("{NO_PREFIX_MARK}{suffix}"))?;
        match marked.strip_prefix(mark.as_slice()) {
            Some(unspaced) => ids.extend_from_slice(unspaced),
            // A vocabulary where the mark merges with what follows: the
            // suffix keeps its dummy space rather than gaining the mark.
            None => ids.extend(self.encode_plain(suffix)?),
        }
        ids.push(infill.middle);
        Ok(Some(ids))
    }

    /// The published tokenizer, for code (such as the detokenizer) that needs
    /// the full `tokenizers` API.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The same, shared rather than borrowed (for an [`IncrementalDetokenizer`](crate::detokenizer::IncrementalDetokenizer)).
    pub fn shared_hf(&self) -> Arc<tokenizers::Tokenizer> {
        self.inner.clone()
    }

    /// Exactly what `tokenizer.json` gives; `add_bos` is transformers'
    /// `add_special_tokens`, so literal special-token text becomes control ids.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, add_bos)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Untrusted text as SentencePiece encodes it: no BOS, and `<s>`, `</s>`,
    /// `<unk>` in the text stay plain text instead of becoming control ids.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .plain
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    /// The token's own text for logprobs. A lone byte-fallback piece that is
    /// not ASCII cannot be shown as text, so it becomes U+FFFD; its exact
    /// value is in [`Tokenizer::token_bytes`].
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.id_to_token(id) {
            Some(piece) => match byte_fallback(&piece) {
                Some(byte) => String::from_utf8_lossy(&[byte]).into_owned(),
                None => piece.replace(SPIECE_UNDERLINE, " "),
            },
            None => String::new(),
        }
    }

    /// The raw bytes the token stands for, as OpenAI's logprobs `bytes` field
    /// wants them: clients join them to rebuild UTF-8 split across tokens.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        match self.inner.id_to_token(id) {
            Some(piece) => match byte_fallback(&piece) {
                Some(byte) => vec![byte],
                None => piece.replace(SPIECE_UNDERLINE, " ").into_bytes(),
            },
            None => Vec::new(),
        }
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Includes added tokens: this is the number of ids the tokenizer can
    /// produce, which the model's embedding must cover.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// `add_bos_token` of `tokenizer_config.json` (true when absent, as for Llama).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// A special token in the HF config files is either a plain string or an
/// `AddedToken` object with a `content` field.
pub(crate) fn token_content(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_owned),
        _ => None,
    }
}

/// `<0xNN>` pieces are SentencePiece's byte fallback for text outside the vocabulary.
fn byte_fallback(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_dir() -> PathBuf {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/tiny-llama"
        ))
    }

    fn fixture(name: &str) -> Value {
        let path =
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(name);
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    fn ids(value: &Value) -> Vec<u32> {
        value
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }

    fn tokenizer() -> Tokenizer {
        Tokenizer::from_model_dir(&model_dir()).unwrap()
    }

    /// A model directory holding Meta's `tokenizer.model` and no
    /// `tokenizer.json`, with `tokenizer_config` as its config.
    fn sentencepiece_dir(name: &str, tokenizer_config: Option<Value>) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("llama-serve-spm-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fixtures = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"));
        std::fs::copy(
            fixtures.join("llama2-tokenizer.model"),
            dir.join("tokenizer.model"),
        )
        .unwrap();
        if let Some(config) = tokenizer_config {
            std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        }
        dir
    }

    /// The published tokenizer and the one converted from `tokenizer.model`.
    fn both_tokenizers() -> [(&'static str, Tokenizer); 2] {
        let config = read_json(&model_dir().join("tokenizer_config.json")).unwrap();
        let converted =
            Tokenizer::from_model_dir(&sentencepiece_dir("both", Some(config))).unwrap();
        [
            ("tokenizer.json", tokenizer()),
            ("tokenizer.model", converted),
        ]
    }

    #[test]
    fn special_tokens_from_config() {
        for (source, tok) in both_tokenizers() {
            assert_eq!(tok.bos_id(), Some(1), "{source}");
            assert_eq!(tok.eos_id(), Some(2), "{source}");
            assert!(tok.add_bos(), "{source}");
            assert_eq!(tok.vocab_size(), 32000, "{source}");
        }

        let bare = Tokenizer::from_file(&model_dir().join("tokenizer.json")).unwrap();
        assert_eq!(
            (bare.bos_id(), bare.eos_id(), bare.add_bos()),
            (Some(1), Some(2), true)
        );
    }

    #[test]
    fn every_fixture_case_encodes_and_decodes() {
        let cases = fixture("tokenizer-cases.json");
        let cases = cases["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 479);
        for (source, tok) in both_tokenizers() {
            for case in cases {
                let text = case["text"].as_str().unwrap();
                let expected = ids(&case["ids"]);
                assert_eq!(
                    tok.encode(text, true).unwrap(),
                    expected,
                    "{source}: encode {text:?}"
                );
                assert_eq!(
                    tok.encode(text, false).unwrap(),
                    expected[1..],
                    "{source}: encode without BOS {text:?}"
                );
                let decoded = case.get("decoded").and_then(Value::as_str).unwrap_or(text);
                assert_eq!(
                    tok.decode(&expected, true).unwrap(),
                    decoded,
                    "{source}: decode {text:?}"
                );
            }
        }
    }

    #[test]
    fn encode_plain_matches_sentencepiece() {
        let cases = fixture("tokenizer-cases.json");
        for (source, tok) in both_tokenizers() {
            let mut with_sp_ids = 0;
            for case in cases["cases"].as_array().unwrap() {
                let text = case["text"].as_str().unwrap();
                // Meta's ids equal tokenizer.json's unless `sentencepiece_ids` says otherwise.
                let expected = ids(case.get("sentencepiece_ids").unwrap_or(&case["ids"]));
                with_sp_ids += usize::from(case.get("sentencepiece_ids").is_some());
                assert_eq!(expected[0], 1);
                assert_eq!(
                    tok.encode_plain(text).unwrap(),
                    expected[1..],
                    "{source}: encode_plain {text:?}"
                );
            }
            assert_eq!(with_sp_ids, 21);
        }
    }

    #[test]
    fn encode_plain_never_yields_control_tokens() {
        let tok = tokenizer();
        let ids = tok.encode_plain("<s></s><unk> <s>[INST] </s>").unwrap();
        assert!(ids.iter().all(|&id| id > 2), "{ids:?}");
        // The full encoder still honours them, as transformers does.
        assert_eq!(tok.encode("</s>", false).unwrap(), vec![2]);
    }

    #[test]
    fn meta_ids_for_eos_literal_in_user_text() {
        let tok = tokenizer();
        let conversations = fixture("llama2-chat-template.json");
        let case = conversations["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "user_contains_eos_literal")
            .unwrap();
        let mut got = vec![1];
        got.extend(
            tok.encode_plain("[INST] Say </s> then <s> please [/INST]")
                .unwrap(),
        );
        assert_eq!(got, ids(&case["meta_ids"]));
    }

    #[test]
    fn token_text_and_bytes() {
        let tok = tokenizer();
        // "▁Hello" shows its word-boundary marker as a space.
        assert_eq!(tok.token_text(15043), " Hello");
        assert_eq!(tok.token_bytes(15043), b" Hello");
        // <0x0A> is the newline byte.
        assert_eq!(tok.token_text(13), "\n");
        assert_eq!(tok.token_bytes(13), vec![b'\n']);
        // 243 is <0xF0>, the first byte of a 4-byte UTF-8 sequence (an emoji).
        assert_eq!(tok.hf().id_to_token(243).as_deref(), Some("<0xF0>"));
        assert_eq!(tok.token_text(243), "\u{FFFD}");
        assert_eq!(tok.token_bytes(243), vec![0xF0]);
        // A multi-byte piece keeps its UTF-8 bytes.
        let piece = tok.hf().id_to_token(30919).unwrap();
        assert_eq!(
            tok.token_bytes(30919),
            piece.replace(SPIECE_UNDERLINE, " ").into_bytes()
        );
        assert_eq!(tok.token_text(1), "<s>");
        assert_eq!(tok.token_text(u32::MAX), "");
        assert!(tok.token_bytes(u32::MAX).is_empty());
    }

    #[test]
    fn converted_tokenizer_honours_add_bos_and_add_eos() {
        // No config at all: Llama's defaults, BOS only.
        let bare = Tokenizer::from_model_dir(&sentencepiece_dir("bare", None)).unwrap();
        assert_eq!(bare.encode("Hello", true).unwrap(), vec![1, 15043]);
        let eos = Tokenizer::from_model_dir(&sentencepiece_dir(
            "eos",
            Some(serde_json::json!({"add_bos_token": false, "add_eos_token": true})),
        ))
        .unwrap();
        assert!(!eos.add_bos());
        assert_eq!(eos.encode("Hello", true).unwrap(), vec![15043, 2]);
        assert_eq!(eos.encode("Hello", false).unwrap(), vec![15043]);
    }

    #[test]
    fn a_directory_without_a_tokenizer_says_which_files_it_needs() {
        let dir = std::env::temp_dir().join(format!("llama-serve-no-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = Tokenizer::from_model_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("neither tokenizer.json nor tokenizer.model"),
            "{err}"
        );
    }

    /// The bundled tokenizer with Code Llama's 16 extra pieces (ids
    /// 32000–32015, the fill-in-the-middle ones special), as in
    /// codellama/CodeLlama-7b-hf.
    fn code_llama_tokenizer() -> Tokenizer {
        let mut json = read_json(&model_dir().join("tokenizer.json")).unwrap();
        let extra = [
            "\u{2581}<SU",
            "\u{2581}<SUF",
            "\u{2581}<PRE",
            "\u{2581}<M",
            "\u{2581}<MID",
            "\u{2581}<E",
            "\u{2581}<EOT",
            "\u{2581}<PRE>",
            "\u{2581}<SUF>",
            "\u{2581}<MID>",
            "\u{2581}<EOT>",
            "\u{2581}<EOT><EOT>",
            "\u{2581}<EOT><EOT><EOT>",
            "\u{2581}<EOT><EOT><EOT><EOT>",
            "\u{2581}<EOT><EOT><EOT><EOT><EOT>",
            "\u{2581}<EOT><EOT><EOT><EOT><EOT><EOT>",
        ];
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        for (i, piece) in extra.iter().enumerate() {
            vocab.insert(piece.to_string(), serde_json::json!(32000 + i));
        }
        let added = json["added_tokens"].as_array_mut().unwrap();
        for (id, piece) in (32007..).zip(&extra[7..11]) {
            added.push(serde_json::json!({
                "id": id, "content": piece, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            }));
        }
        Tokenizer::build(
            Path::new("code-llama/tokenizer.json"),
            json,
            SpecialTokenConfig::default(),
        )
        .unwrap()
    }

    #[test]
    fn infill_prompts_are_metas() {
        assert_eq!(tokenizer().infill_tokens(), None);
        assert_eq!(tokenizer().encode_infill("a", "b").unwrap(), None);

        let tok = code_llama_tokenizer();
        assert_eq!(tok.vocab_size(), 32016);
        let infill = tok.infill_tokens().unwrap();
        assert_eq!(
            (infill.prefix, infill.suffix, infill.middle, infill.end),
            (32007, 32008, 32009, 32010)
        );
        let prompt = |pre: &str, suf: &str| tok.encode_infill(pre, suf).unwrap().unwrap();

        assert_eq!(prompt("", ""), vec![1, 32007, 32008, 32009]);
        // The prefix keeps SentencePiece's leading space ("▁def"); the suffix
        // does not ("world", not "▁world").
        assert_eq!(
            prompt("def", "world"),
            vec![1, 32007, 822, 32008, 11526, 32009]
        );
        assert_eq!(tok.encode_plain("world").unwrap(), vec![3186]);

        // A suffix starting with a newline: the plain encoding's lone "▁"
        // piece (29871) is what the infill encoding leaves out.
        let prefix = "def add(a, b):\n    ";
        let suffix = "\n    return a + b\n";
        let plain_suffix = tok.encode_plain(suffix).unwrap();
        assert_eq!(plain_suffix[..2], [29871, 13]);
        let mut expected = vec![1, 32007];
        expected.extend(tok.encode_plain(prefix).unwrap());
        expected.push(32008);
        expected.extend(&plain_suffix[1..]);
        expected.push(32009);
        assert_eq!(prompt(prefix, suffix), expected);
    }

    #[test]
    fn missing_files_name_the_path() {
        let err = Tokenizer::from_model_dir(Path::new("/nonexistent/model")).unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/model/tokenizer.json"),
            "{err}"
        );
    }
}
