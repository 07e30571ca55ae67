//! A client that goes away mid-generation must cancel it: otherwise every
//! closed browser tab keeps a sequence running and its KV blocks taken.
//!
//! Evidence, strongest first: `/metrics` (KV blocks used back to 0, one
//! `cancelled` outcome, fewer tokens generated than asked for); `/ready`
//! (`running` back to 0); and a follow-up request that needs the whole KV
//! pool, which could not be scheduled if a block had leaked.

use std::time::{Duration, Instant};

use e2e::{Server, SseReader};
use serde_json::{json, Value};

/// Long enough that the generation cannot have finished when we hang up.
const MAX_TOKENS: u64 = 450;
/// Exactly the tiny model's context: one full-length request fills the pool.
const KV_TOKENS: u64 = 512;

async fn metrics(server: &Server) -> Option<String> {
    let response = server
        .client()
        .get(server.url("/metrics"))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    response.text().await.ok()
}

fn sample(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn start() -> Server {
    Server::builder()
        .args(["--kv-cache-memory", &format!("{KV_TOKENS}tokens")])
        .start()
        .await
        .unwrap()
}

fn long_request(path: &str, stream: bool) -> Value {
    let mut body = json!({
        "model": "tiny-llama",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    });
    if path.contains("chat") {
        body["messages"] = json!([{"role": "user", "content": "Tell me a long story."}]);
    } else {
        body["prompt"] = json!("Once upon a time");
    }
    body
}

/// After a hang-up: the engine idles, frees every block, counts a
/// cancellation, and can still serve a request that needs the whole pool.
async fn assert_cancelled_and_freed(server: &Server, before: Option<&str>) {
    let started = Instant::now();
    let stats = server.wait_idle(Duration::from_secs(20)).await.unwrap();
    assert_eq!(stats["running"], 0, "{stats}");

    if let (Some(before), Some(after)) = (before, metrics(server).await) {
        // The gauges are refreshed from the engine; give them a moment too.
        let mut after = after;
        while sample(&after, "llama_serve_kv_cache_blocks_used") != Some(0.0)
            && started.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            after = metrics(server).await.unwrap();
        }
        assert_eq!(
            sample(&after, "llama_serve_kv_cache_blocks_used"),
            Some(0.0),
            "KV blocks still in use after the disconnect:\n{after}"
        );
        let cancelled = "llama_serve_engine_requests_total{outcome=\"cancelled\"}";
        assert_eq!(
            sample(&after, cancelled).unwrap_or(0.0) - sample(before, cancelled).unwrap_or(0.0),
            1.0,
            "one cancelled request:\n{after}"
        );
        let generated = "llama_serve_generation_tokens_total";
        let tokens =
            sample(&after, generated).unwrap_or(0.0) - sample(before, generated).unwrap_or(0.0);
        assert!(
            tokens < MAX_TOKENS as f64,
            "generation ran to the end ({tokens} tokens): the disconnect did not cancel it"
        );
    }

    // Fills the pool exactly: 2 prompt tokens + 510 new ones. A leaked block
    // would leave it waiting forever (or failing).
    let body = json!({
        "model": "tiny-llama",
        "prompt": "Hello",
        "max_tokens": KV_TOKENS - 2,
        "temperature": 0,
        "ignore_eos": true,
    });
    let full = server.post_json("/v1/completions", &body);
    let full = tokio::time::timeout(Duration::from_secs(60), full)
        .await
        .expect("a full-context request after the disconnect did not finish: KV blocks leaked?")
        .unwrap();
    assert_eq!(full.status, 200, "{}", full.text);
    assert_eq!(full.body["usage"]["completion_tokens"], KV_TOKENS - 2);
    assert_eq!(full.body["usage"]["prompt_tokens"], 2);
    server.wait_idle(Duration::from_secs(10)).await.unwrap();
}

async fn hang_up_after_three_chunks(path: &str) {
    let server = start().await;
    let before = metrics(&server).await;
    let response = server.post(path, &long_request(path, true)).await.unwrap();
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
    let mut reader = SseReader::new(response);
    for i in 0..3 {
        let data = reader.next_data().await.unwrap();
        assert!(
            data.as_deref().is_some_and(|d| d != "[DONE]"),
            "chunk {i}: {data:?}"
        );
    }
    let running = server.ready_stats().await.unwrap();
    assert_eq!(
        running["running"], 1,
        "the generation is still running before the hang-up: {running}"
    );
    drop(reader);
    assert_cancelled_and_freed(&server, before.as_deref()).await;
}

#[tokio::test]
async fn chat_stream_disconnect_frees_the_engine() {
    hang_up_after_three_chunks("/v1/chat/completions").await;
}

#[tokio::test]
async fn completion_stream_disconnect_frees_the_engine() {
    hang_up_after_three_chunks("/v1/completions").await;
}

#[tokio::test]
async fn non_streaming_disconnect_frees_the_engine() {
    let server = start().await;
    let before = metrics(&server).await;
    let request = server
        .client()
        .post(server.url("/v1/completions"))
        .json(&long_request("/v1/completions", false));
    let sent = tokio::spawn(request.send());
    // Hang up only once the engine has the request, so the test cannot pass
    // by the request never arriving; and at once, since the tiny model
    // writes its 450 tokens in a few hundred milliseconds (a client timeout
    // of 300 ms was outrun once the kernels got faster).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if server.ready_stats().await.unwrap()["running"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the request never started running"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // Dropping the in-flight request closes its connection.
    sent.abort();
    let outcome = sent.await;
    assert!(
        outcome.as_ref().is_err_and(|e| e.is_cancelled()),
        "the client should have hung up mid-generation: {outcome:?}"
    );
    assert_cancelled_and_freed(&server, before.as_deref()).await;
}
