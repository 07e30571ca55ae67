//! Load: 256 concurrent streaming chats against one server with a small queue.
//! Every client gets its whole stream (`[DONE]`) or a clean 429; none hangs;
//! afterwards nothing runs, every KV block is free and RSS is within 10% of
//! its value after warm-up (which has touched the whole KV pool). Then 2,000
//! short requests, one client in five hanging up mid-stream, with the same
//! checks.

mod ops_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use e2e::{Server, SseReader};
use futures::StreamExt;
use ops_support::{rss_kib, scrape, stream_chat, wait_drained, Outcome};
use serde_json::Value;

/// No single request may take longer than this (queue + generation + transfer).
const PER_REQUEST_LIMIT: Duration = Duration::from_secs(60);
const MAX_NUM_SEQS: &str = "32";
const MAX_QUEUE: &str = "16";
/// Clients at a time in the 2,000-request rounds.
const STREAM_CONCURRENCY: usize = 40;

/// One streaming client; `disconnect_after` = hang up after that many data chunks.
async fn client_run(
    client: reqwest::Client,
    url: String,
    body: Value,
    disconnect_after: Option<usize>,
) -> anyhow::Result<Outcome> {
    let response = client.post(&url).json(&body).send().await?;
    match response.status().as_u16() {
        200 => {}
        429 => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .context("429 without Retry-After")?
                .to_str()?
                .parse::<u64>()
                .context("Retry-After is not a number of seconds")?;
            ensure!(retry_after >= 1);
            let error: Value = response.json().await.context("429 body is not JSON")?;
            e2e::assert_openai_error(&error, "429");
            ensure!(error["error"]["type"] == "rate_limit_error", "{error}");
            return Ok(Outcome::Overloaded);
        }
        other => bail!(
            "unexpected status {other}: {}",
            response.text().await.unwrap_or_default()
        ),
    }
    let mut reader = SseReader::new(response);
    let mut chunks = 0;
    loop {
        match reader.next_data().await? {
            Some(d) if d == "[DONE]" => return Ok(Outcome::Done),
            Some(d) => {
                let chunk: Value =
                    serde_json::from_str(&d).with_context(|| format!("chunk {d}"))?;
                ensure!(chunk.get("error").is_none(), "error event: {chunk}");
                chunks += 1;
                if disconnect_after == Some(chunks) {
                    drop(reader);
                    return Ok(Outcome::Disconnected);
                }
            }
            None => bail!("the stream ended without [DONE] after {chunks} chunks"),
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    done: usize,
    overloaded: usize,
    disconnected: usize,
    #[allow(dead_code)] // printed with {:?}
    elapsed: Duration,
}

/// `total` requests, at most `concurrency` at a time; every `disconnect_every`-th hangs up.
async fn round(
    server: &Server,
    total: usize,
    concurrency: usize,
    max_tokens: u32,
    disconnect_every: Option<usize>,
) -> anyhow::Result<Tally> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let url = Arc::new(server.url("/v1/chat/completions"));
    let start = Instant::now();
    let results: Vec<anyhow::Result<Outcome>> = futures::stream::iter(0..total)
        .map(|i| {
            let client = client.clone();
            let url = url.as_ref().clone();
            let disconnect = disconnect_every.filter(|k| i % k == 0).map(|_| 2);
            let body = stream_chat(&format!("Request {i}: tell me about llamas"), max_tokens);
            async move {
                tokio::time::timeout(PER_REQUEST_LIMIT, client_run(client, url, body, disconnect))
                    .await
                    .unwrap_or_else(|_| bail!("request {i} hung for {PER_REQUEST_LIMIT:?}"))
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut tally = Tally {
        elapsed: start.elapsed(),
        ..Tally::default()
    };
    for result in results {
        match result? {
            Outcome::Done => tally.done += 1,
            Outcome::Overloaded => tally.overloaded += 1,
            Outcome::Disconnected => tally.disconnected += 1,
        }
    }
    Ok(tally)
}

fn assert_rss_close(label: &str, baseline: u64, now: u64) {
    let ratio = now as f64 / baseline as f64;
    eprintln!(
        "RSS {label}: {now} KiB ({:+.1}% vs warm-up {baseline} KiB)",
        (ratio - 1.0) * 100.0
    );
    assert!(
        (0.9..=1.1).contains(&ratio),
        "RSS {label} is {now} KiB, more than 10% away from {baseline} KiB after warm-up"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_backpressure_and_disconnects_leave_nothing_behind() -> anyhow::Result<()>
{
    // A KV pool the warm-up fills: with prefix caching, freed blocks keep
    // their contents and new sequences take never-used blocks first, so RSS
    // grows until every page of the pool has been touched once (by design:
    // the pool is the memory the operator gave the cache). 2,048 blocks of
    // the tiny model; the warm-up allocates several times that.
    let server = Server::builder()
        .args([
            "--max-num-seqs",
            MAX_NUM_SEQS,
            "--max-queue",
            MAX_QUEUE,
            "--kv-cache-memory",
            "16MiB",
        ])
        .start()
        .await?;
    let pid = server.pid().context("server pid")?;
    let kv_total = scrape(&server)
        .await?
        .get("llama_serve_kv_cache_blocks_total");
    assert!(kv_total > 0.0);

    // Warm-up: the same shapes as the measured rounds, so buffers, thread
    // pools and allocator arenas reach their steady size.
    let warm = round(&server, 256, 256, 16, Some(5)).await?;
    eprintln!("warm-up: {warm:?}");
    let warm2 = round(&server, 2000, STREAM_CONCURRENCY, 8, Some(5)).await?;
    eprintln!("warm-up: {warm2:?}");
    wait_drained(&server, Duration::from_secs(20)).await?;
    let baseline = rss_kib(pid)?;

    // Round 1: 256 concurrent streams against a queue of 16.
    let first = round(&server, 256, 256, 32, None).await?;
    eprintln!("256 concurrent: {first:?}");
    assert_eq!(first.done + first.overloaded, 256);
    assert!(first.done >= 32, "too few streams completed: {first:?}");
    assert!(
        first.overloaded > 0,
        "a queue of {MAX_QUEUE} should have refused some of 256: {first:?}"
    );
    let after = wait_drained(&server, Duration::from_secs(20)).await?;
    assert_eq!(after.get("llama_serve_kv_cache_blocks_used"), 0.0);
    assert_eq!(after.get("llama_serve_kv_cache_blocks_total"), kv_total);
    assert_eq!(
        after.requests("/v1/chat/completions", 429),
        (warm.overloaded + warm2.overloaded + first.overloaded) as f64
    );
    assert_rss_close("after 256 concurrent", baseline, rss_kib(pid)?);

    // Round 2: 2,000 short requests, 20% hanging up after two chunks.
    // Concurrency just under what the server holds (32 running + 16 waiting):
    // most requests stream (a 429 may still slip in while a finished slot is
    // freed), one in five hangs up after two chunks.
    let second = round(&server, 2000, STREAM_CONCURRENCY, 8, Some(5)).await?;
    eprintln!("2000 with disconnects: {second:?}");
    assert_eq!(second.done + second.overloaded + second.disconnected, 2000);
    assert!(second.done > 1000, "{second:?}");
    // One in five streamed clients hung up (the rest of the fifth got 429).
    assert!(
        second.disconnected * 10 >= (second.done + second.disconnected),
        "{second:?}"
    );
    let after = wait_drained(&server, Duration::from_secs(20)).await?;
    assert_eq!(after.get("llama_serve_kv_cache_blocks_used"), 0.0);
    assert_eq!(after.get("llama_serve_num_requests_running"), 0.0);
    assert_eq!(after.get("llama_serve_num_requests_waiting"), 0.0);
    assert_rss_close("after 2,000 with disconnects", baseline, rss_kib(pid)?);

    // Still serving normally.
    let data = server
        .post_sse("/v1/chat/completions", &stream_chat("still there?", 4))
        .await?;
    assert!(!data.is_empty());
    eprintln!(
        "engine: finished {} cancelled {} preemptions {}",
        after.get("llama_serve_engine_requests_total{outcome=\"finished\"}"),
        after.get("llama_serve_engine_requests_total{outcome=\"cancelled\"}"),
        after.get("llama_serve_preemptions_total"),
    );
    Ok(())
}
