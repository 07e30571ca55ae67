//! Per-token kernels: RoPE + KV-cache write, residual add + RMSNorm, SwiGLU.

use super::{cuda_view, dims_i32, suffix, Held, StepMeta, MODULE, PTX};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// RoPE on q and k of a fused QKV row, k/v into the cache, rotated q out.
struct RopeWriteKv<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    meta: &'a StepMeta,
    k_cache: &'a Tensor,
    v_cache: &'a Tensor,
    heads: [usize; 3],
}

impl RopeWriteKv<'_> {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        qkv: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev: &CudaDevice = &qkv.device;
        let [h, kvh, d] = self.heads;
        let n = l.dims()[0];
        let (cos, sin) = (
            Held::new(self.cos, "rope cos"),
            Held::new(self.sin, "rope sin"),
        );
        let pos = Held::new(&self.meta.positions, "positions");
        let slots = Held::new(&self.meta.slots, "slots");
        let (kc, vc) = (
            Held::new(self.k_cache, "k cache"),
            Held::new(self.v_cache, "v cache"),
        );
        let qkv_v = cuda_view::<T>(qkv, l, "qkv")?;
        let (cos_v, sin_v) = (cos.view::<T>()?, sin.view::<T>()?);
        let (pos_v, slots_v) = (pos.view::<u32>()?, slots.view::<u32>()?);
        let (kc_v, vc_v) = (kc.view::<T>()?, vc.view::<T>()?);
        let out = unsafe { dev.alloc::<T>(n * h * d)? };
        let func = dev.get_or_load_custom_func(
            &format!("rope_write_kv_{}", suffix(qkv.dtype())?),
            MODULE,
            PTX,
        )?;
        let dims = dims_i32(&[h, kvh, d]);
        let mut b = func.builder();
        b.arg(&qkv_v)
            .arg(&cos_v)
            .arg(&sin_v)
            .arg(&pos_v)
            .arg(&slots_v);
        b.arg(&out).arg(&kc_v).arg(&vc_v);
        b.arg(&dims[0]).arg(&dims[1]).arg(&dims[2]);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (((h + kvh) * d / 2).clamp(32, 256) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, h, d)),
        ))
    }
}
cuda_op1!(RopeWriteKv, "llama-rope-write-kv");

/// `qkv: [n, (h + 2 kvh) d]` → rotated `q: [n, h, d]`; k and v land in the caches.
#[allow(clippy::too_many_arguments)]
pub fn rope_write_kv(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    meta: &StepMeta,
    k_cache: &Tensor,
    v_cache: &Tensor,
    heads: [usize; 3],
) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&RopeWriteKv {
        cos,
        sin,
        meta,
        k_cache,
        v_cache,
        heads,
    })
}

/// `x + delta` and its RMSNorm in one pass, as `[2, rows, hidden]`.
struct AddRmsNorm<'a> {
    delta: &'a Tensor,
    weight: &'a Tensor,
    eps: f32,
}

impl AddRmsNorm<'_> {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev: &CudaDevice = &x.device;
        let &[rows, hidden] = l.dims() else {
            bail!("add_rms_norm: x must be [rows, hidden]")
        };
        let delta = Held::new(self.delta, "residual delta");
        let weight = Held::new(self.weight, "norm weight");
        let x_v = cuda_view::<T>(x, l, "x")?;
        let (delta_v, weight_v) = (delta.view::<T>()?, weight.view::<T>()?);
        let out = unsafe { dev.alloc::<T>(2 * rows * hidden)? };
        let func = dev.get_or_load_custom_func(
            &format!("add_rms_norm_{}", suffix(x.dtype())?),
            MODULE,
            PTX,
        )?;
        let ints = dims_i32(&[rows, hidden]);
        let mut b = func.builder();
        b.arg(&x_v).arg(&delta_v).arg(&weight_v).arg(&out);
        b.arg(&ints[0]).arg(&ints[1]).arg(&self.eps);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (hidden.div_ceil(32 * 4).clamp(1, 32) as u32 * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((2, rows, hidden)),
        ))
    }
}
cuda_op1!(AddRmsNorm, "llama-add-rms-norm");

/// `(x + delta, rms_norm(x + delta) * weight)`.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    if x.dims() != delta.dims() {
        bail!(
            "add_rms_norm: x {:?} and delta {:?} differ",
            x.dims(),
            delta.dims()
        );
    }
    let delta = delta.contiguous()?;
    let both = x.contiguous()?.apply_op1_no_bwd(&AddRmsNorm {
        delta: &delta,
        weight,
        eps,
    })?;
    Ok((both.get(0)?, both.get(1)?))
}

struct Swiglu<'a>(std::marker::PhantomData<&'a ()>);

impl Swiglu<'_> {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev: &CudaDevice = &x.device;
        let &[rows, width] = l.dims() else {
            bail!("swiglu: input must be [rows, 2 * intermediate]")
        };
        let inter = width / 2;
        let x_v = cuda_view::<T>(x, l, "gate/up")?;
        let out = unsafe { dev.alloc::<T>(rows * inter)? };
        let func =
            dev.get_or_load_custom_func(&format!("swiglu_{}", suffix(x.dtype())?), MODULE, PTX)?;
        let ints = dims_i32(&[rows, inter]);
        let mut b = func.builder();
        b.arg(&x_v).arg(&out).arg(&ints[0]).arg(&ints[1]);
        let total = (rows * inter) as u32;
        let cfg = LaunchConfig {
            grid_dim: (total.div_ceil(256).min(65535), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((rows, inter)),
        ))
    }
}
cuda_op1!(Swiglu, "llama-swiglu");

/// `[rows, 2 * inter]` (gate then up) → `silu(gate) * up`.
pub fn swiglu(gate_up: &Tensor) -> Result<Tensor> {
    gate_up
        .contiguous()?
        .apply_op1_no_bwd(&Swiglu(std::marker::PhantomData))
}
