//! `llama-serve`: the only place that reads the command line, the environment
//! and the config file; everything below gets typed settings.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use llama_server::cli::{Cli, FileConfig, LogFormat};
use llama_server::config::{HubOptions, ServerConfig};
use tracing_subscriber::EnvFilter;

fn hub_options_from_env() -> HubOptions {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let home = var("HF_HOME")
        .map(PathBuf::from)
        .or_else(|| var("XDG_CACHE_HOME").map(|c| PathBuf::from(c).join("huggingface")));
    HubOptions {
        cache_dir: var("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| home.map(|h| h.join("hub"))),
        token: var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")),
        offline: var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
        }),
        endpoint: var("HF_ENDPOINT"),
    }
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
}

fn load_config() -> anyhow::Result<ServerConfig> {
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            FileConfig::from_toml(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    ServerConfig::merge(cli, file, hub_options_from_env())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let config = match load_config() {
        Ok(c) => c,
        Err(err) => {
            eprintln!("llama-serve: {err:#}");
            return std::process::ExitCode::from(2);
        }
    };
    init_tracing(config.log_format);
    match llama_server::run(config).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("llama-serve: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
