//! `GET /metrics`: Prometheus text format, named after vLLM's metrics so that
//! existing dashboards translate (`vllm:` → `llama_serve_`).
//!
//! - Request counts by endpoint and status come from a router layer
//!   ([`track_requests`]); the endpoint is the matched route pattern, so
//!   unknown paths cannot blow up the label set.
//! - Latency histograms come from wrapping each request's event stream
//!   ([`instrument`]): time to first token, inter-token latency per choice,
//!   end-to-end latency of requests that ran to their end.
//! - Gauges and token/preemption totals are read from the engine's
//!   [`StatsSnapshot`] at scrape time: the engine is the one source of truth.
//!
//! One registry per process (the binary serves one model); in-process tests
//! that build several apps share it, which only matters to tests of exact counts,
//! and those run the real binary.

use std::pin::Pin;
use std::sync::{LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::Stream;
use llama_engine::{EngineError, StatsSnapshot};
use prometheus::{
    CounterVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::generate::{ChoiceEvent, ChoiceStream};
use crate::state::AppState;

/// Prometheus' text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// vLLM's buckets for time to first token (seconds).
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
];
const ITL_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
];
const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0,
];

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub e2e_request_latency: Histogram,
    pub queue_time: Histogram,
    running: IntGauge,
    waiting: IntGauge,
    kv_blocks_used: IntGauge,
    kv_blocks_total: IntGauge,
    kv_usage: prometheus::Gauge,
    preemptions: IntCounter,
    prefix_cache_queries: IntCounter,
    prefix_cache_hits: IntCounter,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    engine_requests: IntCounterVec,
    engine_up: IntGauge,
    engine_steps: IntCounter,
    graph_steps: IntCounter,
    engine_step_seconds: CounterVec,
    /// Serialises scrapes: engine totals are copied into counters as deltas.
    sync: Mutex<()>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

fn histogram(registry: &Registry, name: &str, help: &str, buckets: &[f64]) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram");
    registry
        .register(Box::new(h.clone()))
        .expect("unique metric");
    h
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid gauge");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn int_counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid counter");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "llama_serve_requests_total",
                "HTTP requests answered, by route and status code.",
            ),
            &["endpoint", "status"],
        )
        .expect("valid counter");
        r.register(Box::new(requests.clone()))
            .expect("unique metric");
        let engine_requests = IntCounterVec::new(
            Opts::new(
                "llama_serve_engine_requests_total",
                "Generation requests the engine ended, by outcome (finished, cancelled, failed).",
            ),
            &["outcome"],
        )
        .expect("valid counter");
        r.register(Box::new(engine_requests.clone()))
            .expect("unique metric");
        // Where the engine loop's time goes: the forward, and the host work
        // around it (scheduling, then sampling, detokenising and streaming
        // the step's output). The latter two are the engine's overhead.
        let engine_step_seconds = CounterVec::new(
            Opts::new(
                "llama_serve_engine_step_seconds_total",
                "Seconds of engine steps, by phase (schedule, forward, postprocess).",
            ),
            &["phase"],
        )
        .expect("valid counter");
        r.register(Box::new(engine_step_seconds.clone()))
            .expect("unique metric");
        let kv_usage = prometheus::Gauge::new(
            "llama_serve_kv_cache_usage_ratio",
            "Fraction of KV cache blocks in use (0 to 1).",
        )
        .expect("valid gauge");
        r.register(Box::new(kv_usage.clone()))
            .expect("unique metric");
        Self {
            time_to_first_token: histogram(
                &r,
                "llama_serve_time_to_first_token_seconds",
                "Seconds from submission to the engine to the first generated token.",
                TTFT_BUCKETS,
            ),
            inter_token_latency: histogram(
                &r,
                "llama_serve_inter_token_latency_seconds",
                "Seconds between consecutive tokens of one choice.",
                ITL_BUCKETS,
            ),
            e2e_request_latency: histogram(
                &r,
                "llama_serve_e2e_request_latency_seconds",
                "Seconds from submission to the engine to the last event, for requests that ran to their end.",
                REQUEST_BUCKETS,
            ),
            queue_time: histogram(
                &r,
                "llama_serve_queue_time_seconds",
                "Seconds a request waited in the engine's queue before it was first scheduled.",
                REQUEST_BUCKETS,
            ),
            running: int_gauge(&r, "llama_serve_num_requests_running", "Requests in the running batch."),
            waiting: int_gauge(&r, "llama_serve_num_requests_waiting", "Requests waiting for a slot."),
            kv_blocks_used: int_gauge(&r, "llama_serve_kv_cache_blocks_used", "KV cache blocks in use."),
            kv_blocks_total: int_gauge(&r, "llama_serve_kv_cache_blocks_total", "KV cache blocks in the pool."),
            preemptions: int_counter(&r, "llama_serve_preemptions_total", "Sequences preempted (to be recomputed) for lack of KV blocks."),
            prefix_cache_queries: int_counter(&r, "llama_serve_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache at admission."),
            prefix_cache_hits: int_counter(&r, "llama_serve_prefix_cache_hits_total", "Prompt tokens found in the prefix cache (their KV not computed again)."),
            prompt_tokens: int_counter(&r, "llama_serve_prompt_tokens_total", "Prompt tokens of admitted requests."),
            generation_tokens: int_counter(&r, "llama_serve_generation_tokens_total", "Tokens generated."),
            engine_up: int_gauge(&r, "llama_serve_engine_up", "1 while the engine thread runs its loop, 0 once it stopped."),
            engine_steps: int_counter(&r, "llama_serve_engine_steps_total", "Batched forward steps the engine ran."),
            graph_steps: int_counter(&r, "llama_serve_cuda_graph_steps_total", "Decode steps served by replaying a CUDA graph (--cuda-graphs on)."),
            engine_step_seconds,
            engine_requests,
            kv_usage,
            requests,
            registry: r,
            sync: Mutex::new(()),
        }
    }

    pub fn count_request(&self, endpoint: &str, status: StatusCode) {
        self.requests
            .with_label_values(&[endpoint, status.as_str()])
            .inc();
    }

    /// The text exposition, with gauges and totals taken from `stats`.
    pub fn render(&self, stats: &StatsSnapshot, engine_alive: bool) -> String {
        let _guard = self.sync.lock().unwrap_or_else(|e| e.into_inner());
        let gauge = |g: &IntGauge, v: usize| g.set(i64::try_from(v).unwrap_or(i64::MAX));
        gauge(&self.running, stats.running);
        gauge(&self.waiting, stats.waiting);
        gauge(&self.kv_blocks_used, stats.kv_blocks_used);
        gauge(&self.kv_blocks_total, stats.kv_blocks_total);
        self.kv_usage.set(if stats.kv_blocks_total == 0 {
            0.0
        } else {
            stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64
        });
        self.engine_up.set(i64::from(engine_alive));
        // Engine totals only grow; copy them over as increments.
        let total = |c: &IntCounter, v: u64| c.inc_by(v.saturating_sub(c.get()));
        total(&self.preemptions, stats.preemptions_total);
        total(&self.prefix_cache_queries, stats.prefix_cache_queries_total);
        total(&self.prefix_cache_hits, stats.prefix_cache_hits_total);
        total(&self.prompt_tokens, stats.prompt_tokens_total);
        total(&self.generation_tokens, stats.generation_tokens_total);
        total(&self.engine_steps, stats.steps_total);
        total(&self.graph_steps, stats.graph_steps_total);
        for (phase, ns) in [
            ("schedule", stats.schedule_ns),
            ("forward", stats.forward_ns),
            ("postprocess", stats.postprocess_ns),
        ] {
            let c = self.engine_step_seconds.with_label_values(&[phase]);
            c.inc_by((ns as f64 / 1e9 - c.get()).max(0.0));
        }
        for (outcome, v) in [
            ("finished", stats.requests_finished_total),
            ("cancelled", stats.requests_cancelled_total),
            ("failed", stats.requests_failed_total),
        ] {
            total(&self.engine_requests.with_label_values(&[outcome]), v);
        }
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"))
    }
}

/// `GET /metrics`, open like `/health`: scrapers carry no API key.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = global().render(&state.backend.stats(), state.backend.is_alive());
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE))],
        text,
    )
        .into_response()
}

/// Router layer: counts every answered request by route pattern and status.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let response = next.run(request).await;
    let endpoint = endpoint.as_deref().unwrap_or("unmatched");
    global().count_request(endpoint, response.status());
    response
}

/// Wraps a request's events to time them. `submitted` is when the request
/// went to the engine.
pub fn instrument(events: ChoiceStream, submitted: Instant) -> ChoiceStream {
    Box::pin(Timed {
        inner: events,
        submitted,
        first_token: false,
        last_token: Vec::new(),
        done: false,
    })
}

struct Timed {
    inner: ChoiceStream,
    submitted: Instant,
    first_token: bool,
    /// When each choice last produced a token.
    last_token: Vec<Option<Instant>>,
    done: bool,
}

impl Stream for Timed {
    type Item = Result<ChoiceEvent, EngineError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_next(cx);
        let m = global();
        match &polled {
            Poll::Ready(Some(Ok(ChoiceEvent::Token { index, .. }))) => {
                let now = Instant::now();
                if !this.first_token {
                    this.first_token = true;
                    m.time_to_first_token
                        .observe((now - this.submitted).as_secs_f64());
                }
                if this.last_token.len() <= *index {
                    this.last_token.resize(*index + 1, None);
                }
                if let Some(prev) = this.last_token[*index].replace(now) {
                    m.inter_token_latency.observe((now - prev).as_secs_f64());
                }
            }
            Poll::Ready(Some(Ok(ChoiceEvent::Done {
                queue_time: Some(q),
                ..
            }))) => m.queue_time.observe(q.as_secs_f64()),
            Poll::Ready(Some(Err(_))) => this.done = true,
            Poll::Ready(None) if !this.done => {
                this.done = true;
                m.e2e_request_latency
                    .observe(this.submitted.elapsed().as_secs_f64());
            }
            _ => {}
        }
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_vllm_style_names() {
        let stats = StatsSnapshot {
            running: 2,
            waiting: 1,
            kv_blocks_used: 5,
            kv_blocks_total: 20,
            prompt_tokens_total: 30,
            generation_tokens_total: 12,
            preemptions_total: 1,
            prefix_cache_queries_total: 40,
            prefix_cache_hits_total: 16,
            steps_total: 7,
            graph_steps_total: 4,
            forward_ns: 1_500_000_000,
            ..Default::default()
        };
        global().count_request("/v1/completions", StatusCode::OK);
        let text = global().render(&stats, true);
        for name in [
            "llama_serve_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
            "llama_serve_num_requests_running 2",
            "llama_serve_num_requests_waiting 1",
            "llama_serve_kv_cache_blocks_used 5",
            "llama_serve_kv_cache_blocks_total 20",
            "llama_serve_preemptions_total 1",
            "llama_serve_prefix_cache_queries_total 40",
            "llama_serve_prefix_cache_hits_total 16",
            "llama_serve_prompt_tokens_total 30",
            "llama_serve_generation_tokens_total 12",
            "llama_serve_engine_steps_total 7",
            "llama_serve_cuda_graph_steps_total 4",
            "llama_serve_engine_step_seconds_total{phase=\"forward\"} 1.5",
            "llama_serve_engine_step_seconds_total{phase=\"schedule\"} 0",
            "# TYPE llama_serve_time_to_first_token_seconds histogram",
            "# TYPE llama_serve_inter_token_latency_seconds histogram",
            "# TYPE llama_serve_e2e_request_latency_seconds histogram",
            "# TYPE llama_serve_queue_time_seconds histogram",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
        // Totals are copied, not added, on every scrape.
        let again = global().render(&stats, true);
        assert!(again.contains("llama_serve_prompt_tokens_total 30"));
        assert!(again.contains("llama_serve_engine_step_seconds_total{phase=\"forward\"} 1.5"));
    }
}
