//! Named model shapes for `--random-weights` and benchmarks.

use std::path::Path;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelShape {
    /// The fixture's shape: hidden 64, 2 layers, 4 heads, 2 KV heads.
    Tiny,
    /// A 134M-parameter Llama (hidden 768, 12 layers) used for CPU benchmarks.
    Small134m,
    Llama7b,
    Llama13b,
    Llama70b,
}

impl ModelShape {
    pub fn config(&self) -> LlamaConfig {
        let (hidden, inter, layers, heads, kv_heads) = match self {
            ModelShape::Tiny => (64, 176, 2, 4, 2),
            ModelShape::Small134m => (768, 2048, 12, 12, 12),
            ModelShape::Llama7b => (4096, 11008, 32, 32, 32),
            ModelShape::Llama13b => (5120, 13824, 40, 40, 40),
            ModelShape::Llama70b => (8192, 28672, 80, 64, 8),
        };
        LlamaConfig {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            vocab_size: 32000,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: if matches!(self, ModelShape::Tiny) {
                512
            } else {
                4096
            },
            tie_word_embeddings: false,
            rope_scaling_factor: 1.0,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ModelShape::Tiny => "tiny",
            ModelShape::Small134m => "134m",
            ModelShape::Llama7b => "7b",
            ModelShape::Llama13b => "13b",
            ModelShape::Llama70b => "70b",
        }
    }
}

/// `tiny`, `134m`, `7b`, `13b`, `70b`, or a path to a `config.json`.
pub fn resolve_shape(spec: &str) -> Result<LlamaConfig> {
    let shape = match spec.trim().to_ascii_lowercase().as_str() {
        "tiny" => Some(ModelShape::Tiny),
        "134m" | "small" => Some(ModelShape::Small134m),
        "7b" => Some(ModelShape::Llama7b),
        "13b" => Some(ModelShape::Llama13b),
        "70b" => Some(ModelShape::Llama70b),
        _ => None,
    };
    if let Some(shape) = shape {
        return Ok(shape.config());
    }
    let path = Path::new(spec);
    if path.is_file() {
        return LlamaConfig::from_file(path);
    }
    if path.is_dir() && path.join("config.json").is_file() {
        return LlamaConfig::from_file(&path.join("config.json"));
    }
    Err(ModelError::UnknownShape(spec.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_have_the_published_sizes() {
        let p7 = ModelShape::Llama7b.config().num_parameters() as f64 / 1e9;
        assert!((6.6..6.9).contains(&p7), "{p7}");
        let p70 = ModelShape::Llama70b.config().num_parameters() as f64 / 1e9;
        assert!((68.0..70.5).contains(&p70), "{p70}");
        let p134 = ModelShape::Small134m.config().num_parameters() as f64 / 1e6;
        assert!((125.0..140.0).contains(&p134), "{p134}");
        assert!(resolve_shape("huge").is_err());
    }
}
