//! Server-sent events for streaming responses: `data: {chunk}` per event,
//! `data: [DONE]` at the end, keep-alive comments while a request waits in
//! the queue, and an `event: error` with an OpenAI error body if the engine
//! fails after the response has begun (the status line is already sent).
//!
//! The engine's stream lives inside the response body, so a client that
//! disconnects drops it, which cancels the request in the engine.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use serde::Serialize;

use crate::error::ApiError;
use crate::generate::{ChoiceEvent, ChoiceStream};

/// Turns choice events into the chunks of one endpoint's stream format.
pub trait ChunkFormatter: Send + Unpin + 'static {
    /// Chunks sent before any token (chat's `role` chunk).
    fn start(&mut self) -> Vec<Event>;
    fn event(&mut self, event: ChoiceEvent) -> Vec<Event>;
    /// Chunks after the last choice finished, before `[DONE]` (the usage chunk).
    fn finish(&mut self) -> Vec<Event>;
}

pub fn data<T: Serialize>(chunk: &T) -> Event {
    // Our chunk types are plain structs of strings and numbers: they always serialize.
    Event::default().data(serde_json::to_string(chunk).unwrap_or_default())
}

pub fn error_event(err: &ApiError) -> Event {
    if let ApiError::Internal(detail) = err {
        tracing::error!(%detail, "stream failed");
    } else {
        tracing::warn!(error = %err, "stream failed");
    }
    Event::default()
        .event("error")
        .data(serde_json::to_string(&err.body()).unwrap_or_default())
}

struct SseStream<F> {
    events: Option<ChoiceStream>,
    formatter: F,
    pending: VecDeque<Event>,
    started: bool,
}

impl<F: ChunkFormatter> Stream for SseStream<F> {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if !this.started {
                this.started = true;
                this.pending.extend(this.formatter.start());
                continue;
            }
            let Some(events) = this.events.as_mut() else {
                return Poll::Ready(None);
            };
            match events.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(event))) => this.pending.extend(this.formatter.event(event)),
                Poll::Ready(Some(Err(err))) => {
                    // Dropping the engine stream now cancels the request's other choices.
                    this.events = None;
                    this.pending.push_back(error_event(&ApiError::from(err)));
                }
                Poll::Ready(None) => {
                    this.events = None;
                    this.pending.extend(this.formatter.finish());
                    this.pending.push_back(Event::default().data("[DONE]"));
                }
            }
        }
    }
}

pub fn stream_response<F: ChunkFormatter>(
    events: ChoiceStream,
    formatter: F,
    keep_alive: Duration,
) -> Response {
    let stream = SseStream {
        events: Some(events),
        formatter,
        pending: VecDeque::new(),
        started: false,
    };
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response();
    // Proxies such as nginx buffer responses unless told not to, which would hold back every token.
    response.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    response
}
