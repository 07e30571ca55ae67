//! `GET /metrics`: after a known workload the counters equal the requests and
//! tokens sent, the histograms counted every request, and the gauges are back
//! to idle. `/metrics` is open even when API keys are required.

mod ops_support;

use std::time::Duration;

use e2e::Server;
use ops_support::{scrape, wait_drained};
use serde_json::json;

const KEY: &str = "sk-ops-metrics";

#[tokio::test]
async fn counters_match_a_known_workload() -> anyhow::Result<()> {
    let server = Server::builder().arg("--api-key").arg(KEY).start().await?;
    let client = server.client();

    let before = scrape(&server).await?;
    for family in [
        "llama_serve_requests_total",
        "llama_serve_num_requests_running",
        "llama_serve_num_requests_waiting",
        "llama_serve_kv_cache_blocks_used",
        "llama_serve_kv_cache_blocks_total",
        "llama_serve_preemptions_total",
        "llama_serve_prompt_tokens_total",
        "llama_serve_generation_tokens_total",
        "llama_serve_time_to_first_token_seconds",
        "llama_serve_inter_token_latency_seconds",
        "llama_serve_e2e_request_latency_seconds",
        "llama_serve_queue_time_seconds",
        "llama_serve_engine_steps_total",
        "llama_serve_engine_step_seconds_total",
    ] {
        assert!(
            before.has_family(family),
            "/metrics lacks {family}:\n{}",
            before.text
        );
    }
    assert!(before.get("llama_serve_kv_cache_blocks_total") > 0.0);
    assert_eq!(before.get("llama_serve_generation_tokens_total"), 0.0);

    // The workload: 3 completions of exactly 5 tokens, 1 bad request, 1 unauthenticated one.
    let mut prompt_tokens = 0.0;
    for prompt in ["Once upon a time", "The capital of France is", "1, 2, 3,"] {
        let response = client
            .post(server.url("/v1/completions"))
            .bearer_auth(KEY)
            .json(&json!({"prompt": prompt, "max_tokens": 5, "ignore_eos": true, "temperature": 0}))
            .send()
            .await?;
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await?;
        assert_eq!(body["usage"]["completion_tokens"], 5, "{body}");
        prompt_tokens += body["usage"]["prompt_tokens"].as_f64().unwrap();
    }
    let bad = client
        .post(server.url("/v1/completions"))
        .bearer_auth(KEY)
        .json(&json!({"prompt": "x", "max_tokens": 5, "temperature": 5}))
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    let unauthenticated = client
        .post(server.url("/v1/completions"))
        .json(&json!({"prompt": "x", "max_tokens": 5}))
        .send()
        .await?;
    assert_eq!(unauthenticated.status(), 401);

    let after = wait_drained(&server, Duration::from_secs(10)).await?;
    let text = &after.text;
    assert_eq!(after.requests("/v1/completions", 200), 3.0, "{text}");
    assert_eq!(after.requests("/v1/completions", 400), 1.0, "{text}");
    assert_eq!(after.requests("/v1/completions", 401), 1.0, "{text}");
    assert_eq!(
        after.get("llama_serve_generation_tokens_total"),
        15.0,
        "{text}"
    );
    assert_eq!(
        after.get("llama_serve_prompt_tokens_total"),
        prompt_tokens,
        "{text}"
    );
    assert_eq!(after.get("llama_serve_preemptions_total"), 0.0, "{text}");
    // Each request is one prompt step (its first token) and four decode
    // steps; run one after another, the engine took at least 15 steps, each
    // with some forward time.
    let steps =
        after.get("llama_serve_engine_steps_total") - before.get("llama_serve_engine_steps_total");
    assert!(steps >= 15.0, "{steps} steps\n{text}");
    let forward = "llama_serve_engine_step_seconds_total{phase=\"forward\"}";
    assert!(after.get(forward) > before.get(forward), "{text}");
    assert_eq!(
        after.get("llama_serve_time_to_first_token_seconds_count"),
        3.0,
        "{text}"
    );
    assert_eq!(
        after.get("llama_serve_e2e_request_latency_seconds_count"),
        3.0,
        "{text}"
    );
    // 5 tokens per request: 4 gaps each.
    assert_eq!(
        after.get("llama_serve_inter_token_latency_seconds_count"),
        12.0,
        "{text}"
    );
    assert!(
        after.get("llama_serve_e2e_request_latency_seconds_sum") > 0.0,
        "{text}"
    );
    assert_eq!(
        after.get("llama_serve_engine_requests_total{outcome=\"finished\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(after.get("llama_serve_num_requests_running"), 0.0);
    assert_eq!(after.get("llama_serve_kv_cache_blocks_used"), 0.0);
    // The scrapes themselves are counted, under their own route.
    assert!(after.requests("/metrics", 200) >= 1.0, "{text}");
    // Unknown paths share one label instead of one series each.
    let missing = client.get(server.url("/no/such/path")).send().await?;
    assert_eq!(missing.status(), 404);
    let last = scrape(&server).await?;
    assert_eq!(last.requests("unmatched", 404), 1.0, "{}", last.text);
    assert!(!last.text.contains("/no/such/path"));
    Ok(())
}

#[tokio::test]
async fn streaming_requests_and_overload_are_counted() -> anyhow::Result<()> {
    let server = Server::start().await?;
    let data = server
        .post_sse(
            "/v1/chat/completions",
            &ops_support::stream_chat("Hello there", 4),
        )
        .await?;
    assert!(!data.is_empty());
    let after = wait_drained(&server, Duration::from_secs(10)).await?;
    assert_eq!(
        after.requests("/v1/chat/completions", 200),
        1.0,
        "{}",
        after.text
    );
    assert_eq!(after.get("llama_serve_generation_tokens_total"), 4.0);
    assert_eq!(
        after.get("llama_serve_time_to_first_token_seconds_count"),
        1.0
    );
    assert_eq!(
        after.get("llama_serve_inter_token_latency_seconds_count"),
        3.0
    );
    assert_eq!(
        after.get("llama_serve_e2e_request_latency_seconds_count"),
        1.0
    );
    Ok(())
}
