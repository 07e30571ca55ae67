//! Helpers shared by the `ops_*` tests (metrics scraping, RSS, request bodies).
//! The server harness itself is `e2e` (tests/src/lib.rs).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{bail, Context};
use e2e::Server;
use serde_json::{json, Value};

/// One scrape of `/metrics`: `name{labels}` → value, as the text format writes them.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                Some((key.to_string(), value.parse().ok()?))
            })
            .collect();
        Self {
            text: text.to_string(),
            samples,
        }
    }

    /// A sample's value; 0 when absent (a counter with no increments yet).
    pub fn get(&self, key: &str) -> f64 {
        self.samples.get(key).copied().unwrap_or(0.0)
    }

    pub fn has_family(&self, name: &str) -> bool {
        self.text.contains(&format!("# TYPE {name} "))
    }

    /// `llama_serve_requests_total{endpoint=..,status=..}`
    pub fn requests(&self, endpoint: &str, status: u16) -> f64 {
        self.get(&format!(
            "llama_serve_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}}"
        ))
    }

    /// Sum of `llama_serve_requests_total` over all labels with this status.
    pub fn requests_with_status(&self, status: u16) -> f64 {
        let suffix = format!("status=\"{status}\"}}");
        self.samples
            .iter()
            .filter(|(k, _)| k.starts_with("llama_serve_requests_total{") && k.ends_with(&suffix))
            .map(|(_, v)| v)
            .sum()
    }
}

/// GET /metrics (no API key: it is open like /health) and parse it.
pub async fn scrape(server: &Server) -> anyhow::Result<Scrape> {
    let response = server.client().get(server.url("/metrics")).send().await?;
    if response.status() != 200 {
        bail!("/metrics answered {}", response.status());
    }
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    anyhow::ensure!(
        content_type.starts_with("text/plain"),
        "/metrics content type {content_type}"
    );
    Ok(Scrape::parse(&response.text().await?))
}

/// Polls `/metrics` until nothing runs or waits and every KV block is free.
pub async fn wait_drained(server: &Server, timeout: Duration) -> anyhow::Result<Scrape> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let s = scrape(server).await?;
        if s.get("llama_serve_num_requests_running") == 0.0
            && s.get("llama_serve_num_requests_waiting") == 0.0
            && s.get("llama_serve_kv_cache_blocks_used") == 0.0
        {
            return Ok(s);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "engine not drained after {timeout:?}: running {} waiting {} kv used {}",
                s.get("llama_serve_num_requests_running"),
                s.get("llama_serve_num_requests_waiting"),
                s.get("llama_serve_kv_cache_blocks_used")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident set size of a process in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    line.split_whitespace()
        .nth(1)
        .context("VmRSS without a value")?
        .parse()
        .context("VmRSS value")
}

/// A streaming chat request that generates exactly `max_tokens` tokens.
pub fn stream_chat(content: &str, max_tokens: u32) -> Value {
    json!({
        "messages": [{"role": "user", "content": content}],
        "stream": true,
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "temperature": 0,
    })
}

/// What one streaming client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// 200 and every chunk up to `[DONE]`.
    Done,
    /// 429 with `Retry-After` and an OpenAI error body.
    Overloaded,
    /// The client hung up on purpose mid-stream.
    Disconnected,
}
