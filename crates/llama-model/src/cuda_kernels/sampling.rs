//! Token picks on the device: see `crate::sampling` for what is picked.

use super::{cuda_view, MODULE, PTX};
use crate::sampling::RowPick;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Floats per row of the kernel's parameters (`PICK_PARAMS` in sampling.cuh).
const PARAMS: usize = 5;
/// Threads per row (`PICK_THREADS`).
const THREADS: u32 = 1024;

struct Pick<'a> {
    picks: &'a [RowPick],
}

impl CustomOp1 for Pick<'_> {
    fn name(&self) -> &'static str {
        "llama-pick-rows"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("llama-pick-rows runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &s.device;
        let &[rows, vocab] = l.dims() else {
            bail!("pick_rows: logits must be [rows, vocab]")
        };
        if rows != self.picks.len() {
            bail!("pick_rows: {rows} rows, {} picks", self.picks.len())
        }
        let l_v = cuda_view::<f32>(s, l, "logits")?;
        let params: Vec<f32> = self
            .picks
            .iter()
            .flat_map(|p| [p.temperature, p.top_k as f32, p.top_p, p.min_p, p.u])
            .collect();
        debug_assert_eq!(params.len(), rows * PARAMS);
        let params = dev.clone_htod(&params)?;
        // SAFETY: the kernel writes each row's weights before reading them, and
        // every row's id.
        let scratch = unsafe { dev.alloc::<f32>(rows * vocab)? };
        let out = unsafe { dev.alloc::<u32>(rows)? };
        let func = dev.get_or_load_custom_func("pick_rows_f32", MODULE, PTX)?;
        let vocab_i = vocab as i32;
        let mut b = func.builder();
        b.arg(&l_v)
            .arg(&params)
            .arg(&scratch)
            .arg(&out)
            .arg(&vocab_i);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from(rows),
        ))
    }
}

/// `logits: [rows, vocab]` on the GPU → one u32 id per row, left on the
/// device: reading it back (the step's one sync) is the caller's choice of
/// moment.
pub fn pick_rows(logits: &Tensor, picks: &[RowPick]) -> Result<Tensor> {
    if !logits.device().is_cuda() {
        bail!("pick_rows: the logits are not on a CUDA device")
    }
    logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1_no_bwd(&Pick { picks })
}
