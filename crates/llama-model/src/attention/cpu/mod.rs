//! Fused CPU kernels: the cache write and paged attention read the block tables
//! directly, with f32 accumulation whatever the storage dtype, parallel over
//! tasks of (tokens, kv heads) with rayon. No per-sequence tensor ops, so a
//! decode step of 64 sequences costs one kernel call per layer instead of
//! hundreds of small ops. The cache may hold another dtype than the
//! activations (`--kv-cache-dtype`): values are converted as they are written
//! and widened to f32 as they are read.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::AttentionMeta;

use crate::cpu_kernels::contiguous;
use crate::error::Result;

#[cfg(target_arch = "x86_64")]
mod prefill;
mod write;

pub use write::{rope_write_kv, write_kv, RopeRows};
#[cfg(target_arch = "x86_64")]
mod simd;

trait Elem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
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

/// The innermost loops of [`Inputs::attend_with`], which each variant
/// compiles for its own instruction set.
struct InnerLoops<Dot, Axpy, ExpSum> {
    /// `q · key`.
    dot: Dot,
    /// `acc += weight · value`.
    axpy: Axpy,
    /// Scores to `exp(score - max)` in place; returns their sum.
    exp_sum: ExpSum,
}

/// A task's inputs: the step's queries and this layer's caches.
struct Inputs<'a, Q, KV> {
    q: &'a [Q],
    k: &'a [KV],
    v: &'a [KV],
}

impl<Q: Elem, KV: Elem> Inputs<'_, Q, KV> {
    /// The body of every variant of the kernel, with its inner loops passed
    /// in.
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
        out: &OutPtr<Q>,
        loops: InnerLoops<
            impl Fn(&[f32], &[KV]) -> f32,
            impl Fn(&mut [f32], f32, &[KV]),
            impl Fn(&mut [f32]) -> f32,
        >,
    ) {
        let InnerLoops { dot, axpy, exp_sum } = loops;
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
            let inv = 1.0 / exp_sum(row);
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
                *o = Q::from_f32(*a);
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
        out: &OutPtr<Q>,
    ) {
        self.attend_with(
            m,
            task,
            s,
            out,
            InnerLoops {
                dot: dot_lanes::<KV, FMA>,
                axpy: |acc: &mut [f32], w, v: &[KV]| {
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a = madd::<FMA>(w, x.to_f32(), *a);
                    }
                },
                exp_sum: |row: &mut [f32]| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    row.iter_mut().fold(0.0, |sum, x| {
                        *x = (*x - max).exp();
                        sum + *x
                    })
                },
            },
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::simd::{self, KvSimd};
    use super::{AttentionMeta, Elem, InnerLoops, Inputs, OutPtr, Scratch, Task};

    /// The general loops with AVX2 dot products and scaled adds: decode
    /// tasks, and prompt tiles that span several kv heads.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; and as [`Inputs::attend_with`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend<Q: Elem, KV: KvSimd>(
        inputs: &Inputs<Q, KV>,
        m: &AttentionMeta,
        task: &Task,
        s: &mut Scratch,
        out: &OutPtr<Q>,
    ) {
        inputs.attend_with(
            m,
            task,
            s,
            out,
            InnerLoops {
                dot: |q: &[f32], k: &[KV]| simd::dot(q, k),
                axpy: |acc: &mut [f32], w, v: &[KV]| simd::axpy(acc, w, v),
                exp_sum: |row: &mut [f32]| super::prefill::exp_in_place(row),
            },
        )
    }
}

struct PagedAttention<'a> {
    meta: &'a AttentionMeta,
}

impl PagedAttention<'_> {
    fn run<Q: Elem, KV: KernelKv>(&self, q: &[Q], k: &[KV], v: &[KV]) -> Vec<Q> {
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
        let mut out = vec![Q::from_f32(0.0); q.len()];
        let out_ptr = OutPtr(out.as_mut_ptr());
        let inputs = Inputs { q, k, v };
        let simd = crate::cpu_kernels::has_avx2_fma();
        tasks
            .par_iter()
            .for_each_init(Scratch::default, |scratch, task| {
                // SAFETY (all calls): every (token, head) row belongs to
                // exactly one task; the SIMD kernels run only where AVX2,
                // FMA and F16C were detected.
                #[cfg(target_arch = "x86_64")]
                if simd {
                    unsafe {
                        if task.tokens > 1 && task.kv_heads.len() == 1 {
                            prefill::attend(&inputs, m, task, scratch, &out_ptr)
                        } else {
                            avx2::attend(&inputs, m, task, scratch, &out_ptr)
                        }
                    }
                    return;
                }
                let _ = simd;
                unsafe { inputs.attend::<false>(m, task, scratch, &out_ptr) };
            });
        out
    }
}

/// A cache element type every kernel takes (the SIMD ones on x86-64).
#[cfg(target_arch = "x86_64")]
trait KernelKv: simd::KvSimd {}
#[cfg(target_arch = "x86_64")]
impl<T: simd::KvSimd> KernelKv for T {}
#[cfg(not(target_arch = "x86_64"))]
trait KernelKv: Elem {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: Elem> KernelKv for T {}

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
        let (k, v) = (s2, s3);
        macro_rules! by_cache {
            ($q:expr, $wrap:path) => {
                match (k, v) {
                    (CpuStorage::F32(k), CpuStorage::F32(v)) => $wrap(self.run(
                        contiguous($q, l1, "q")?,
                        contiguous(k, l2, "k cache")?,
                        contiguous(v, l3, "v cache")?,
                    )),
                    (CpuStorage::F16(k), CpuStorage::F16(v)) => $wrap(self.run(
                        contiguous($q, l1, "q")?,
                        contiguous(k, l2, "k cache")?,
                        contiguous(v, l3, "v cache")?,
                    )),
                    (CpuStorage::BF16(k), CpuStorage::BF16(v)) => $wrap(self.run(
                        contiguous($q, l1, "q")?,
                        contiguous(k, l2, "k cache")?,
                        contiguous(v, l3, "v cache")?,
                    )),
                    _ => bail!(
                        "paged attention: k and v caches must share a dtype (f32, f16 or bf16)"
                    ),
                }
            };
        }
        let storage = match s1 {
            CpuStorage::F32(q) => by_cache!(q, CpuStorage::F32),
            CpuStorage::F16(q) => by_cache!(q, CpuStorage::F16),
            CpuStorage::BF16(q) => by_cache!(q, CpuStorage::BF16),
            _ => bail!("paged attention: q must be f32, f16 or bf16"),
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
