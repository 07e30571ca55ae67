//! Attention with plain Candle ops: runs on every device, slow but obviously right.

use candle_core::{DType, Tensor};

use super::AttentionMeta;
use crate::error::Result;

pub fn write_kv(
    k_cache: &Tensor,
    v_cache: &Tensor,
    k: &Tensor,
    v: &Tensor,
    meta: &AttentionMeta,
) -> Result<()> {
    let width = meta.num_kv_heads * meta.head_dim;
    let slots = k_cache.dims()[0] * k_cache.dims()[1];
    let index = meta.scatter_index(k_cache.device())?;
    let t = meta.num_tokens();
    // reshape of a contiguous tensor shares its storage, so the scatter lands in the cache.
    // The cache may hold another dtype than the activations (--kv-cache-dtype).
    let rows = |x: &Tensor| {
        x.reshape((t, width))?
            .to_dtype(k_cache.dtype())?
            .contiguous()
    };
    k_cache
        .reshape((slots, width))?
        .scatter_set(index, &rows(k)?, 0)?;
    v_cache
        .reshape((slots, width))?
        .scatter_set(index, &rows(v)?, 0)?;
    Ok(())
}

pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &AttentionMeta,
) -> Result<Tensor> {
    let device = q.device();
    let dtype = q.dtype();
    let (h, kv, d) = (meta.num_heads, meta.num_kv_heads, meta.head_dim);
    let group = h / kv;
    let slots = k_cache.dims()[0] * k_cache.dims()[1];
    let k_flat = k_cache.reshape((slots, kv, d))?;
    let v_flat = v_cache.reshape((slots, kv, d))?;
    let mut outs = Vec::with_capacity(meta.seqs.len());
    for s in &meta.seqs {
        let ctx = s.context_len();
        let ctx_slots: Vec<u32> = (0..ctx)
            .map(|p| {
                s.blocks[p / meta.block_size] * meta.block_size as u32
                    + (p % meta.block_size) as u32
            })
            .collect();
        let idx = Tensor::from_vec(ctx_slots, ctx, device)?;
        let gather = |cache: &Tensor| -> Result<Tensor> {
            // [ctx, kv, d] -> [kv, ctx, d] -> [h, ctx, d] (each kv head serves `group` query heads)
            let x = cache
                .index_select(&idx, 0)?
                .to_dtype(DType::F32)?
                .transpose(0, 1)?;
            Ok(x.unsqueeze(1)?
                .expand((kv, group, ctx, d))?
                .reshape((h, ctx, d))?
                .contiguous()?)
        };
        let k = gather(&k_flat)?;
        let v = gather(&v_flat)?;
        let qs = q
            .narrow(0, s.q_start, s.q_len)?
            .to_dtype(DType::F32)?
            .transpose(0, 1)?
            .contiguous()?; // [h, q_len, d]
        let mut att = (qs.matmul(&k.t()?)? * meta.scale as f64)?; // [h, q_len, ctx]
        if s.q_len > 1 {
            let mask: Vec<f32> = (0..s.q_len)
                .flat_map(|i| {
                    let pos = s.start_pos + i;
                    (0..ctx).map(move |j| if j <= pos { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (1, s.q_len, ctx), device)?;
            att = att.broadcast_add(&mask)?;
        }
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let out = att.matmul(&v)?.transpose(0, 1)?; // [q_len, h, d]
        outs.push(out.to_dtype(dtype)?);
    }
    Ok(Tensor::cat(&outs, 0)?.contiguous()?)
}
