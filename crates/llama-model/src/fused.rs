//! The per-layer building blocks of the forward pass, each with one entry
//! point: a fused kernel where the step runs on CUDA, or on the CPU in f32,
//! with fused kernels on; plain Candle (plus the CPU attention kernels)
//! everywhere else. The forward itself is written once against these.

use candle_core::Tensor;

use crate::attention::{self, AttentionMeta};
use crate::error::Result;
use crate::rope::RopeTables;

/// `(x + delta, rms_norm(x + delta) * weight)`: the new residual stream and
/// the next sublayer's input.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
    meta: &AttentionMeta,
) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if meta.use_cuda_kernels(x.device()) {
        return Ok(crate::cuda_kernels::add_rms_norm(x, delta, weight, eps)?);
    }
    if meta.use_cpu_kernels(x.device()) && crate::cpu_kernels::applies(x) {
        return Ok(crate::cpu_kernels::add_rms_norm(x, delta, weight, eps)?);
    }
    let sum = (x + delta)?;
    let normed = candle_nn::ops::rms_norm(&sum, weight, eps)?;
    Ok((sum, normed))
}

/// `[rows, 2 * inter]` (gate, then up) → `silu(gate) * up`.
pub fn swiglu(gate_up: &Tensor, meta: &AttentionMeta) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if meta.use_cuda_kernels(gate_up.device()) {
        return Ok(crate::cuda_kernels::swiglu(gate_up)?);
    }
    if meta.use_cpu_kernels(gate_up.device()) && crate::cpu_kernels::applies(gate_up) {
        return Ok(crate::cpu_kernels::swiglu(gate_up)?);
    }
    Ok(candle_nn::ops::swiglu(gate_up)?)
}

/// Rotary-embedded cos/sin rows of the step's positions, for the unfused path
/// (the CUDA kernel reads the full tables by position instead).
pub struct StepRope {
    rows: Option<(Tensor, Tensor)>,
}

impl StepRope {
    pub fn new(rope: &RopeTables, positions: &Tensor, meta: &AttentionMeta) -> Result<Self> {
        let fused = meta.use_cuda_kernels(positions.device())
            || use_cpu_rope(rope, positions.device(), meta);
        let rows = if fused {
            None
        } else {
            Some(rope.gather(positions)?)
        };
        Ok(Self { rows })
    }
}

/// The fused CPU RoPE + cache write applies: f32 activations on the CPU with
/// fused kernels on.
fn use_cpu_rope(rope: &RopeTables, device: &candle_core::Device, meta: &AttentionMeta) -> bool {
    meta.use_cpu_kernels(device) && rope.cos.dtype() == candle_core::DType::F32
}

/// Splits the fused QKV projection `[n, (h + 2 kvh) d]`, applies RoPE to q
/// and k, writes k and v into this layer's cache, and returns q `[n, h, d]`.
pub fn rope_and_write_kv(
    qkv: &Tensor,
    rope: &RopeTables,
    step_rope: &StepRope,
    caches: (&Tensor, &Tensor),
    meta: &AttentionMeta,
) -> Result<Tensor> {
    let (h, kvh, d) = (meta.num_heads, meta.num_kv_heads, meta.head_dim);
    let (k_cache, v_cache) = caches;
    let Some((cos, sin)) = &step_rope.rows else {
        if use_cpu_rope(rope, qkv.device(), meta) {
            let rows = attention::cpu::RopeRows {
                cos: &rope.host_cos,
                sin: &rope.host_sin,
            };
            return attention::cpu::rope_write_kv(qkv, &rows, caches, meta);
        }
        #[cfg(feature = "cuda")]
        {
            let step = meta.cuda_meta(qkv.device())?;
            return Ok(crate::cuda_kernels::rope_write_kv(
                qkv,
                &rope.cos,
                &rope.sin,
                step,
                k_cache,
                v_cache,
                [h, kvh, d],
            )?);
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = rope;
            unreachable!("rope rows are gathered whenever the CUDA kernels are off");
        }
    };
    let n = qkv.dims()[0];
    let (q_width, kv_width) = (h * d, kvh * d);
    let q = qkv
        .narrow(1, 0, q_width)?
        .contiguous()?
        .reshape((1, n, h, d))?;
    let k = qkv
        .narrow(1, q_width, kv_width)?
        .contiguous()?
        .reshape((1, n, kvh, d))?;
    let v = qkv
        .narrow(1, q_width + kv_width, kv_width)?
        .reshape((n, kvh, d))?;
    let q = candle_nn::rotary_emb::rope_thd(&q, cos, sin)?.reshape((n, h, d))?;
    let k = candle_nn::rotary_emb::rope_thd(&k, cos, sin)?.reshape((n, kvh, d))?;
    attention::write_kv(k_cache, v_cache, &k, &v, meta)?;
    Ok(q)
}
