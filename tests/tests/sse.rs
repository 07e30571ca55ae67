//! SSE over raw HTTP, checked byte by byte: client libraries differ in how
//! forgiving their parsers are, so the wire format must be exactly OpenAI's.

use std::collections::BTreeMap;

use e2e::{Server, SseReader};
use serde_json::{json, Value};

const SEED: u64 = 7;
const TEMPERATURE: f64 = 0.8;
const MAX_TOKENS: u64 = 20;

/// Splits a whole SSE body into its events, asserting the framing: every
/// event is exactly one `data: <payload>` line (or a `:` keep-alive comment)
/// ended by a blank line, LF only, and the body ends right after `[DONE]`.
fn strict_events(raw: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(raw).expect("SSE body is UTF-8");
    assert!(!text.contains('\r'), "LF line endings only: {text:?}");
    assert!(
        text.ends_with("data: [DONE]\n\n"),
        "body must end with `data: [DONE]\\n\\n`: {text:?}"
    );
    let mut data = Vec::new();
    for block in text.strip_suffix("\n\n").unwrap().split("\n\n") {
        assert!(!block.contains('\n'), "one line per event: {block:?}");
        if block.starts_with(':') {
            continue;
        }
        let payload = block
            .strip_prefix("data: ")
            .unwrap_or_else(|| panic!("event is not `data: ...`: {block:?}"));
        data.push(payload.to_string());
    }
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(
        data.iter().filter(|d| *d == "[DONE]").count(),
        1,
        "[DONE] exactly once"
    );
    data.pop();
    data
}

/// POSTs with `stream: true`, checks the headers, returns the parsed chunks.
async fn stream_chunks(server: &Server, path: &str, body: &Value) -> Vec<Value> {
    let response = server.post(path, body).await.unwrap();
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "content-type {content_type}"
    );
    let mut reader = SseReader::new(response);
    while reader.next_event().await.unwrap().is_some() {}
    strict_events(&reader.raw)
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{d:?}: {e}")))
        .collect()
}

/// Common to both endpoints: one id, object, model and `created` on every
/// chunk; `usage` only on the last chunk (with empty choices) when asked for.
fn check_envelope(chunks: &[Value], id_prefix: &str, object: &str, include_usage: bool) {
    assert!(!chunks.is_empty());
    let first = &chunks[0];
    let id = first["id"].as_str().expect("id");
    assert!(id.starts_with(id_prefix), "id {id}");
    for chunk in chunks {
        assert_eq!(chunk["id"], id, "same id on every chunk: {chunk}");
        assert_eq!(chunk["object"], object, "{chunk}");
        assert_eq!(chunk["created"], first["created"], "{chunk}");
        assert!(chunk["created"].is_u64(), "{chunk}");
        assert_eq!(chunk["model"], "tiny-llama", "{chunk}");
        assert!(chunk["choices"].is_array(), "{chunk}");
    }
    let (last, rest) = chunks.split_last().unwrap();
    for chunk in rest {
        assert!(
            chunk.get("usage").is_none_or(Value::is_null),
            "usage only on the final chunk: {chunk}"
        );
    }
    if include_usage {
        assert_eq!(
            last["choices"],
            json!([]),
            "usage chunk has empty choices: {last}"
        );
        let usage = &last["usage"];
        let (p, c) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        assert!(p > 0 && c > 0, "{usage}");
        assert_eq!(usage["total_tokens"].as_u64(), Some(p + c));
    } else {
        assert!(last.get("usage").is_none_or(Value::is_null), "{last}");
    }
}

/// Per choice index: the concatenated text field and the finish reason,
/// asserting that exactly one chunk per index carries a finish reason and it
/// is the index's last.
fn fold_choices(
    chunks: &[Value],
    text_of: impl Fn(&Value) -> Option<&str>,
) -> BTreeMap<u64, (String, String)> {
    let mut out: BTreeMap<u64, (String, Option<String>)> = BTreeMap::new();
    for chunk in chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let index = choice["index"].as_u64().expect("choices[].index");
            let entry = out.entry(index).or_default();
            assert!(
                entry.1.is_none(),
                "chunk after the finish of choice {index}: {chunk}"
            );
            if let Some(text) = text_of(choice) {
                entry.0.push_str(text);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                entry.1 = Some(reason.to_string());
            } else {
                assert!(choice["finish_reason"].is_null(), "{choice}");
            }
        }
    }
    out.into_iter()
        .map(|(i, (text, reason))| {
            let reason = reason.unwrap_or_else(|| panic!("choice {i} never finished"));
            (i, (text, reason))
        })
        .collect()
}

fn chat_body(n: u64, stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "tiny-llama",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "What is the capital of France?"}
        ],
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "seed": SEED,
        "n": n,
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn completion_body(n: u64, stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": "tiny-llama",
        "prompt": "The quick brown fox",
        "max_tokens": MAX_TOKENS,
        "temperature": TEMPERATURE,
        "seed": SEED,
        "n": n,
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

async fn chat_case(server: &Server, n: u64, include_usage: bool) {
    let whole = server
        .post_json("/v1/chat/completions", &chat_body(n, false, false))
        .await
        .unwrap();
    assert_eq!(whole.status, 200, "{}", whole.text);
    let chunks = stream_chunks(
        server,
        "/v1/chat/completions",
        &chat_body(n, true, include_usage),
    )
    .await;
    check_envelope(&chunks, "chatcmpl-", "chat.completion.chunk", include_usage);

    // Each choice opens with its role, once, before any of its content
    // (OpenAI sends one choice per chunk, so with n=2 there are two role chunks).
    let mut seen = std::collections::BTreeSet::new();
    for chunk in &chunks {
        for choice in chunk["choices"].as_array().unwrap() {
            let index = choice["index"].as_u64().unwrap();
            let role = &choice["delta"]["role"];
            if seen.insert(index) {
                assert_eq!(*role, "assistant", "first chunk of choice {index}: {chunk}");
                assert!(choice["finish_reason"].is_null(), "{chunk}");
            } else {
                assert!(role.is_null(), "role only once per choice: {chunk}");
            }
        }
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(seen.len() as u64, n);

    let streamed = fold_choices(&chunks, |c| c["delta"]["content"].as_str());
    assert_eq!(streamed.len() as u64, n);
    let choices = whole.body["choices"].as_array().unwrap();
    assert_eq!(choices.len() as u64, n);
    for choice in choices {
        let i = choice["index"].as_u64().unwrap();
        let (text, reason) = &streamed[&i];
        assert_eq!(
            Some(text.as_str()),
            choice["message"]["content"].as_str(),
            "choice {i}"
        );
        assert_eq!(
            Some(reason.as_str()),
            choice["finish_reason"].as_str(),
            "choice {i}"
        );
    }
    if include_usage {
        same_token_counts(&chunks.last().unwrap()["usage"], &whole.body["usage"]);
    }
}

async fn completion_case(server: &Server, n: u64, include_usage: bool) {
    let whole = server
        .post_json("/v1/completions", &completion_body(n, false, false))
        .await
        .unwrap();
    assert_eq!(whole.status, 200, "{}", whole.text);
    let chunks = stream_chunks(
        server,
        "/v1/completions",
        &completion_body(n, true, include_usage),
    )
    .await;
    check_envelope(&chunks, "cmpl-", "text_completion", include_usage);
    let streamed = fold_choices(&chunks, |c| c["text"].as_str());
    let choices = whole.body["choices"].as_array().unwrap();
    assert_eq!(choices.len() as u64, n);
    assert_eq!(streamed.len() as u64, n);
    for choice in choices {
        let i = choice["index"].as_u64().unwrap();
        let (text, reason) = &streamed[&i];
        assert_eq!(Some(text.as_str()), choice["text"].as_str(), "choice {i}");
        assert_eq!(
            Some(reason.as_str()),
            choice["finish_reason"].as_str(),
            "choice {i}"
        );
    }
    if include_usage {
        same_token_counts(&chunks.last().unwrap()["usage"], &whole.body["usage"]);
    }
}

#[tokio::test]
async fn chat_stream_framing_and_equality() {
    let server = Server::start().await.unwrap();
    chat_case(&server, 1, true).await;
    chat_case(&server, 1, false).await;
    chat_case(&server, 2, true).await;
}

#[tokio::test]
async fn completion_stream_framing_and_equality() {
    let server = Server::start().await.unwrap();
    completion_case(&server, 1, true).await;
    completion_case(&server, 1, false).await;
    completion_case(&server, 2, true).await;
}

#[tokio::test]
async fn n2_choices_differ_but_repeat_with_the_seed() {
    // Guards the equality tests above against a trivially passing sampler
    // (e.g. both choices or both runs silently greedy).
    let server = Server::start().await.unwrap();
    let a = server
        .post_json("/v1/completions", &completion_body(2, false, false))
        .await
        .unwrap();
    let b = server
        .post_json("/v1/completions", &completion_body(2, false, false))
        .await
        .unwrap();
    assert_eq!(
        a.body["choices"], b.body["choices"],
        "same seed, same answer"
    );
    assert_ne!(
        a.body["choices"][0]["text"], a.body["choices"][1]["text"],
        "the two choices of one seeded request should differ"
    );
    let mut other = completion_body(1, false, false);
    other["seed"] = json!(SEED + 1);
    let c = server.post_json("/v1/completions", &other).await.unwrap();
    assert_ne!(a.body["choices"][0]["text"], c.body["choices"][0]["text"]);
}

#[tokio::test]
async fn greedy_completion_stream_is_the_reference_text() {
    let server = Server::start().await.unwrap();
    let reference = &e2e::fixture_json("tiny-llama-reference.json")["prompts"][0];
    let chunks = stream_chunks(
        &server,
        "/v1/completions",
        &json!({
            "model": "tiny-llama",
            "prompt": reference["prompt"],
            "max_tokens": 48,
            "temperature": 0,
            "stream": true,
        }),
    )
    .await;
    check_envelope(&chunks, "cmpl-", "text_completion", false);
    let folded = fold_choices(&chunks, |c| c["text"].as_str());
    assert_eq!(
        folded[&0].0,
        reference["greedy_text_incremental"].as_str().unwrap()
    );
    assert_eq!(folded[&0].1, "length");
}

/// The same counts, streamed or not. (Not `prompt_tokens_details`: the
/// second request of a pair can find the first one's prompt in the prefix cache.)
fn same_token_counts(streamed: &Value, whole: &Value) {
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(streamed[key], whole[key], "{key}: {streamed} vs {whole}");
        assert!(streamed[key].is_u64(), "{key}: {streamed}");
    }
}
