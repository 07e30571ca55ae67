//! A scripted engine and helpers for driving `app()` in process.

#![allow(dead_code)]

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response};
use futures::Stream;
use llama_engine::{
    EngineError, FinishReason, GenerateRequest, SampledLogprobs, StatsSnapshot, StreamEvent,
    SubmitError, TokenLogprob, Usage,
};
use llama_server::backend::{Backend, EventStream};
use llama_server::llama_codec::LlamaCodec;
use llama_server::{AppOptions, AppState, ServedModel};
use serde_json::Value;
use tokio::sync::mpsc;
use tower::ServiceExt;

pub fn tiny_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama")
}

/// Emits tokens "t0", " t1", ... (ids 100, 101, ...) for each choice, then Done.
#[derive(Default)]
pub struct FakeBackend {
    pub overloaded: AtomicBool,
    pub draining: AtomicBool,
    /// Fail with a model error after this many tokens.
    pub fail_after: Mutex<Option<usize>>,
    pub token_delay: Mutex<Duration>,
    /// Streams not yet dropped: a disconnect must bring this back to 0.
    pub live: Arc<AtomicUsize>,
    pub requests: Mutex<Vec<GenerateRequest>>,
}

struct Guarded {
    rx: mpsc::UnboundedReceiver<Result<StreamEvent, EngineError>>,
    live: Arc<AtomicUsize>,
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Stream for Guarded {
    type Item = Result<StreamEvent, EngineError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

fn logprob(id: u32, text: &str) -> TokenLogprob {
    TokenLogprob {
        id,
        token: text.to_string(),
        bytes: text.as_bytes().to_vec(),
        logprob: -0.5,
    }
}

impl Backend for FakeBackend {
    fn submit(&self, request: GenerateRequest) -> Result<EventStream, SubmitError> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(SubmitError::Unavailable(
                "the server is shutting down".into(),
            ));
        }
        if self.overloaded.load(Ordering::SeqCst) {
            return Err(SubmitError::Overloaded { waiting: 7 });
        }
        if request.prompt.len() + request.stop.max_tokens > self.max_context() {
            return Err(SubmitError::ContextLength {
                max_context: self.max_context(),
                requested: request.prompt.len() + request.stop.max_tokens,
                prompt: request.prompt.len(),
                max_tokens: request.stop.max_tokens,
            });
        }
        self.requests.lock().unwrap().push(request.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let fail_after = *self.fail_after.lock().unwrap();
        let delay = *self.token_delay.lock().unwrap();
        self.live.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let prompt_tokens = request.prompt.len();
            for step in 0..request.stop.max_tokens {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if fail_after == Some(step) {
                    let _ = tx.send(Err(EngineError::Model(
                        "CUDA out of memory at /secret/kernel.cu".into(),
                    )));
                    return;
                }
                for index in 0..request.n {
                    let text = if step == 0 {
                        format!("t{step}")
                    } else {
                        format!(" t{step}")
                    };
                    let id = 100 + step as u32;
                    let logprobs = request.logprobs.map(|k| SampledLogprobs {
                        chosen: logprob(id, &text),
                        top: (0..k)
                            .map(|j| logprob(200 + j as u32, &format!("alt{j}")))
                            .collect(),
                    });
                    if tx
                        .send(Ok(StreamEvent::Token {
                            index,
                            id,
                            text,
                            logprobs,
                        }))
                        .is_err()
                    {
                        return;
                    }
                }
            }
            for index in 0..request.n {
                let _ = tx.send(Ok(StreamEvent::Done {
                    index,
                    finish_reason: FinishReason::Length,
                    usage: Usage {
                        prompt_tokens,
                        completion_tokens: request.stop.max_tokens,
                        ..Default::default()
                    },
                }));
            }
        });
        Ok(Box::pin(Guarded {
            rx,
            live: self.live.clone(),
        }))
    }

    fn is_alive(&self) -> bool {
        true
    }

    fn is_accepting(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }

    fn stop_accepting(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    fn shutdown(&self) {
        self.stop_accepting();
    }

    fn stats(&self) -> StatsSnapshot {
        StatsSnapshot {
            running: self.live.load(Ordering::SeqCst),
            ..Default::default()
        }
    }

    fn max_context(&self) -> usize {
        512
    }
}

pub struct Harness {
    pub backend: Arc<FakeBackend>,
    pub state: AppState,
}

pub fn harness(options: AppOptions) -> Harness {
    let backend = Arc::new(FakeBackend::default());
    let codec = Arc::new(LlamaCodec::from_model_dir(&tiny_dir()).expect("bundled tokenizer"));
    let state = AppState::new(
        backend.clone(),
        codec,
        ServedModel::new("tiny-llama"),
        options,
    );
    Harness { backend, state }
}

impl Harness {
    pub async fn call(&self, request: Request<Body>) -> Response<Body> {
        llama_server::app(self.state.clone())
            .oneshot(request)
            .await
            .unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let response = self
            .call(
                Request::post(path)
                    .header("content-type", "application/json")
                    .body(Body::from(body.to_string()))
                    .unwrap(),
            )
            .await;
        let status = response.status().as_u16();
        (status, body_json(response).await)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .call(Request::get(path).body(Body::empty()).unwrap())
            .await;
        let status = response.status().as_u16();
        (status, body_json(response).await)
    }
}

pub async fn body_text(response: Response<Body>) -> String {
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .unwrap();
    String::from_utf8(bytes.to_vec()).unwrap()
}

pub async fn body_json(response: Response<Body>) -> Value {
    let text = body_text(response).await;
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The `data:` payloads and `event:` names of an SSE body, in order.
pub fn sse_events(body: &str) -> Vec<(Option<String>, String)> {
    body.split("\n\n")
        .filter(|block| !block.trim().is_empty())
        .filter_map(|block| {
            let mut event = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = Some(e.trim().to_string());
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
                }
            }
            (!data.is_empty()).then(|| (event, data.join("\n")))
        })
        .collect()
}
