//! The command line (and its `LLAMA_SERVE_*` environment twins) and the TOML
//! config file. Every field is optional here: [`crate::config::ServerConfig::merge`]
//! applies the precedence CLI > env > file > built-in default.

use std::path::PathBuf;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// An on/off setting, typed when parsed (`on`/`off`, also `true`/`false` in TOML as strings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "llama-serve",
    version,
    about = "An OpenAI-compatible HTTP server for Llama 2",
    long_about = "An OpenAI-compatible HTTP server for Llama 2. Every flag can also be set as an \
                  LLAMA_SERVE_* environment variable or in a TOML file given with --config; \
                  the command line wins over the environment, which wins over the file."
)]
pub struct Cli {
    /// TOML config file (see config/default.toml for every key).
    #[arg(long, env = "LLAMA_SERVE_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,

    /// A local model directory or GGUF file, a Hugging Face repo id (e.g.
    /// meta-llama/Llama-2-7b-chat-hf) or one GGUF file of a repo
    /// (owner/name/FILE.gguf), or random:SHAPE (tiny, 134m, 7b, 13b, 70b) for
    /// random weights. Default: the bundled tiny model.
    #[arg(long, env = "LLAMA_SERVE_MODEL")]
    pub model: Option<String>,

    /// Hugging Face revision (branch, tag or commit) when --model is a repo id.
    #[arg(long, env = "LLAMA_SERVE_REVISION")]
    pub revision: Option<String>,

    /// The model name clients use and responses carry. Default: the repo id or directory name.
    #[arg(long, env = "LLAMA_SERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Address to listen on [default: 0.0.0.0].
    #[arg(long, env = "LLAMA_SERVE_HOST")]
    pub host: Option<String>,

    /// Port to listen on; 0 picks a free one [default: 8000].
    #[arg(long, env = "LLAMA_SERVE_PORT")]
    pub port: Option<u16>,

    /// cpu, cuda[:N] or metal[:N] [default: cpu].
    #[arg(long, env = "LLAMA_SERVE_DEVICE")]
    pub device: Option<String>,

    /// f32, f16 or bf16 [default: f32 on cpu, bf16 on a GPU].
    #[arg(long, env = "LLAMA_SERVE_DTYPE")]
    pub dtype: Option<String>,

    /// Model kernels: auto (the fused kernels), generic (plain Candle ops
    /// only, the reference) or cuda-cores (fused, with prompt attention on
    /// CUDA cores instead of tensor cores) [default: auto]. An escape hatch
    /// should a fused kernel misbehave on some GPU.
    #[arg(long, env = "LLAMA_SERVE_KERNELS")]
    pub kernels: Option<String>,

    /// KV cache budget: 4GiB, 512MiB, 8192tokens, or 90% (of the device memory for the whole process, like vLLM's --gpu-memory-utilization) [default: the engine's].
    #[arg(long, env = "LLAMA_SERVE_KV_CACHE_MEMORY")]
    pub kv_cache_memory: Option<String>,

    /// KV cache element type: auto (the model's), f32, f16 or bf16. f16 for an
    /// f32 model (llama.cpp's default) halves the cache and the bytes each
    /// decode step reads; CPU only.
    #[arg(long, env = "LLAMA_SERVE_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: Option<String>,

    /// Where tokens drawn with a temperature are picked: auto (next to the
    /// logits on a GPU, by the host sampler on the CPU), device or host
    /// [default: auto]. Greedy tokens are always picked next to the logits.
    #[arg(long, env = "LLAMA_SERVE_SAMPLING")]
    pub sampling: Option<String>,

    /// on or off [default: off]: replay decode steps as CUDA graphs, recorded
    /// at start for every batch size up to --max-num-seqs, so the host no
    /// longer launches each kernel of a step (vLLM's default; its
    /// --enforce-eager is our off). Each graph is checked against the plain
    /// forward once, and graphs turn themselves off should one disagree.
    #[arg(long, env = "LLAMA_SERVE_CUDA_GRAPHS")]
    pub cuda_graphs: Option<String>,

    /// auto, on or off [default: auto]: detokenize, check stop strings and
    /// send each step's tokens while the device runs the next step. auto:
    /// on a GPU, where steps run asynchronously; on the CPU a token would
    /// only wait a step longer.
    #[arg(long, env = "LLAMA_SERVE_OVERLAP")]
    pub overlap: Option<String>,

    /// on or off [default: on]: automatic prefix caching. A prompt starts
    /// from the KV blocks of the longest prefix already computed (a shared
    /// system prompt, the earlier turns of a chat), kept until the cache
    /// needs the room; usage reports them as prompt_tokens_details.cached_tokens.
    #[arg(long, env = "LLAMA_SERVE_PREFIX_CACHING")]
    pub prefix_caching: Option<String>,

    /// Most sequences running in one step.
    #[arg(long, env = "LLAMA_SERVE_MAX_NUM_SEQS")]
    pub max_num_seqs: Option<usize>,

    /// Most tokens in one step (prompt chunks + decodes).
    #[arg(long, env = "LLAMA_SERVE_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: Option<usize>,

    /// Most requests waiting for a slot; more get 429.
    #[arg(long, env = "LLAMA_SERVE_MAX_QUEUE")]
    pub max_queue: Option<usize>,

    /// An accepted API key (repeatable; comma-separated in the environment).
    #[arg(long = "api-key", env = "LLAMA_SERVE_API_KEY", value_delimiter = ',')]
    pub api_keys: Vec<String>,

    /// A file of API keys, one per line (# comments allowed).
    #[arg(long, env = "LLAMA_SERVE_API_KEY_FILE", value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,

    /// An origin allowed by CORS, or * (repeatable; comma-separated in the environment).
    #[arg(
        long = "cors-allow-origin",
        env = "LLAMA_SERVE_CORS_ALLOW_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_allow_origins: Vec<String>,

    /// Largest request body, in bytes or with a unit (2MiB) [default: 2MiB].
    #[arg(long, env = "LLAMA_SERVE_MAX_REQUEST_BYTES")]
    pub max_request_bytes: Option<String>,

    /// Seconds a request may wait and run before it fails; 0 = no limit [default: 0].
    #[arg(long, env = "LLAMA_SERVE_REQUEST_TIMEOUT", value_name = "SECONDS")]
    pub request_timeout: Option<f64>,

    /// System prompt used when a chat request has none.
    #[arg(long, env = "LLAMA_SERVE_DEFAULT_SYSTEM_PROMPT")]
    pub default_system_prompt: Option<String>,

    /// text or json [default: text].
    #[arg(long, env = "LLAMA_SERVE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT [default: 30].
    #[arg(long, env = "LLAMA_SERVE_SHUTDOWN_TIMEOUT", value_name = "SECONDS")]
    pub shutdown_timeout: Option<f64>,

    /// Seconds a connection has to send a complete request head, from its
    /// opening or its previous response (so it also closes idle HTTP/1
    /// keep-alive connections); 0 = no limit [default: 30].
    #[arg(long, env = "LLAMA_SERVE_HEADER_READ_TIMEOUT", value_name = "SECONDS")]
    pub header_read_timeout: Option<f64>,

    /// Seconds a request body may send nothing before the request fails
    /// with 408; 0 = no limit [default: 60].
    #[arg(long, env = "LLAMA_SERVE_BODY_READ_TIMEOUT", value_name = "SECONDS")]
    pub body_read_timeout: Option<f64>,

    /// Seconds a connection with no request in progress stays open; 0 = no
    /// limit [default: 60].
    #[arg(long, env = "LLAMA_SERVE_IDLE_TIMEOUT", value_name = "SECONDS")]
    pub idle_timeout: Option<f64>,

    /// Most open client connections. At the cap the connection idle the
    /// longest is closed to make room; new ones are refused only while every
    /// connection has a request in progress. Capped by the open-files limit,
    /// which is raised to its hard limit at start [default: 4096].
    #[arg(long, env = "LLAMA_SERVE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// on or off [default: on]: serve the built-in chat page at / (its API
    /// calls still need a key when keys are set).
    #[arg(long, env = "LLAMA_SERVE_WEB_UI")]
    pub web_ui: Option<Switch>,
}

/// The TOML file: the same keys as the flags, with underscores.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub model: Option<String>,
    pub revision: Option<String>,
    pub served_model_name: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub device: Option<String>,
    pub dtype: Option<String>,
    pub kernels: Option<String>,
    pub kv_cache_memory: Option<String>,
    pub kv_cache_dtype: Option<String>,
    pub sampling: Option<String>,
    pub cuda_graphs: Option<String>,
    pub overlap: Option<String>,
    pub prefix_caching: Option<String>,
    pub max_num_seqs: Option<usize>,
    pub max_num_batched_tokens: Option<usize>,
    pub max_queue: Option<usize>,
    #[serde(default, alias = "api_key")]
    pub api_keys: Vec<String>,
    pub api_key_file: Option<PathBuf>,
    #[serde(default, alias = "cors_allow_origin")]
    pub cors_allow_origins: Vec<String>,
    pub max_request_bytes: Option<SizeValue>,
    pub request_timeout: Option<f64>,
    pub default_system_prompt: Option<String>,
    pub log_format: Option<LogFormat>,
    pub shutdown_timeout: Option<f64>,
    pub header_read_timeout: Option<f64>,
    pub body_read_timeout: Option<f64>,
    pub idle_timeout: Option<f64>,
    pub max_connections: Option<usize>,
    pub web_ui: Option<Switch>,
}

/// A size written as a number of bytes or a string with a unit.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl FileConfig {
    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let cli = Cli::try_parse_from([
            "llama-serve",
            "--port",
            "0",
            "--api-key",
            "a",
            "--api-key",
            "b",
            "--cors-allow-origin",
            "*",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.port, Some(0));
        assert_eq!(cli.api_keys, vec!["a", "b"]);
        assert_eq!(cli.cors_allow_origins, vec!["*"]);
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        assert!(Cli::try_parse_from(["llama-serve", "--port", "seventy"]).is_err());
    }

    #[test]
    fn the_file_rejects_typos() {
        assert!(FileConfig::from_toml("prot = 80").is_err());
        let f = FileConfig::from_toml("port = 80\napi_key = [\"k\"]\nmax_request_bytes = \"1MiB\"")
            .unwrap();
        assert_eq!(f.port, Some(80));
        assert_eq!(f.api_keys, vec!["k"]);
        assert_eq!(f.max_request_bytes, Some(SizeValue::Text("1MiB".into())));
    }
}
