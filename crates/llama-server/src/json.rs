//! `ApiJson<T>`: a JSON body extractor whose every rejection is an OpenAI
//! error (axum's own answers in plain text, which OpenAI clients cannot parse).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers().get(header::CONTENT_TYPE)) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let limit = req
            .extensions()
            .get::<BodyLimit>()
            .map(|l| l.0)
            .unwrap_or_default();
        let body_timeout = req.extensions().get::<BodyTimeout>().map(|t| t.0);
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge { limit }
            } else if crate::guards::is_body_stall(&rejection)
                || rejection.body_text().contains("request body stalled")
            {
                ApiError::BodyTimeout(body_timeout.unwrap_or_default())
            } else {
                ApiError::invalid(
                    format!("could not read the request body: {}", rejection.body_text()),
                    None,
                )
            }
        })?;
        parse(&bytes).map(ApiJson)
    }
}

/// The body-read timeout, put into request extensions so rejections can state it.
#[derive(Debug, Clone, Copy)]
pub struct BodyTimeout(pub std::time::Duration);

/// The configured body limit, put into request extensions so rejections can state it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

fn is_json(content_type: Option<&header::HeaderValue>) -> bool {
    let Some(value) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mime = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses a body, naming the JSON path of a type error in `param`.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        classify(err.into_inner(), path)
    })?;
    de.end().map_err(|e| classify(e, String::new()))?;
    Ok(value)
}

fn classify(inner: serde_json::Error, path: String) -> ApiError {
    use serde_json::error::Category;
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            ApiError::invalid(format!("the request body is not valid JSON: {inner}"), None)
        }
        Category::Data => {
            let message = strip_position(&inner.to_string());
            if path == "." || path.is_empty() {
                ApiError::invalid(format!("invalid request: {message}"), None)
            } else {
                ApiError::invalid(format!("invalid value for `{path}`: {message}"), Some(path))
            }
        }
    }
}

/// serde_json appends " at line 1 column 42", which means little to an API client.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Req {
        model: String,
        messages: Vec<Msg>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Msg {
        role: String,
    }

    #[test]
    fn errors_name_the_path() {
        let err = parse::<Req>(br#"{"model": "m", "messages": [{"role": 5}]}"#).unwrap_err();
        let body = err.body().error;
        assert_eq!(body.param.as_deref(), Some("messages[0].role"));
        assert!(!body.message.contains("line"), "{}", body.message);

        let err = parse::<Req>(br#"{"model": "m""#).unwrap_err();
        assert!(err.body().error.message.contains("not valid JSON"));
        let err = parse::<Req>(br#"{"model": "m"}"#).unwrap_err();
        assert!(
            err.body().error.message.contains("messages"),
            "{}",
            err.body().error.message
        );
        let err = parse::<Req>(br#"{"model": "m", "messages": []} x"#).unwrap_err();
        assert!(err.body().error.message.contains("not valid JSON"));
    }

    #[test]
    fn content_types() {
        let v = |s: &'static str| header::HeaderValue::from_static(s);
        assert!(is_json(Some(&v("application/json"))));
        assert!(is_json(Some(&v("application/json; charset=utf-8"))));
        assert!(is_json(Some(&v("application/merge-patch+json"))));
        assert!(!is_json(Some(&v("text/plain"))));
        assert!(!is_json(None));
    }
}
