//! Launches of the fused CUDA kernels in `kernels/` (PTX built by build.rs).
//!
//! Each op is a Candle `CustomOp1` on its main input; the other tensors it
//! reads (and, for the cache write, writes) ride in the op struct and are
//! reached through their storage. Everything stays on the device's one stream,
//! so no synchronisation is needed between these launches and Candle's own.

use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, CudaStorage, DType, Layout, Result, Storage, Tensor};

pub(super) const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/llama.ptx"));
pub(super) const MODULE: &str = "llama_serve_kernels";

pub(super) fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("fused CUDA kernels support f32, f16 and bf16, not {other:?}"),
    })
}

/// A tensor's storage, held read-locked while its device view is in use.
pub(super) struct Held<'a>(candle_core::StorageRef<'a>, &'a Layout, &'static str);

impl<'a> Held<'a> {
    pub(super) fn new(t: &'a Tensor, what: &'static str) -> Self {
        let (s, l) = t.storage_and_layout();
        Held(s, l, what)
    }

    pub(super) fn view<T: CudaDType + DeviceRepr>(&self) -> Result<CudaView<'_, T>> {
        let Storage::Cuda(s) = &*self.0 else {
            bail!("{} is not on the CUDA device", self.2)
        };
        cuda_view(s, self.1, self.2)
    }
}

pub(super) fn cuda_view<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        bail!("{what} must be contiguous")
    };
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

pub(super) fn dims_i32(v: &[usize]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

macro_rules! dispatch {
    ($self:ident, $storage:ident, $layout:ident) => {
        match $storage.dtype() {
            DType::F32 => $self.run::<f32>($storage, $layout),
            DType::F16 => $self.run::<f16>($storage, $layout),
            DType::BF16 => $self.run::<bf16>($storage, $layout),
            other => bail!("{}: unsupported dtype {other:?}", $self.name()),
        }
    };
}

macro_rules! cuda_op1 {
    ($ty:ident, $name:literal) => {
        impl CustomOp1 for $ty<'_> {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &Layout,
            ) -> Result<(candle_core::CpuStorage, Shape)> {
                bail!("{} runs on CUDA only", $name)
            }

            fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
                dispatch!(self, s, l)
            }
        }
    };
}

// After the macros: textual scoping makes them visible to these modules.
mod attention;
pub(crate) mod graphs;
mod matmul;
mod pointwise;
mod sampling;

pub use attention::{paged_attention, StepMeta, StepSeq, MAX_ATTN_WARPS};
pub use matmul::skinny_matmul;
pub use pointwise::{add_rms_norm, rope_write_kv, swiglu};
pub use sampling::pick_rows;
