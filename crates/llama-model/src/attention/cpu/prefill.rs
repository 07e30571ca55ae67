//! Prompt tiles with AVX2: the query rows of up to 16 tokens against one kv
//! head, block by block of the cache (any activation and cache dtype; the
//! arithmetic is f32).
//!
//! The generic loop, position by position over all the tile's rows, kept a
//! 16-row accumulator in memory (a load and a store of every accumulator
//! vector per position and row) and called the scalar `expf` per score: about
//! 160 cycles per (query, key) pair. Here the keys of a cache block (4 KiB per
//! head) stay in L1 while every row scores them, the softmax uses the vector
//! `exp`, and each row sums its values with its accumulators in registers.

use std::arch::x86_64::*;

use super::simd::{dot, hsum, KvSimd};
use super::{AttentionMeta, Elem, Inputs, OutPtr, Scratch, Task};
use crate::cpu_kernels::avx2::exp8;

/// # Safety
/// The CPU must have AVX2, FMA and F16C; `task` must cover one kv head, and
/// no other task may write its output rows.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend<Q: Elem, KV: KvSimd>(
    inputs: &Inputs<Q, KV>,
    m: &AttentionMeta,
    task: &Task,
    s: &mut Scratch,
    out: &OutPtr<Q>,
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
        let qr = &inputs.q[q_row(r) * d..(q_row(r) + 1) * d];
        s.q.extend(qr.iter().map(|x| x.to_f32() * m.scale));
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

    let mut row_out = vec![0f32; d];
    for r in 0..rows {
        let probs = &s.scores[r * ctx_max..r * ctx_max + ctx(r)];
        weighted_values(
            inputs.v,
            probs,
            bs,
            kv_row,
            &block_base,
            s.acc[r],
            &mut row_out,
        );
        let dst = std::slice::from_raw_parts_mut(out.0.add(q_row(r) * d), d);
        for (o, x) in dst.iter_mut().zip(&row_out) {
            *o = Q::from_f32(*x);
        }
    }
}

/// `row[i] = exp(row[i] - max(row))`; returns the sum.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[inline(always)]
pub(super) unsafe fn exp_in_place(row: &mut [f32]) -> f32 {
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
unsafe fn weighted_values<KV: KvSimd>(
    v: &[KV],
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
            8 => lanes_sum::<KV, 8>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            7 => lanes_sum::<KV, 7>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            6 => lanes_sum::<KV, 6>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            5 => lanes_sum::<KV, 5>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            4 => lanes_sum::<KV, 4>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            3 => lanes_sum::<KV, 3>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            2 => lanes_sum::<KV, 2>(v, probs, bs, kv_row, block_base, scale, d0, dst),
            _ => lanes_sum::<KV, 1>(v, probs, bs, kv_row, block_base, scale, d0, dst),
        }
        d0 += lanes * 8;
    }
    // Head sizes that are not a multiple of 8: the last dims one by one.
    for (i, o) in dst.iter_mut().enumerate().skip(d0) {
        let mut acc = 0f32;
        for (j, p) in probs.iter().enumerate() {
            acc += p * v[block_base(j / bs) + (j % bs) * kv_row + i].to_f32();
        }
        *o = acc * scale;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn lanes_sum<KV: KvSimd, const L: usize>(
    v: &[KV],
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
                *a = _mm256_fmadd_ps(pv, KV::load8(row.add(l * 8)), *a);
            }
        }
    }
    let vs = _mm256_set1_ps(scale);
    for (l, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(dst.as_mut_ptr().add(d0 + l * 8), _mm256_mul_ps(*a, vs));
    }
}
