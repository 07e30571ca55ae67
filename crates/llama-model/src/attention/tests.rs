use candle_core::{DType, Device, Tensor};

use super::*;
use crate::kv::{BlockAllocator, BlockTable};

fn wave(shape: &[usize], freq: f64, phase: f64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::arange(0f32, n as f32, &Device::Cpu)
        .unwrap()
        .affine(freq, phase)
        .unwrap()
        .sin()
        .unwrap()
        .affine(2.0, 0.0)
        .unwrap()
        .reshape(shape)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Runs write + attention with both implementations on the same random data.
fn compare(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    chunks: &[(usize, usize)],
    dtype: DType,
) -> f32 {
    let out = |imp| run(heads, kv_heads, head_dim, chunks, dtype, dtype, imp);
    rel_diff(&out(AttentionImpl::Auto), &out(AttentionImpl::Generic))
}

/// Write + attention with activations of `dtype` and a cache of `kv_dtype`;
/// the output in f32.
fn run(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    chunks: &[(usize, usize)],
    dtype: DType,
    kv_dtype: DType,
    imp: AttentionImpl,
) -> Tensor {
    let block_size = 4;
    let mut pool = BlockAllocator::new(64, block_size).unwrap();
    let mut tables = Vec::new();
    let mut seqs = Vec::new();
    let mut q_start = 0;
    for &(start_pos, q_len) in chunks {
        let mut t = BlockTable::new();
        // Interleave allocations so that tables are not contiguous runs of blocks.
        let mut spare = BlockTable::new();
        pool.ensure_capacity(&mut spare, block_size).unwrap();
        pool.ensure_capacity(&mut t, start_pos + q_len).unwrap();
        seqs.push(SeqAttention {
            q_start,
            q_len,
            start_pos,
            blocks: t.blocks().to_vec(),
        });
        q_start += q_len;
        tables.push(t);
    }
    let n = q_start;
    let meta = AttentionMeta::new(seqs, block_size, heads, kv_heads, head_dim, imp);
    // Deterministic pseudo-random contents: the same for every run.
    let k_cache = wave(&[64, block_size, kv_heads, head_dim], 0.37, 0.0, kv_dtype);
    let v_cache = wave(&[64, block_size, kv_heads, head_dim], 0.53, 0.4, kv_dtype);
    let q = wave(&[n, heads, head_dim], 0.11, 0.2, dtype);
    let k = wave(&[n, kv_heads, head_dim], 0.23, 0.9, dtype);
    let v = wave(&[n, kv_heads, head_dim], 0.31, 0.5, dtype);
    write_kv(&k_cache, &v_cache, &k, &v, &meta).unwrap();
    paged_attention(&q, &k_cache, &v_cache, &meta)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let reference = b;
    let diff = (a - b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    let norm = reference
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    diff / norm
}

#[test]
fn fused_cpu_matches_generic_across_shapes() {
    // (start_pos, q_len): decodes, prompt chunks, block boundaries, odd lengths.
    // A 40-token prompt spans several 16-token tiles; head size 20 leaves a
    // tail after the 8-wide vector loops.
    let chunks = [
        (0, 7),
        (3, 1),
        (15, 1),
        (16, 5),
        (4, 4),
        (0, 1),
        (30, 3),
        (0, 40),
    ];
    for (h, kv) in [(4, 4), (8, 2), (8, 1)] {
        for d in [16, 20, 64] {
            let rel = compare(h, kv, d, &chunks, DType::F32);
            assert!(rel < 1e-5, "f32 h={h} kv={kv} d={d}: {rel}");
            let rel = compare(h, kv, d, &chunks, DType::BF16);
            assert!(rel < 1e-2, "bf16 h={h} kv={kv} d={d}: {rel}");
            let rel = compare(h, kv, d, &chunks, DType::F16);
            assert!(rel < 1e-2, "f16 h={h} kv={kv} d={d}: {rel}");
        }
    }
}

#[test]
fn narrow_caches_under_f32_activations() {
    // An f16 or bf16 cache for an f32 model (--kv-cache-dtype): both
    // implementations read the same rounded values, so they agree as closely
    // as f32 runs do; against an f32 cache the difference is the rounding.
    let chunks = [(0, 7), (3, 1), (15, 1), (16, 5), (0, 40)];
    for (h, kv) in [(4, 4), (8, 2)] {
        for d in [16, 20, 64] {
            let exact = run(
                h,
                kv,
                d,
                &chunks,
                DType::F32,
                DType::F32,
                AttentionImpl::Generic,
            );
            for (kv_dtype, tol) in [(DType::F16, 2e-3), (DType::BF16, 1e-2)] {
                let out = |imp| run(h, kv, d, &chunks, DType::F32, kv_dtype, imp);
                let fused = out(AttentionImpl::Auto);
                let rel = rel_diff(&fused, &out(AttentionImpl::Generic));
                assert!(
                    rel < 1e-5,
                    "{kv_dtype:?} cache, h={h} kv={kv} d={d}: fused vs generic {rel}"
                );
                let rel = rel_diff(&fused, &exact);
                assert!(
                    rel < tol,
                    "{kv_dtype:?} cache, h={h} kv={kv} d={d}: vs f32 cache {rel}"
                );
            }
        }
    }
}
