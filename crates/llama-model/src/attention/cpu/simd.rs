//! AVX2 building blocks shared by the decode and prompt kernels: loading
//! eight cache elements as f32 whatever the cache's dtype, dot products and
//! scaled adds. Callers are `#[target_feature(enable = "avx2,fma,f16c")]`.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::Elem;

/// A cache element type the kernels read eight at a time.
pub trait KvSimd: Elem {
    /// # Safety
    /// `p` must point at eight readable elements; the CPU must have AVX2 and F16C.
    unsafe fn load8(p: *const Self) -> __m256;
}

impl KvSimd for f32 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

impl KvSimd for f16 {
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

impl KvSimd for bf16 {
    /// bf16 is the top half of an f32: widen and shift.
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16))
    }
}

#[inline(always)]
pub unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// `q · k`, two independent accumulator chains.
#[inline(always)]
pub unsafe fn dot<K: KvSimd>(q: &[f32], k: &[K]) -> f32 {
    let n = q.len().min(k.len());
    let (qp, kp) = (q.as_ptr(), k.as_ptr());
    let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut i = 0;
    while i + 16 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), K::load8(kp.add(i)), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i + 8)), K::load8(kp.add(i + 8)), a1);
        i += 16;
    }
    if i + 8 <= n {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(i)), K::load8(kp.add(i)), a0);
        i += 8;
    }
    let mut sum = hsum(_mm256_add_ps(a0, a1));
    for j in i..n {
        sum += q[j] * k[j].to_f32();
    }
    sum
}

/// `acc += w · v`.
#[inline(always)]
pub unsafe fn axpy<K: KvSimd>(acc: &mut [f32], w: f32, v: &[K]) {
    let n = acc.len().min(v.len());
    let (ap, vp) = (acc.as_mut_ptr(), v.as_ptr());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        let x = _mm256_fmadd_ps(wv, K::load8(vp.add(i)), _mm256_loadu_ps(ap.add(i)));
        _mm256_storeu_ps(ap.add(i), x);
        i += 8;
    }
    for j in i..n {
        acc[j] += w * v[j].to_f32();
    }
}
