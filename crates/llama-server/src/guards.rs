//! Checks every request passes before a handler sees it, so a careless or
//! hostile client costs little:
//! - a declared `Content-Length` over `--max-request-bytes` gets 413 at once,
//!   before a byte of the body is read (rather than waiting for a body that
//!   may never come);
//! - a body that stalls (no data for `--body-read-timeout`) fails with 408;
//! - while draining after SIGTERM, every request but the probes gets 503, so
//!   load balancers move on while in-flight streams finish;
//! - an `X-Request-Id` that is long or not visible ASCII is replaced by a
//!   fresh one instead of being echoed and logged.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::request_id::REQUEST_ID_HEADER;
use crate::state::AppState;

/// Paths that answer while draining: orchestrators must see the drain.
const PROBES: [&str; 3] = ["/health", "/ready", "/metrics"];

/// The longest client request id kept (a UUID is 36 characters).
pub const MAX_REQUEST_ID_LEN: usize = 128;

pub async fn guard(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.backend.is_accepting() && !PROBES.contains(&request.uri().path()) {
        let mut response =
            ApiError::Unavailable("the server is shutting down".into()).into_response();
        response.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return response;
    }
    let limit = state.options.max_request_bytes;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return ApiError::PayloadTooLarge { limit }.into_response();
    }
    let request = match state.options.body_read_timeout {
        Some(timeout) => {
            let mut request = request.map(|body| Body::new(StallTimeout::new(body, timeout)));
            request
                .extensions_mut()
                .insert(crate::json::BodyTimeout(timeout));
            request
        }
        None => request,
    };
    next.run(request).await
}

/// Removes a client's `X-Request-Id` that is too long or not visible ASCII,
/// so the request-id layer gives the request a fresh one.
pub async fn drop_unusable_request_id(mut request: Request, next: Next) -> Response {
    let usable = request.headers().get(&REQUEST_ID_HEADER).map(|v| {
        let bytes = v.as_bytes();
        !bytes.is_empty()
            && bytes.len() <= MAX_REQUEST_ID_LEN
            && bytes.iter().all(|b| b.is_ascii_graphic())
    });
    if usable == Some(false) {
        request.headers_mut().remove(&REQUEST_ID_HEADER);
    }
    next.run(request).await
}

/// The request body sent nothing for the body-read timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body stalled: no data for {0:?}")]
pub struct BodyStalled(pub Duration);

/// A body that fails when no data arrives for `timeout` between frames (as
/// nginx's `client_body_timeout`), so a stalled upload cannot hold a handler.
struct StallTimeout {
    inner: Body,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl StallTimeout {
    fn new(inner: Body, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl http_body::Body for StallTimeout {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let next = Instant::now() + self.timeout;
                self.deadline.as_mut().reset(next);
                Poll::Ready(frame)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(axum::Error::new(BodyStalled(self.timeout)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether an error (from reading a body) is, somewhere down its chain, a
/// stalled body.
pub fn is_body_stall(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if e.is::<BodyStalled>() {
            return true;
        }
        current = e.source();
    }
    false
}
