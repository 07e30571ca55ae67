//! The HTTP surface: which handler answers which path, and the layers around them.

pub mod chat;
pub mod completions;
pub mod health;
pub mod models;
pub mod tokenize;

use axum::extract::Request;
use axum::http::Method;
use axum::routing::{get, post};
use axum::Router;

use crate::codec::CodecError;
use crate::error::ApiError;
use crate::state::AppState;

/// Routes only; [`crate::app`] adds the layers.
pub fn router(state: AppState) -> Router {
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(models::list))
        .route("/v1/models/{*id}", get(models::get))
        .route("/tokenize", post(tokenize::tokenize))
        .route("/detokenize", post(tokenize::detokenize))
        .route("/tokenizer_info", get(tokenize::tokenizer_info))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_api_key,
        ));
    // Probes stay open: orchestrators do not carry API keys.
    let mut public = Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(crate::metrics::metrics));
    if state.options.web_ui {
        public = public.merge(crate::web_ui::router());
    }
    public
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(crate::metrics::track_requests))
        .with_state(state)
}

async fn not_found(method: Method, request: Request) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", request.uri().path()))
}

async fn method_not_allowed(method: Method, request: Request) -> ApiError {
    ApiError::MethodNotAllowed {
        method: method.to_string(),
        path: request.uri().path().to_string(),
    }
}

/// Codec failures: the client's conversation or text, or our fault.
pub fn codec_error(err: CodecError, param: &str) -> ApiError {
    match err {
        CodecError::InvalidConversation(message) | CodecError::InvalidInput(message) => {
            ApiError::param(param, message)
        }
        CodecError::Internal(detail) => ApiError::internal(detail),
    }
}
