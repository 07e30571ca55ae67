//! The Llama forward pass over a batch of sequences, each at its own position.

use candle_core::{DType, Device, Tensor};

use crate::attention::{self, AttentionImpl, AttentionMeta, SeqAttention};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::fused;
use crate::kv::{BlockTable, KvCache};
use crate::loader::CheckpointWeights;
use crate::profile;
use crate::rope::RopeTables;
use crate::weights::LlamaWeights;

/// One sequence's contribution to a step: a prompt chunk or a single decode token.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`: the number of tokens already in the cache for this sequence.
    pub start_pos: usize,
    /// Must already hold `start_pos + tokens.len()` tokens.
    pub block_table: &'a BlockTable,
    /// Also return the logits of every position of this chunk (prompt logprobs).
    pub all_logits: bool,
}

#[derive(Debug, Clone, Default)]
pub struct BatchInput<'a> {
    pub seqs: Vec<SeqChunk<'a>>,
}

impl<'a> BatchInput<'a> {
    pub fn new(seqs: Vec<SeqChunk<'a>>) -> Self {
        Self { seqs }
    }

    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// Logits of a step, `[rows, vocab]` in f32: one row per sequence (its last
/// position), or one per position for sequences that asked for all of them.
pub struct Logits {
    pub values: Tensor,
    /// Row of each sequence's last position.
    pub last_row: Vec<usize>,
    /// First row and row count of each sequence's all-position logits, if asked.
    pub all_rows: Vec<Option<(usize, usize)>>,
}

impl Logits {
    /// Each sequence's last-position logits, `[num_seqs, vocab]`.
    pub fn last(&self) -> Result<Tensor> {
        let idx: Vec<u32> = self.last_row.iter().map(|&r| r as u32).collect();
        let n = idx.len();
        let idx = Tensor::from_vec(idx, n, self.values.device())?;
        Ok(self.values.index_select(&idx, 0)?)
    }
}

/// How to build a [`LlamaModel`].
#[derive(Debug, Clone, Copy)]
pub struct ModelOptions {
    pub dtype: DType,
    pub attention: AttentionImpl,
    /// Decode projections of up to four rows by the weight-streaming CUDA
    /// kernel instead of cuBLAS ([`crate::linear::Linear::forward_gemv`]).
    /// Off until measured faster on a GPU; no effect on the CPU.
    pub gemv: bool,
}

impl Default for ModelOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            attention: AttentionImpl::Auto,
            gemv: false,
        }
    }
}

/// Stateless weights + RoPE tables. KV memory lives in a [`KvCache`] passed to [`LlamaModel::forward`].
pub struct LlamaModel {
    cfg: LlamaConfig,
    weights: LlamaWeights,
    rope: RopeTables,
    device: Device,
    options: ModelOptions,
}

impl LlamaModel {
    /// Loads `config.json` and the safetensors weights of a local model directory.
    /// A Hugging Face directory, or a GGUF file (or a directory holding
    /// only one, see [`crate::gguf::gguf_path`]).
    pub fn load(dir: &std::path::Path, device: &Device, options: ModelOptions) -> Result<Self> {
        if let Some(path) = crate::gguf::gguf_path(dir)? {
            let mut gguf = crate::gguf::GgufFile::open(&path)?;
            let cfg = gguf.config()?;
            let weights = crate::gguf::load_weights(&mut gguf, &cfg, options.dtype, device)?;
            return Self::from_weights(cfg, weights, device, options);
        }
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let st = CheckpointWeights::open_dir(dir)?;
        let weights = LlamaWeights::from_safetensors(&cfg, &st, options.dtype, device)?;
        Self::from_weights(cfg, weights, device, options)
    }

    /// A model of shape `cfg` with seeded random weights made on `device`.
    pub fn random(
        cfg: LlamaConfig,
        seed: u64,
        device: &Device,
        options: ModelOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let weights = LlamaWeights::random(&cfg, seed, options.dtype, device)?;
        Self::from_weights(cfg, weights, device, options)
    }

    pub fn from_weights(
        cfg: LlamaConfig,
        weights: LlamaWeights,
        device: &Device,
        options: ModelOptions,
    ) -> Result<Self> {
        let rope = RopeTables::new(&cfg, options.dtype, device)?;
        Ok(Self {
            cfg,
            weights,
            rope,
            device: device.clone(),
            options,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.options.dtype
    }

    pub fn attention(&self) -> AttentionImpl {
        self.options.attention
    }

    /// Same model, other attention implementation (tests compare the two).
    pub fn set_attention(&mut self, imp: AttentionImpl) {
        self.options.attention = imp;
    }

    /// A KV cache shaped for this model on its device.
    pub fn new_kv_cache(&self, spec: &crate::kv::KvCacheSpec) -> Result<KvCache> {
        KvCache::new(&self.cfg, spec, self.options.dtype, &self.device)
    }

    pub(crate) fn check(&self, batch: &BatchInput, kv: &KvCache) -> Result<()> {
        if batch.seqs.is_empty() {
            return Err(ModelError::BadBatch("no sequences".into()));
        }
        for (i, s) in batch.seqs.iter().enumerate() {
            if s.tokens.is_empty() {
                return Err(ModelError::BadBatch(format!("sequence {i} has no tokens")));
            }
            let end = s.start_pos + s.tokens.len();
            if end > self.rope.max_positions {
                return Err(ModelError::BadBatch(format!(
                    "sequence {i} reaches position {end}, past the model's {} positions",
                    self.rope.max_positions
                )));
            }
            if s.block_table.capacity(kv.block_size()) < end {
                return Err(ModelError::BadBatch(format!(
                    "sequence {i}: block table holds {} tokens, step needs {end}",
                    s.block_table.capacity(kv.block_size())
                )));
            }
            if s.block_table
                .blocks()
                .iter()
                .any(|&b| b as usize >= kv.num_blocks())
            {
                return Err(ModelError::BadBatch(format!(
                    "sequence {i}: block id outside the pool"
                )));
            }
            if let Some(&bad) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size)
            {
                return Err(ModelError::BadBatch(format!(
                    "token id {bad} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// One batched step: writes the new tokens' keys/values into `kv` and
    /// returns next-token logits.
    pub fn forward(&self, batch: &BatchInput, kv: &KvCache) -> Result<Logits> {
        self.check(batch, kv)?;
        let cfg = &self.cfg;
        let n = batch.num_tokens();
        let (h, kvh, d) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );

        let mut tokens = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        let mut seqs = Vec::with_capacity(batch.seqs.len());
        let mut rows = Vec::new();
        let mut last_row = Vec::with_capacity(batch.seqs.len());
        let mut all_rows = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            let q_start = tokens.len();
            tokens.extend_from_slice(s.tokens);
            positions.extend((s.start_pos..s.start_pos + s.tokens.len()).map(|p| p as u32));
            seqs.push(SeqAttention {
                q_start,
                q_len: s.tokens.len(),
                start_pos: s.start_pos,
                blocks: s.block_table.blocks().to_vec(),
            });
            if s.all_logits {
                all_rows.push(Some((rows.len(), s.tokens.len())));
                rows.extend((q_start..q_start + s.tokens.len()).map(|r| r as u32));
            } else {
                all_rows.push(None);
                rows.push((q_start + s.tokens.len() - 1) as u32);
            }
            last_row.push(rows.len() - 1);
        }
        let meta = AttentionMeta::new(seqs, kv.block_size(), h, kvh, d, self.options.attention);
        let ids = Tensor::from_vec(tokens, n, &self.device)?;
        let pos = Tensor::from_vec(positions, n, &self.device)?;
        let rows = if rows.len() == n {
            None
        } else {
            let num_rows = rows.len();
            Some(Tensor::from_vec(rows, num_rows, &self.device)?)
        };
        let values = self.run_layers(&ids, &pos, &meta, kv, rows.as_ref())?;
        Ok(Logits {
            values,
            last_row,
            all_rows,
        })
    }

    /// The layers over a step whose inputs are already on the device: token
    /// ids and positions `[n]`, and `rows`, the rows whose logits are wanted
    /// (all when `None`). Returns `[rows, vocab]` f32 logits. Does no
    /// host/device copy, so a CUDA graph can capture it.
    pub(crate) fn run_layers(
        &self,
        ids: &Tensor,
        pos: &Tensor,
        meta: &AttentionMeta,
        kv: &KvCache,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let n = ids.dims()[0];
        let (h, d) = (cfg.num_attention_heads, cfg.head_dim);
        let step_rope = fused::StepRope::new(&self.rope, pos, meta)?;
        let eps = cfg.rms_norm_eps as f32;
        let layers = &self.weights.layers;
        // The fused kernels' switch covers the GEMV too: `generic` is the
        // plain-Candle reference.
        let gemv = self.options.gemv && meta.use_cuda_kernels(&self.device);

        // The residual stream `x` and the next sublayer's normed input travel
        // together: each residual add is fused with the norm that follows it.
        profile::mark("step setup", &self.device);
        let mut x = self.weights.embed.index_select(ids, 0)?; // [n, hidden]
        let mut normed = candle_nn::ops::rms_norm(&x, &layers[0].input_norm, eps)?;
        for (layer_idx, layer) in layers.iter().enumerate() {
            profile::mark("norms", &self.device);
            let qkv = layer.qkv.forward_gemv(&normed, gemv)?; // [n, (h + 2 kvh) d]
            profile::mark("qkv matmul", &self.device);
            let caches = kv.layer(layer_idx);
            let q = fused::rope_and_write_kv(&qkv, &self.rope, &step_rope, caches, meta)?;
            profile::mark("rope + kv write", &self.device);
            let attn =
                attention::paged_attention(&q, caches.0, caches.1, meta)?.reshape((n, h * d))?;
            profile::mark("attention", &self.device);
            let attn_out = layer.o.forward_gemv(&attn, gemv)?;
            profile::mark("o matmul", &self.device);
            (x, normed) = fused::add_rms_norm(&x, &attn_out, &layer.post_norm, eps, meta)?;
            profile::mark("norms", &self.device);
            let gate_up = layer.gate_up.forward_gemv(&normed, gemv)?;
            profile::mark("gate_up matmul", &self.device);
            let act = fused::swiglu(&gate_up, meta)?;
            profile::mark("swiglu", &self.device);
            let mlp_out = layer.down.forward_gemv(&act, gemv)?;
            profile::mark("down matmul", &self.device);
            let next_norm = match layers.get(layer_idx + 1) {
                Some(next) => &next.input_norm,
                None => &self.weights.norm,
            };
            (x, normed) = fused::add_rms_norm(&x, &mlp_out, next_norm, eps, meta)?;
        }
        drop(x);
        let x = match rows {
            None => normed,
            Some(rows) => normed.index_select(rows, 0)?,
        };
        profile::mark("norms", &self.device);
        let values = self
            .weights
            .lm_head
            .forward_gemv(&x, gemv)?
            .to_dtype(DType::F32)?;
        profile::mark("lm head", &self.device);
        Ok(values)
    }
}
