//! The fused kernels against the plain-Candle path, on the device named by
//! `LLAMA_TEST_DEVICE` (cpu by default; scripts/gpu-run.sh runs them on cuda).
//! On CPU this checks the CPU attention kernel; on CUDA every kernel of
//! `kernels/llama.cu`: paged attention, RoPE + cache write, add + RMSNorm, SwiGLU.

use llama_model::attention::{self, AttentionImpl, AttentionMeta, SeqAttention};
use llama_model::fused;
use llama_model::rope::RopeTables;
use llama_model::{
    resolve_shape, BatchInput, BlockAllocator, BlockTable, DType, DecodeGraphs, Device, KvBudget,
    KvCacheSpec, LlamaConfig, LlamaModel, ModelOptions, SeqChunk, Tensor,
};

fn device() -> Device {
    let spec = std::env::var("LLAMA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    spec.parse::<llama_model::DeviceSpec>()
        .unwrap()
        .open()
        .unwrap()
}

/// Deterministic values in [-2, 2] that differ from element to element.
fn wave(shape: &[usize], freq: f64, phase: f64, dtype: DType, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    // u32 indices: an f32 arange stops counting at 2^24.
    Tensor::arange(0u32, n as u32, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
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
        .to_device(dev)
        .unwrap()
}

/// ‖a − b‖ / ‖b‖ in f32.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt()
    };
    norm(&(&a - &b).unwrap()) / norm(&b)
}

fn tolerance(dtype: DType) -> f32 {
    if dtype == DType::F32 {
        1e-4
    } else {
        1e-2
    }
}

const BLOCK_SIZE: usize = 16;
const NUM_BLOCKS: usize = 128;

/// Sequences as (start_pos, new tokens): decodes, prompt chunks, block
/// boundaries (15 → 16, 31 → 32), tile and key-chunk boundaries of the
/// prefill kernels, and odd lengths, with block tables that are not
/// contiguous runs of the pool.
fn step(chunks: &[(usize, usize)]) -> Vec<SeqAttention> {
    let mut pool = BlockAllocator::new(NUM_BLOCKS, BLOCK_SIZE).unwrap();
    let mut seqs = Vec::new();
    let mut q_start = 0;
    for &(start_pos, q_len) in chunks {
        let mut spare = BlockTable::new();
        pool.ensure_capacity(&mut spare, BLOCK_SIZE).unwrap();
        let mut t = BlockTable::new();
        pool.ensure_capacity(&mut t, start_pos + q_len).unwrap();
        seqs.push(SeqAttention {
            q_start,
            q_len,
            start_pos,
            blocks: t.blocks().to_vec(),
        });
        q_start += q_len;
    }
    seqs
}

const CHUNKS: &[(usize, usize)] = &[
    (0, 7),
    (3, 1),
    (15, 1),
    (16, 5),
    (0, 1),
    (30, 3),
    (100, 1),
    (0, 37),
    (250, 1),
    // Prompts over several 64-token tiles and key chunks: from position 0,
    // from inside a chunk (a later chunk of a chunked prefill), and from a
    // chunk boundary with a one-token last tile.
    (0, 150),
    (70, 90),
    (128, 65),
];

/// A decode-only step with short contexts: the decode kernel then runs with
/// fewer warps than its maximum.
const SHORT_DECODES: &[(usize, usize)] = &[(3, 1), (15, 1), (40, 1), (0, 1), (63, 1)];

fn shape_cases() -> Vec<(usize, usize, usize)> {
    // (heads, kv_heads, head_dim): GQA ratios 1, 4, 8 and the head sizes of Llama 2 and the fixture.
    let mut v = Vec::new();
    for (h, kv) in [(8, 8), (8, 2), (8, 1)] {
        for d in [16, 64, 128] {
            v.push((h, kv, d));
        }
    }
    // A head size that is no power of two, and the largest the kernels take
    // (the latter also exercises the shared-memory fallbacks).
    v.push((8, 2, 80));
    v.push((8, 1, 256));
    v
}

#[test]
fn paged_attention_matches_the_plain_path() {
    let dev = device();
    for (dtype, chunks) in [DType::F32, DType::BF16, DType::F16]
        .into_iter()
        .flat_map(|dt| [(dt, CHUNKS), (dt, SHORT_DECODES)])
    {
        let seqs = step(chunks);
        let n: usize = seqs.iter().map(|s| s.q_len).sum();
        for (h, kvh, d) in shape_cases() {
            let run = |imp| {
                let meta = AttentionMeta::new(seqs.clone(), BLOCK_SIZE, h, kvh, d, imp);
                let cache = [NUM_BLOCKS, BLOCK_SIZE, kvh, d];
                let k_cache = wave(&cache, 0.37, 0.0, dtype, &dev);
                let v_cache = wave(&cache, 0.53, 0.4, dtype, &dev);
                let q = wave(&[n, h, d], 0.11, 0.2, dtype, &dev);
                let k = wave(&[n, kvh, d], 0.23, 0.9, dtype, &dev);
                let v = wave(&[n, kvh, d], 0.31, 0.5, dtype, &dev);
                attention::write_kv(&k_cache, &v_cache, &k, &v, &meta).unwrap();
                attention::paged_attention(&q, &k_cache, &v_cache, &meta).unwrap()
            };
            let reference = run(AttentionImpl::Generic);
            // Auto runs prompts on tensor cores where the kernel is built for
            // the dtype and head size (CUDA, f16/bf16, d 64 or 128).
            for imp in [AttentionImpl::Auto, AttentionImpl::CudaCorePrefill] {
                let rel = rel_err(&run(imp), &reference);
                println!(
                    "attention {imp:?} {dtype:?} h={h} kv={kvh} d={d} ({} seqs): rel {rel:.2e}",
                    seqs.len()
                );
                assert!(
                    rel < tolerance(dtype),
                    "{imp:?} {dtype:?} h={h} kv={kvh} d={d} ({} seqs): {rel}",
                    seqs.len()
                );
            }
        }
    }
}

fn small_config(h: usize, kvh: usize, d: usize) -> LlamaConfig {
    let mut cfg = resolve_shape("tiny").unwrap();
    cfg.num_attention_heads = h;
    cfg.num_key_value_heads = kvh;
    cfg.head_dim = d;
    cfg.hidden_size = h * d;
    cfg.intermediate_size = 3 * h * d;
    cfg.max_position_embeddings = 512;
    cfg
}

#[test]
fn rope_and_cache_write_match_the_plain_path() {
    let dev = device();
    let seqs = step(CHUNKS);
    let n: usize = seqs.iter().map(|s| s.q_len).sum();
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (h, kvh, d) in shape_cases() {
            let cfg = small_config(h, kvh, d);
            let rope = RopeTables::new(&cfg, dtype, &dev).unwrap();
            let positions: Vec<u32> = seqs
                .iter()
                .flat_map(|s| (s.start_pos..s.context_len()).map(|p| p as u32))
                .collect();
            let pos = Tensor::from_vec(positions, n, &dev).unwrap();
            let qkv = wave(&[n, (h + 2 * kvh) * d], 0.19, 0.3, dtype, &dev);
            let run = |imp| {
                let meta = AttentionMeta::new(seqs.clone(), BLOCK_SIZE, h, kvh, d, imp);
                let step_rope = fused::StepRope::new(&rope, &pos, &meta).unwrap();
                let cache = [NUM_BLOCKS, BLOCK_SIZE, kvh, d];
                let k_cache = Tensor::zeros(cache.to_vec(), dtype, &dev).unwrap();
                let v_cache = Tensor::zeros(cache.to_vec(), dtype, &dev).unwrap();
                let q =
                    fused::rope_and_write_kv(&qkv, &rope, &step_rope, (&k_cache, &v_cache), &meta)
                        .unwrap();
                (q, k_cache, v_cache)
            };
            let (q1, k1, v1) = run(AttentionImpl::Auto);
            let (q2, k2, v2) = run(AttentionImpl::Generic);
            for (what, a, b) in [
                ("q", &q1, &q2),
                ("k cache", &k1, &k2),
                ("v cache", &v1, &v2),
            ] {
                let rel = rel_err(a, b);
                assert!(
                    rel < tolerance(dtype),
                    "{what} {dtype:?} h={h} kv={kvh} d={d}: {rel}"
                );
            }
        }
    }
}

#[test]
fn add_rms_norm_and_swiglu_match_the_plain_path() {
    let dev = device();
    let seqs = step(&[(0, 3)]);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for (rows, hidden) in [(1, 64), (3, 4096), (37, 768), (5, 5120)] {
            let x = wave(&[rows, hidden], 0.07, 0.1, dtype, &dev);
            let delta = wave(&[rows, hidden], 0.13, 0.6, dtype, &dev);
            let w = wave(&[hidden], 0.29, 0.8, dtype, &dev);
            let gate_up = wave(&[rows, 2 * hidden], 0.17, 0.2, dtype, &dev);
            let run = |imp| {
                let meta = AttentionMeta::new(seqs.clone(), BLOCK_SIZE, 1, 1, 16, imp);
                let (sum, normed) = fused::add_rms_norm(&x, &delta, &w, 1e-5, &meta).unwrap();
                let act = fused::swiglu(&gate_up, &meta).unwrap();
                (sum, normed, act)
            };
            let (s1, n1, a1) = run(AttentionImpl::Auto);
            let (s2, n2, a2) = run(AttentionImpl::Generic);
            for (what, a, b) in [("sum", &s1, &s2), ("norm", &n1, &n2), ("swiglu", &a1, &a2)] {
                let rel = rel_err(a, b);
                assert!(
                    rel < tolerance(dtype),
                    "{what} {dtype:?} {rows}x{hidden}: {rel}"
                );
            }
        }
    }
}

/// The whole forward, fused kernels on vs off, on a mixed step of prompt
/// chunks and decodes, for GQA ratios 1, 4 and 8.
#[test]
fn forward_with_fused_kernels_matches_the_plain_path() {
    let dev = device();
    for dtype in [DType::F32, DType::BF16] {
        for (h, kvh, d) in [(8, 8, 32), (8, 2, 64), (8, 1, 128)] {
            let cfg = small_config(h, kvh, d);
            let opts = ModelOptions {
                dtype,
                ..ModelOptions::default()
            };
            let mut model = LlamaModel::random(cfg.clone(), 7, &dev, opts).unwrap();
            let spec = KvCacheSpec {
                block_size: BLOCK_SIZE,
                budget: KvBudget::Tokens(NUM_BLOCKS * BLOCK_SIZE),
                dtype: None,
            };
            let prompts: Vec<Vec<u32>> = [5usize, 17, 33, 1]
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    (0..len)
                        .map(|t| ((t * 31 + i * 7) % 1000 + 3) as u32)
                        .collect()
                })
                .collect();
            let mut logits = Vec::new();
            for imp in [AttentionImpl::Auto, AttentionImpl::Generic] {
                model.set_attention(imp);
                let kv = model.new_kv_cache(&spec).unwrap();
                let mut pool = kv.allocator();
                let mut tables: Vec<BlockTable> =
                    prompts.iter().map(|_| BlockTable::new()).collect();
                for (t, p) in tables.iter_mut().zip(&prompts) {
                    pool.ensure_capacity(t, p.len() + 2).unwrap();
                }
                let batch = BatchInput::new(
                    prompts
                        .iter()
                        .zip(&tables)
                        .map(|(p, t)| SeqChunk {
                            tokens: p,
                            start_pos: 0,
                            block_table: t,
                            all_logits: false,
                        })
                        .collect(),
                );
                let first = model.forward(&batch, &kv).unwrap().last().unwrap();
                let next: Vec<[u32; 1]> = prompts.iter().map(|p| [p[0] + 1]).collect();
                let batch = BatchInput::new(
                    next.iter()
                        .zip(&tables)
                        .zip(&prompts)
                        .map(|((tok, t), p)| SeqChunk {
                            tokens: tok,
                            start_pos: p.len(),
                            block_table: t,
                            all_logits: false,
                        })
                        .collect(),
                );
                let second = model.forward(&batch, &kv).unwrap().last().unwrap();
                logits.push((first, second));
            }
            let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            for (what, a, b) in [
                ("prefill", &logits[0].0, &logits[1].0),
                ("decode", &logits[0].1, &logits[1].1),
            ] {
                let rel = rel_err(a, b);
                println!("forward {what} {dtype:?} h={h} kv={kvh} d={d}: rel {rel:.2e}");
                assert!(rel < tol, "{what} {dtype:?} h={h} kv={kvh} d={d}: {rel}");
            }
        }
    }
}

/// The weight-streaming decode projection (`--gemv`) against the plain
/// matmul: 1 to 4 rows (5 falls back), weights whose row count is not a
/// multiple of the block's four rows, `k` over several rounds of the warps'
/// steps and a partial last step, and a `k` the kernel does not take (100
/// halves are not whole 16-byte vectors: the plain path). Then a whole
/// decode step with it on and off. On the CPU both sides are the plain path.
#[test]
fn gemv_matches_the_plain_matmul() {
    let dev = device();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for (n, k) in [(103, 64), (257, 1000), (64, 11008), (50, 100), (4096, 512)] {
            let w = wave(&[n, k], 0.37, 0.1, dtype, &dev)
                .affine(0.05, 0.0)
                .unwrap();
            let linear = llama_model::linear::Linear::dense(w).unwrap();
            for m in 1..=5 {
                let x = wave(&[m, k], 0.11, 0.7, dtype, &dev);
                let plain = linear.forward(&x).unwrap();
                let gemv = linear.forward_gemv(&x, true).unwrap();
                assert_eq!(gemv.dims(), [m, n]);
                let rel = rel_err(&gemv, &plain);
                println!("gemv {dtype:?} n={n} k={k} m={m}: rel {rel:.2e}");
                assert!(rel < tolerance(dtype), "{dtype:?} n={n} k={k} m={m}: {rel}");
            }
        }
        // A decode step of 1 and of 3 sequences, GEMV on and off.
        let cfg = small_config(8, 2, 64);
        let mut logits = Vec::new();
        for gemv in [true, false] {
            let opts = ModelOptions {
                dtype,
                gemv,
                ..ModelOptions::default()
            };
            let model = LlamaModel::random(cfg.clone(), 7, &dev, opts).unwrap();
            let spec = KvCacheSpec {
                block_size: BLOCK_SIZE,
                budget: KvBudget::Tokens(NUM_BLOCKS * BLOCK_SIZE),
                dtype: None,
            };
            let kv = model.new_kv_cache(&spec).unwrap();
            let mut pool = kv.allocator();
            let mut tables: Vec<BlockTable> = (0..3).map(|_| BlockTable::new()).collect();
            for t in tables.iter_mut() {
                pool.ensure_capacity(t, 8).unwrap();
            }
            let toks: Vec<[u32; 1]> = (0..3).map(|i| [i as u32 * 11 + 5]).collect();
            for seqs in [1, 3] {
                let batch = BatchInput::new(
                    (0..seqs)
                        .map(|i| SeqChunk {
                            tokens: &toks[i],
                            start_pos: seqs - 1,
                            block_table: &tables[i],
                            all_logits: false,
                        })
                        .collect(),
                );
                logits.push(model.forward(&batch, &kv).unwrap().last().unwrap());
            }
        }
        for (i, seqs) in [1, 3].iter().enumerate() {
            let rel = rel_err(&logits[i], &logits[i + 2]);
            println!("gemv forward {dtype:?} {seqs} sequences: rel {rel:.2e}");
            let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            assert!(rel < tol, "{dtype:?} {seqs} sequences: {rel}");
        }
    }
}

/// Decode steps replayed as CUDA graphs against the same steps run plainly,
/// each side with its own cache: batch sizes that pad (3 → 4, 5 → 8, 9 →
/// 16) and contexts that change the graph's warp count, with graphs both
/// recorded ahead (`prepare`) and on the fly. A padding row that wrote into
/// the cache, or a graph that read a stale input, would change the logits of
/// later steps. On the CPU there are no graphs to make.
#[test]
fn decode_graphs_replay_the_plain_steps() {
    let dev = device();
    let spec = KvCacheSpec {
        block_size: BLOCK_SIZE,
        budget: KvBudget::Tokens(NUM_BLOCKS * BLOCK_SIZE),
        dtype: None,
    };
    for dtype in [DType::F32, DType::BF16] {
        for (h, kvh, d) in [(8, 2, 64), (8, 8, 32)] {
            let opts = ModelOptions {
                dtype,
                ..ModelOptions::default()
            };
            let model = LlamaModel::random(small_config(h, kvh, d), 7, &dev, opts).unwrap();
            let plain_kv = model.new_kv_cache(&spec).unwrap();
            let graph_kv = model.new_kv_cache(&spec).unwrap();
            let Some(mut graphs) = DecodeGraphs::new(&model, &graph_kv, 16).unwrap() else {
                assert!(!dev.is_cuda(), "no graphs on CUDA");
                return;
            };
            // Ahead of time: batches of 3 and 5 at contexts up to 64.
            for n in [3, 5] {
                assert!(graphs.prepare(&model, &graph_kv, n, 64).unwrap());
            }
            let prompt_lens = [1usize, 20, 40, 70, 100, 9, 15, 33, 64];
            let (mut plain_pool, mut graph_pool) = (plain_kv.allocator(), graph_kv.allocator());
            let mut tables: Vec<(BlockTable, BlockTable)> = prompt_lens
                .iter()
                .map(|_| (BlockTable::new(), BlockTable::new()))
                .collect();
            let mut positions = vec![0usize; prompt_lens.len()];
            let mut next = vec![0u32; prompt_lens.len()];
            let active_per_step = [9, 3, 3, 3, 5, 5, 5, 1, 1, 1, 2, 9, 9, 9, 4, 5, 3, 9];
            for (step, &active) in std::iter::once(&9).chain(&active_per_step).enumerate() {
                let prompts: Vec<Vec<u32>> = (0..active)
                    .map(|i| {
                        if step == 0 {
                            (0..prompt_lens[i])
                                .map(|t| ((t * 31 + i * 7) % 1000 + 3) as u32)
                                .collect()
                        } else {
                            vec![next[i]]
                        }
                    })
                    .collect();
                for (i, p) in prompts.iter().enumerate() {
                    let end = positions[i] + p.len();
                    plain_pool.ensure_capacity(&mut tables[i].0, end).unwrap();
                    graph_pool.ensure_capacity(&mut tables[i].1, end).unwrap();
                }
                let batch = |graph_side: bool| {
                    BatchInput::new(
                        prompts
                            .iter()
                            .enumerate()
                            .map(|(i, p)| SeqChunk {
                                tokens: p,
                                start_pos: positions[i],
                                block_table: if graph_side {
                                    &tables[i].1
                                } else {
                                    &tables[i].0
                                },
                                all_logits: false,
                            })
                            .collect(),
                    )
                };
                let plain = model
                    .forward(&batch(false), &plain_kv)
                    .unwrap()
                    .last()
                    .unwrap();
                let replayed = model
                    .forward_graphed(&batch(true), &graph_kv, Some(&mut graphs))
                    .unwrap()
                    .last()
                    .unwrap();
                let rel = rel_err(&replayed, &plain);
                let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
                assert!(
                    rel < tol,
                    "{dtype:?} h={h} kv={kvh} d={d} step {step} ({active} sequences): rel {rel}"
                );
                let ids: Vec<u32> = plain
                    .argmax(candle_core::D::Minus1)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (i, p) in prompts.iter().enumerate() {
                    positions[i] += p.len();
                    next[i] = ids[i];
                }
            }
            let stats = graphs.stats();
            println!("graphs {dtype:?} h={h} kv={kvh} d={d}: {stats:?}");
            assert!(!stats.disabled, "{:?}", graphs.disabled_reason());
            assert!(stats.captured >= 2 && stats.replayed >= 6, "{stats:?}");
        }
    }
}

/// Token picks next to the logits (on CUDA the `pick_rows` kernel) against
/// their definition on the host, over vocabularies around the kernel's
/// per-thread spans and every filter.
#[test]
fn row_picks_match_their_definition() {
    use llama_model::sampling::{pick_row, pick_rows, RowPick};
    let dev = device();
    let filters: [(f32, u32, f32, f32); 6] = [
        (0.0, 0, 1.0, 0.0),
        (1.0, 0, 1.0, 0.0),
        (0.7, 40, 1.0, 0.0),
        (1.0, 0, 0.9, 0.0),
        (1.3, 0, 1.0, 0.05),
        (0.8, 50, 0.95, 0.02),
    ];
    for vocab in [1000, 1025, 32000, 32001] {
        for dtype in [DType::F32, DType::BF16] {
            // 96 rows: every filter with 16 draws spread over [0, 1).
            let picks: Vec<RowPick> = (0..96)
                .map(|r| {
                    let (temperature, top_k, top_p, min_p) = filters[r % filters.len()];
                    RowPick {
                        temperature,
                        top_k,
                        top_p,
                        min_p,
                        u: ((r / filters.len()) as f32 + 0.5) / 16.0,
                    }
                })
                .collect();
            // Logits in [-8, 8] with a spread like a model's; bf16 has ties.
            let logits = (wave(&[96, vocab], 0.37, 0.1, DType::F32, &dev)
                * wave(&[96, vocab], 0.011, 1.3, DType::F32, &dev))
            .unwrap()
            .affine(2.0, 0.0)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
            let got = pick_rows(&logits, &picks).unwrap();
            let rows = logits
                .to_dtype(DType::F32)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let mut differ = 0;
            for (r, (row, pick)) in rows.iter().zip(&picks).enumerate() {
                let want = pick_row(row, pick);
                if pick.temperature == 0.0 {
                    assert_eq!(got[r], want, "greedy row {r}, vocab {vocab}, {dtype:?}");
                } else if got[r] != want {
                    // The device sums the weights in another order (a tree,
                    // where the host runs one long f32 sum), so a draw within
                    // rounding of a boundary of the running sum may land on a
                    // neighbour. The pick is monotonic in u, so a right pick
                    // lies between the host's picks for u -/+ a small band.
                    let band = |du: f32| {
                        pick_row(
                            row,
                            &RowPick {
                                u: (pick.u + du).clamp(0.0, 0.999_999),
                                ..*pick
                            },
                        )
                    };
                    let (lo, hi) = (band(-1e-3), band(1e-3));
                    println!(
                        "row {r} {pick:?}, vocab {vocab}, {dtype:?}: device {} host {want} (host over u -/+ 1e-3: {lo}..={hi})",
                        got[r]
                    );
                    assert!(
                        (lo..=hi).contains(&got[r]),
                        "row {r} {pick:?}, vocab {vocab}, {dtype:?}: device picked {}, the host {want} (and {lo}..={hi} over u -/+ 1e-3)",
                        got[r]
                    );
                    differ += 1;
                }
            }
            // Rounding moves few draws: many would mean a biased sum.
            assert!(
                differ <= 8,
                "{differ} of 96 picks differ, vocab {vocab}, {dtype:?}"
            );
        }
    }
}
