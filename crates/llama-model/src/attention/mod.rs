//! Paged attention: writing a step's keys/values into the block pool and
//! attending each query token to its own sequence's cached keys/values.
//!
//! Three implementations sit behind [`write_kv`] and [`paged_attention`]: a
//! fused CPU kernel (custom Candle ops reading the block tables directly), a
//! CUDA kernel (one launch for every token of the step, `kernels/llama.cu`)
//! and a plain-Candle path (gather + matmul) that runs on any device. The
//! last is the reference the fused kernels are tested against.

pub(crate) mod cpu;
mod generic;

use candle_core::{Device, Tensor};

use crate::error::Result;

/// Which implementation runs attention. `Auto` picks the fused kernel where one exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionImpl {
    #[default]
    Auto,
    /// Plain Candle ops only: gather + matmul attention, and no fused CUDA
    /// kernels for norms, RoPE or SwiGLU either. The reference, and the
    /// "before" of every fused-kernel benchmark.
    Generic,
    /// The fused kernels, with prompt attention on CUDA cores (the tiled
    /// kernel) instead of tensor cores: the "before" of the tensor-core
    /// prefill kernel. The same as `Auto` on the CPU.
    CudaCorePrefill,
}

impl std::str::FromStr for AttentionImpl {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "generic" => Ok(Self::Generic),
            "cuda-cores" => Ok(Self::CudaCorePrefill),
            other => Err(format!(
                "kernels: auto, generic or cuda-cores, not {other:?}"
            )),
        }
    }
}

/// One sequence's share of a step, as attention sees it.
#[derive(Debug, Clone)]
pub struct SeqAttention {
    /// First row of this sequence in the packed `[tokens, ...]` batch.
    pub q_start: usize,
    pub q_len: usize,
    /// Position of the first new token; the context after this step is `start_pos + q_len`.
    pub start_pos: usize,
    pub blocks: Vec<u32>,
}

impl SeqAttention {
    pub fn context_len(&self) -> usize {
        self.start_pos + self.q_len
    }
}

/// Per-step metadata shared by every layer.
pub struct AttentionMeta {
    pub seqs: Vec<SeqAttention>,
    /// Cache slot of each packed token.
    pub slot_mapping: Vec<u32>,
    pub block_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub imp: AttentionImpl,
    /// `[tokens, kv_width]` copies of the slots, for the generic scatter; built lazily once per step.
    scatter_index: std::sync::OnceLock<Tensor>,
    /// The step's metadata on the CUDA device, uploaded once for all layers.
    #[cfg(feature = "cuda")]
    cuda_meta: std::sync::OnceLock<crate::cuda_kernels::StepMeta>,
}

impl AttentionMeta {
    pub fn new(
        seqs: Vec<SeqAttention>,
        block_size: usize,
        num_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        imp: AttentionImpl,
    ) -> Self {
        let mut slot_mapping = Vec::with_capacity(seqs.iter().map(|s| s.q_len).sum());
        for s in &seqs {
            for p in s.start_pos..s.context_len() {
                slot_mapping
                    .push(s.blocks[p / block_size] * block_size as u32 + (p % block_size) as u32);
            }
        }
        Self {
            seqs,
            slot_mapping,
            block_size,
            num_heads,
            num_kv_heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            imp,
            scatter_index: std::sync::OnceLock::new(),
            #[cfg(feature = "cuda")]
            cuda_meta: std::sync::OnceLock::new(),
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.slot_mapping.len()
    }

    /// The same step with its device metadata given rather than uploaded:
    /// a CUDA graph's, kept in buffers that outlive the step.
    #[cfg(feature = "cuda")]
    pub(crate) fn with_cuda_meta(self, meta: crate::cuda_kernels::StepMeta) -> Self {
        let _ = self.cuda_meta.set(meta);
        self
    }

    fn use_fused(&self, device: &Device) -> bool {
        self.imp != AttentionImpl::Generic && device.is_cpu()
    }

    /// Whether this step runs the fused CPU kernels (attention and cache
    /// write; in f32 also add + RMSNorm and SwiGLU).
    pub fn use_cpu_kernels(&self, device: &Device) -> bool {
        self.use_fused(device)
    }

    /// Whether this step runs the fused CUDA kernels (attention, RoPE + cache
    /// write, add + RMSNorm, SwiGLU).
    pub fn use_cuda_kernels(&self, device: &Device) -> bool {
        cfg!(feature = "cuda") && self.imp != AttentionImpl::Generic && device.is_cuda()
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_meta(&self, device: &Device) -> Result<&crate::cuda_kernels::StepMeta> {
        if let Some(m) = self.cuda_meta.get() {
            return Ok(m);
        }
        let n = self.num_tokens();
        let mut positions = Vec::with_capacity(n);
        let mut tok_seq = Vec::with_capacity(n);
        for (i, s) in self.seqs.iter().enumerate() {
            positions.extend((s.start_pos..s.context_len()).map(|p| p as u32));
            tok_seq.extend(std::iter::repeat_n(i as u32, s.q_len));
        }
        let seqs: Vec<crate::cuda_kernels::StepSeq> = self
            .seqs
            .iter()
            .map(|s| crate::cuda_kernels::StepSeq {
                q_start: s.q_start,
                q_len: s.q_len,
                blocks: &s.blocks,
            })
            .collect();
        let m = crate::cuda_kernels::StepMeta::new(
            &positions,
            &self.slot_mapping,
            &tok_seq,
            &seqs,
            self.num_heads / self.num_kv_heads,
            device,
        )?;
        Ok(self.cuda_meta.get_or_init(|| m))
    }

    fn scatter_index(&self, device: &Device) -> Result<&Tensor> {
        if let Some(t) = self.scatter_index.get() {
            return Ok(t);
        }
        let width = self.num_kv_heads * self.head_dim;
        let t = Tensor::from_slice(&self.slot_mapping, (self.num_tokens(), 1), device)?
            .broadcast_as((self.num_tokens(), width))?
            .contiguous()?;
        Ok(self.scatter_index.get_or_init(|| t))
    }
}

/// Writes `k`, `v` (`[tokens, kv_heads, head_dim]`) into the caches at the step's slots.
pub fn write_kv(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    meta: &AttentionMeta,
) -> Result<()> {
    if meta.use_fused(k_cache.device()) {
        cpu::write_kv(k_cache, v_cache, k, v, meta)
    } else {
        generic::write_kv(k_cache, v_cache, k, v, meta)
    }
}

/// `q: [tokens, heads, head_dim]` → `[tokens, heads, head_dim]`, each token attending
/// causally to its own sequence's cached keys and values (written by [`write_kv`] first).
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMeta,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if meta.use_cuda_kernels(q.device()) {
        let step = meta.cuda_meta(q.device())?;
        return Ok(crate::cuda_kernels::paged_attention(
            q,
            k_cache,
            v_cache,
            step,
            meta.block_size,
            meta.scale,
            meta.imp == AttentionImpl::Auto,
        )?);
    }
    if meta.use_fused(q.device()) {
        cpu::paged_attention(q, k_cache, v_cache, meta)
    } else {
        generic::paged_attention(q, k_cache, v_cache, meta)
    }
}

#[cfg(test)]
mod tests;
