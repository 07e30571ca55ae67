//! Writes a Llama GGUF file the way llama.cpp's `convert_hf_to_gguf.py`
//! does from a Hugging Face checkpoint: `llama.*` metadata from
//! `config.json`, tensors renamed, q and k rows permuted back to Meta's
//! interleaved RoPE order (the script's `permute`, written here with tensor
//! reshapes), each tensor in the format the caller picks.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

/// A SentencePiece vocabulary, as `tokenizer.ggml.*` stores it.
pub struct Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
    pub bos: u32,
    pub eos: u32,
    pub unk: u32,
    pub chat_template: Option<String>,
}

/// The GGUF name of a Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> String {
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        let (layer, leaf) = rest.split_once('.').unwrap();
        let leaf = match leaf {
            "self_attn.q_proj.weight" => "attn_q.weight",
            "self_attn.k_proj.weight" => "attn_k.weight",
            "self_attn.v_proj.weight" => "attn_v.weight",
            "self_attn.o_proj.weight" => "attn_output.weight",
            "mlp.gate_proj.weight" => "ffn_gate.weight",
            "mlp.up_proj.weight" => "ffn_up.weight",
            "mlp.down_proj.weight" => "ffn_down.weight",
            "input_layernorm.weight" => "attn_norm.weight",
            "post_attention_layernorm.weight" => "ffn_norm.weight",
            other => panic!("unexpected tensor {other}"),
        };
        return format!("blk.{layer}.{leaf}");
    }
    match hf {
        "model.embed_tokens.weight" => "token_embd.weight",
        "model.norm.weight" => "output_norm.weight",
        "lm_head.weight" => "output.weight",
        other => panic!("unexpected tensor {other}"),
    }
    .to_string()
}

/// `convert_hf_to_gguf.py`'s `permute`: Hugging Face's rotate-half rows
/// back to Meta's interleaved ones.
fn to_meta_rope_order(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Writes `tensors` (Hugging Face names) of a model with `config`
/// (`config.json`) to `path`, each in the format `format(gguf_name, shape)`.
pub fn write_gguf(
    path: &Path,
    config: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
    format: &dyn Fn(&str, &[usize]) -> GgmlDType,
    vocab: Option<&Vocab>,
) {
    let heads = config["num_attention_heads"].as_u64().unwrap() as usize;
    let kv_heads = config["num_key_value_heads"]
        .as_u64()
        .unwrap_or(heads as u64) as usize;
    let mut quantized = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for hf in names {
        let mut t = tensors[hf].to_dtype(DType::F32).unwrap();
        if hf.ends_with("q_proj.weight") {
            t = to_meta_rope_order(&t, heads);
        } else if hf.ends_with("k_proj.weight") {
            t = to_meta_rope_order(&t, kv_heads);
        }
        let name = gguf_name(hf);
        let q = QTensor::quantize(&t, format(&name, t.dims())).unwrap();
        quantized.push((name, q));
    }
    let u32_of = |key: &str| Value::U32(config[key].as_u64().unwrap() as u32);
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String("test model".into())),
        (
            "llama.context_length".into(),
            u32_of("max_position_embeddings"),
        ),
        ("llama.embedding_length".into(), u32_of("hidden_size")),
        ("llama.block_count".into(), u32_of("num_hidden_layers")),
        (
            "llama.feed_forward_length".into(),
            u32_of("intermediate_size"),
        ),
        (
            "llama.attention.head_count".into(),
            u32_of("num_attention_heads"),
        ),
        (
            "llama.attention.head_count_kv".into(),
            Value::U32(kv_heads as u32),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(config["rms_norm_eps"].as_f64().unwrap() as f32),
        ),
        (
            "llama.rope.freq_base".into(),
            Value::F32(config["rope_theta"].as_f64().unwrap_or(10_000.0) as f32),
        ),
        ("llama.vocab_size".into(), u32_of("vocab_size")),
    ];
    if let Some(v) = vocab {
        metadata.extend([
            ("tokenizer.ggml.model".into(), Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(v.tokens.iter().cloned().map(Value::String).collect()),
            ),
            (
                "tokenizer.ggml.scores".into(),
                Value::Array(v.scores.iter().copied().map(Value::F32).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                Value::Array(v.types.iter().copied().map(Value::I32).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), Value::U32(v.bos)),
            ("tokenizer.ggml.eos_token_id".into(), Value::U32(v.eos)),
            ("tokenizer.ggml.unknown_token_id".into(), Value::U32(v.unk)),
            ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
            ("tokenizer.ggml.add_eos_token".into(), Value::Bool(false)),
        ]);
        if let Some(t) = &v.chat_template {
            metadata.push(("tokenizer.chat_template".into(), Value::String(t.clone())));
        }
    }
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        quantized.iter().map(|(k, q)| (k.as_str(), q)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

/// llama.cpp's usual choice when a format's blocks do not divide a row: F16.
pub fn or_f16(wanted: GgmlDType, shape: &[usize]) -> GgmlDType {
    if shape.len() < 2 {
        GgmlDType::F32
    } else if shape[shape.len() - 1].is_multiple_of(wanted.block_size()) {
        wanted
    } else {
        GgmlDType::F16
    }
}
