//! `http-bench`: streaming completions at fixed concurrency against a running
//! `llama-serve`, as a user's client sees them: output tokens/s across all
//! requests, and time to first token, measured over HTTP and SSE.
//!
//! Each request sends `--prompt-len` token ids (distinct per request, so
//! nothing is shared), asks for `--max-tokens` with `ignore_eos`, streams,
//! and counts the completion tokens the final usage chunk reports.
//!
//! ```text
//! target/release/llama-serve --model random:134m --port 8000 &
//! target/release/http-bench --url http://127.0.0.1:8000 --concurrency 1,4,16,32
//! ```

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};

struct Args {
    url: String,
    concurrency: Vec<usize>,
    prompt_len: usize,
    max_tokens: usize,
    rounds: usize,
    model: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        url: "http://127.0.0.1:8000".into(),
        concurrency: vec![1, 4, 16, 32],
        prompt_len: 128,
        max_tokens: 128,
        rounds: 1,
        model: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--concurrency" => {
                args.concurrency = value()?
                    .split(',')
                    .map(|c| c.trim().parse().context("--concurrency: a list of numbers"))
                    .collect::<Result<_>>()?
            }
            "--prompt-len" => args.prompt_len = value()?.parse()?,
            "--max-tokens" => args.max_tokens = value()?.parse()?,
            "--rounds" => args.rounds = value()?.parse()?,
            "--model" => args.model = Some(value()?),
            "-h" | "--help" => {
                println!(
                    "http-bench [--url U] [--concurrency 1,4,16,32] [--prompt-len 128] \
                     [--max-tokens 128] [--rounds 1] [--model NAME]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown flag {other}"),
        }
    }
    if args.prompt_len == 0 || args.max_tokens == 0 || args.rounds == 0 {
        bail!("--prompt-len, --max-tokens and --rounds must be positive");
    }
    Ok(args)
}

/// One streamed request: (time to first token, completion tokens).
async fn one_request(client: &reqwest::Client, url: &str, body: Value) -> Result<(Duration, u64)> {
    let start = Instant::now();
    let resp = client.post(url).json(&body).send().await?;
    if !resp.status().is_success() {
        bail!("HTTP {}: {}", resp.status(), resp.text().await?);
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut ttft = None;
    let mut completion_tokens = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            let text = std::str::from_utf8(&event)?;
            for data in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data)?;
                if let Some(err) = v.get("error") {
                    bail!("error event: {err}");
                }
                let has_text = v["choices"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["text"].as_str().is_some_and(|t| !t.is_empty()))
                });
                if has_text && ttft.is_none() {
                    ttft = Some(start.elapsed());
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    completion_tokens = Some(n);
                }
            }
        }
    }
    if !done {
        bail!("stream ended without [DONE]");
    }
    let tokens = completion_tokens.context("no usage chunk (stream_options.include_usage)")?;
    Ok((ttft.unwrap_or_else(|| start.elapsed()), tokens))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    let url = format!("{}/v1/completions", args.url.trim_end_matches('/'));
    let model = match &args.model {
        Some(m) => m.clone(),
        None => {
            let models: Value = client
                .get(format!("{}/v1/models", args.url.trim_end_matches('/')))
                .send()
                .await?
                .json()
                .await?;
            models["data"][0]["id"]
                .as_str()
                .context("/v1/models lists no model")?
                .to_string()
        }
    };
    let body = |i: usize, max_tokens: usize| {
        // Distinct ids per request (BOS first), inside the Llama 2 vocabulary.
        let prompt: Vec<u32> = std::iter::once(1)
            .chain((1..args.prompt_len).map(|k| 100 + ((i * 7919 + k * 104_729) % 30_000) as u32))
            .collect();
        json!({
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        })
    };
    // Warm-up: connection set-up and the server's first-step costs.
    one_request(&client, &url, body(usize::MAX / 2, 4)).await?;

    println!("| concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | wall s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut next_id = 0;
    for &conc in &args.concurrency {
        let total = conc * args.rounds;
        let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(conc));
        let t0 = Instant::now();
        let mut tasks = Vec::with_capacity(total);
        for _ in 0..total {
            let (client, url, body) = (client.clone(), url.clone(), body(next_id, args.max_tokens));
            next_id += 1;
            let slots = slots.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = slots.acquire_owned().await.expect("semaphore open");
                one_request(&client, &url, body).await
            }));
        }
        let mut ttfts = Vec::with_capacity(total);
        let mut tokens = 0;
        for t in tasks {
            let (ttft, n) = t.await??;
            ttfts.push(ttft.as_secs_f64() * 1e3);
            tokens += n;
        }
        let wall = t0.elapsed().as_secs_f64();
        if tokens != (total * args.max_tokens) as u64 {
            bail!(
                "concurrency {conc}: {tokens} completion tokens, expected {}",
                total * args.max_tokens
            );
        }
        ttfts.sort_by(f64::total_cmp);
        println!(
            "| {conc} | {total} | {:.1} | {:.0} | {:.0} | {wall:.1} |",
            tokens as f64 / wall,
            percentile(&ttfts, 0.5),
            percentile(&ttfts, 0.99),
        );
    }
    Ok(())
}
