//! Fused per-token CPU kernels for f32: residual add + RMSNorm in one pass and
//! SwiGLU over the fused gate/up projection.
//!
//! Candle runs each of these as several ops, each a full pass over memory
//! with its own allocation, and its `silu` calls the scalar `expf` per
//! element: together 13% of a 128-token prefill of the 134M model. Here each
//! is one pass, parallel over rows, with a vectorised `exp` under AVX2.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Below this many elements a kernel runs on the calling thread: waking the
/// pool costs more than a decode step's few rows.
const PARALLEL_MIN: usize = 1 << 15;

/// The elements a contiguous layout covers (the CPU custom ops take no
/// strided inputs; their callers make them contiguous).
pub(crate) fn contiguous<'a, T>(
    data: &'a [T],
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what} must be contiguous"),
    }
}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        bail!("{what}: fused CPU kernels are f32 only")
    };
    contiguous(data, l, what)
}

/// Splits `out` into rows of `width` and runs `f(row_index, row)` on each,
/// in parallel when the work is large enough to pay for it.
fn for_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if out.len() >= PARALLEL_MIN {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    } else {
        out.chunks_mut(width)
            .enumerate()
            .for_each(|(r, row)| f(r, row));
    }
}

struct AddRmsNorm {
    eps: f32,
}

/// One row: `sum = x + delta` and `normed = rms_norm(sum) * weight`.
#[inline(always)]
fn add_rms_norm_row(
    x: &[f32],
    delta: &[f32],
    w: &[f32],
    eps: f32,
    sum: &mut [f32],
    normed: &mut [f32],
) {
    // Eight partial sums: the compiler may not reorder one running sum.
    let mut sq = [0f32; 8];
    for (i, ((s, a), b)) in sum.iter_mut().zip(x).zip(delta).enumerate() {
        *s = a + b;
        sq[i % 8] += *s * *s;
    }
    let mean = sq.iter().sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for ((n, s), g) in normed.iter_mut().zip(sum.iter()).zip(w) {
        *n = s * scale * g;
    }
}

impl AddRmsNorm {
    fn run(&self, x: &[f32], delta: &[f32], w: &[f32]) -> Vec<f32> {
        let hidden = w.len();
        let rows = x.len() / hidden;
        // [2, rows, hidden]: the sums, then the normed rows.
        let mut out = vec![0f32; 2 * x.len()];
        let (sums, normed) = out.split_at_mut(x.len());
        let eps = self.eps;
        let simd = has_avx2_fma();
        let body = |r: usize, pair: (&mut [f32], &mut [f32])| {
            let (xr, dr) = (
                &x[r * hidden..(r + 1) * hidden],
                &delta[r * hidden..(r + 1) * hidden],
            );
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2 and FMA were detected on this CPU.
                unsafe { avx2::add_rms_norm_row(xr, dr, w, eps, pair.0, pair.1) };
                return;
            }
            let _ = simd;
            add_rms_norm_row(xr, dr, w, eps, pair.0, pair.1);
        };
        if x.len() >= PARALLEL_MIN {
            sums.par_chunks_mut(hidden)
                .zip(normed.par_chunks_mut(hidden))
                .enumerate()
                .for_each(|(r, pair)| body(r, pair));
        } else {
            sums.chunks_mut(hidden)
                .zip(normed.chunks_mut(hidden))
                .enumerate()
                .for_each(|(r, pair)| body(r, pair));
        }
        debug_assert_eq!(rows * hidden, x.len());
        out
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "llama-cpu-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, hidden) = l1.shape().dims2()?;
        if l2.shape().dims2()? != (rows, hidden) || l3.shape().dims1()? != hidden {
            bail!("add_rms_norm: x, delta [rows, hidden] and weight [hidden] disagree")
        }
        let out = self.run(
            contiguous_f32(s1, l1, "x")?,
            contiguous_f32(s2, l2, "delta")?,
            contiguous_f32(s3, l3, "norm weight")?,
        );
        Ok((CpuStorage::F32(out), Shape::from((2, rows, hidden))))
    }
}

/// `(x + delta, rms_norm(x + delta) * weight)` for CPU f32 `[rows, hidden]`.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> candle_core::Result<(Tensor, Tensor)> {
    let both = x.contiguous()?.apply_op3_no_bwd(
        &delta.contiguous()?,
        &weight.contiguous()?,
        &AddRmsNorm { eps },
    )?;
    Ok((both.get(0)?, both.get(1)?))
}

struct Swiglu;

/// One row: `silu(gate) * up`.
#[inline(always)]
fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

impl CustomOp1 for Swiglu {
    fn name(&self) -> &'static str {
        "llama-cpu-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, width) = l.shape().dims2()?;
        if width % 2 != 0 {
            bail!("swiglu: gate/up width {width} is odd")
        }
        let x = contiguous_f32(s, l, "gate_up")?;
        let inter = width / 2;
        let mut out = vec![0f32; rows * inter];
        let simd = has_avx2_fma();
        for_rows(&mut out, inter, |r, row| {
            let (gate, up) = x[r * width..(r + 1) * width].split_at(inter);
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: AVX2 and FMA were detected on this CPU.
                unsafe { avx2::swiglu_row(gate, up, row) };
                return;
            }
            let _ = simd;
            swiglu_row(gate, up, row);
        });
        Ok((CpuStorage::F32(out), Shape::from((rows, inter))))
    }
}

/// `[rows, 2 * inter]` (gate, then up) → `silu(gate) * up`, CPU f32.
pub fn swiglu(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    gate_up.contiguous()?.apply_op1_no_bwd(&Swiglu)
}

/// Whether these kernels take tensors of this kind.
pub fn applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.rank() == 2
}

/// Whether this CPU runs the AVX2 kernels of the crate (GEMM, attention,
/// per-token ops): AVX2, FMA and F16C, which every AVX2 CPU has. Checked at
/// run time, so one binary runs everywhere; the answer is cached by std.
pub(crate) fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    /// The portable row, compiled for AVX2 (its loops vectorise as written).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn add_rms_norm_row(
        x: &[f32],
        delta: &[f32],
        w: &[f32],
        eps: f32,
        sum: &mut [f32],
        normed: &mut [f32],
    ) {
        super::add_rms_norm_row(x, delta, w, eps, sum, normed)
    }

    /// `e^x` for eight lanes: Cephes' range reduction and degree-5
    /// polynomial (relative error about 2e-7 over the f32 range), clamped so
    /// that large inputs saturate instead of overflowing the exponent.
    ///
    /// # Safety
    /// The caller must be compiled with AVX2 and FMA.
    #[inline(always)]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(
            _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
            _mm256_set1_ps(88.3),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        // x - n ln 2, with ln 2 in two parts so the product is exact.
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let r2 = _mm256_mul_ps(r, r);
        let p = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(p, _mm256_castsi256_ps(pow2))
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn swiglu_row(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let inter = out.len().min(gate.len()).min(up.len());
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= inter {
            let g = _mm256_loadu_ps(gate.as_ptr().add(i));
            let u = _mm256_loadu_ps(up.as_ptr().add(i));
            let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            let silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_mul_ps(silu, u));
            i += 8;
        }
        super::swiglu_row(&gate[i..], &up[i..], &mut out[i..]);
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn swiglu_matches_candle_including_saturated_inputs() {
        // Odd widths exercise the scalar tail; the ±100 columns the clamps.
        for (rows, inter) in [(1, 8), (3, 13), (70, 1000)] {
            let mut gu = Tensor::randn(0f32, 4.0, (rows, 2 * inter), &Device::Cpu).unwrap();
            if inter >= 8 {
                let big = Tensor::new(&[100f32, -100.0, 0.0, -0.0], &Device::Cpu).unwrap();
                let edge = big.broadcast_as((rows, 4)).unwrap();
                gu = Tensor::cat(&[&edge, &gu.narrow(1, 4, 2 * inter - 4).unwrap()], 1).unwrap();
            }
            let want = candle_nn::ops::swiglu(&gu).unwrap();
            let got = super::swiglu(&gu).unwrap();
            let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
            let scale: f32 = scale.to_scalar().unwrap();
            let diff = max_diff(&want, &got);
            assert!(diff <= 1e-6 * scale.max(1.0), "{rows}x{inter}: {diff}");
        }
    }

    #[test]
    fn add_rms_norm_matches_candle() {
        for (rows, hidden) in [(1, 64), (5, 77), (50, 768)] {
            let x = Tensor::randn(0f32, 1.0, (rows, hidden), &Device::Cpu).unwrap();
            let d = Tensor::randn(0f32, 1.0, (rows, hidden), &Device::Cpu).unwrap();
            let w = Tensor::randn(1f32, 0.1, hidden, &Device::Cpu).unwrap();
            let (sum, normed) = super::add_rms_norm(&x, &d, &w, 1e-5).unwrap();
            let want_sum = (&x + &d).unwrap();
            let want_normed = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5).unwrap();
            assert_eq!(max_diff(&sum, &want_sum), 0.0);
            assert!(max_diff(&normed, &want_normed) < 1e-5, "{rows}x{hidden}");
        }
    }
}
