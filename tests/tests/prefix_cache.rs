//! Automatic prefix caching through the real server: chats that share a
//! system prompt, a repeated request, a conversation's next turn. Each
//! reports the prompt tokens it found cached in
//! `usage.prompt_tokens_details.cached_tokens` (read by a real OpenAI client
//! too), answers as it would from scratch, and `/metrics` counts the hits.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestSystemMessage, ChatCompletionRequestUserMessage,
    CreateChatCompletionRequestArgs,
};
use async_openai::Client;
use e2e::Server;
use serde_json::{json, Value};

const SYSTEM: &str = "You are a helpful, respectful and honest assistant. Always answer \
    as helpfully as possible, while being safe. Your answers should not include any harmful, \
    unethical, racist, sexist, toxic, dangerous, or illegal content.";

/// KV blocks of the default CPU cache hold 16 tokens.
const BLOCK: usize = 16;

fn messages(user: &str) -> Value {
    json!([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
}

async fn prompt_ids(server: &Server, messages: &Value) -> Vec<u64> {
    let reply = server
        .post_json("/tokenize", &json!({"messages": messages}))
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.body["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap())
        .collect()
}

/// Greedy chat: the answer and the usage object.
async fn chat(server: &Server, messages: &Value) -> (String, Value) {
    let reply = server
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "tiny-llama", "messages": messages, "max_tokens": 12, "temperature": 0}),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let text = reply.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    (text, reply.body["usage"].clone())
}

fn cached(usage: &Value) -> usize {
    usage["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {usage}")) as usize
}

/// What the cache can give a prompt after another was computed: the
/// whole blocks of their common prefix, short of the prompt's last token.
fn expected_hit(computed: &[u64], prompt: &[u64]) -> usize {
    let common = computed
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count();
    common.min(prompt.len() - 1) / BLOCK * BLOCK
}

async fn metric(server: &Server, name: &str) -> f64 {
    let text = server.metrics().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[tokio::test]
async fn chats_sharing_a_system_prompt_reuse_its_cached_blocks() {
    let server = Server::start().await.unwrap();
    let first = messages("Name three colours.");
    let second = messages("What is the capital of France?");
    let (first_ids, second_ids) = (
        prompt_ids(&server, &first).await,
        prompt_ids(&server, &second).await,
    );

    let (first_text, usage) = chat(&server, &first).await;
    assert_eq!(cached(&usage), 0, "nothing computed yet: {usage}");
    assert_eq!(usage["prompt_tokens"], first_ids.len());

    let (_, usage) = chat(&server, &second).await;
    let shared = expected_hit(&first_ids, &second_ids);
    assert!(
        shared >= 3 * BLOCK,
        "the system prompt spans blocks: {shared}"
    );
    assert_eq!(cached(&usage), shared, "{usage}");

    // The same request again, streamed: every whole block but the one with
    // the last prompt token comes from the cache, and the answer is the same.
    let chunks = server
        .post_sse(
            "/v1/chat/completions",
            &json!({"model": "tiny-llama", "messages": first, "max_tokens": 12, "temperature": 0,
                    "stream": true, "stream_options": {"include_usage": true}}),
        )
        .await
        .unwrap();
    let chunks: Vec<Value> = chunks
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0)?["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, first_text);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(
        cached(usage),
        (first_ids.len() - 1) / BLOCK * BLOCK,
        "{usage}"
    );

    // A conversation's next turn holds the first answer: cached up to it.
    let next = json!([
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Name three colours."},
        {"role": "assistant", "content": first_text},
        {"role": "user", "content": "And three more?"},
    ]);
    let next_ids = prompt_ids(&server, &next).await;
    let (_, usage) = chat(&server, &next).await;
    assert!(
        cached(&usage) >= expected_hit(&first_ids, &next_ids),
        "{usage}"
    );

    let hits = metric(&server, "llama_serve_prefix_cache_hits_total").await;
    let queries = metric(&server, "llama_serve_prefix_cache_queries_total").await;
    assert!(hits >= (shared + 3 * BLOCK) as f64, "{hits}");
    let prompts = first_ids.len() * 2 + second_ids.len() + next_ids.len();
    assert_eq!(queries, prompts as f64);
    server
        .wait_idle(std::time::Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_openai_client_reads_the_cached_tokens() {
    let server = Server::start().await.unwrap();
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(server.openai_base())
            .with_api_key("unused"),
    );
    let request = CreateChatCompletionRequestArgs::default()
        .model("tiny-llama")
        .messages(vec![
            ChatCompletionRequestSystemMessage::from(SYSTEM).into(),
            ChatCompletionRequestUserMessage::from("Hello!").into(),
        ])
        .max_completion_tokens(4u32)
        .temperature(0.0)
        .build()
        .unwrap();
    let mut seen = Vec::new();
    let mut answers = Vec::new();
    for _ in 0..2 {
        let response = client.chat().create(request.clone()).await.unwrap();
        let usage = response.usage.expect("usage");
        seen.push(usage.prompt_tokens_details.and_then(|d| d.cached_tokens));
        answers.push(response.choices[0].message.content.clone());
    }
    assert_eq!(seen[0], Some(0));
    assert!(seen[1].is_some_and(|n| n >= 3 * BLOCK as u32), "{seen:?}");
    assert_eq!(answers[0], answers[1]);
}

#[tokio::test]
async fn with_prefix_caching_off_every_prompt_is_computed() {
    let server = Server::builder()
        .args(["--prefix-caching", "off"])
        .start()
        .await
        .unwrap();
    let first = messages("Name three colours.");
    let (a, usage) = chat(&server, &first).await;
    assert_eq!(cached(&usage), 0);
    let (b, usage) = chat(&server, &first).await;
    assert_eq!(cached(&usage), 0, "{usage}");
    assert_eq!(a, b);
    assert_eq!(
        metric(&server, "llama_serve_prefix_cache_queries_total").await,
        0.0
    );

    let refused = Server::builder()
        .args(["--prefix-caching", "yes"])
        .start()
        .await
        .err()
        .expect("a bad value stops the server")
        .to_string();
    assert!(
        refused.contains("--prefix-caching: on or off, not \"yes\""),
        "{refused}"
    );
}
