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

/// Keys given on the command line, in the environment or in the file: a
/// blank one is a mistake (an unset variable in a template, a stray comma)
/// that must not quietly turn authentication off or on for the wrong key.
fn usable_keys(keys: Vec<String>, source: &str) -> anyhow::Result<Vec<String>> {
    if keys.iter().any(|k| k.trim().is_empty()) {
        bail!(
            "{source}: an API key is empty or blank; refusing to start \
             (leave the option out for a server without authentication)"
        );
    }
    Ok(keys.into_iter().map(|k| k.trim().to_string()).collect())
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
            usable_keys(file.api_keys, "the config file's `api_keys`")?
        } else {
            usable_keys(cli.api_keys, "--api-key (or LLAMA_SERVE_API_KEY)")?
        };
        if let Some(path) = cli.api_key_file.or(file.api_key_file) {
            let keys = read_key_file(&path)?;
            if keys.is_empty() {
                bail!(
                    "--api-key-file {}: the file holds no key (only blank lines or # comments); \
                     refusing to start without authentication",
                    path.display()
                );
            }
            app.api_keys.extend(keys);
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
        let optional_seconds =
            |value: Option<f64>, name: &str, current: Option<Duration>| match value {
                Some(t) => seconds(t, name).map(|t| (!t.is_zero()).then_some(t)),
                None => Ok(current),
            };
        app.connections.header_read_timeout = optional_seconds(
            cli.header_read_timeout.or(file.header_read_timeout),
            "header-read-timeout",
            app.connections.header_read_timeout,
        )?;
        app.connections.idle_timeout = optional_seconds(
            cli.idle_timeout.or(file.idle_timeout),
            "idle-timeout",
            app.connections.idle_timeout,
        )?;
        app.body_read_timeout = optional_seconds(
            cli.body_read_timeout.or(file.body_read_timeout),
            "body-read-timeout",
            app.body_read_timeout,
        )?;
        if let Some(max) = cli.max_connections.or(file.max_connections) {
            if max == 0 {
                bail!("--max-connections must be positive");
            }
            app.connections.max_connections = max;
        }
        if let Some(switch) = cli.web_ui.or(file.web_ui) {
            app.web_ui = switch.is_on();
        }

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
        assert_eq!(from_file.app.web_ui, built_in.app.web_ui);
        assert_eq!(from_file.app.connections, built_in.app.connections);
        assert_eq!(
            from_file.app.body_read_timeout,
            built_in.app.body_read_timeout
        );
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
    fn key_options_that_give_no_usable_key_refuse_to_start() {
        let merge = |args: &[&str], file: &str| {
            let mut argv = vec!["llama-serve"];
            argv.extend_from_slice(args);
            ServerConfig::merge(
                Cli::try_parse_from(argv).unwrap(),
                FileConfig::from_toml(file).unwrap(),
                HubOptions::default(),
            )
        };
        for args in [
            &["--api-key", ""][..],
            &["--api-key", "   "],
            &["--api-key", "a,,b"],
        ] {
            let err = merge(args, "").unwrap_err().to_string();
            assert!(err.contains("--api-key"), "{args:?}: {err}");
        }
        let err = merge(&[], "api_keys = [\" \"]").unwrap_err().to_string();
        assert!(err.contains("api_keys"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# only a comment\n\n   \n").unwrap();
        let err = merge(&["--api-key-file", file.to_str().unwrap()], "")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--api-key-file") && err.contains("no key"),
            "{err}"
        );
        std::fs::write(&file, "# a key\nsk-1\n").unwrap();
        let ok = merge(
            &[
                "--api-key-file",
                file.to_str().unwrap(),
                "--api-key",
                " sk-2 ",
            ],
            "",
        )
        .unwrap();
        assert_eq!(ok.app.api_keys, ["sk-2", "sk-1"]);
        // Leaving every key option out is a server without authentication.
        assert!(merge(&[], "").unwrap().app.api_keys.is_empty());
    }

    #[test]
    fn connection_limits_are_typed_at_parse_time() {
        let cli = Cli::try_parse_from([
            "llama-serve",
            "--header-read-timeout",
            "5",
            "--idle-timeout",
            "0",
            "--max-connections",
            "10",
        ])
        .unwrap();
        let file = FileConfig::from_toml("body_read_timeout = 2.5").unwrap();
        let c = ServerConfig::merge(cli, file, HubOptions::default()).unwrap();
        assert_eq!(
            c.app.connections.header_read_timeout,
            Some(Duration::from_secs(5))
        );
        assert_eq!(c.app.connections.idle_timeout, None);
        assert_eq!(c.app.connections.max_connections, 10);
        assert_eq!(c.app.body_read_timeout, Some(Duration::from_millis(2500)));
        let bad = Cli::try_parse_from(["llama-serve", "--max-connections", "0"]).unwrap();
        assert!(ServerConfig::merge(bad, FileConfig::default(), HubOptions::default()).is_err());
        let bad = Cli::try_parse_from(["llama-serve", "--idle-timeout=-1"]).unwrap();
        assert!(ServerConfig::merge(bad, FileConfig::default(), HubOptions::default()).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2MiB").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}
