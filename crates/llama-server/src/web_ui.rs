//! The built-in chat page at `/`: static assets compiled into the binary,
//! served without an API key (the page holds no secret; its API calls need one
//! when keys are set). `--web-ui off` leaves `/` to the 404 fallback.
//!
//! The page is plain HTML, CSS and JavaScript modules under `web/` (no build
//! step). It talks to the server only through the public API
//! (`/v1/models`, streaming `/v1/chat/completions`), so it doubles as an
//! example client. Every response carries its `Content-Type`,
//! `X-Content-Type-Options: nosniff` and `Cache-Control: no-cache` with an
//! `ETag` (a browser revalidates, so an upgraded server's page shows at once,
//! and gets a 304 when nothing changed); the page adds a strict
//! `Content-Security-Policy` that allows nothing but this origin's own files.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

/// The page's policy: scripts, styles and API calls from this origin only; no
/// inline script or style, no plugins, no framing, no form posts.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// One file of the page.
struct Asset {
    /// The URL path it is served at.
    path: &'static str,
    body: &'static [u8],
    content_type: &'static str,
    /// The HTML document (gets the page-only security headers).
    document: bool,
    etag: u64,
}

impl Asset {
    const fn new(path: &'static str, body: &'static [u8], content_type: &'static str) -> Self {
        Self {
            path,
            body,
            content_type,
            document: false,
            etag: fnv1a(body),
        }
    }

    const fn document(mut self) -> Self {
        self.document = true;
        self
    }
}

const JS: &str = "text/javascript; charset=utf-8";

static ASSETS: &[Asset] = &[
    Asset::new(
        "/",
        include_bytes!("../web/index.html"),
        "text/html; charset=utf-8",
    )
    .document(),
    Asset::new("/app.js", include_bytes!("../web/app.js"), JS),
    Asset::new("/api.js", include_bytes!("../web/api.js"), JS),
    Asset::new("/markdown.js", include_bytes!("../web/markdown.js"), JS),
    Asset::new(
        "/app.css",
        include_bytes!("../web/app.css"),
        "text/css; charset=utf-8",
    ),
    Asset::new(
        "/favicon.svg",
        include_bytes!("../web/favicon.svg"),
        "image/svg+xml",
    ),
];

/// 64-bit FNV-1a, at compile time: the assets' ETags.
const fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// The page's routes, merged into the public router when the UI is on.
pub fn router() -> Router<AppState> {
    routes()
}

fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |router, asset| {
        router.route(
            asset.path,
            get(move |headers: HeaderMap| async move { serve(asset, &headers) }),
        )
    })
}

/// Whether an `If-None-Match` header names `etag` (or is `*`).
fn matches_etag(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag)
}

fn serve(asset: &'static Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{:016x}\"", asset.etag);
    let not_modified = matches_etag(request, &etag);
    let mut response = if not_modified {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        asset.body.into_response()
    };
    let headers = response.headers_mut();
    if !not_modified {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // A formatted hex string in quotes is always a valid header value.
    if let Ok(value) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, value);
    }
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if asset.document {
        headers.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        );
        headers.insert(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        );
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(path: &str, if_none_match: Option<&str>) -> Response {
        let mut request = Request::get(path);
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        routes::<()>()
            .oneshot(request.body(Body::empty()).unwrap())
            .await
            .unwrap()
    }

    async fn body_of(response: Response) -> Vec<u8> {
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec()
    }

    fn header(response: &Response, name: header::HeaderName) -> &str {
        response
            .headers()
            .get(&name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
    }

    fn file(name: &str) -> Vec<u8> {
        std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("web")
                .join(name),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn every_asset_is_served_with_its_type_and_caching_headers() {
        let expected = [
            ("/", "index.html", "text/html; charset=utf-8"),
            ("/app.js", "app.js", "text/javascript; charset=utf-8"),
            ("/api.js", "api.js", "text/javascript; charset=utf-8"),
            (
                "/markdown.js",
                "markdown.js",
                "text/javascript; charset=utf-8",
            ),
            ("/app.css", "app.css", "text/css; charset=utf-8"),
            ("/favicon.svg", "favicon.svg", "image/svg+xml"),
        ];
        assert_eq!(
            ASSETS.len(),
            expected.len(),
            "a new asset needs a line here"
        );
        for (path, name, content_type) in expected {
            let response = get(path, None).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            assert_eq!(
                header(&response, header::CONTENT_TYPE),
                content_type,
                "{path}"
            );
            assert_eq!(
                header(&response, header::CACHE_CONTROL),
                "no-cache",
                "{path}"
            );
            assert_eq!(header(&response, header::X_CONTENT_TYPE_OPTIONS), "nosniff");
            let etag = header(&response, header::ETAG).to_string();
            assert!(etag.starts_with('"') && etag.ends_with('"') && etag.len() == 18);
            let page_only = response
                .headers()
                .contains_key(header::CONTENT_SECURITY_POLICY);
            assert_eq!(page_only, path == "/", "{path}: CSP only on the document");
            // The binary serves the files as they are in the tree (no stale copy).
            assert_eq!(body_of(response).await, file(name), "{path}");
        }
    }

    #[tokio::test]
    async fn the_page_carries_a_strict_content_security_policy() {
        let response = get("/", None).await;
        let csp = header(&response, header::CONTENT_SECURITY_POLICY);
        for directive in [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ] {
            assert!(csp.contains(directive), "{directive} missing from {csp}");
        }
        for loose in ["unsafe-inline", "unsafe-eval", "http:", "https:", "*"] {
            assert!(!csp.contains(loose), "{loose} in {csp}");
        }
        assert_eq!(header(&response, header::REFERRER_POLICY), "no-referrer");
        assert_eq!(header(&response, header::X_FRAME_OPTIONS), "DENY");
    }

    #[tokio::test]
    async fn a_matching_etag_gets_304_without_a_body() {
        let first = get("/app.js", None).await;
        let etag = header(&first, header::ETAG).to_string();
        let again = get("/app.js", Some(&etag)).await;
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header(&again, header::ETAG), etag);
        assert_eq!(header(&again, header::CACHE_CONTROL), "no-cache");
        assert!(body_of(again).await.is_empty());

        let listed = get("/app.js", Some(&format!("\"0000000000000000\", W/{etag}"))).await;
        assert_eq!(listed.status(), StatusCode::NOT_MODIFIED);
        let other = get("/app.js", Some("\"0000000000000000\"")).await;
        assert_eq!(other.status(), StatusCode::OK);
        // Another file's tag does not match this one.
        let css_tag = header(&get("/app.css", None).await, header::ETAG).to_string();
        assert_ne!(css_tag, etag);
        assert_eq!(
            get("/app.js", Some(&css_tag)).await.status(),
            StatusCode::OK
        );
    }

    #[tokio::test]
    async fn only_the_listed_paths_are_served() {
        for path in [
            "/index.html",
            "/app",
            "/web/app.js",
            "/app.js/",
            "/../Cargo.toml",
        ] {
            assert_eq!(
                get(path, None).await.status(),
                StatusCode::NOT_FOUND,
                "{path}"
            );
        }
    }

    /// Values of `attr="..."` in `html`.
    fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
        let needle = format!(" {attr}=\"");
        html.match_indices(&needle)
            .map(|(i, _)| {
                let rest = &html[i + needle.len()..];
                &rest[..rest.find('"').unwrap()]
            })
            .collect()
    }

    /// The page works under its own policy: no inline script or style, and
    /// every file it loads is one the router serves (no CDN, no typo).
    #[test]
    fn the_page_needs_nothing_its_policy_forbids_or_its_router_lacks() {
        let served: Vec<&str> = ASSETS
            .iter()
            .map(|a| a.path.trim_start_matches('/'))
            .collect();
        let html = String::from_utf8(file("index.html")).unwrap();
        let lower = html.to_ascii_lowercase();
        assert!(!lower.contains("<style"), "inline <style> in index.html");
        assert!(
            !lower.contains(" style=\""),
            "inline style attribute in index.html"
        );
        assert!(
            !lower.contains("javascript:"),
            "javascript: URL in index.html"
        );
        for (i, _) in lower.match_indices(" on") {
            let name: String = lower[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphabetic())
                .collect();
            assert!(
                !lower[i + 1 + name.len()..].starts_with('='),
                "inline event handler {name}= in index.html"
            );
        }
        for (i, _) in lower.match_indices("<script") {
            let tag = &lower[i..i + lower[i..].find('>').unwrap()];
            assert!(
                tag.contains(" src=\""),
                "inline <script> in index.html: {tag}"
            );
        }
        let mut loaded = attribute_values(&html, "src");
        loaded.extend(attribute_values(&html, "href"));
        for url in loaded {
            if url.starts_with('#') {
                continue;
            }
            assert!(
                served.contains(&url),
                "index.html loads {url:?}, which is not served"
            );
        }
        // Module imports between the scripts.
        for asset in ASSETS.iter().filter(|a| a.path.ends_with(".js")) {
            let source = std::str::from_utf8(asset.body).unwrap();
            for line in source.lines().filter(|l| l.starts_with("import ")) {
                let from = line.rsplit("from '").next().unwrap();
                let target = from.trim_end_matches("';").trim_start_matches("./");
                assert!(
                    served.contains(&target),
                    "{}: imports {target:?}",
                    asset.path
                );
            }
            assert!(
                !source.contains("innerHTML"),
                "{} writes innerHTML",
                asset.path
            );
            assert!(!source.contains("eval("), "{} calls eval", asset.path);
        }
    }
}
