//! Rotary position embedding tables (Hugging Face's rotate-half layout).

use candle_core::{DType, Device, Tensor};

use crate::config::LlamaConfig;
use crate::error::Result;

/// `cos`/`sin` for every position up to the model's context, `[max_pos, head_dim / 2]`.
pub struct RopeTables {
    pub cos: Tensor,
    pub sin: Tensor,
    pub max_positions: usize,
    /// The same tables in f32 on the host, for the fused CPU kernel (empty
    /// on other devices).
    pub host_cos: Vec<f32>,
    pub host_sin: Vec<f32>,
}

impl RopeTables {
    pub fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let max_positions = cfg.max_position_embeddings;
        // Same as transformers: inv_freq in f32, linear scaling divides the position.
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / (cfg.rope_theta as f32).powf((2 * i) as f32 / cfg.head_dim as f32))
            .collect();
        let scale = 1.0 / cfg.rope_scaling_factor as f32;
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            let t = p as f32 * scale;
            for f in &inv_freq {
                let angle = t * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let (host_cos, host_sin) = if device.is_cpu() {
            (cos.clone(), sin.clone())
        } else {
            (Vec::new(), Vec::new())
        };
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?.to_dtype(dtype)?,
            max_positions,
            host_cos,
            host_sin,
        })
    }

    /// The rows for `positions`, ready for `rope_thd`.
    pub fn gather(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.cos.index_select(positions, 0)?.contiguous()?,
            self.sin.index_select(positions, 0)?.contiguous()?,
        ))
    }
}
