//! Bearer-token authentication. Keys are compared in constant time so that
//! response timing does not reveal how much of a guess was right.

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::AppState;

#[derive(Debug, Clone, Default)]
pub struct ApiKeys {
    keys: Vec<Vec<u8>>,
}

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = String>) -> Self {
        Self {
            keys: keys
                .into_iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .map(String::into_bytes)
                .collect(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks every key, without stopping at the first match.
    pub fn accepts(&self, candidate: &str) -> bool {
        let candidate = candidate.as_bytes();
        let mut ok = subtle::Choice::from(0u8);
        for key in &self.keys {
            // `ct_eq` on slices of different lengths is false at once; lengths are not secret.
            ok |= key.as_slice().ct_eq(candidate);
        }
        ok.into()
    }
}

/// Reads `Authorization: Bearer <key>` (also `x-api-key`, which some clients send).
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let value = value.trim();
        let (scheme, token) = value.split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if state.api_keys.is_enabled() {
        let ok = bearer(request.headers()).is_some_and(|k| state.api_keys.accepts(k));
        if !ok {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let keys = ApiKeys::new(["sk-one".to_string(), " sk-two ".to_string(), "".to_string()]);
        assert!(keys.is_enabled());
        assert!(keys.accepts("sk-one"));
        assert!(keys.accepts("sk-two"));
        assert!(!keys.accepts("sk-on"));
        assert!(!keys.accepts(""));
        assert!(!ApiKeys::new(Vec::new()).is_enabled());

        let mut h = axum::http::HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer sk-one".parse().unwrap());
        assert_eq!(bearer(&h), Some("sk-one"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
