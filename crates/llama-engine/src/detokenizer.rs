//! Incremental (streaming) detokenization.
//!
//! Decoding one token at a time does not work for Llama 2's SentencePiece
//! tokenizer: its decoder strips one leading space from whatever it decodes,
//! and characters outside the vocabulary arrive as several byte-fallback
//! tokens (`<0xE2>` `<0x82>` `<0xAC>`) that only form a character together.
//! Decoding the whole sequence at every step would be correct but quadratic.
//!
//! Instead we decode a small window twice, with and without the new tokens,
//! and emit the difference (the idea of candle-examples' `TokenOutputStream`
//! and vLLM's `detokenize_incrementally`). The window always starts at a
//! "boundary" token, an ordinary vocabulary piece: the decoder treats the text
//! before such a token independently of the text after it, so the window's
//! decode is a faithful slice of the full decode.
//!
//! Text is only emitted when a boundary token arrives. The `ByteFallback`
//! decoder turns a whole run of byte tokens into `U+FFFD`s (one per byte) if
//! the run as a whole is not valid UTF-8, so even a run that is valid so far
//! (`<0x0A>`) can still change meaning until a non-byte token ends it. Holding
//! the run back costs at most one token of latency and makes the streamed text
//! equal to the full decode byte for byte, for any token sequence.

use std::sync::Arc;

use tokenizers::Tokenizer;

/// With tokenizers that split characters without byte-fallback pieces (byte
/// level BPE), a trailing `U+FFFD` usually means "character not finished yet",
/// so we wait. A model can also produce genuine replacement characters forever;
/// past this many held tokens the text is emitted anyway so the window stays
/// small.
const MAX_HELD_FOR_REPLACEMENT: usize = 16;

/// Streams the text of generated tokens, one token at a time.
pub struct IncrementalDetokenizer {
    tokenizer: Arc<Tokenizer>,
    /// The token ids still needed for decoding: from the window start (a
    /// boundary token, or the start of the sequence) to the newest token.
    window: Vec<u32>,
    /// `window[..read]` is already accounted for: its text is either part of
    /// the prompt or has been returned by `push`/`finish`.
    read: usize,
    /// Characters still to drop from the output, see [`Self::take_delta`].
    owed_chars: usize,
    text: String,
}

impl IncrementalDetokenizer {
    /// `prompt` = the prompt's token ids. Decoding is done against them, so the
    /// first generated token keeps its leading space: the streamed text is
    /// `decode(prompt + generated)[len(decode(prompt))..]`.
    pub fn new(tokenizer: Arc<Tokenizer>, prompt: &[u32]) -> Self {
        // Only the prompt's tail from its last boundary token matters: a run of
        // trailing byte tokens may continue into the generated ones.
        let start = prompt
            .iter()
            .rposition(|&id| is_boundary(&tokenizer, id))
            .unwrap_or(0);
        let window = prompt[start..].to_vec();
        Self {
            read: window.len(),
            window,
            tokenizer,
            owed_chars: 0,
            text: String::new(),
        }
    }

    /// Feeds one generated token and returns the newly completed text, which
    /// is empty while the token cannot be rendered yet (a byte-fallback piece,
    /// a special token).
    pub fn push(&mut self, id: u32) -> String {
        self.window.push(id);
        if !is_boundary(&self.tokenizer, id) {
            return String::new();
        }
        let (prefix, full) = self.decode_window();
        let held = self.window.len() - self.read;
        if full.ends_with('\u{FFFD}') && held < MAX_HELD_FOR_REPLACEMENT {
            return String::new();
        }
        let delta = self.take_delta(&prefix, &full);
        // The new token is a boundary: everything before it is final.
        self.window.drain(..self.window.len() - 1);
        self.read = 1;
        delta
    }

    /// All text produced so far (the concatenation of `push` and `finish`
    /// results).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Returns whatever is still pending at the end of generation; an
    /// incomplete UTF-8 sequence is decoded lossily, as the full decode does.
    pub fn finish(&mut self) -> String {
        if self.read == self.window.len() {
            return String::new();
        }
        let (prefix, full) = self.decode_window();
        let delta = self.take_delta(&prefix, &full);
        self.read = self.window.len();
        delta
    }

    /// Appends the text `full` adds after `prefix` to the output and returns it.
    ///
    /// `full` starts with `prefix` except when a byte run that started in the
    /// prompt changes meaning (`<0xD9>` alone decodes to U+FFFD, `<0xD9><0xA5>`
    /// to one Arabic digit). The definition `full_text[len(prompt_text):]`
    /// then slices by characters, as in Python, and may even have to drop
    /// characters that come later: they are owed and dropped from later text.
    fn take_delta(&mut self, prefix: &str, full: &str) -> String {
        let delta = match full.strip_prefix(prefix) {
            Some(rest) if self.owed_chars == 0 => rest.to_string(),
            Some(rest) => self.pay_owed(rest),
            None => {
                self.owed_chars += prefix.chars().count();
                self.pay_owed(full)
            }
        };
        self.text.push_str(&delta);
        delta
    }

    fn pay_owed(&mut self, text: &str) -> String {
        let mut chars = text.chars();
        while self.owed_chars > 0 && chars.next().is_some() {
            self.owed_chars -= 1;
        }
        chars.as_str().to_string()
    }

    /// Decodes the already-read part of the window and the whole window.
    fn decode_window(&self) -> (String, String) {
        // Decoding known ids with a well-formed decoder does not fail; an empty
        // string is the least harmful answer if it ever does.
        let decode = |ids: &[u32]| self.tokenizer.decode(ids, true).unwrap_or_default();
        (decode(&self.window[..self.read]), decode(&self.window))
    }

    #[cfg(test)]
    fn window_len(&self) -> usize {
        self.window.len()
    }
}

/// Whether the decoder renders `id` on its own, as an ordinary piece: not a
/// skipped special token, not an unknown id (also skipped by `decode`), not a
/// byte-fallback piece (`<0xHH>`) whose text depends on its neighbours.
fn is_boundary(tokenizer: &Tokenizer, id: u32) -> bool {
    match tokenizer.id_to_token(id) {
        None => false,
        Some(token) => {
            !is_byte_piece(&token) && !tokenizer.get_added_vocabulary().is_special_token(&token)
        }
    }
}

/// Same test as the `ByteFallback` decoder uses.
fn is_byte_piece(token: &str) -> bool {
    token.len() == 6
        && token.starts_with("<0x")
        && token.ends_with('>')
        && u8::from_str_radix(&token[3..5], 16).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};
    use std::sync::LazyLock;

    static TOKENIZER: LazyLock<Arc<Tokenizer>> = LazyLock::new(|| {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/tiny-llama/tokenizer.json"
        );
        Arc::new(Tokenizer::from_file(path).expect("tokenizer fixture"))
    });

    fn fixture(name: &str) -> serde_json::Value {
        let path = format!("{}/../../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        serde_json::from_str(&std::fs::read_to_string(path).expect("fixture file"))
            .expect("fixture json")
    }

    fn ids_of(value: &serde_json::Value) -> Vec<u32> {
        let ids = value.as_array().expect("id array");
        ids.iter().map(|v| v.as_u64().expect("id") as u32).collect()
    }

    fn encode(text: &str, special: bool) -> Vec<u32> {
        TOKENIZER
            .encode(text, special)
            .expect("encode")
            .get_ids()
            .to_vec()
    }

    fn decode(ids: &[u32]) -> String {
        TOKENIZER.decode(ids, true).expect("decode")
    }

    /// The definition: Python's `full_text[len(prompt_text):]`, in characters.
    fn expected(prompt: &[u32], generated: &[u32]) -> String {
        let all: Vec<u32> = prompt.iter().chain(generated).copied().collect();
        decode(&all)
            .chars()
            .skip(decode(prompt).chars().count())
            .collect()
    }

    /// Streams `generated` and checks the invariants on the way; returns the
    /// chunks (the last one from `finish`).
    fn stream_checked(prompt: &[u32], generated: &[u32]) -> Vec<String> {
        let want = expected(prompt, generated);
        let mut detok = IncrementalDetokenizer::new(TOKENIZER.clone(), prompt);
        let mut chunks = Vec::with_capacity(generated.len() + 1);
        for (i, &id) in generated.iter().enumerate() {
            let chunk = detok.push(id);
            if !want.contains('\u{FFFD}') {
                assert!(
                    !chunk.contains('\u{FFFD}'),
                    "U+FFFD mid-stream at {i}: {generated:?}"
                );
            }
            chunks.push(chunk);
            assert!(
                want.starts_with(detok.text()),
                "streamed text diverged at {i}: {generated:?}"
            );
            assert!(detok.window_len() <= prompt.len() + generated.len() + 1);
        }
        chunks.push(detok.finish());
        assert_eq!(
            chunks.concat(),
            want,
            "prompt {prompt:?} generated {generated:?}"
        );
        assert_eq!(detok.text(), want);
        assert_eq!(detok.finish(), "", "finish twice");
        chunks
    }

    #[test]
    fn reference_greedy_text_incremental() {
        let reference = fixture("tiny-llama-reference.json");
        for case in reference["prompts"].as_array().expect("prompts") {
            let prompt = ids_of(&case["prompt_ids"]);
            let generated = ids_of(&case["greedy_ids"]);
            let chunks = stream_checked(&prompt, &generated);
            assert_eq!(
                chunks.concat(),
                case["greedy_text_incremental"].as_str().expect("text")
            );
        }
    }

    #[test]
    fn leading_space_of_first_token_is_kept_after_a_prompt() {
        let prompt = encode("Hello", true);
        let generated = encode("world peace", false);
        let chunks = stream_checked(&prompt, &generated);
        assert_eq!(chunks[0], " world");
        assert_eq!(chunks.concat(), " world peace");
    }

    #[test]
    fn bos_only_prompt_gives_the_full_decode() {
        let ids = encode("  two leading spaces", true);
        let chunks = stream_checked(&[1], &ids[1..]);
        assert_eq!(chunks.concat(), decode(&ids));
        assert_eq!(stream_checked(&[], &ids).concat(), decode(&ids));
    }

    #[test]
    fn byte_fallback_character_comes_out_whole() {
        // "😀" is not in the vocabulary: <0xF0> <0x9F> <0x98> <0x80>.
        let generated = encode("a😀b", false);
        assert!(generated.len() >= 6, "{generated:?}");
        let chunks = stream_checked(&[1, 15043], &generated);
        assert!(chunks.iter().all(|c| c.chars().all(|ch| ch != '\u{FFFD}')));
        assert!(chunks.iter().any(|c| c.contains('😀')));
    }

    #[test]
    fn invalid_byte_runs_match_the_full_decode() {
        let nl = 13; // <0x0A>
        let e2 = 3 + 0xE2;
        let x = encode("x", false)[0];
        for generated in [
            vec![nl, e2, x],
            vec![nl, e2],
            vec![e2, 2, 3 + 0x82, 3 + 0xAC, x],
            vec![e2, e2, 3 + 0x82, 3 + 0xAC, x],
            vec![x, 2, 1, 0],
        ] {
            stream_checked(&[1, 15043], &generated);
            stream_checked(&[1, 15043, nl], &generated);
            stream_checked(&[1, 15043, e2], &generated);
            stream_checked(&[1], &generated);
        }
    }

    #[test]
    fn special_tokens_are_skipped() {
        let chunks = stream_checked(&[1, 15043], &[2, 1, 0, 3186]);
        assert_eq!(chunks.concat(), decode(&[1, 15043, 3186])[5..]);
    }

    #[test]
    fn every_tokenizer_case_streams_exactly() {
        let cases = fixture("tokenizer-cases.json");
        let prompts = [vec![], vec![1], encode("Hello", true), encode("x\n", true)];
        for case in cases["cases"].as_array().expect("cases") {
            let ids = ids_of(&case["ids"]);
            let want = case
                .get("decoded")
                .unwrap_or(&case["text"])
                .as_str()
                .expect("text");
            assert_eq!(stream_checked(&[1], &ids[1..]).concat(), want);
            for prompt in &prompts {
                stream_checked(prompt, &ids[1..]);
            }
            // Split the case's own ids between prompt and generation everywhere.
            for k in 0..ids.len() {
                stream_checked(&ids[..k], &ids[k..]);
            }
        }
    }

    /// Strings whose characters are mostly outside the vocabulary.
    const RARE_TEXT: &[&str] = &[
        "😀",
        "🦀🚀",
        "👨‍👩‍👧",
        "€",
        "龘",
        "𝄞",
        "ｱ",
        "🇫🇷",
        "中文字",
        "é",
        "\n",
        "\u{1F9EA}",
    ];

    /// A long sequence mixing every kind of token: random vocabulary pieces,
    /// byte-fallback runs that encode real characters, stray bytes, specials.
    fn random_sequence(rng: &mut StdRng, len: usize) -> Vec<u32> {
        let mut ids = Vec::with_capacity(len + 16);
        while ids.len() < len {
            match rng.random_range(0..100) {
                0..=39 => ids.push(rng.random_range(259..32000)),
                40..=64 => {
                    let text = RARE_TEXT[rng.random_range(0..RARE_TEXT.len())];
                    ids.extend(text.bytes().map(|b| 3 + u32::from(b)));
                }
                65..=79 => ids.extend(encode(
                    RARE_TEXT[rng.random_range(0..RARE_TEXT.len())],
                    false,
                )),
                80..=91 => ids.push(rng.random_range(3..=258)),
                _ => ids.push(rng.random_range(0..3)),
            }
        }
        ids
    }

    #[test]
    fn long_random_sequences_stream_exactly() {
        let mut rng = StdRng::seed_from_u64(0x11a3a);
        for round in 0..40 {
            let prompt_len = rng.random_range(0..12);
            let prompt = random_sequence(&mut rng, prompt_len);
            let generated = random_sequence(&mut rng, 300 + round * 5);
            stream_checked(&prompt, &generated);
            stream_checked(&[1], &generated);
        }
    }

    #[test]
    fn text_is_emitted_as_soon_as_a_boundary_token_arrives() {
        let mut rng = StdRng::seed_from_u64(7);
        let generated = random_sequence(&mut rng, 400);
        let prompt = [1, 15043];
        let mut detok = IncrementalDetokenizer::new(TOKENIZER.clone(), &prompt);
        for (i, &id) in generated.iter().enumerate() {
            detok.push(id);
            let want = expected(&prompt, &generated[..=i]);
            if is_boundary(&TOKENIZER, id) && !want.ends_with('\u{FFFD}') {
                assert_eq!(detok.text(), want, "held back after token {i}");
                assert_eq!(detok.window_len(), 1, "window not trimmed");
            }
        }
    }

    #[test]
    fn unicode_texts_round_trip_through_the_stream() {
        let mut rng = StdRng::seed_from_u64(42);
        for _ in 0..50 {
            let text: String = (0..rng.random_range(1..40))
                .map(|_| match rng.random_range(0..4) {
                    0 => RARE_TEXT[rng.random_range(0..RARE_TEXT.len())].to_string(),
                    1 => " ".to_string(),
                    2 => {
                        ["the", "Straße", "日本", "привет", "x"][rng.random_range(0..5)].to_string()
                    }
                    _ => char::from_u32(rng.random_range(0x20..0x2FFFF))
                        .unwrap_or('?')
                        .to_string(),
                })
                .collect();
            let ids = encode(&text, true);
            let chunks = stream_checked(&[1], &ids[1..]);
            assert_eq!(chunks.concat(), decode(&ids));
        }
    }

    fn any_id() -> impl Strategy<Value = u32> {
        prop_oneof![
            1 => 0u32..3,
            3 => 3u32..=258,
            4 => 259u32..32000,
            1 => 0xE0u32 + 3..=0xF4 + 3,
            1 => 0x80u32 + 3..=0xBF + 3,
        ]
    }

    proptest! {
        #[test]
        fn streaming_equals_full_decode(
            prompt in proptest::collection::vec(any_id(), 0..6),
            generated in proptest::collection::vec(any_id(), 0..80),
        ) {
            stream_checked(&prompt, &generated);
        }
    }
}
