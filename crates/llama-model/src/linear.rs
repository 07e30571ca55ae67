//! The one linear-layer abstraction every projection goes through, so that a
//! quantized weight format can be added as a variant without a second forward.

use std::sync::Arc;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Module, Result, Tensor};

use crate::cpu_gemm::{PackedLinear, PackedWeight};

#[derive(Debug, Clone)]
pub enum Linear {
    /// A dense `[out_features, in_features]` weight, as Hugging Face stores it.
    Dense(Tensor),
    /// f32 on the CPU: the same weight packed once for the CPU GEMM
    /// (`cpu_gemm`), which beats a general GEMM that repacks it every call.
    PackedCpu(PackedLinear),
    /// A GGUF weight in one of ggml's block formats (Q4_K, Q8_0, ...), kept
    /// quantized: Candle's quantized matmul reads it as it is.
    Quantized(QMatMul),
    /// Projections fused on the output axis whose weights cannot be
    /// concatenated (quantized in different formats, as llama.cpp's mixed
    /// presets do): each runs on its own, outputs side by side.
    Stacked(Vec<Linear>),
}

impl Linear {
    /// Takes ownership of the weight: on the CPU in f32 it is packed and the
    /// original is dropped, so the weight is not held twice.
    pub fn dense(weight: Tensor) -> Result<Self> {
        if weight.device().is_cpu() && weight.dtype() == DType::F32 && weight.rank() == 2 {
            let packed = PackedWeight::pack(&weight)?;
            return Ok(Linear::PackedCpu(PackedLinear(Arc::new(packed))));
        }
        Ok(Linear::Dense(weight))
    }

    /// `x: [tokens, in] -> [tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::PackedCpu(p) => p.forward(x),
            // On CUDA this is cuBLAS. A first hand-written weight-streaming
            // kernel for decode batches measured slower on an H200 (6.94 vs
            // 6.65 ms per batch-1 step of a 7B, 14.1 vs 6.8 ms at batch 8):
            // one warp per four rows left most of the GPU idle on the
            // smaller projections. `forward_gemv` is the second attempt.
            Linear::Dense(w) => x.matmul(&w.t()?),
            // Candle's quantized matmul takes and gives f32.
            Linear::Quantized(q) => q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype()),
            Linear::Stacked(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&outs, outs[0].rank() - 1)
            }
        }
    }

    /// [`Linear::forward`], with `gemv` set: a decode step's few rows (up to
    /// four) by the weight-streaming CUDA kernel, which reads each weight
    /// once at close to the copy bandwidth, instead of cuBLAS. Anything the
    /// kernel does not take (more rows, the CPU, unaligned data) goes through
    /// `forward` as before.
    pub fn forward_gemv(&self, x: &Tensor, gemv: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (true, Linear::Dense(w)) = (gemv, self) {
            if let Some(y) = crate::cuda_kernels::skinny_matmul(x, w)? {
                return Ok(y);
            }
        }
        let _ = gemv;
        self.forward(x)
    }

    pub fn out_features(&self) -> usize {
        match self {
            Linear::Dense(w) => w.dims()[0],
            Linear::PackedCpu(p) => p.0.out_features(),
            Linear::Quantized(QMatMul::QTensor(q)) => q.shape().dims()[0],
            Linear::Quantized(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => w.dims()[0],
            Linear::Stacked(parts) => parts.iter().map(Linear::out_features).sum(),
        }
    }
}
