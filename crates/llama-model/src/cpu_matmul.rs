//! `x · Wᵀ` for few rows of `x` on the CPU (f32 decode steps).
//!
//! gemm packs both operands into panels before multiplying. With 1–16 rows of
//! activations that packing of the weight matrix costs more than the product
//! itself: a decode step of 8 sequences took 4× the time of 1. Here each
//! weight row is read once, straight from the checkpoint layout, and dotted
//! with every activation row while it is in cache: the step stays
//! memory-bound, like a single-sequence GEMV, up to the point where gemm's
//! register blocking wins (measured crossover, see `SMALL_M_MAX`).

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Above this many rows gemm is faster (134M model, 2 cores: measured 16 vs 32).
pub const SMALL_M_MAX: usize = 64;

/// Weight rows per task: four output columns share each load of `x`.
const ROWS: usize = 4;
const LANES: usize = 8;

struct SmallMMatmul;

#[inline(always)]
fn dot_rows(x: &[f32], w: [&[f32]; ROWS]) -> [f32; ROWS] {
    let k = x.len();
    let mut acc = [[0f32; LANES]; ROWS];
    let chunks = k / LANES;
    for c in 0..chunks {
        let xs: &[f32; LANES] = x[c * LANES..(c + 1) * LANES].try_into().unwrap();
        for r in 0..ROWS {
            let ws: &[f32; LANES] = w[r][c * LANES..(c + 1) * LANES].try_into().unwrap();
            for l in 0..LANES {
                acc[r][l] += xs[l] * ws[l];
            }
        }
    }
    let mut out = [0f32; ROWS];
    for r in 0..ROWS {
        let mut s: f32 = acc[r].iter().sum();
        for i in chunks * LANES..k {
            s += x[i] * w[r][i];
        }
        out[r] = s;
    }
    out
}

/// One task's rows, compiled twice: with AVX2+FMA where the CPU has them
/// (checked at run time, so the binary still runs everywhere), and plain.
#[inline(always)]
fn block_rows(x: &[f32], m: usize, k: usize, w: &[f32], j0: usize, dst: &mut [f32]) {
    let rows_here = dst.len() / m;
    if rows_here == ROWS {
        let w_rows: [&[f32]; ROWS] = std::array::from_fn(|r| &w[(j0 + r) * k..(j0 + r + 1) * k]);
        for i in 0..m {
            let d = dot_rows(&x[i * k..(i + 1) * k], w_rows);
            for r in 0..ROWS {
                dst[r * m + i] = d[r];
            }
        }
    } else {
        for r in 0..rows_here {
            let wr = &w[(j0 + r) * k..(j0 + r + 1) * k];
            for i in 0..m {
                dst[r * m + i] = x[i * k..(i + 1) * k]
                    .iter()
                    .zip(wr)
                    .map(|(a, b)| a * b)
                    .sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::ROWS;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let hi = _mm256_extractf128_ps(v, 1);
        let lo = _mm256_castps256_ps128(v);
        let s = _mm_add_ps(hi, lo);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Two activation rows × four weight rows: eight independent FMA chains,
    /// enough to hide FMA latency, six loads per eight FMAs.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_2x4(x0: &[f32], x1: &[f32], w: [&[f32]; ROWS]) -> ([f32; ROWS], [f32; ROWS]) {
        let k = x0.len();
        let mut a = [_mm256_setzero_ps(); 8];
        let mut i = 0;
        while i + 8 <= k {
            let xa = _mm256_loadu_ps(x0.as_ptr().add(i));
            let xb = _mm256_loadu_ps(x1.as_ptr().add(i));
            for r in 0..ROWS {
                let wv = _mm256_loadu_ps(w[r].as_ptr().add(i));
                a[r] = _mm256_fmadd_ps(xa, wv, a[r]);
                a[r + ROWS] = _mm256_fmadd_ps(xb, wv, a[r + ROWS]);
            }
            i += 8;
        }
        let mut o0 = [0f32; ROWS];
        let mut o1 = [0f32; ROWS];
        for r in 0..ROWS {
            o0[r] = hsum(a[r]);
            o1[r] = hsum(a[r + ROWS]);
            for j in i..k {
                o0[r] += x0[j] * w[r][j];
                o1[r] += x1[j] * w[r][j];
            }
        }
        (o0, o1)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn block_rows(x: &[f32], m: usize, k: usize, w: &[f32], j0: usize, dst: &mut [f32]) {
        let rows_here = dst.len() / m;
        if rows_here != ROWS {
            super::block_rows(x, m, k, w, j0, dst);
            return;
        }
        let w_rows: [&[f32]; ROWS] = std::array::from_fn(|r| &w[(j0 + r) * k..(j0 + r + 1) * k]);
        let mut i = 0;
        while i < m {
            let x0 = &x[i * k..(i + 1) * k];
            // An odd last row pairs with itself; its duplicate result is dropped.
            let i1 = if i + 1 < m { i + 1 } else { i };
            let x1 = &x[i1 * k..(i1 + 1) * k];
            let (d0, d1) = dot_2x4(x0, x1, w_rows);
            for r in 0..ROWS {
                dst[r * m + i] = d0[r];
                dst[r * m + i1] = d1[r];
            }
            i += 2;
        }
    }
}

fn run_block(x: &[f32], m: usize, k: usize, w: &[f32], j0: usize, dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected on this CPU just above.
            unsafe { avx2::block_rows(x, m, k, w, j0, dst) };
            return;
        }
    }
    block_rows(x, m, k, w, j0, dst)
}

fn small_m(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    // Computed transposed ([n, m]) so that tasks write disjoint contiguous chunks.
    let mut out_t = vec![0f32; n * m];
    out_t
        .par_chunks_mut(ROWS * m)
        .enumerate()
        .for_each(|(block, dst)| run_block(x, m, k, w, block * ROWS, dst));
    let mut out = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = out_t[j * m + i];
        }
    }
    out
}

impl CustomOp2 for SmallMMatmul {
    fn name(&self) -> &'static str {
        "llama-small-m-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(w)) = (s1, s2) else {
            bail!("small-m matmul is f32 only")
        };
        let (Some((xs, xe)), Some((ws, we))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            bail!("small-m matmul needs contiguous operands")
        };
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        if k != k2 {
            bail!("small-m matmul: inner dims {k} and {k2} differ")
        }
        Ok((
            CpuStorage::F32(small_m(&x[xs..xe], m, k, &w[ws..we], n)),
            Shape::from((m, n)),
        ))
    }
}

/// `x: [m, k]`, `w: [n, k]` (f32, CPU, contiguous) → `[m, n]`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(w, &SmallMMatmul)
}

/// Whether [`matmul_t`] should replace gemm for this product.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu()
        && x.dtype() == candle_core::DType::F32
        && w.dtype() == candle_core::DType::F32
        && x.rank() == 2
        && x.dims()[0] <= SMALL_M_MAX
        && w.is_contiguous()
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn matches_gemm() {
        for (m, k, n) in [(1, 64, 10), (3, 67, 9), (8, 768, 2304), (16, 130, 33)] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = super::matmul_t(&x, &w).unwrap();
            let diff: f32 = (want - got)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(diff < 1e-3, "m={m} k={k} n={n}: {diff}");
        }
    }
}
