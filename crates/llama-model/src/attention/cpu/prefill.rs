//! Prompt tiles in f32 with AVX2: the query rows of up to 16 tokens against
//! one kv head, block by block of the cache.
//!
//! The generic loop, position by position over all the tile's rows, kept a
//! 16-row accumulator in memory (a load and a store of every accumulator
//! vector per position and row) and called the scalar `expf` per score: about
//! 160 cycles per (query, key) pair. Here the keys of a cache block (4 KiB per
//! head) stay in L1 while every row scores them, the softmax uses the vector
//! `exp`, and each row sums its values with its accumulators in registers.

use std::arch::x86_64::*;

use super::{AttentionMeta, Inputs, OutPtr, Scratch, Task};
use crate::cpu_kernels::avx2::exp8;

/// # Safety
/// The CPU must have AVX2 and FMA; `task` must cover one kv head, and no
/// other task may write its output rows.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn attend(
    inputs: &Inputs<f32>,
    m: &AttentionMeta,
    task: &Task,
    s: &mut Scratch,
    out: &OutPtr<f32>,
) {
    let (h, d, bs) = (m.num_heads, m.head_dim, m.block_size);
    let group = h / m.num_kv_heads;
    let kv_row = m.num_kv_heads * d;
    let seq = &m.seqs[task.seq];
    let kv = task.kv_heads.start;
    debug_assert_eq!(task.kv_heads.len(), 1);
    let rows = task.tokens * group;
    let q_row = |r: usize| (task.token + r / group) * h + kv * group + r % group;
    let first_pos = seq.start_pos + task.token - seq.q_start;
    // Positions row r sees (its token's own included).
    let ctx = |r: usize| first_pos + r / group + 1;
    let ctx_max = ctx(rows - 1);
    let blocks = &seq.blocks[..ctx_max.div_ceil(bs)];
    let block_base = |b: usize| blocks[b] as usize * bs * kv_row + kv * d;

    s.q.clear();
    for r in 0..rows {
        s.q.extend(
            inputs.q[q_row(r) * d..(q_row(r) + 1) * d]
                .iter()
                .map(|x| x * m.scale),
        );
    }
    s.scores.clear();
    s.scores.resize(rows * ctx_max, 0.0);

    for b in 0..blocks.len() {
        let base = block_base(b);
        for r in 0..rows {
            let lim = bs.min(ctx(r).saturating_sub(b * bs));
            let q = &s.q[r * d..(r + 1) * d];
            let scores = &mut s.scores[r * ctx_max + b * bs..];
            for (o, score) in scores.iter_mut().enumerate().take(lim) {
                let at = base + o * kv_row;
                *score = dot(q, &inputs.k[at..at + d]);
            }
        }
    }

    // Softmax; the 1/sum is applied to the output row instead of every weight.
    s.acc.clear();
    for r in 0..rows {
        let row = &mut s.scores[r * ctx_max..r * ctx_max + ctx(r)];
        s.acc.push(1.0 / exp_in_place(row));
    }

    for r in 0..rows {
        let dst = std::slice::from_raw_parts_mut(out.0.add(q_row(r) * d), d);
        let probs = &s.scores[r * ctx_max..r * ctx_max + ctx(r)];
        weighted_values(inputs.v, probs, bs, kv_row, &block_base, s.acc[r], dst);
    }
}

/// `row[i] = exp(row[i] - max(row))`; returns the sum.
#[inline(always)]
unsafe fn exp_in_place(row: &mut [f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let vmax = _mm256_set1_ps(max);
    let mut vsum = _mm256_setzero_ps();
    let mut chunks = row.chunks_exact_mut(8);
    for c in &mut chunks {
        let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), vmax));
        _mm256_storeu_ps(c.as_mut_ptr(), e);
        vsum = _mm256_add_ps(vsum, e);
    }
    let mut sum = hsum(vsum);
    for x in chunks.into_remainder() {
        *x = (*x - max).exp();
        sum += *x;
    }
    sum
}

/// `dst = scale · Σ_j probs[j] · V[j]` over the row's positions, 64 dims at
/// a time in eight accumulators.
#[inline(always)]
unsafe fn weighted_values(
    v: &[f32],
    probs: &[f32],
    bs: usize,
    kv_row: usize,
    block_base: &impl Fn(usize) -> usize,
    scale: f32,
    dst: &mut [f32],
) {
    let d = dst.len();
    let mut d0 = 0;
    while d0 + 8 <= d {
        let lanes = ((d - d0) / 8).min(8);
        match lanes {
            8 => lanes_sum::<8>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            7 => lanes_sum::<7>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            6 => lanes_sum::<6>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            5 => lanes_sum::<5>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            4 => lanes_sum::<4>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            3 => lanes_sum::<3>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            2 => lanes_sum::<2>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            _ => lanes_sum::<1>(v, probs, bs, kv_row, block_base, scale, d0, dst),
        }
        d0 += lanes * 8;
    }
    // Head sizes that are not a multiple of 8: the last dims one by one.
    for (i, o) in dst.iter_mut().enumerate().skip(d0) {
        let mut acc = 0f32;
        for (j, p) in probs.iter().enumerate() {
            acc += p * v[block_base(j / bs) + (j % bs) * kv_row + i];
        }
        *o = acc * scale;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn lanes_sum<const L: usize>(
    v: &[f32],
    probs: &[f32],
    bs: usize,
    kv_row: usize,
    block_base: &impl Fn(usize) -> usize,
    scale: f32,
    d0: usize,
    dst: &mut [f32],
) {
    let mut acc = [_mm256_setzero_ps(); L];
    for (b, chunk) in probs.chunks(bs).enumerate() {
        let base = block_base(b) + d0;
        for (o, &p) in chunk.iter().enumerate() {
            let pv = _mm256_set1_ps(p);
            let row = v[base + o * kv_row..base + o * kv_row + L * 8].as_ptr();
            for (l, a) in acc.iter_mut().enumerate() {
                *a = _mm256_fmadd_ps(pv, _mm256_loadu_ps(row.add(l * 8)), *a);
            }
        }
    }
    let vs = _mm256_set1_ps(scale);
    for (l, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(dst.as_mut_ptr().add(d0 + l * 8), _mm256_mul_ps(*a, vs));
    }
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
    let mut sum = hsum(_mm256_add_ps(a0, a1));
    while i < n {
        sum += *q.add(i) * *k.add(i);
        i += 1;
    }
    sum
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}
