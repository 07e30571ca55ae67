//! Token picks on the device: see `crate::sampling` for what is picked.

use super::{Held, MODULE, PTX};
use crate::sampling::RowPick;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{bail, Device, Result, Tensor};

/// Floats per row of the kernel's parameters (`PICK_PARAMS` in sampling.cuh).
const PARAMS: usize = 5;
/// Threads per row (`PICK_THREADS`).
const THREADS: u32 = 1024;

/// `logits: [rows, vocab]` f32 on the GPU → one id per row; only the ids
/// come back to the host.
pub fn pick_rows(logits: &Tensor, picks: &[RowPick]) -> Result<Vec<u32>> {
    let Device::Cuda(dev) = logits.device() else {
        bail!("pick_rows: the logits are not on a CUDA device")
    };
    let (rows, vocab) = logits.dims2()?;
    if rows != picks.len() {
        bail!("pick_rows: {rows} rows, {} picks", picks.len())
    }
    let logits = logits.contiguous()?;
    let held = Held::new(&logits, "logits");
    let l = held.view::<f32>()?;
    let params: Vec<f32> = picks
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
    b.arg(&l).arg(&params).arg(&scratch).arg(&out).arg(&vocab_i);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { b.launch(cfg) }.w()?;
    dev.clone_dtoh(&out)
}
