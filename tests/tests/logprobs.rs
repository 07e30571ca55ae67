//! Logprobs as OpenAI and vLLM report them, on the real binary:
//! - an end-of-sequence token that ends a choice is counted in `usage` and
//!   has its entry (empty text) in every logprobs form, so entry counts equal
//!   token counts (lm-evaluation-harness reads the last entry as the
//!   generated token);
//! - `/v1/completions` `top_logprobs` objects list the most likely token first.

use e2e::{parse_chunks, Server};
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Value};

/// The Llama 2 end-of-sequence id, forced with a logit bias.
const EOS: &str = "2";
const PROMPT: [u32; 3] = [450, 7483, 310];

fn completion(extra: Value) -> Value {
    let mut body = json!({"model": "tiny-llama", "prompt": PROMPT, "max_tokens": 4,
                          "logprobs": 1, "temperature": 0, "logit_bias": {EOS: 100}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn chat(extra: Value) -> Value {
    let mut body = json!({"model": "tiny-llama", "max_tokens": 4, "temperature": 0,
                          "messages": [{"role": "user", "content": "Hi"}],
                          "logprobs": true, "top_logprobs": 2, "logit_bias": {EOS: 100}});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn len(v: &Value) -> usize {
    v.as_array().map_or(0, Vec::len)
}

/// The usage object of the last chunk that has one.
fn stream_usage(chunks: &[Value]) -> Value {
    chunks
        .iter()
        .rev()
        .find(|c| !c["usage"].is_null())
        .map(|c| c["usage"].clone())
        .expect("a usage chunk")
}

#[tokio::test]
async fn an_end_token_has_its_logprobs_entry_in_every_form() {
    let server = Server::start().await.unwrap();

    // Completions, whole, with and without echo.
    for echo in [false, true] {
        let reply = server
            .post_json("/v1/completions", &completion(json!({"echo": echo})))
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
        let choice = &reply.body["choices"][0];
        assert_eq!(choice["finish_reason"], "stop", "{}", reply.text);
        assert_eq!(reply.body["usage"]["completion_tokens"], 1);
        let lp = &choice["logprobs"];
        let want = usize::from(echo) * PROMPT.len() + 1;
        for key in ["tokens", "token_logprobs", "top_logprobs", "text_offset"] {
            assert_eq!(len(&lp[key]), want, "echo {echo}, {key}: {lp}");
        }
        // The end token: its score, no text, placed at the end of the text.
        let last = want - 1;
        assert_eq!(lp["tokens"][last], "", "{lp}");
        let score = lp["token_logprobs"][last].as_f64().unwrap();
        assert!(score.is_finite() && score <= 0.0, "{score}");
        let text = choice["text"].as_str().unwrap();
        assert_eq!(lp["text_offset"][last], text.chars().count(), "{lp}");
        if !echo {
            assert_eq!(text, "");
        }
    }

    // Completions, streamed, with and without echo.
    for echo in [false, true] {
        let data = server
            .post_sse(
                "/v1/completions",
                &completion(json!({"echo": echo, "stream": true,
                                   "stream_options": {"include_usage": true}})),
            )
            .await
            .unwrap();
        let chunks = parse_chunks(&data);
        let entries: usize = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| len(&c["logprobs"]["token_logprobs"]))
            .sum();
        assert_eq!(entries, usize::from(echo) * PROMPT.len() + 1, "{data:?}");
        assert_eq!(stream_usage(&chunks)["completion_tokens"], 1);
    }

    // Chat, whole and streamed.
    let reply = server
        .post_json("/v1/chat/completions", &chat(json!({})))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let choice = &reply.body["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["content"], "");
    assert_eq!(reply.body["usage"]["completion_tokens"], 1);
    let content = choice["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 1, "{}", reply.text);
    assert_eq!(content[0]["token"], "");
    assert_eq!(content[0]["bytes"], json!([]));
    assert!(content[0]["logprob"].as_f64().unwrap() <= 0.0);
    assert_eq!(len(&content[0]["top_logprobs"]), 2);

    let data = server
        .post_sse(
            "/v1/chat/completions",
            &chat(json!({"stream": true, "stream_options": {"include_usage": true}})),
        )
        .await
        .unwrap();
    let chunks = parse_chunks(&data);
    let entries: usize = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| len(&c["logprobs"]["content"]))
        .sum();
    assert_eq!(entries, 1, "{data:?}");
    assert_eq!(stream_usage(&chunks)["completion_tokens"], 1);
}

#[tokio::test]
async fn entry_counts_equal_token_counts_without_an_end_token() {
    let server = Server::start().await.unwrap();
    for (path, body) in [
        (
            "/v1/completions",
            completion(json!({"logit_bias": {}, "max_tokens": 6})),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logit_bias": {}, "max_tokens": 6})),
        ),
    ] {
        let reply = server.post_json(path, &body).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
        let choice = &reply.body["choices"][0];
        let lp = &choice["logprobs"];
        let entries = len(&lp["token_logprobs"]).max(len(&lp["content"]));
        assert_eq!(
            entries,
            reply.body["usage"]["completion_tokens"].as_u64().unwrap() as usize,
            "{path}: {}",
            reply.text
        );
    }
}

/// A `top_logprobs` object read in the order its keys were written.
#[derive(Debug)]
struct OrderedTop(Vec<(String, f64)>);

impl<'de> Deserialize<'de> for OrderedTop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = OrderedTop;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of logprobs")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedTop, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, f64>()? {
                    entries.push(entry);
                }
                Ok(OrderedTop(entries))
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

#[derive(Debug, Deserialize)]
struct RawCompletion {
    choices: Vec<RawChoice>,
}

#[derive(Debug, Deserialize)]
struct RawChoice {
    logprobs: Option<RawLogprobs>,
}

#[derive(Debug, Deserialize)]
struct RawLogprobs {
    top_logprobs: Vec<Option<OrderedTop>>,
}

/// Every top_logprobs object of a completion body, in wire order.
fn tops(raw: &str) -> Vec<OrderedTop> {
    let parsed: RawCompletion = serde_json::from_str(raw).unwrap();
    parsed
        .choices
        .into_iter()
        .filter_map(|c| c.logprobs)
        .flat_map(|lp| lp.top_logprobs.into_iter().flatten())
        .collect()
}

fn assert_most_likely_first(tops: &[OrderedTop], k: usize, context: &str) {
    assert!(!tops.is_empty(), "{context}: no top_logprobs");
    for top in tops {
        assert_eq!(top.0.len(), k, "{context}: {top:?}");
        assert!(
            top.0.windows(2).all(|w| w[0].1 >= w[1].1),
            "{context}: not most likely first: {top:?}"
        );
    }
}

#[tokio::test]
async fn completion_top_logprobs_come_most_likely_first() {
    let server = Server::start().await.unwrap();
    for echo in [false, true] {
        let body = json!({"model": "tiny-llama", "prompt": "The capital of France",
                          "max_tokens": 8, "logprobs": 5, "temperature": 0, "echo": echo});
        let reply = server.post_json("/v1/completions", &body).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
        let whole = tops(&reply.text);
        assert_most_likely_first(&whole, 5, &format!("echo {echo}"));

        let mut streamed_body = body.clone();
        streamed_body["stream"] = json!(true);
        let data = server
            .post_sse("/v1/completions", &streamed_body)
            .await
            .unwrap();
        let streamed: Vec<OrderedTop> = data
            .iter()
            .filter(|d| d.as_str() != "[DONE]")
            .flat_map(|d| tops(d))
            .collect();
        assert_most_likely_first(&streamed, 5, &format!("streamed, echo {echo}"));
        assert_eq!(streamed.len(), whole.len());
    }
}
