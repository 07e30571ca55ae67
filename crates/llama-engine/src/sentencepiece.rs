//! A SentencePiece `tokenizer.model` turned into the `tokenizer.json` that
//! transformers' `LlamaConverter` (legacy mode, the one Meta's Llama 2 repos
//! were published with) builds from it. Many Llama 2 fine-tunes and older
//! checkpoints ship only `tokenizer.model`; Python servers convert it through
//! transformers on load, and this does the same without Python.
//!
//! Only what Llama needs is read from the protobuf: the pieces with their
//! scores and types, the model type (BPE), the unknown/BOS/EOS ids and
//! whether a dummy-prefix space is added. GGUF files carry the same
//! vocabulary in their metadata ([`SentencePieceVocab::from_gguf`]), and
//! become the same `tokenizer.json`.

use std::collections::HashMap;

use serde_json::{json, Value};

/// SentencePiece's word-boundary marker (U+2581), which stands for a space.
const SPIECE_UNDERLINE: &str = "\u{2581}";

#[derive(Debug, thiserror::Error)]
pub enum SentencePieceError {
    #[error("not a SentencePiece model: {0}")]
    Malformed(String),
    #[error("the SentencePiece model is {0}, only BPE models (Llama's) are supported")]
    NotBpe(&'static str),
}

/// What a piece is for, as `sentencepiece_model.proto` (and GGUF's
/// `tokenizer.ggml.token_type`) numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl PieceType {
    pub fn from_proto(value: i64) -> Self {
        match value {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }

    pub fn as_proto(self) -> i32 {
        match self {
            Self::Normal => 1,
            Self::Unknown => 2,
            Self::Control => 3,
            Self::UserDefined => 4,
            Self::Unused => 5,
            Self::Byte => 6,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Piece {
    pub text: String,
    pub score: f32,
    pub kind: PieceType,
}

/// The parts of `ModelProto` the conversion needs.
#[derive(Debug, Clone)]
pub struct SentencePieceVocab {
    pub pieces: Vec<Piece>,
    /// `TrainerSpec.model_type`: 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: u64,
    pub unk_id: usize,
    pub bos_id: Option<usize>,
    pub eos_id: Option<usize>,
    pub byte_fallback: bool,
    pub add_dummy_prefix: bool,
}

/// Whether the post-processor adds BOS and EOS (`add_bos_token` and
/// `add_eos_token` of `tokenizer_config.json`; Llama: BOS only).
#[derive(Debug, Clone, Copy)]
pub struct SpecialTokenUse {
    pub add_bos: bool,
    pub add_eos: bool,
}

impl Default for SpecialTokenUse {
    fn default() -> Self {
        Self {
            add_bos: true,
            add_eos: false,
        }
    }
}

/// The `tokenizer.json` (as JSON) of a SentencePiece BPE model's bytes.
pub fn tokenizer_json(
    model: &[u8],
    use_special: SpecialTokenUse,
) -> Result<Value, SentencePieceError> {
    SentencePieceVocab::parse(model)?.tokenizer_json(use_special)
}

impl SentencePieceVocab {
    /// The vocabulary llama.cpp's converter wrote into a GGUF file's
    /// metadata (`tokenizer.ggml.model` "llama": SentencePiece BPE).
    pub fn from_gguf(vocab: &llama_model::GgufVocab) -> Result<Self, SentencePieceError> {
        if vocab.model != "llama" {
            return Err(SentencePieceError::Malformed(format!(
                "GGUF tokenizer model {:?}: only \"llama\" (SentencePiece BPE) is supported",
                vocab.model
            )));
        }
        let pieces: Vec<Piece> = vocab
            .tokens
            .iter()
            .zip(&vocab.scores)
            .zip(&vocab.token_types)
            .map(|((text, &score), &kind)| Piece {
                text: text.clone(),
                score,
                kind: PieceType::from_proto(kind as i64),
            })
            .collect();
        if pieces.is_empty() {
            return Err(SentencePieceError::Malformed("it has no pieces".into()));
        }
        let unk_id = match vocab.unk_id {
            Some(id) => id as usize,
            None => pieces
                .iter()
                .position(|p| p.kind == PieceType::Unknown)
                .unwrap_or(0),
        };
        Ok(Self {
            byte_fallback: pieces.iter().any(|p| p.kind == PieceType::Byte),
            pieces,
            model_type: 2,
            unk_id,
            bos_id: vocab.bos_id.map(|id| id as usize),
            eos_id: vocab.eos_id.map(|id| id as usize),
            add_dummy_prefix: vocab.add_space_prefix.unwrap_or(true),
        })
    }

    pub fn tokenizer_json(
        &self,
        use_special: SpecialTokenUse,
    ) -> Result<Value, SentencePieceError> {
        let model = self;
        match model.model_type {
            2 => {}
            1 => return Err(SentencePieceError::NotBpe("a unigram model")),
            3 => return Err(SentencePieceError::NotBpe("a word model")),
            4 => return Err(SentencePieceError::NotBpe("a character model")),
            _ => return Err(SentencePieceError::NotBpe("of an unknown model type")),
        }
        let piece_text =
            |id: Option<usize>| id.and_then(|i| model.pieces.get(i)).map(|p| p.text.clone());
        let unk = piece_text(Some(model.unk_id)).ok_or_else(|| {
            SentencePieceError::Malformed(format!("unk_id {} has no piece", model.unk_id))
        })?;

        let vocab: serde_json::Map<String, Value> = model
            .pieces
            .iter()
            .enumerate()
            .map(|(id, p)| (p.text.clone(), json!(id)))
            .collect();

        // Control and unknown pieces are matched whole and never normalized, as
        // SentencePiece treats them; user-defined pieces likewise, but they are
        // ordinary text rather than special tokens.
        let added_tokens: Vec<Value> = model
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                matches!(
                    p.kind,
                    PieceType::Unknown | PieceType::Control | PieceType::UserDefined
                )
            })
            .map(|(id, p)| {
                json!({
                    "id": id,
                    "content": p.text,
                    "single_word": false,
                    "lstrip": false,
                    "rstrip": false,
                    "normalized": false,
                    "special": p.kind != PieceType::UserDefined,
                })
            })
            .collect();

        let mut normalizers = Vec::new();
        if model.add_dummy_prefix {
            normalizers.push(json!({"type": "Prepend", "prepend": SPIECE_UNDERLINE}));
        }
        normalizers.push(
            json!({"type": "Replace", "pattern": {"String": " "}, "content": SPIECE_UNDERLINE}),
        );

        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": SPIECE_UNDERLINE}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if model.add_dummy_prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }

        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added_tokens,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": null,
            "post_processor": post_processor(
                use_special,
                piece_text(model.bos_id).zip(model.bos_id),
                piece_text(model.eos_id).zip(model.eos_id),
            ),
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {
                "type": "BPE",
                "dropout": null,
                "unk_token": unk,
                "continuing_subword_prefix": null,
                "end_of_word_suffix": null,
                "fuse_unk": true,
                "byte_fallback": model.byte_fallback,
                "vocab": vocab,
                "merges": merges(&model.pieces),
            },
        }))
    }
}

/// Every split of a piece into two pieces of the vocabulary is a merge,
/// ranked by the merged piece's score (higher first). Ties keep vocabulary
/// order, and within one piece the splits go by their halves' ids, so the
/// ranking is the one `SentencePieceExtractor` produces.
fn merges(pieces: &[Piece]) -> Vec<String> {
    let ids: HashMap<&str, usize> = pieces
        .iter()
        .enumerate()
        .map(|(id, p)| (p.text.as_str(), id))
        .collect();
    let mut ranked: Vec<(f32, usize, usize)> = Vec::new();
    for piece in pieces {
        let start = ranked.len();
        for (split, _) in piece.text.char_indices().skip(1) {
            let (left, right) = piece.text.split_at(split);
            if let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) {
                ranked.push((piece.score, l, r));
            }
        }
        ranked[start..].sort_by_key(|&(_, l, r)| (l, r));
    }
    // A stable sort: equal scores keep the order built above.
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
    ranked
        .into_iter()
        .map(|(_, l, r)| format!("{} {}", pieces[l].text, pieces[r].text))
        .collect()
}

fn post_processor(
    use_special: SpecialTokenUse,
    bos: Option<(String, usize)>,
    eos: Option<(String, usize)>,
) -> Value {
    let bos = bos.filter(|_| use_special.add_bos);
    let eos = eos.filter(|_| use_special.add_eos);
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let special = |token: &(String, usize), type_id: u32| json!({"SpecialToken": {"id": token.0, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id, out) in [("A", 0, &mut single), ("B", 1, &mut pair)] {
        if let Some(token) = &bos {
            out.push(special(token, type_id));
        }
        out.push(sequence(seq, type_id));
        if let Some(token) = &eos {
            out.push(special(token, type_id));
        }
    }
    // A pair is the first sequence's template followed by the second's.
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    let mut special_tokens = serde_json::Map::new();
    for (text, id) in bos.iter().chain(eos.iter()) {
        special_tokens.insert(
            text.clone(),
            json!({"id": text, "ids": [id], "tokens": [text]}),
        );
    }
    json!({
        "type": "TemplateProcessing",
        "single": single,
        "pair": pair,
        "special_tokens": special_tokens,
    })
}

impl SentencePieceVocab {
    /// Reads a `tokenizer.model` (SentencePiece's `ModelProto`).
    pub fn parse(bytes: &[u8]) -> Result<Self, SentencePieceError> {
        let mut model = Self {
            pieces: Vec::new(),
            model_type: 1,
            unk_id: 0,
            bos_id: Some(1),
            eos_id: Some(2),
            byte_fallback: false,
            add_dummy_prefix: true,
        };
        let mut reader = Reader::new(bytes);
        while let Some((field, value)) = reader.next_field()? {
            match (field, value) {
                (1, Field::Bytes(piece)) => model.pieces.push(parse_piece(piece)?),
                (2, Field::Bytes(spec)) => model.read_trainer_spec(spec)?,
                (3, Field::Bytes(spec)) => model.read_normalizer_spec(spec)?,
                _ => {}
            }
        }
        if model.pieces.is_empty() {
            return Err(SentencePieceError::Malformed("it has no pieces".into()));
        }
        Ok(model)
    }

    fn read_trainer_spec(&mut self, bytes: &[u8]) -> Result<(), SentencePieceError> {
        // A negative id (int32 -1 as a varint) disables the token.
        let id = |v: u64| usize::try_from(v as i32).ok();
        let mut reader = Reader::new(bytes);
        while let Some((field, value)) = reader.next_field()? {
            match (field, value) {
                (3, Field::Varint(v)) => self.model_type = v,
                (35, Field::Varint(v)) => self.byte_fallback = v != 0,
                (40, Field::Varint(v)) => {
                    self.unk_id = id(v)
                        .ok_or_else(|| SentencePieceError::Malformed("unk_id is negative".into()))?
                }
                (41, Field::Varint(v)) => self.bos_id = id(v),
                (42, Field::Varint(v)) => self.eos_id = id(v),
                _ => {}
            }
        }
        Ok(())
    }

    fn read_normalizer_spec(&mut self, bytes: &[u8]) -> Result<(), SentencePieceError> {
        let mut reader = Reader::new(bytes);
        while let Some((field, value)) = reader.next_field()? {
            if let (3, Field::Varint(v)) = (field, value) {
                self.add_dummy_prefix = v != 0;
            }
        }
        Ok(())
    }
}

fn parse_piece(bytes: &[u8]) -> Result<Piece, SentencePieceError> {
    let mut piece = Piece {
        text: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut reader = Reader::new(bytes);
    while let Some((field, value)) = reader.next_field()? {
        match (field, value) {
            (1, Field::Bytes(text)) => {
                piece.text = String::from_utf8(text.to_vec())
                    .map_err(|_| SentencePieceError::Malformed("a piece is not UTF-8".into()))?
            }
            (2, Field::Fixed32(bits)) => piece.score = f32::from_bits(bits),
            (3, Field::Varint(v)) => piece.kind = PieceType::from_proto(v as i64),
            _ => {}
        }
    }
    Ok(piece)
}

/// One field's value in the protobuf wire format.
enum Field<'a> {
    Varint(u64),
    Fixed64,
    Bytes(&'a [u8]),
    Fixed32(u32),
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn truncated() -> SentencePieceError {
        SentencePieceError::Malformed("the protobuf is truncated".into())
    }

    fn varint(&mut self) -> Result<u64, SentencePieceError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.bytes.get(self.pos).ok_or_else(Self::truncated)?;
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SentencePieceError::Malformed("a varint is too long".into()))
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], SentencePieceError> {
        let end = self.pos.checked_add(len).ok_or_else(Self::truncated)?;
        let slice = self.bytes.get(self.pos..end).ok_or_else(Self::truncated)?;
        self.pos = end;
        Ok(slice)
    }

    fn next_field(&mut self) -> Result<Option<(u64, Field<'a>)>, SentencePieceError> {
        if self.pos == self.bytes.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Field::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Field::Fixed64
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| Self::truncated())?;
                Field::Bytes(self.take(len)?)
            }
            5 => {
                let raw = self.take(4)?;
                Field::Fixed32(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]))
            }
            wire => {
                return Err(SentencePieceError::Malformed(format!(
                    "unsupported protobuf wire type {wire}"
                )))
            }
        };
        Ok(Some((key >> 3, value)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_dir() -> std::path::PathBuf {
        std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures"))
    }

    fn converted() -> Value {
        let bytes = std::fs::read(fixture_dir().join("llama2-tokenizer.model")).unwrap();
        tokenizer_json(&bytes, SpecialTokenUse::default()).unwrap()
    }

    fn published() -> Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/tiny-llama/tokenizer.json"
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// A damaged or hostile `tokenizer.model` is an error (or, if it
        /// still parses, a conversion), never a panic: truncated, with bytes
        /// overwritten, or random bytes altogether.
        #[test]
        fn damaged_models_never_panic(
            cut in 0usize..499_723,
            flips in proptest::collection::vec((0usize..499_723, proptest::prelude::any::<u8>()), 0..8),
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
        ) {
            let real = std::fs::read(fixture_dir().join("llama2-tokenizer.model")).unwrap();
            let mut damaged = real.clone();
            for (at, byte) in flips {
                damaged[at % real.len()] = byte;
            }
            let _ = tokenizer_json(&damaged, SpecialTokenUse::default());
            let _ = tokenizer_json(&real[..cut.min(real.len())], SpecialTokenUse::default());
            let _ = tokenizer_json(&noise, SpecialTokenUse::default());
        }
    }

    /// llama.cpp's converter writes the pieces, scores and types of
    /// `tokenizer.model` into GGUF metadata; from there they become the
    /// same `tokenizer.json`.
    #[test]
    fn gguf_vocabulary_converts_to_the_published_tokenizer_json() {
        let bytes = std::fs::read(fixture_dir().join("llama2-tokenizer.model")).unwrap();
        let model = SentencePieceVocab::parse(&bytes).unwrap();
        let gguf = llama_model::GgufVocab {
            model: "llama".into(),
            tokens: model.pieces.iter().map(|p| p.text.clone()).collect(),
            scores: model.pieces.iter().map(|p| p.score).collect(),
            token_types: model.pieces.iter().map(|p| p.kind.as_proto()).collect(),
            unk_id: Some(0),
            bos_id: Some(1),
            eos_id: Some(2),
            ..Default::default()
        };
        let json = SentencePieceVocab::from_gguf(&gguf)
            .unwrap()
            .tokenizer_json(SpecialTokenUse::default())
            .unwrap();
        assert_eq!(json, converted());
        assert_eq!(json["model"]["merges"], published()["model"]["merges"]);
        let other = llama_model::GgufVocab {
            model: "gpt2".into(),
            ..gguf
        };
        let err = SentencePieceVocab::from_gguf(&other)
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"gpt2\""), "{err}");
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = tokenizer_json(b"not a model", SpecialTokenUse::default()).unwrap_err();
        assert!(
            err.to_string().contains("not a SentencePiece model"),
            "{err}"
        );
        assert!(tokenizer_json(&[], SpecialTokenUse::default()).is_err());
    }

    #[test]
    fn llama2_model_converts_to_the_published_tokenizer_json() {
        let (ours, theirs) = (converted(), published());
        for key in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
        ] {
            assert_eq!(ours[key], theirs[key], "{key}");
        }
        let (ours, theirs) = (&ours["model"], &theirs["model"]);
        assert_eq!(ours["vocab"], theirs["vocab"]);
        let (our_merges, their_merges) = (
            ours["merges"].as_array().unwrap(),
            theirs["merges"].as_array().unwrap(),
        );
        assert_eq!(our_merges.len(), 61249);
        // The order is the merge priority, so it must match too.
        if let Some(i) = (0..our_merges.len()).find(|&i| our_merges[i] != their_merges[i]) {
            panic!("merge {i}: {} != {}", our_merges[i], their_merges[i]);
        }
        assert_eq!(our_merges.len(), their_merges.len());
        for key in ["type", "unk_token", "fuse_unk", "byte_fallback", "dropout"] {
            assert_eq!(ours[key], theirs[key], "model.{key}");
        }
    }
}
