//! llama-serve's HTTP layer: an OpenAI-compatible API over the engine.
//!
//! [`app`] builds the router for an [`AppState`] (tests drive it with
//! `tower::ServiceExt::oneshot` or on a real listener); [`serve`] runs it on a
//! listener with graceful drain; [`run`] does everything `main` needs from a
//! [`ServerConfig`].

pub mod auth;
pub mod backend;
pub mod cli;
pub mod codec;
pub mod codec_pool;
pub mod config;
pub mod error;
pub mod generate;
pub mod generation_defaults;
pub mod guards;
pub mod json;
pub mod listener;
pub mod llama_codec;
pub mod metrics;
pub mod model_source;
pub mod openai;
pub mod request_id;
pub mod routes;
pub mod shutdown;
pub mod sse;
pub mod startup;
pub mod state;
pub mod validation;
pub mod web_ui;

use std::future::Future;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method, Request};
use axum::{Extension, Router};
use tower::ServiceBuilder;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use config::ServerConfig;
pub use error::ApiError;
pub use state::{AppOptions, AppState, ServedModel};

use crate::json::BodyLimit;
use crate::request_id::REQUEST_ID_HEADER;

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            // `*` does not cover `Authorization` under the Fetch standard,
            // and the OpenAI SDKs add headers of their own (`x-stainless-*`,
            // `openai-organization`, ...): name exactly what the browser asks for.
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([REQUEST_ID_HEADER.clone(), header::RETRY_AFTER])
            .max_age(Duration::from_secs(3600)),
    )
}

/// The whole HTTP service: routes, auth, request ids, tracing, CORS, body limit.
pub fn app(state: AppState) -> Router {
    let limit = state.options.max_request_bytes;
    let cors = cors_layer(&state.options.cors_allow_origins);
    let guard = axum::middleware::from_fn_with_state(state.clone(), guards::guard);
    routes::router(state).layer(
        ServiceBuilder::new()
            .layer(axum::middleware::from_fn(guards::drop_unusable_request_id))
            .layer(SetRequestIdLayer::new(
                REQUEST_ID_HEADER.clone(),
                MakeRequestUuid,
            ))
            .layer(
                // Method, path and request id only: prompts and outputs never reach the logs.
                TraceLayer::new_for_http()
                    .make_span_with(|request: &Request<_>| {
                        let request_id = request
                            .headers()
                            .get(&REQUEST_ID_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        tracing::info_span!(
                            "request",
                            method = %request.method(),
                            path = %request.uri().path(),
                            request_id,
                        )
                    })
                    .on_response(DefaultOnResponse::new().level(Level::INFO)),
            )
            .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER.clone()))
            .option_layer(cors)
            .layer(guard)
            .layer(DefaultBodyLimit::max(limit))
            .layer(Extension(BodyLimit(limit))),
    )
}

/// Serves `state` on `listener` until `shutdown` resolves, then drains: the
/// engine stops accepting (so `/ready` and every new request but the probes
/// answer 503, on new connections too), and in-flight requests get
/// `shutdown_timeout` to finish before the engine ends them with an error.
/// Returns once no request is in progress.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    shutdown_timeout: Duration,
) -> std::io::Result<()> {
    let backend = state.backend.clone();
    let limits = state.options.connections.clone();
    let (drain_tx, mut drain_rx) = tokio::sync::watch::channel(false);
    let drain_backend = backend.clone();
    tokio::spawn(async move {
        shutdown.await;
        drain_backend.stop_accepting();
        let _ = drain_tx.send(true);
    });
    let server = listener::serve(listener, app(state), limits, drain_rx.clone());
    tokio::pin!(server);
    let deadline = async move {
        let _ = drain_rx.wait_for(|draining| *draining).await;
        tokio::time::sleep(shutdown_timeout).await;
    };
    tokio::select! {
        () = &mut server => {}
        _ = deadline => {
            tracing::warn!(?shutdown_timeout, "shutdown timeout: ending the requests still in flight");
            backend.shutdown();
            // The engine now sends each remaining stream its error event; give them a moment to flush.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut server).await;
        }
    }
    backend.shutdown();
    Ok(())
}

/// Loads the model, listens, prints `llama-serve listening on http://ADDR`,
/// and serves until SIGTERM or SIGINT.
pub async fn run(config: ServerConfig) -> anyhow::Result<()> {
    let mut config = config;
    config.app.connections.max_connections =
        listener::raise_open_files_limit(config.app.connections.max_connections);
    let state = startup::load(&config).await?;
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", config.host, config.port))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, model = %state.model.id, "serving");
    // Tests and scripts parse this line to learn the port (with --port 0).
    println!("llama-serve listening on http://{addr}");
    serve(listener, state, shutdown::signal(), config.shutdown_timeout).await?;
    tracing::info!("shut down cleanly");
    Ok(())
}
