//! `ServerConfig`: the typed, merged configuration `main` hands to [`crate::run`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::cli::{Cli, FileConfig, LogFormat, SizeValue};
use crate::state::AppOptions;

/// Where the Hugging Face cache is and how to reach the Hub. Filled from
/// `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE` and `HF_ENDPOINT` in `main`.
#[derive(Debug, Clone, Default)]
pub struct HubOptions {
    /// The `hub` cache directory (`$HF_HOME/hub`); `None` = hf-hub's default.
    pub cache_dir: Option<PathBuf>,
    pub token: Option<String>,
    pub offline: bool,
    pub endpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ModelSettings {
    /// `None` = the bundled tiny model.
    pub model: Option<String>,
    pub revision: Option<String>,
    pub served_model_name: Option<String>,
    pub device: String,
    /// `None` = f32 on CPU, bf16 on a GPU.
    pub dtype: Option<String>,
    /// `None` = the fused kernels (`auto`).
    pub kernels: Option<String>,
    pub hub: HubOptions,
}

/// Engine sizing; `None` keeps the engine's default.
#[derive(Debug, Clone, Default)]
pub struct EngineSettings {
    pub kv_cache_memory: Option<String>,
    pub kv_cache_dtype: Option<String>,
    pub sampling: Option<String>,
    pub cuda_graphs: Option<String>,
    pub overlap: Option<String>,
    pub prefix_caching: Option<String>,
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub max_queue: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub port: u16,
    pub model: ModelSettings,
    pub engine: EngineSettings,
    pub app: AppOptions,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            // All interfaces: the server usually runs in a container, reached from outside it.
            host: "0.0.0.0".into(),
            port: 8000,
            model: ModelSettings {
                model: None,
                revision: None,
                served_model_name: None,
                device: "cpu".into(),
                dtype: None,
                kernels: None,
                hub: HubOptions::default(),
            },
            engine: EngineSettings::default(),
            app: AppOptions::default(),
            shutdown_timeout: Duration::from_secs(30),
            log_format: LogFormat::Text,
        }
    }
}

/// `2097152`, `2MiB`, `512KiB`, `1MB`.
pub fn parse_size(text: &str) -> anyhow::Result<usize> {
    llama_model::kv::parse_byte_size(text)
        .map(|b| b as usize)
        .map_err(anyhow::Error::msg)
}

fn seconds(value: f64, name: &str) -> anyhow::Result<Duration> {
    if !value.is_finite() || value < 0.0 {
        bail!("--{name} must be a non-negative number of seconds, got {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

/// API keys from a file: one per line, blank lines and `#` comments skipped.
pub fn read_key_file(path: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading API keys from {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect())
}

impl ServerConfig {
    /// CLI (which clap already merged with the environment) over the file over defaults.
    pub fn merge(cli: Cli, file: FileConfig, hub: HubOptions) -> anyhow::Result<Self> {
        let d = ServerConfig::default();
        let mut app = d.app.clone();

        app.api_keys = if cli.api_keys.is_empty() {
            file.api_keys
        } else {
            cli.api_keys
        };
        if let Some(path) = cli.api_key_file.or(file.api_key_file) {
            app.api_keys.extend(read_key_file(&path)?);
        }
        app.cors_allow_origins = if cli.cors_allow_origins.is_empty() {
            file.cors_allow_origins
        } else {
            cli.cors_allow_origins
        };
        let max_bytes = match (cli.max_request_bytes, file.max_request_bytes) {
            (Some(text), _) | (None, Some(SizeValue::Text(text))) => Some(parse_size(&text)?),
            (None, Some(SizeValue::Bytes(b))) => Some(b as usize),
            (None, None) => None,
        };
        if let Some(bytes) = max_bytes {
            if bytes == 0 {
                bail!("--max-request-bytes must be positive");
            }
            app.max_request_bytes = bytes;
        }
        if let Some(t) = cli.request_timeout.or(file.request_timeout) {
            let t = seconds(t, "request-timeout")?;
            app.request_timeout = (!t.is_zero()).then_some(t);
        }
        app.default_system_prompt = cli.default_system_prompt.or(file.default_system_prompt);

        let shutdown_timeout = match cli.shutdown_timeout.or(file.shutdown_timeout) {
            Some(t) => seconds(t, "shutdown-timeout")?,
            None => d.shutdown_timeout,
        };

        Ok(ServerConfig {
            host: cli.host.or(file.host).unwrap_or(d.host),
            port: cli.port.or(file.port).unwrap_or(d.port),
            model: ModelSettings {
                model: cli.model.or(file.model),
                revision: cli.revision.or(file.revision),
                served_model_name: cli.served_model_name.or(file.served_model_name),
                device: cli.device.or(file.device).unwrap_or(d.model.device),
                dtype: cli.dtype.or(file.dtype),
                kernels: cli.kernels.or(file.kernels),
                hub,
            },
            engine: EngineSettings {
                kv_cache_memory: cli.kv_cache_memory.or(file.kv_cache_memory),
                kv_cache_dtype: cli.kv_cache_dtype.or(file.kv_cache_dtype),
                sampling: cli.sampling.or(file.sampling),
                cuda_graphs: cli.cuda_graphs.or(file.cuda_graphs),
                overlap: cli.overlap.or(file.overlap),
                prefix_caching: cli.prefix_caching.or(file.prefix_caching),
                max_num_seqs: cli.max_num_seqs.or(file.max_num_seqs),
                max_num_batched_tokens: cli.max_num_batched_tokens.or(file.max_num_batched_tokens),
                max_queue: cli.max_queue.or(file.max_queue),
            },
            app,
            shutdown_timeout,
            log_format: cli.log_format.or(file.log_format).unwrap_or(d.log_format),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn cli_beats_file_beats_default() {
        let cli = Cli::try_parse_from(["llama-serve", "--port", "9000", "--request-timeout", "5"])
            .unwrap();
        let file =
            FileConfig::from_toml("port = 7000\nhost = \"127.0.0.1\"\nmax_request_bytes = 1024")
                .unwrap();
        let c = ServerConfig::merge(cli, file, HubOptions::default()).unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.host, "127.0.0.1");
        assert_eq!(c.app.max_request_bytes, 1024);
        assert_eq!(c.app.request_timeout, Some(Duration::from_secs(5)));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(c.model.device, "cpu");
    }

    #[test]
    fn the_shipped_default_file_matches_the_built_in_defaults() {
        let text = include_str!("../../../config/default.toml");
        let file = FileConfig::from_toml(text).unwrap();
        let from_file = ServerConfig::merge(Cli::default(), file, HubOptions::default()).unwrap();
        let built_in =
            ServerConfig::merge(Cli::default(), FileConfig::default(), HubOptions::default())
                .unwrap();
        assert_eq!(from_file.host, built_in.host);
        assert_eq!(from_file.port, built_in.port);
        assert_eq!(from_file.model.device, built_in.model.device);
        assert_eq!(
            from_file.app.max_request_bytes,
            built_in.app.max_request_bytes
        );
        assert_eq!(from_file.app.request_timeout, built_in.app.request_timeout);
        assert_eq!(from_file.shutdown_timeout, built_in.shutdown_timeout);
        assert_eq!(from_file.log_format, built_in.log_format);
    }

    /// The Kubernetes ConfigMap carries the default file verbatim (as
    /// `scripts/render-configmap.sh` writes it): a key added to one and not
    /// the other is a deployment that silently differs from the docs.
    #[test]
    fn the_kubernetes_config_map_carries_the_default_file() {
        let default = include_str!("../../../config/default.toml");
        let config_map = include_str!("../../../deploy/kubernetes/configmap.yaml");
        let (_, embedded) = config_map
            .split_once("  config.toml: |\n")
            .expect("a config.toml entry");
        let embedded: String = embedded
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        assert_eq!(
            embedded, default,
            "deploy/kubernetes/configmap.yaml is stale: bash scripts/render-configmap.sh > deploy/kubernetes/configmap.yaml"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2MiB").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}
