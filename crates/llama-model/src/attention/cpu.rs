//! Fused CPU kernels: the cache write and paged attention read the block tables
//! directly, with f32 accumulation whatever the storage dtype, parallel over
//! (token, head) with rayon. No per-sequence tensor ops, so a decode step of 64
//! sequences costs one kernel call per layer instead of hundreds of small ops.

use candle_core::{bail, CpuStorage, CustomOp3, InplaceOp2, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use super::AttentionMeta;
use crate::error::Result;

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

/// Dot product with eight independent partial sums: a single running sum is a
/// chain of dependent adds that the compiler may not reorder, which made this
/// loop latency-bound (a sixth of a decode step at batch 32).
#[inline(always)]
fn dot_lanes<T: Elem>(q: &[f32], k: &[T]) -> f32 {
    const L: usize = 8;
    let mut acc = [0f32; L];
    let chunks = q.len() / L;
    for c in 0..chunks {
        for l in 0..L {
            acc[l] += q[c * L + l] * k[c * L + l].to_f32();
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks * L..q.len() {
        sum += q[i] * k[i].to_f32();
    }
    sum
}

struct PagedAttention<'a> {
    meta: &'a AttentionMeta,
}

impl PagedAttention<'_> {
    fn run<T: Elem>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let m = self.meta;
        let (h, kvh, d, bs) = (m.num_heads, m.num_kv_heads, m.head_dim, m.block_size);
        let group = h / kvh;
        let kv_row = kvh * d;
        // token -> (sequence, position) so each (token, head) task is independent.
        let mut token_seq = Vec::with_capacity(m.num_tokens());
        for (si, s) in m.seqs.iter().enumerate() {
            for i in 0..s.q_len {
                token_seq.push((si as u32, (s.start_pos + i) as u32));
            }
        }
        let mut out = vec![T::from_f32(0.0); q.len()];
        out.par_chunks_mut(d).enumerate().for_each_init(
            || (Vec::<f32>::new(), vec![0f32; d], vec![0f32; d]),
            |(scores, qf, acc), (row, out_row)| {
                let t = row / h;
                let head = row % h;
                let (si, pos) = token_seq[t];
                let s = &m.seqs[si as usize];
                let ctx = pos as usize + 1;
                let kv_head = head / group;
                for (dst, src) in qf.iter_mut().zip(&q[row * d..(row + 1) * d]) {
                    *dst = src.to_f32() * m.scale;
                }
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                // Walk the table block by block: no division per position.
                for (b, &block) in s.blocks.iter().enumerate().take(ctx.div_ceil(bs)) {
                    let first = block as usize * bs * kv_row + kv_head * d;
                    for off in 0..bs.min(ctx - b * bs) {
                        let base = first + off * kv_row;
                        let dot = dot_lanes(qf, &k[base..base + d]);
                        max = max.max(dot);
                        scores.push(dot);
                    }
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let inv = 1.0 / sum;
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (b, &block) in s.blocks.iter().enumerate().take(ctx.div_ceil(bs)) {
                    let first = block as usize * bs * kv_row + kv_head * d;
                    for off in 0..bs.min(ctx - b * bs) {
                        let base = first + off * kv_row;
                        let w = scores[b * bs + off] * inv;
                        for (a, x) in acc.iter_mut().zip(&v[base..base + d]) {
                            *a += w * x.to_f32();
                        }
                    }
                }
                for (o, a) in out_row.iter_mut().zip(acc.iter()) {
                    *o = T::from_f32(*a);
                }
            },
        );
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
