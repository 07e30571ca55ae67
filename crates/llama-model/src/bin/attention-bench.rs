//! `attention-bench`: the paged-attention kernel alone, timed over many
//! back-to-back launches (no per-launch sync), against the bytes of K/V it
//! must read. Tells the kernel's own cost apart from the rest of a step.

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use llama_model::attention::{self, AttentionImpl, AttentionMeta, SeqAttention};
use llama_model::{BlockAllocator, BlockTable, DTypeSpec, DeviceSpec, Tensor};

#[derive(Parser, Debug)]
#[command(name = "attention-bench", about = "Paged-attention kernel time")]
struct Args {
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 32)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// `SEQSxCTX` (decode: one new token per sequence at context CTX) or
    /// `pSEQSxLEN` (prefill: LEN new tokens per sequence from position 0).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1x128,1x512,1x4096,64x128,64x512,p1x512"
    )]
    cases: Vec<String>,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long, default_value = "auto", value_parser = ["auto", "generic", "cuda-cores"])]
    kernels: String,
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = args.device.parse::<DeviceSpec>()?.open()?;
    let dtype = args.dtype.parse::<DTypeSpec>()?.dtype();
    let imp = args
        .kernels
        .parse::<AttentionImpl>()
        .map_err(anyhow::Error::msg)?;
    let (h, kvh, d) = (args.heads, args.kv_heads, args.head_dim);
    let block_size = 16;
    let mut rows = Vec::new();
    for case in &args.cases {
        let (prefill, spec) = match case.strip_prefix('p') {
            Some(rest) => (true, rest),
            None => (false, case.as_str()),
        };
        let (seqs, len) = spec
            .split_once('x')
            .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)))
            .ok_or_else(|| anyhow::anyhow!("case `{case}`: expected SEQSxCTX or pSEQSxLEN"))?;
        let blocks_per_seq = len.div_ceil(block_size) + 1;
        let num_blocks = seqs * blocks_per_seq;
        let mut pool = BlockAllocator::new(num_blocks, block_size)?;
        let mut step = Vec::new();
        let mut q_start = 0;
        for _ in 0..seqs {
            let mut t = BlockTable::new();
            pool.ensure_capacity(&mut t, len)?;
            let (start_pos, q_len) = if prefill { (0, len) } else { (len - 1, 1) };
            step.push(SeqAttention {
                q_start,
                q_len,
                start_pos,
                blocks: t.blocks().to_vec(),
            });
            q_start += q_len;
        }
        let n = q_start;
        let meta = AttentionMeta::new(step, block_size, h, kvh, d, imp);
        let cache = (num_blocks, block_size, kvh, d);
        let k_cache = Tensor::randn(0f32, 1.0, cache, &device)?.to_dtype(dtype)?;
        let v_cache = Tensor::randn(0f32, 1.0, cache, &device)?.to_dtype(dtype)?;
        let q = Tensor::randn(0f32, 1.0, (n, h, d), &device)?.to_dtype(dtype)?;
        attention::paged_attention(&q, &k_cache, &v_cache, &meta)?;
        device.synchronize()?;
        let t0 = Instant::now();
        for _ in 0..args.iters {
            attention::paged_attention(&q, &k_cache, &v_cache, &meta)?;
        }
        device.synchronize()?;
        let us = t0.elapsed().as_secs_f64() * 1e6 / args.iters as f64;
        // K and V rows each token's context covers, read once per (token, kv head).
        let keys: usize = if prefill {
            seqs * len * (len + 1) / 2
        } else {
            seqs * len
        };
        let bytes = keys * 2 * kvh * d * dtype.size_in_bytes();
        let gbs = bytes as f64 / (us * 1e-6) / 1e9;
        if !args.json {
            eprintln!("{case:>10}: {us:>9.1} µs per call, {gbs:>8.1} GB/s of K/V");
        }
        rows.push(serde_json::json!({"case": case, "us": us, "kv_gb_s": gbs}));
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"device": args.device, "kernels": args.kernels, "results": rows})
        );
    }
    Ok(())
}
