//! Decode projections of a few rows by the weight-streaming kernel
//! (`kernels/skinny.cuh`), where cuBLAS leaves bandwidth unused.

use super::{cuda_view, suffix, Held, MODULE, PTX};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Most activation rows the kernel takes; must match SKINNY_MAX_M in skinny.cuh.
pub const SKINNY_MAX_M: usize = 4;
/// Weight rows per block and threads per block (SKINNY_ROWS, SKINNY_WARPS * 32).
const SKINNY_ROWS: usize = 4;
const SKINNY_THREADS: u32 = 256;

/// `x · wᵀ` for `x: [m, k]`, `w: [n, k]`.
struct Skinny<'a> {
    w: &'a Tensor,
}

impl Skinny<'_> {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev: &CudaDevice = &x.device;
        let &[m, k] = l.dims() else {
            bail!("skinny matmul: x must be [rows, in_features]")
        };
        let n = self.w.dims()[0];
        let w = Held::new(self.w, "weight");
        let (x_v, w_v) = (cuda_view::<T>(x, l, "x")?, w.view::<T>()?);
        let out = unsafe { dev.alloc::<T>(m * n)? };
        let func = dev.get_or_load_custom_func(
            &format!("skinny_matmul_m{m}_{}", suffix(x.dtype())?),
            MODULE,
            PTX,
        )?;
        let (n_i, k_i) = (n as i32, k as i32);
        let mut b = func.builder();
        b.arg(&x_v).arg(&w_v).arg(&out).arg(&n_i).arg(&k_i);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(SKINNY_ROWS) as u32, 1, 1),
            block_dim: (SKINNY_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((m, n)),
        ))
    }
}
cuda_op1!(Skinny, "llama-skinny-matmul");

/// Whether a contiguous tensor's first element is 16-byte aligned (the
/// kernel's vector loads; allocations themselves are).
fn aligned(t: &Tensor) -> bool {
    t.is_contiguous() && (t.layout().start_offset() * t.dtype().size_in_bytes()).is_multiple_of(16)
}

/// `x · wᵀ` (`x: [m, k]`, `w: [n, k]`) by the weight-streaming kernel, or
/// `None` where it does not apply: more than [`SKINNY_MAX_M`] rows, not on
/// CUDA, other dtypes, `k` not a whole number of 16-byte vectors, unaligned.
pub fn skinny_matmul(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let &[m, k] = x.dims() else {
        return Ok(None);
    };
    let vector = 16 / x.dtype().size_in_bytes().max(1);
    let applies = (1..=SKINNY_MAX_M).contains(&m)
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && w.dtype() == x.dtype()
        && w.rank() == 2
        && w.dims()[1] == k
        && k.is_multiple_of(vector)
        && aligned(w);
    if !applies {
        return Ok(None);
    }
    let x = x.contiguous()?;
    if !aligned(&x) {
        return Ok(None);
    }
    Ok(Some(x.apply_op1_no_bwd(&Skinny { w })?))
}
