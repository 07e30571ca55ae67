//! `ApiError`: every failure a client can see, and the only place that turns
//! one into an HTTP status and an OpenAI error body.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use llama_engine::{EngineError, SubmitError};
use serde::Serialize;

/// OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ErrorDetail {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("incorrect or missing API key: send it as `Authorization: Bearer <key>`")]
    Unauthorized,
    #[error("method {method} is not allowed for {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("unsupported content type: send the body as `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("the server is overloaded ({waiting} requests waiting); retry later")]
    Overloaded { waiting: usize },
    #[error("{0}")]
    Unavailable(String),
    #[error("the request did not finish within the request timeout")]
    Timeout,
    #[error("the request body stopped arriving: nothing was received for {0:?}")]
    BodyTimeout(std::time::Duration),
    /// The detail is logged, never sent: it may name files, devices or internals.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Seconds a client should wait after a 429; queues drain in about a step or a few.
const RETRY_AFTER_SECS: u64 = 1;

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.into(),
            code: None,
        }
    }

    /// An invalid request naming the offending parameter.
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self::invalid(message, Some(param.to_string()))
    }

    /// A parameter OpenAI defines that this server cannot honour.
    pub fn unsupported(param: &str, why: &str) -> Self {
        ApiError::InvalidRequest {
            message: format!("`{param}` is not supported by this server: {why}"),
            param: Some(param.to_string()),
            code: Some("unsupported_parameter"),
        }
    }

    pub fn internal(detail: impl std::fmt::Display) -> Self {
        ApiError::Internal(detail.to_string())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Overloaded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ApiError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error body, also used for SSE `error` events.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code): (&str, Option<String>, Option<&str>) = match self {
            ApiError::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", param.clone(), *code)
            }
            ApiError::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model".into()),
                Some("model_not_found"),
            ),
            ApiError::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
            ApiError::Unauthorized => ("authentication_error", None, Some("invalid_api_key")),
            ApiError::MethodNotAllowed { .. } => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            ApiError::PayloadTooLarge { .. } => {
                ("invalid_request_error", None, Some("request_too_large"))
            }
            ApiError::UnsupportedMediaType => (
                "invalid_request_error",
                None,
                Some("unsupported_media_type"),
            ),
            ApiError::Overloaded { .. } => ("rate_limit_error", None, Some("server_overloaded")),
            ApiError::Unavailable(_) => ("server_error", None, Some("service_unavailable")),
            ApiError::Timeout => ("server_error", None, Some("timeout")),
            ApiError::BodyTimeout(_) => ("invalid_request_error", None, Some("request_timeout")),
            ApiError::Internal(_) => ("server_error", None, Some("internal_error")),
        };
        let message = match self {
            ApiError::Internal(_) => {
                "the server had an error while processing your request".to_string()
            }
            other => other.to_string(),
        };
        ErrorBody {
            error: ErrorDetail {
                message,
                kind: kind.to_string(),
                param,
                code: code.map(str::to_string),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(%detail, "internal error");
        } else if status.is_server_error() {
            tracing::warn!(%status, error = %self, "request failed");
        } else {
            tracing::debug!(%status, error = %self, "request refused");
        }
        let mut response = (status, axum::Json(self.body())).into_response();
        if let ApiError::Overloaded { .. } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(err: SubmitError) -> Self {
        match err {
            SubmitError::Overloaded { waiting } => ApiError::Overloaded { waiting },
            SubmitError::Invalid(message) => ApiError::invalid(message, None),
            SubmitError::ContextLength { .. } => ApiError::InvalidRequest {
                message: err.to_string(),
                param: Some("max_tokens".into()),
                code: Some("context_length_exceeded"),
            },
            SubmitError::Unavailable(message) => ApiError::Unavailable(message),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        match err {
            EngineError::Model(detail) => ApiError::Internal(format!("model failure: {detail}")),
            EngineError::Timeout => ApiError::Timeout,
            EngineError::Shutdown => {
                ApiError::Unavailable("the server shut down before this request finished".into())
            }
        }
    }
}

/// The context-length error when the prompt alone leaves no room to generate.
pub fn context_length_exceeded(
    max_context: usize,
    prompt: usize,
    max_tokens: usize,
    param: &str,
) -> ApiError {
    ApiError::InvalidRequest {
        message: format!(
            "this model's maximum context length is {max_context} tokens, but you requested {} tokens ({prompt} in the prompt, {max_tokens} for the completion); shorten the prompt or lower max_tokens",
            prompt + max_tokens
        ),
        param: Some(param.to_string()),
        code: Some("context_length_exceeded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_bodies() {
        let e = ApiError::from(SubmitError::Overloaded { waiting: 3 });
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        let r = e.into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");

        let e = ApiError::from(SubmitError::ContextLength {
            max_context: 512,
            requested: 600,
            prompt: 100,
            max_tokens: 500,
        });
        let body = e.body();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(body.error.code.as_deref(), Some("context_length_exceeded"));
        assert!(body.error.message.contains("512") && body.error.message.contains("600"));

        let e = ApiError::internal("/secret/path panicked at foo.rs:12");
        let body = serde_json::to_value(e.body()).unwrap();
        assert!(!body.to_string().contains("secret"));
        assert_eq!(body["error"]["type"], "server_error");
        assert!(body["error"]["param"].is_null());

        let e = ApiError::ModelNotFound("gpt-4".into());
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.body().error.code.as_deref(), Some("model_not_found"));
        assert_eq!(
            ApiError::Unauthorized.body().error.kind,
            "authentication_error"
        );
    }
}
