//! `--request-timeout`: a request that runs too long ends with a clear error,
//! its KV blocks are freed, and the server keeps serving.

use std::time::Duration;

use e2e::{Server, SseReader};
use serde_json::json;

#[tokio::test]
async fn a_request_past_its_timeout_ends_with_an_error_and_frees_the_engine() {
    let server = Server::builder()
        .args(["--request-timeout", "0.1"])
        .start()
        .await
        .unwrap();
    // 510 tokens (the whole context) take about 0.3 s for the tiny model
    // here, three times the timeout; it outran a 0.3 s timeout with 480
    // tokens in CI.
    let long = json!({"prompt": "Hello", "max_tokens": 510, "ignore_eos": true, "temperature": 0});
    let reply = server.post_json("/v1/completions", &long).await.unwrap();
    assert_eq!(reply.status.as_u16(), 504, "{}", reply.text);
    assert_eq!(reply.body["error"]["code"], "timeout", "{}", reply.text);
    assert!(
        reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("request timeout"),
        "{}",
        reply.text
    );

    // Streaming: the stream began, so the timeout arrives as an SSE error event.
    let mut stream_body = long.clone();
    stream_body["stream"] = json!(true);
    let response = server.post("/v1/completions", &stream_body).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let mut sse = SseReader::new(response);
    let mut saw_error = false;
    while let Some(event) = tokio::time::timeout(Duration::from_secs(30), sse.next_event())
        .await
        .unwrap()
        .unwrap()
    {
        if event.contains("event: error") {
            assert!(event.contains("\"timeout\""), "{event}");
            saw_error = true;
        }
    }
    assert!(saw_error, "the stream ended without an error event");

    // A short request still fits in the timeout, and nothing is left running.
    let short = json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let reply = server.post_json("/v1/completions", &short).await.unwrap();
    assert_eq!(reply.status.as_u16(), 200, "{}", reply.text);
    let stats = server.wait_idle(Duration::from_secs(10)).await.unwrap();
    assert_eq!(stats["running"], 0, "{stats}");
}
