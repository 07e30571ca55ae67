//! Fused CPU kernels: the cache write and paged attention read the block tables
//! directly, with f32 accumulation whatever the storage dtype, parallel over
//! (token, head) with rayon. No per-sequence tensor ops, so a decode step of 64
//! sequences costs one kernel call per layer instead of hundreds of small ops.

use candle_core::{bail, CpuStorage, CustomOp3, InplaceOp2, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::AttentionMeta;

#[cfg(target_arch = "x86_64")]
mod prefill;
use crate::error::Result;

trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// The slice itself when the element is f32: picks the SIMD kernel.
    fn as_f32(_s: &[Self]) -> Option<&[f32]> {
        None
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{what} must be contiguous"),
    }
}

/// Copies rows of `src` (`[tokens, width]`) into `dst` rows given by `slots`.
struct WriteSlots<'a> {
    slots: &'a [u32],
    width: usize,
}

impl WriteSlots<'_> {
    fn copy<T: Copy>(
        &self,
        dst: &mut [T],
        dl: &Layout,
        src: &[T],
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (start, end) = match dl.contiguous_offsets() {
            Some(o) => o,
            None => bail!("kv cache must be contiguous"),
        };
        let dst = &mut dst[start..end];
        let src = contiguous(src, sl, "new keys/values")?;
        if src.len() != self.slots.len() * self.width {
            bail!(
                "kv write: {} values for {} slots of width {}",
                src.len(),
                self.slots.len(),
                self.width
            );
        }
        for (row, &slot) in self.slots.iter().enumerate() {
            let at = slot as usize * self.width;
            if at + self.width > dst.len() {
                bail!("kv write: slot {slot} outside the cache");
            }
            dst[at..at + self.width]
                .copy_from_slice(&src[row * self.width..(row + 1) * self.width]);
        }
        Ok(())
    }
}

impl InplaceOp2 for WriteSlots<'_> {
    fn name(&self) -> &'static str {
        "llama-write-kv"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        match (s1, s2) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => self.copy(d, l1, s, l2),
            (CpuStorage::F16(d), CpuStorage::F16(s)) => self.copy(d, l1, s, l2),
            (CpuStorage::BF16(d), CpuStorage::BF16(s)) => self.copy(d, l1, s, l2),
            _ => bail!("kv write: cache and values must share a dtype (f32, f16 or bf16)"),
        }
    }
}

pub fn write_kv(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    meta: &AttentionMeta,
) -> Result<()> {
    let op = WriteSlots {
        slots: &meta.slot_mapping,
        width: meta.num_kv_heads * meta.head_dim,
    };
    k_cache.inplace_op2(&k.contiguous()?, &op)?;
    v_cache.inplace_op2(&v.contiguous()?, &op)?;
    Ok(())
}

/// `a * b + c`, as one fused instruction where the caller was compiled for FMA
/// (`f32::mul_add` without hardware FMA is a slow library call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Dot product with sixteen independent partial sums (two AVX registers): a
/// single running sum is a chain of dependent adds that the compiler may not
/// reorder, which made this loop latency-bound.
#[inline(always)]
fn dot_lanes<T: Elem, const FMA: bool>(q: &[f32], k: &[T]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let chunks = q.len() / L;
    for c in 0..chunks {
        for l in 0..L {
            acc[l] = madd::<FMA>(q[c * L + l], k[c * L + l].to_f32(), acc[l]);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * L..q.len() {
        sum += q[i] * k[i].to_f32();
    }
    sum
}

/// Query rows attended together: they share each key and value load, which
/// for a prompt is what keeps the scan in cache instead of re-reading the
/// whole context from L3 for every query.
const ROWS_PER_TASK: usize = 16;

/// One task: the query rows of `tokens` consecutive tokens of one sequence
/// that read the kv heads `kv_heads` (with GQA, all the query heads of each
/// group). A decode task takes several kv heads so that it reads whole runs
/// of each cache row: one head's slice alone is a short strided read per
/// position, which left the decode scan at half the memory bandwidth.
struct Task {
    seq: usize,
    /// First token of the task, as a row of the packed batch.
    token: usize,
    tokens: usize,
    kv_heads: std::ops::Range<usize>,
}

/// Cache positions whose rows are requested ahead of the scan. The rows of
/// successive positions are a block apart or more, which the hardware
/// prefetchers do not follow far enough to hide DRAM latency.
const PREFETCH_POSITIONS: usize = 4;

/// Asks for every cache line of `data` without waiting for it.
#[inline(always)]
fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        let bytes = std::mem::size_of_val(data);
        let p = data.as_ptr() as *const i8;
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch never faults, and the address is inside `data`.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.add(off))
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Scratch reused by every task a thread runs.
#[derive(Default)]
struct Scratch {
    /// `[rows][d]`, scaled.
    q: Vec<f32>,
    /// `[rows][ctx_max]`: scores, then probabilities.
    scores: Vec<f32>,
    /// `[rows][d]`.
    acc: Vec<f32>,
    /// Positions visible to each row (its own included).
    ctx: Vec<usize>,
}

/// Where a task's output rows go: tasks write disjoint rows of one buffer.
struct OutPtr<T>(*mut T);
unsafe impl<T: Send> Sync for OutPtr<T> {}

/// A task's inputs: the step's queries and this layer's caches.
struct Inputs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
}

impl<T: Elem> Inputs<'_, T> {
    /// The body of every variant of the kernel, with its two inner loops
    /// passed in: `dot(q, key)` and `axpy(acc, weight, value)`.
    ///
    /// # Safety
    /// `out` must be the step's `[tokens, heads, d]` output, whose rows of
    /// this task no other task writes.
    #[inline(always)]
    unsafe fn attend_with(
        &self,
        m: &AttentionMeta,
        task: &Task,
        s: &mut Scratch,
        out: &OutPtr<T>,
        dot: impl Fn(&[f32], &[T]) -> f32,
        axpy: impl Fn(&mut [f32], f32, &[T]),
    ) {
        let (h, d, bs) = (m.num_heads, m.head_dim, m.block_size);
        let group = h / m.num_kv_heads;
        let kv_row = m.num_kv_heads * d;
        let seq = &m.seqs[task.seq];
        let (kv_first, heads) = (task.kv_heads.start, task.kv_heads.len());
        // Rows are token-major, then kv head, then the head in its group; the
        // query heads of one token's rows are consecutive.
        let per_token = heads * group;
        let rows = task.tokens * per_token;
        let q_row = |r: usize| (task.token + r / per_token) * h + kv_first * group + r % per_token;
        // Positions visible to each token of the task (its own included).
        s.ctx.clear();
        let first_pos = seq.start_pos + task.token - seq.q_start;
        s.ctx.extend((0..task.tokens).map(|t| first_pos + t + 1));
        let ctx_max = s.ctx[task.tokens - 1];
        s.q.clear();
        for r in 0..rows {
            let qr = &self.q[q_row(r) * d..(q_row(r) + 1) * d];
            s.q.extend(qr.iter().map(|x| x.to_f32() * m.scale));
        }
        s.scores.clear();
        s.scores.resize(rows * ctx_max, f32::NEG_INFINITY);
        // Walk the table block by block: no division per position.
        let positions = || {
            seq.blocks
                .iter()
                .take(ctx_max.div_ceil(bs))
                .enumerate()
                .flat_map(move |(b, &block)| {
                    let first = block as usize * bs * kv_row + kv_first * d;
                    (0..bs.min(ctx_max - b * bs)).map(move |o| (b * bs + o, first + o * kv_row))
                })
        };
        let span = heads * d;
        let mut ahead = positions().skip(PREFETCH_POSITIONS);
        for (j, base) in positions() {
            if let Some((_, next)) = ahead.next() {
                prefetch(&self.k[next..next + span]);
            }
            for t in (0..task.tokens).filter(|&t| j < s.ctx[t]) {
                for hl in 0..heads {
                    let key = &self.k[base + hl * d..base + (hl + 1) * d];
                    for r in (t * per_token + hl * group)..(t * per_token + (hl + 1) * group) {
                        s.scores[r * ctx_max + j] = dot(&s.q[r * d..(r + 1) * d], key);
                    }
                }
            }
        }
        for r in 0..rows {
            let row = &mut s.scores[r * ctx_max..r * ctx_max + s.ctx[r / per_token]];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for sc in row.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|p| *p *= inv);
        }
        s.acc.clear();
        s.acc.resize(rows * d, 0.0);
        let mut ahead = positions().skip(PREFETCH_POSITIONS);
        for (j, base) in positions() {
            if let Some((_, next)) = ahead.next() {
                prefetch(&self.v[next..next + span]);
            }
            for t in (0..task.tokens).filter(|&t| j < s.ctx[t]) {
                for hl in 0..heads {
                    let value = &self.v[base + hl * d..base + (hl + 1) * d];
                    for r in (t * per_token + hl * group)..(t * per_token + (hl + 1) * group) {
                        let p = s.scores[r * ctx_max + j];
                        axpy(&mut s.acc[r * d..(r + 1) * d], p, value);
                    }
                }
            }
        }
        for r in 0..rows {
            let dst = std::slice::from_raw_parts_mut(out.0.add(q_row(r) * d), d);
            for (o, a) in dst.iter_mut().zip(&s.acc[r * d..(r + 1) * d]) {
                *o = T::from_f32(*a);
            }
        }
    }

    /// `FMA` says whether the caller was compiled with AVX2 + FMA.
    ///
    /// # Safety
    /// As [`Inputs::attend_with`].
    #[inline(always)]
    unsafe fn attend<const FMA: bool>(
        &self,
        m: &AttentionMeta,
        task: &Task,
        s: &mut Scratch,
        out: &OutPtr<T>,
    ) {
        self.attend_with(m, task, s, out, dot_lanes::<T, FMA>, |acc, w, v| {
            for (a, x) in acc.iter_mut().zip(v) {
                *a = madd::<FMA>(w, x.to_f32(), *a);
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{AttentionMeta, Elem, Inputs, OutPtr, Scratch, Task};

    /// Any element type: the generic loops, compiled with FMA.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; and as [`Inputs::attend_with`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attend<T: Elem>(
        inputs: &Inputs<T>,
        m: &AttentionMeta,
        task: &Task,
        s: &mut Scratch,
        out: &OutPtr<T>,
    ) {
        inputs.attend::<true>(m, task, s, out)
    }

    /// f32: the loops in AVX2 intrinsics (the compiler leaves the generic
    /// ones scalar).
    ///
    /// # Safety
    /// As [`attend`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn attend_f32(
        inputs: &Inputs<f32>,
        m: &AttentionMeta,
        task: &Task,
        s: &mut Scratch,
        out: &OutPtr<f32>,
    ) {
        inputs.attend_with(
            m,
            task,
            s,
            out,
            |q, k| dot(q, k),
            |acc, w, v| axpy(acc, w, v),
        )
    }

    #[inline(always)]
    unsafe fn dot(q: &[f32], k: &[f32]) -> f32 {
        let n = q.len().min(k.len());
        let (q, k) = (q.as_ptr(), k.as_ptr());
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(k.add(i)), a0);
            a1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(q.add(i + 8)),
                _mm256_loadu_ps(k.add(i + 8)),
                a1,
            );
            i += 16;
        }
        if i + 8 <= n {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(i)), _mm256_loadu_ps(k.add(i)), a0);
            i += 8;
        }
        let v = _mm256_add_ps(a0, a1);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let mut sum = _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
        while i < n {
            sum += *q.add(i) * *k.add(i);
            i += 1;
        }
        sum
    }

    #[inline(always)]
    unsafe fn axpy(acc: &mut [f32], w: f32, v: &[f32]) {
        let n = acc.len().min(v.len());
        let (a, v) = (acc.as_mut_ptr(), v.as_ptr());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        while i + 8 <= n {
            let x = _mm256_fmadd_ps(wv, _mm256_loadu_ps(v.add(i)), _mm256_loadu_ps(a.add(i)));
            _mm256_storeu_ps(a.add(i), x);
            i += 8;
        }
        while i < n {
            *a.add(i) += w * *v.add(i);
            i += 1;
        }
    }
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

struct PagedAttention<'a> {
    meta: &'a AttentionMeta,
}

impl PagedAttention<'_> {
    fn run<T: Elem>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let m = self.meta;
        let (group, kvh) = (m.num_heads / m.num_kv_heads, m.num_kv_heads);
        let tokens_per_task = (ROWS_PER_TASK / group).max(1);
        let token_tiles: usize = m
            .seqs
            .iter()
            .map(|s| s.q_len.div_ceil(tokens_per_task))
            .sum();
        // As many kv heads per task as the row budget allows, while leaving
        // about four tasks per thread for the pool to balance.
        let by_balance = (kvh * token_tiles / (4 * rayon::current_num_threads())).max(1);
        let mut tasks = Vec::new();
        for (seq, s) in m.seqs.iter().enumerate() {
            for first in (0..s.q_len).step_by(tokens_per_task) {
                let tokens = tokens_per_task.min(s.q_len - first);
                let by_rows = (ROWS_PER_TASK / (tokens * group)).max(1);
                let heads_per_task = by_rows.min(by_balance).min(kvh);
                for kv_first in (0..kvh).step_by(heads_per_task) {
                    tasks.push(Task {
                        seq,
                        token: s.q_start + first,
                        tokens,
                        kv_heads: kv_first..(kv_first + heads_per_task).min(kvh),
                    });
                }
            }
        }
        let mut out = vec![T::from_f32(0.0); q.len()];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let inputs = Inputs { q, k, v };
        let simd = has_avx2_fma();
        let f32_inputs = match (T::as_f32(q), T::as_f32(k), T::as_f32(v)) {
            (Some(q), Some(k), Some(v)) => Some(Inputs { q, k, v }),
            _ => None,
        };
        tasks
            .par_iter()
            .for_each_init(Scratch::default, |scratch, task| {
                // SAFETY: every (token, head) row belongs to exactly one task.
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: AVX2 and FMA were detected on this CPU.
                    unsafe {
                        match &f32_inputs {
                            Some(f) => {
                                let out = OutPtr(out_ptr.0 as *mut f32);
                                if task.tokens > 1 && task.kv_heads.len() == 1 {
                                    prefill::attend(f, m, task, scratch, &out)
                                } else {
                                    avx2::attend_f32(f, m, task, scratch, &out)
                                }
                            }
                            None => avx2::attend(&inputs, m, task, scratch, &out_ptr),
                        }
                    }
                    return;
                }
                let _ = (simd, &f32_inputs);
                unsafe { inputs.attend::<false>(m, task, scratch, &out_ptr) };
            });
        out
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "llama-paged-attention"
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
        let shape = l1.shape().clone();
        let storage = match (s1, s2, s3) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(
                    contiguous(q, l1, "q")?,
                    contiguous(k, l2, "k cache")?,
                    contiguous(v, l3, "v cache")?,
                ))
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(self.run(
                    contiguous(q, l1, "q")?,
                    contiguous(k, l2, "k cache")?,
                    contiguous(v, l3, "v cache")?,
                ))
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.run(
                    contiguous(q, l1, "q")?,
                    contiguous(k, l2, "k cache")?,
                    contiguous(v, l3, "v cache")?,
                ))
            }
            _ => bail!("paged attention: q and caches must share a dtype (f32, f16 or bf16)"),
        };
        Ok((storage, shape))
    }
}

pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMeta,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    Ok(q.apply_op3_no_bwd(k_cache, v_cache, &PagedAttention { meta })?)
}
