//! `AppState`: what every handler shares. Built once at start-up from typed
//! settings; nothing below reads the environment.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::ApiKeys;
use crate::backend::Backend;
use crate::codec::Codec;
use crate::codec_pool::CodecPool;
use crate::generation_defaults::GenerationDefaults;
use crate::listener::ConnectionLimits;
use crate::openai::unix_now;
use crate::validation::ApiLimits;

/// The model as clients name it.
#[derive(Debug, Clone)]
pub struct ServedModel {
    /// The name `/v1/models` lists and responses carry.
    pub id: String,
    /// Other names requests may use for it (e.g. the `--model` path as typed).
    pub aliases: Vec<String>,
    pub created: u64,
    pub owned_by: String,
}

impl ServedModel {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            aliases: Vec::new(),
            created: unix_now(),
            owned_by: "llama-serve".into(),
        }
    }

    pub fn names(&self) -> Vec<String> {
        std::iter::once(self.id.clone())
            .chain(self.aliases.iter().cloned())
            .collect()
    }
}

/// HTTP-side behaviour; the defaults are the CLI's.
#[derive(Debug, Clone)]
pub struct AppOptions {
    pub api_keys: Vec<String>,
    /// Empty = no CORS headers; `*` = any origin.
    pub cors_allow_origins: Vec<String>,
    pub max_request_bytes: usize,
    /// Whole-request deadline handed to the engine (queue + generation).
    pub request_timeout: Option<Duration>,
    /// SSE comment interval, so proxies keep a queued stream open.
    pub keep_alive: Duration,
    pub default_system_prompt: Option<String>,
    pub generation_defaults: GenerationDefaults,
    pub limits: ApiLimits,
    /// `/v1/completions` without `max_tokens` gets this many (OpenAI's and vLLM's 16).
    pub completions_default_max_tokens: usize,
    /// Serve the built-in chat page at `/`.
    pub web_ui: bool,
    /// Threads that tokenize and render chat templates.
    pub codec_threads: usize,
    /// A request body that sends nothing for this long fails with 408.
    pub body_read_timeout: Option<Duration>,
    /// Header-read and idle timeouts, the connection cap.
    pub connections: ConnectionLimits,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            cors_allow_origins: Vec::new(),
            max_request_bytes: 2 * 1024 * 1024,
            request_timeout: None,
            keep_alive: Duration::from_secs(10),
            default_system_prompt: None,
            generation_defaults: GenerationDefaults::default(),
            limits: ApiLimits::default(),
            completions_default_max_tokens: 16,
            web_ui: true,
            codec_threads: crate::codec_pool::default_threads(),
            // nginx's client_body_timeout.
            body_read_timeout: Some(Duration::from_secs(60)),
            connections: ConnectionLimits::default(),
        }
    }
}

pub struct AppInner {
    pub backend: Arc<dyn Backend>,
    pub codec: Arc<dyn Codec>,
    pub model: ServedModel,
    pub model_names: Vec<String>,
    pub options: AppOptions,
    pub api_keys: ApiKeys,
    pub system_fingerprint: String,
    pub codec_pool: CodecPool,
}

/// Cheap to clone.
#[derive(Clone)]
pub struct AppState(pub Arc<AppInner>);

impl std::ops::Deref for AppState {
    type Target = AppInner;
    fn deref(&self) -> &AppInner {
        &self.0
    }
}

impl AppState {
    pub fn new(
        backend: Arc<dyn Backend>,
        codec: Arc<dyn Codec>,
        model: ServedModel,
        options: AppOptions,
    ) -> Self {
        let api_keys = ApiKeys::new(options.api_keys.iter().cloned());
        let codec_pool =
            CodecPool::new(options.codec_threads).expect("starting the tokenizer threads");
        Self(Arc::new(AppInner {
            backend,
            codec,
            model_names: model.names(),
            model,
            api_keys,
            options,
            system_fingerprint: format!("fp_llama-serve-{}", env!("CARGO_PKG_VERSION")),
            codec_pool,
        }))
    }

    /// Runs text ↔ token work on the codec pool, off the async threads: a
    /// long prompt takes milliseconds.
    pub async fn blocking<T, F>(&self, f: F) -> Result<T, crate::error::ApiError>
    where
        F: FnOnce(&dyn Codec) -> Result<T, crate::error::ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let codec = self.codec.clone();
        self.codec_pool
            .run(move || f(codec.as_ref()))
            .await
            .map_err(crate::error::ApiError::internal)?
    }
}
