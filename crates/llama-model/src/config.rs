//! `LlamaConfig`: the Hugging Face `config.json` of a Llama 2 family model.

use std::path::Path;

use serde::Deserialize;

use crate::error::{ModelError, Result};

/// The architecture hyper-parameters we need, validated.
///
/// Fields we do not use are ignored, but fields that would change the maths
/// (an activation other than SiLU, biases, an unsupported RoPE scaling) are
/// refused by [`LlamaConfig::validate`] with the field's name, rather than
/// silently producing wrong logits.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Linear RoPE scaling factor (positions are divided by it); 1.0 when absent.
    pub rope_scaling_factor: f64,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    max_position_embeddings: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    model_type: Option<String>,
    bos_token_id: Option<serde_json::Value>,
    eos_token_id: Option<serde_json::Value>,
    pretraining_tp: Option<usize>,
}

fn field_err(field: &'static str, message: impl Into<String>) -> ModelError {
    ModelError::ConfigField {
        field,
        message: message.into(),
    }
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T> {
    value.ok_or_else(|| field_err(field, "missing"))
}

fn token_ids(value: &Option<serde_json::Value>, field: &'static str) -> Result<Vec<u32>> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Number(n)) => n
            .as_u64()
            .map(|id| vec![id as u32])
            .ok_or_else(|| field_err(field, format!("not a token id: {n}"))),
        Some(serde_json::Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|id| id as u32)
                    .ok_or_else(|| field_err(field, format!("not a token id: {v}")))
            })
            .collect(),
        Some(other) => Err(field_err(
            field,
            format!("expected an id or a list, got {other}"),
        )),
    }
}

fn rope_scaling_factor(value: &Option<serde_json::Value>) -> Result<f64> {
    let Some(value) = value else { return Ok(1.0) };
    if value.is_null() {
        return Ok(1.0);
    }
    let obj = value
        .as_object()
        .ok_or_else(|| field_err("rope_scaling", "expected an object"))?;
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("");
    match kind {
        "linear" => {
            let factor = obj.get("factor").and_then(|v| v.as_f64()).ok_or_else(|| {
                field_err("rope_scaling", "linear scaling needs a numeric `factor`")
            })?;
            if !(factor.is_finite() && factor >= 1.0) {
                return Err(field_err(
                    "rope_scaling",
                    format!("factor must be >= 1, got {factor}"),
                ));
            }
            Ok(factor)
        }
        "default" => Ok(1.0),
        other => Err(field_err(
            "rope_scaling",
            format!("unsupported rope scaling type `{other}` (only `linear` is supported)"),
        )),
    }
}

impl LlamaConfig {
    pub fn from_json_str(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| ModelError::ConfigParse {
            path: "config.json".into(),
            message: e.to_string(),
        })?;
        Self::from_raw(raw)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| ModelError::ConfigParse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self> {
        if let Some(model_type) = &raw.model_type {
            if model_type != "llama" {
                return Err(field_err(
                    "model_type",
                    format!("`{model_type}` is not a Llama model"),
                ));
            }
        }
        if let Some(act) = &raw.hidden_act {
            if act != "silu" {
                return Err(field_err(
                    "hidden_act",
                    format!("`{act}` is not supported (only silu)"),
                ));
            }
        }
        if raw.attention_bias == Some(true) {
            return Err(field_err(
                "attention_bias",
                "attention biases are not supported",
            ));
        }
        if raw.mlp_bias == Some(true) {
            return Err(field_err("mlp_bias", "MLP biases are not supported"));
        }
        if let Some(tp) = raw.pretraining_tp {
            // pretraining_tp > 1 only changes how transformers splits the matmuls; the maths is the same.
            if tp == 0 {
                return Err(field_err("pretraining_tp", "must be at least 1"));
            }
        }
        let hidden_size = required(raw.hidden_size, "hidden_size")?;
        let num_attention_heads = required(raw.num_attention_heads, "num_attention_heads")?;
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None => {
                if num_attention_heads == 0 || !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(field_err(
                        "num_attention_heads",
                        format!("hidden_size {hidden_size} is not divisible by {num_attention_heads} heads"),
                    ));
                }
                hidden_size / num_attention_heads
            }
        };
        let cfg = LlamaConfig {
            hidden_size,
            intermediate_size: required(raw.intermediate_size, "intermediate_size")?,
            num_hidden_layers: required(raw.num_hidden_layers, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: required(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            rope_scaling_factor: rope_scaling_factor(&raw.rope_scaling)?,
            bos_token_id: token_ids(&raw.bos_token_id, "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(&raw.eos_token_id, "eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks the invariants the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let positive: [(&'static str, usize); 7] = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(field_err(field, "must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(field_err(
                "num_key_value_heads",
                format!(
                    "{} attention heads are not a multiple of {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(field_err(
                "head_dim",
                format!("must be even and positive, got {}", self.head_dim),
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(field_err(
                "rms_norm_eps",
                format!("must be positive, got {}", self.rms_norm_eps),
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(field_err(
                "rope_theta",
                format!("must be positive, got {}", self.rope_theta),
            ));
        }
        Ok(())
    }

    /// Context length in tokens the model supports.
    pub fn max_context(&self) -> usize {
        self.max_position_embeddings
    }

    /// Width of one K (or V) row of the cache for one token in one layer.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Bytes of KV cache one token needs across all layers: `2 × layers × kv_heads × head_dim × dtype_bytes`.
    pub fn kv_bytes_per_token(&self, dtype_bytes: usize) -> usize {
        2 * self.num_hidden_layers * self.kv_width() * dtype_bytes
    }

    /// Parameter count, for reports.
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.kv_width();
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate_size + 2 * h;
        let lm_head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.vocab_size * h + self.num_hidden_layers * per_layer + h + lm_head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = include_str!("../../../models/tiny-llama/config.json");

    #[test]
    fn parses_the_tiny_fixture() {
        let cfg = LlamaConfig::from_json_str(TINY).unwrap();
        assert_eq!(cfg.hidden_size, 64);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.eos_token_ids, vec![2]);
        assert_eq!(cfg.rope_scaling_factor, 1.0);
    }

    fn with(field: &str, value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
        v[field] = value;
        v.to_string()
    }

    fn without(field: &str) -> String {
        let mut v: serde_json::Value = serde_json::from_str(TINY).unwrap();
        v.as_object_mut().unwrap().remove(field);
        v.to_string()
    }

    #[test]
    fn missing_field_is_named() {
        let err = LlamaConfig::from_json_str(&without("hidden_size")).unwrap_err();
        assert!(err.to_string().contains("hidden_size"), "{err}");
        let err = LlamaConfig::from_json_str(&without("vocab_size")).unwrap_err();
        assert!(err.to_string().contains("vocab_size"), "{err}");
    }

    #[test]
    fn unsupported_values_are_named() {
        let err = LlamaConfig::from_json_str(&with("hidden_act", "gelu".into())).unwrap_err();
        assert!(err.to_string().contains("hidden_act"), "{err}");
        let err = LlamaConfig::from_json_str(&with(
            "rope_scaling",
            serde_json::json!({"type": "dynamic", "factor": 2.0}),
        ))
        .unwrap_err();
        assert!(err.to_string().contains("rope_scaling"), "{err}");
        let err = LlamaConfig::from_json_str(&with("num_key_value_heads", 3.into())).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
        let err = LlamaConfig::from_json_str(&with("attention_bias", true.into())).unwrap_err();
        assert!(err.to_string().contains("attention_bias"), "{err}");
    }

    #[test]
    fn code_llama_and_linear_scaling() {
        let text = with("rope_theta", 1_000_000.0.into());
        let cfg = LlamaConfig::from_json_str(&text).unwrap();
        assert_eq!(cfg.rope_theta, 1e6);
        let text = with(
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 4.0}),
        );
        assert_eq!(
            LlamaConfig::from_json_str(&text)
                .unwrap()
                .rope_scaling_factor,
            4.0
        );
        let text = with("eos_token_id", serde_json::json!([2, 32010]));
        assert_eq!(
            LlamaConfig::from_json_str(&text).unwrap().eos_token_ids,
            vec![2, 32010]
        );
    }

    #[test]
    fn kv_bytes_per_token_matches_the_formula() {
        let cfg = crate::shapes::ModelShape::Llama7b.config();
        assert_eq!(cfg.kv_bytes_per_token(2), 512 * 1024);
    }
}
