//! GGUF checkpoints, llama.cpp's single-file format: the config from its
//! metadata, the weights kept in their quantized block formats (Q4_K, Q8_0,
//! ...) behind [`Linear::Quantized`], float ones loaded like safetensors.
//!
//! llama.cpp's converter stores the q and k projections in Meta's original
//! row order, whose RoPE rotates interleaved pairs; this model rotates the
//! two halves of each head, as Hugging Face's checkpoints expect. The rows of
//! those two weights are put back in Hugging Face's order at load: rows are
//! whole blocks in every ggml format, so this moves bytes and loses nothing.

use std::borrow::Cow;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::weights::{LayerWeights, LlamaWeights};

/// An open `.gguf` file: its metadata, and its tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

/// The tokenizer a GGUF file carries (`tokenizer.ggml.*`), as plain data
/// for the engine's SentencePiece conversion.
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: `llama` for SentencePiece BPE.
    pub model: String,
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    /// SentencePiece's piece types: 1 normal, 2 unknown, 3 control,
    /// 4 user-defined, 5 unused, 6 byte.
    pub token_types: Vec<i32>,
    pub unk_id: Option<u32>,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// Whether SentencePiece's dummy-prefix space is added (`add_space_prefix`).
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`, a Jinja template, when the file has one.
    pub chat_template: Option<String>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| ModelError::UnreadableShard {
            path: path.to_path_buf(),
            message: format!("not a GGUF file: {e}"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u64(&self, key: &'static str) -> Result<Option<u64>> {
        self.meta(key).map(|v| as_u64(v, key)).transpose()
    }

    fn meta_f64(&self, key: &'static str) -> Result<Option<f64>> {
        self.meta(key)
            .map(|v| match v {
                Value::F32(x) => Ok(*x as f64),
                Value::F64(x) => Ok(*x),
                other => as_u64(other, key).map(|x| x as f64),
            })
            .transpose()
    }

    fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The model's shape from `llama.*` metadata, as transformers reads a
    /// `config.json` (same defaults, same validation).
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.meta_str("general.architecture").unwrap_or("llama");
        if arch != "llama" {
            return Err(ModelError::ConfigField {
                field: "general.architecture",
                message: format!("{arch:?}: only Llama GGUF files are supported"),
            });
        }
        let need = |key: &'static str| -> Result<usize> {
            self.meta_u64(key)?
                .map(|v| v as usize)
                .ok_or(ModelError::ConfigField {
                    field: key,
                    message: "missing from the GGUF metadata".into(),
                })
        };
        let hidden_size = need("llama.embedding_length")?;
        let num_attention_heads = need("llama.attention.head_count")?;
        let num_key_value_heads = self
            .meta_u64("llama.attention.head_count_kv")?
            .map_or(num_attention_heads, |v| v as usize);
        let head_dim = match self.meta_u64("llama.attention.key_length")? {
            Some(d) => d as usize,
            None => hidden_size / num_attention_heads.max(1),
        };
        let vocab_size = match self.meta_u64("llama.vocab_size")? {
            Some(v) => v as usize,
            None => match (
                self.meta("tokenizer.ggml.tokens"),
                self.content.tensor_infos.get("token_embd.weight"),
            ) {
                (Some(Value::Array(tokens)), _) => tokens.len(),
                (_, Some(info)) => info.shape.dims()[0],
                _ => need("llama.vocab_size")?,
            },
        };
        let rope_scaling_factor = match self.meta_str("llama.rope.scaling.type") {
            None | Some("none") => self.meta_f64("llama.rope.scale_linear")?.unwrap_or(1.0),
            Some("linear") => self.meta_f64("llama.rope.scaling.factor")?.unwrap_or(1.0),
            Some(other) => {
                return Err(ModelError::ConfigField {
                    field: "llama.rope.scaling.type",
                    message: format!("{other:?}: only linear RoPE scaling is supported"),
                })
            }
        };
        let cfg = LlamaConfig {
            hidden_size,
            intermediate_size: need("llama.feed_forward_length")?,
            num_hidden_layers: need("llama.block_count")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            rms_norm_eps: self
                .meta_f64("llama.attention.layer_norm_rms_epsilon")?
                .unwrap_or(1e-6),
            rope_theta: self.meta_f64("llama.rope.freq_base")?.unwrap_or(10_000.0),
            max_position_embeddings: self
                .meta_u64("llama.context_length")?
                .map_or(4096, |v| v as usize),
            // llama.cpp's converter leaves out `output.weight` when it is the embedding.
            tie_word_embeddings: !self.has_tensor("output.weight"),
            rope_scaling_factor,
            bos_token_id: self
                .meta_u64("tokenizer.ggml.bos_token_id")?
                .map(|v| v as u32),
            eos_token_ids: self
                .meta_u64("tokenizer.ggml.eos_token_id")?
                .map(|v| vec![v as u32])
                .unwrap_or_default(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The tokenizer's vocabulary and settings.
    pub fn vocab(&self) -> Result<GgufVocab> {
        let array = |key: &'static str| -> Result<&Vec<Value>> {
            match self.meta(key) {
                Some(Value::Array(values)) => Ok(values),
                _ => Err(ModelError::ConfigField {
                    field: key,
                    message: "missing from the GGUF metadata".into(),
                }),
            }
        };
        let tokens = array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(bad("tokenizer.ggml.tokens", "holds a non-string")),
            })
            .collect::<Result<Vec<_>>>()?;
        let scores = match self.meta("tokenizer.ggml.scores") {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(*x),
                    _ => Err(bad("tokenizer.ggml.scores", "holds a non-f32")),
                })
                .collect::<Result<Vec<_>>>()?,
            _ => vec![0.0; tokens.len()],
        };
        let token_types = match self.meta("tokenizer.ggml.token_type") {
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::I32(x) => Ok(*x),
                    other => as_u64(other, "tokenizer.ggml.token_type").map(|x| x as i32),
                })
                .collect::<Result<Vec<_>>>()?,
            _ => vec![1; tokens.len()],
        };
        if scores.len() != tokens.len() || token_types.len() != tokens.len() {
            return Err(bad(
                "tokenizer.ggml.scores",
                "tokens, scores and token types differ in length",
            ));
        }
        let id = |key: &'static str| -> Result<Option<u32>> {
            Ok(self.meta_u64(key)?.map(|v| v as u32))
        };
        let flag = |key: &str| match self.meta(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        };
        Ok(GgufVocab {
            model: self
                .meta_str("tokenizer.ggml.model")
                .unwrap_or("llama")
                .to_string(),
            tokens,
            scores,
            token_types,
            unk_id: id("tokenizer.ggml.unknown_token_id")?,
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token"),
            add_eos: flag("tokenizer.ggml.add_eos_token"),
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix"),
            chat_template: self.meta_str("tokenizer.chat_template").map(str::to_string),
        })
    }

    /// A tensor's raw blocks and format, checked against the expected shape.
    fn raw(&mut self, name: &str, shape: &[usize]) -> Result<Raw> {
        let info =
            self.content
                .tensor_infos
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor {
                    name: name.to_string(),
                    files: self.path.display().to_string(),
                })?;
        if info.shape.dims() != shape {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                expected: shape.to_vec(),
                actual: info.shape.dims().to_vec(),
            });
        }
        let q = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| ModelError::UnreadableShard {
                path: self.path.clone(),
                message: format!("tensor `{name}`: {e}"),
            })?;
        Ok(Raw {
            dtype: q.dtype(),
            rows: shape[0],
            cols: shape.iter().skip(1).product(),
            bytes: q.data()?.into_owned(),
        })
    }
}

/// One weight as stored: `rows` rows of `cols` values, each row whole blocks.
struct Raw {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
}

impl Raw {
    fn is_float(&self) -> bool {
        matches!(
            self.dtype,
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        )
    }

    fn qtensor(&self, device: &Device) -> Result<QTensor> {
        let storage = QStorage::from_data(Cow::Borrowed(&self.bytes), device, self.dtype)?;
        Ok(QTensor::new(storage, (self.rows, self.cols))?)
    }

    /// The values, as a dense tensor of `dtype` on `device`.
    fn dense(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.qtensor(&Device::Cpu)?.dequantize(&Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(device)?)
    }

    /// Rows from Meta's interleaved RoPE order back to Hugging Face's: in
    /// each head of `head_dim` rows, Hugging Face's row `t * head_dim/2 + j`
    /// is stored at `2j + t`.
    fn rows_to_hf_rope_order(mut self, heads: usize) -> Self {
        let row_bytes = self.bytes.len() / self.rows;
        let head_dim = self.rows / heads;
        let half = head_dim / 2;
        let mut out = Vec::with_capacity(self.bytes.len());
        for h in 0..heads {
            for t in 0..2 {
                for j in 0..half {
                    let src = h * head_dim + 2 * j + t;
                    out.extend_from_slice(&self.bytes[src * row_bytes..(src + 1) * row_bytes]);
                }
            }
        }
        self.bytes = out;
        self
    }
}

/// The projections of `parts`, concatenated on the output axis: one dense or
/// one quantized weight when they share a format, side by side otherwise.
fn fused(parts: Vec<Raw>, dtype: DType, device: &Device) -> Result<Linear> {
    if parts.iter().all(Raw::is_float) {
        let tensors = parts
            .iter()
            .map(|p| p.dense(dtype, device))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Linear::dense(Tensor::cat(&tensors, 0)?)?);
    }
    if parts.iter().all(|p| p.dtype == parts[0].dtype) {
        let joined = Raw {
            dtype: parts[0].dtype,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: parts[0].cols,
            bytes: parts.iter().flat_map(|p| p.bytes.iter().copied()).collect(),
        };
        return linear(joined, dtype, device);
    }
    Ok(Linear::Stacked(
        parts
            .into_iter()
            .map(|p| linear(p, dtype, device))
            .collect::<Result<Vec<_>>>()?,
    ))
}

fn linear(raw: Raw, dtype: DType, device: &Device) -> Result<Linear> {
    if raw.is_float() {
        return Ok(Linear::dense(raw.dense(dtype, device)?)?);
    }
    Ok(Linear::Quantized(QMatMul::from_qtensor(
        raw.qtensor(device)?,
    )?))
}

/// The weights of a GGUF file of shape `cfg`. Quantized projections stay
/// quantized; the embedding and norms are dequantized to `dtype` (a lookup
/// and a gain, read once per token).
pub fn load_weights(
    gguf: &mut GgufFile,
    cfg: &LlamaConfig,
    dtype: DType,
    device: &Device,
) -> Result<LlamaWeights> {
    let h = cfg.hidden_size;
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.kv_width();
    let inter = cfg.intermediate_size;
    let embed_raw = gguf.raw("token_embd.weight", &[cfg.vocab_size, h])?;
    let embed = embed_raw.dense(dtype, device)?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("blk.{i}");
        let q = gguf
            .raw(&format!("{p}.attn_q.weight"), &[q_out, h])?
            .rows_to_hf_rope_order(cfg.num_attention_heads);
        let k = gguf
            .raw(&format!("{p}.attn_k.weight"), &[kv_out, h])?
            .rows_to_hf_rope_order(cfg.num_key_value_heads);
        let v = gguf.raw(&format!("{p}.attn_v.weight"), &[kv_out, h])?;
        let o = gguf.raw(&format!("{p}.attn_output.weight"), &[h, q_out])?;
        let gate = gguf.raw(&format!("{p}.ffn_gate.weight"), &[inter, h])?;
        let up = gguf.raw(&format!("{p}.ffn_up.weight"), &[inter, h])?;
        let down = gguf.raw(&format!("{p}.ffn_down.weight"), &[h, inter])?;
        let input_norm = gguf.raw(&format!("{p}.attn_norm.weight"), &[h])?;
        let post_norm = gguf.raw(&format!("{p}.ffn_norm.weight"), &[h])?;
        layers.push(LayerWeights {
            input_norm: input_norm.dense(dtype, device)?.reshape(h)?,
            qkv: fused(vec![q, k, v], dtype, device)?,
            o: linear(o, dtype, device)?,
            post_norm: post_norm.dense(dtype, device)?.reshape(h)?,
            gate_up: fused(vec![gate, up], dtype, device)?,
            down: linear(down, dtype, device)?,
        });
    }
    let norm = gguf
        .raw("output_norm.weight", &[h])?
        .dense(dtype, device)?
        .reshape(h)?;
    let lm_head = if cfg.tie_word_embeddings {
        linear(embed_raw, dtype, device)?
    } else {
        linear(
            gguf.raw("output.weight", &[cfg.vocab_size, h])?,
            dtype,
            device,
        )?
    };
    Ok(LlamaWeights {
        embed,
        layers,
        norm,
        lm_head,
    })
}

fn as_u64(value: &Value, key: &'static str) -> Result<u64> {
    match value {
        Value::U8(v) => Ok(*v as u64),
        Value::U16(v) => Ok(*v as u64),
        Value::U32(v) => Ok(*v as u64),
        Value::U64(v) => Ok(*v),
        Value::I8(v) if *v >= 0 => Ok(*v as u64),
        Value::I16(v) if *v >= 0 => Ok(*v as u64),
        Value::I32(v) if *v >= 0 => Ok(*v as u64),
        Value::I64(v) if *v >= 0 => Ok(*v as u64),
        other => Err(bad(key, &format!("{other:?} is not a count"))),
    }
}

fn bad(key: &'static str, message: &str) -> ModelError {
    ModelError::ConfigField {
        field: key,
        message: message.to_string(),
    }
}

/// The GGUF file `path` stands for: the file itself, or the only `.gguf` of
/// a directory that has no `config.json` (a Hugging Face layout wins).
pub fn gguf_path(path: &Path) -> Result<Option<PathBuf>> {
    if path.is_file() {
        let is_gguf = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        return Ok(is_gguf.then(|| path.to_path_buf()));
    }
    if !path.is_dir() || path.join("config.json").is_file() {
        return Ok(None);
    }
    let entries = std::fs::read_dir(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    found.sort();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(ModelError::UnreadableShard {
            path: path.to_path_buf(),
            message: format!(
                "{} GGUF files and no config.json: pass the one to serve ({})",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}
