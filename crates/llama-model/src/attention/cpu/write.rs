//! Writing a step's keys and values into the cache, straight out of the fused
//! QKV projection: RoPE applied to the keys on the way, each value converted
//! to the cache's dtype, and q rotated into its own tensor. One pass over the
//! projection, parallel over tokens, where the plain path took a narrow copy
//! per part, Candle's `rope_thd` (one thread for a whole prompt) and a copy
//! into the cache: 6% of a 512-token prefill.

use candle_core::{bail, CpuStorage, CustomOp1, InplaceOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous, Elem};
use crate::attention::AttentionMeta;
use crate::error::Result;

/// Below this many values the work stays on the calling thread.
const PARALLEL_MIN: usize = 1 << 14;

/// Rotate-half RoPE of one head, as Candle's `rope_thd` computes it.
#[inline(always)]
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        o1[i] = x1[i] * cos[i] - x2[i] * sin[i];
        o2[i] = x1[i] * sin[i] + x2[i] * cos[i];
    }
}

/// Position of each packed token of the step.
fn positions(meta: &AttentionMeta) -> Vec<usize> {
    let mut pos = Vec::with_capacity(meta.num_tokens());
    for s in &meta.seqs {
        pos.extend(s.start_pos..s.context_len());
    }
    pos
}

/// RoPE tables on the host, `[positions, head_dim / 2]` each.
pub struct RopeRows<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// Copies rows of `src` into cache rows given by `slots`: from column
/// `src_col` of each `src_stride`-wide source row, `width` values, rotated
/// per head when `rope` is given.
struct WriteSlots<'a> {
    slots: &'a [u32],
    width: usize,
    src_stride: usize,
    src_col: usize,
    rope: Option<(&'a RopeRows<'a>, &'a [usize], usize)>,
}

impl WriteSlots<'_> {
    fn copy<D: Elem, S: Elem>(
        &self,
        dst: &mut [D],
        dl: &Layout,
        src: &[S],
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = dl.contiguous_offsets() else {
            bail!("kv cache must be contiguous")
        };
        let dst = &mut dst[start..end];
        let src = contiguous(src, sl, "new keys/values")?;
        if src.len() != self.slots.len() * self.src_stride
            || self.src_col + self.width > self.src_stride
        {
            bail!(
                "kv write: {} values for {} slots of stride {}",
                src.len(),
                self.slots.len(),
                self.src_stride
            );
        }
        let mut from = vec![0f32; self.width];
        let mut rotated = vec![0f32; self.width];
        for (row, &slot) in self.slots.iter().enumerate() {
            let at = slot as usize * self.width;
            if at + self.width > dst.len() {
                bail!("kv write: slot {slot} outside the cache");
            }
            let begin = row * self.src_stride + self.src_col;
            let part = &src[begin..begin + self.width];
            let to = &mut dst[at..at + self.width];
            match self.rope {
                None if std::any::TypeId::of::<D>() == std::any::TypeId::of::<S>() => {
                    // SAFETY: D and S are the same type (checked just above).
                    to.copy_from_slice(unsafe { &*(part as *const [S] as *const [D]) });
                }
                None => {
                    for (t, f) in to.iter_mut().zip(part) {
                        *t = D::from_f32(f.to_f32());
                    }
                }
                Some((rows, positions, head_dim)) => {
                    let half = head_dim / 2;
                    let p = positions[row];
                    let (cos, sin) = (
                        &rows.cos[p * half..(p + 1) * half],
                        &rows.sin[p * half..(p + 1) * half],
                    );
                    for (f, x) in from.iter_mut().zip(part) {
                        *f = x.to_f32();
                    }
                    for (x, o) in from
                        .chunks_exact(head_dim)
                        .zip(rotated.chunks_exact_mut(head_dim))
                    {
                        rotate(x, cos, sin, o);
                    }
                    for (t, r) in to.iter_mut().zip(&rotated) {
                        *t = D::from_f32(*r);
                    }
                }
            }
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
        macro_rules! by_source {
            ($dst:expr) => {
                match s2 {
                    CpuStorage::F32(s) => self.copy($dst, l1, s, l2),
                    CpuStorage::F16(s) => self.copy($dst, l1, s, l2),
                    CpuStorage::BF16(s) => self.copy($dst, l1, s, l2),
                    _ => bail!("kv write: values must be f32, f16 or bf16"),
                }
            };
        }
        match s1 {
            CpuStorage::F32(d) => by_source!(d),
            CpuStorage::F16(d) => by_source!(d),
            CpuStorage::BF16(d) => by_source!(d),
            _ => bail!("kv write: the cache must be f32, f16 or bf16"),
        }
    }
}

/// Writes already-rotated `k` and `v` (`[tokens, kv_heads, d]`) at the step's slots.
pub fn write_kv(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    meta: &AttentionMeta,
) -> Result<()> {
    let width = meta.num_kv_heads * meta.head_dim;
    let op = WriteSlots {
        slots: &meta.slot_mapping,
        width,
        src_stride: width,
        src_col: 0,
        rope: None,
    };
    k_cache.inplace_op2(&k.contiguous()?, &op)?;
    v_cache.inplace_op2(&v.contiguous()?, &op)?;
    Ok(())
}

/// q of the fused projection, rotated: `[tokens, heads, d]`.
struct RopeQ<'a> {
    rows: &'a RopeRows<'a>,
    positions: &'a [usize],
    heads: usize,
    head_dim: usize,
}

impl CustomOp1 for RopeQ<'_> {
    fn name(&self) -> &'static str {
        "llama-rope-q"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(src) = s else {
            bail!("fused rope: f32 activations only")
        };
        let src = contiguous(src, l, "qkv")?;
        let (n, stride) = l.shape().dims2()?;
        let (d, half) = (self.head_dim, self.head_dim / 2);
        let width = self.heads * d;
        if n != self.positions.len() || width > stride {
            bail!(
                "fused rope: qkv is [{n}, {stride}], expected {} tokens",
                self.positions.len()
            );
        }
        let mut out = vec![0f32; n * width];
        let row = |t: usize, dst: &mut [f32]| {
            let p = self.positions[t];
            let cos = &self.rows.cos[p * half..(p + 1) * half];
            let sin = &self.rows.sin[p * half..(p + 1) * half];
            let q = &src[t * stride..t * stride + width];
            for (x, o) in q.chunks_exact(d).zip(dst.chunks_exact_mut(d)) {
                rotate(x, cos, sin, o);
            }
        };
        if out.len() >= PARALLEL_MIN {
            out.par_chunks_mut(width)
                .enumerate()
                .for_each(|(t, dst)| row(t, dst));
        } else {
            out.chunks_mut(width)
                .enumerate()
                .for_each(|(t, dst)| row(t, dst));
        }
        Ok((CpuStorage::F32(out), Shape::from((n, self.heads, d))))
    }
}

/// From the fused projection `qkv` (`[tokens, (h + 2 kvh) d]`, f32): writes
/// the rotated keys and the values into this layer's cache and returns the
/// rotated queries `[tokens, h, d]`.
pub fn rope_write_kv(
    qkv: &Tensor,
    rows: &RopeRows,
    caches: (&Tensor, &Tensor),
    meta: &AttentionMeta,
) -> Result<Tensor> {
    let (h, kvh, d) = (meta.num_heads, meta.num_kv_heads, meta.head_dim);
    let qkv = qkv.contiguous()?;
    let positions = positions(meta);
    let (q_width, kv_width) = (h * d, kvh * d);
    let stride = q_width + 2 * kv_width;
    let k_op = WriteSlots {
        slots: &meta.slot_mapping,
        width: kv_width,
        src_stride: stride,
        src_col: q_width,
        rope: Some((rows, &positions, d)),
    };
    caches.0.inplace_op2(&qkv, &k_op)?;
    let v_op = WriteSlots {
        src_col: q_width + kv_width,
        rope: None,
        ..k_op
    };
    caches.1.inplace_op2(&qkv, &v_op)?;
    let q = qkv.apply_op1_no_bwd(&RopeQ {
        rows,
        positions: &positions,
        heads: h,
        head_dim: d,
    })?;
    Ok(q)
}
