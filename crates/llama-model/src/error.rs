use std::path::PathBuf;

/// Everything that can go wrong while loading or running a Llama model.
///
/// Loading errors name the culprit (file, field, tensor) because the person
/// reading them is usually pointing the server at a directory they did not
/// build themselves.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    ConfigParse { path: PathBuf, message: String },
    #[error("config field `{field}`: {message}")]
    ConfigField {
        field: &'static str,
        message: String,
    },
    #[error("no weights in {dir}: expected model.safetensors or pytorch_model.bin, or their index (model.safetensors.index.json, pytorch_model.bin.index.json) with its shards")]
    NoWeights { dir: PathBuf },
    #[error("invalid weights index {path}: {message}")]
    BadIndex { path: PathBuf, message: String },
    #[error("cannot read weights file {path}: {message}")]
    UnreadableShard { path: PathBuf, message: String },
    #[error("missing tensor `{name}` (looked in {files})")]
    MissingTensor { name: String, files: String },
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("unknown device `{0}` (expected cpu, cuda, cuda:N, metal or metal:N)")]
    UnknownDevice(String),
    #[error("device `{device}` is not available: {message}")]
    DeviceUnavailable { device: String, message: String },
    #[error("unknown dtype `{0}` (expected f32, f16 or bf16)")]
    UnknownDType(String),
    #[error(
        "unknown model shape `{0}` (expected tiny, 134m, 7b, 13b, 70b or a path to a config.json)"
    )]
    UnknownShape(String),
    #[error("KV cache: {0}")]
    Kv(#[from] crate::kv::KvError),
    #[error("bad batch: {0}")]
    BadBatch(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
