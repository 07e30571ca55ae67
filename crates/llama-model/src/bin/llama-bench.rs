//! `llama-bench`: prefill and decode throughput of the model alone (no engine, no HTTP).
//!
//! Decode steps run at a context of `--prompt-len` tokens per sequence. The
//! cache for that context is reserved but not computed by a prefill: attention
//! cost depends on the context length, not on the cached values, and skipping
//! 64 prefills keeps CPU runs short.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use llama_model::{
    resolve_shape, AttentionImpl, BatchInput, BlockTable, DTypeSpec, DecodeGraphs, DeviceSpec,
    KvBudget, KvCacheSpec, LlamaModel, ModelOptions, SeqChunk,
};

#[derive(Parser, Debug)]
#[command(
    name = "llama-bench",
    about = "Prefill and decode tokens/s of a Llama model"
)]
struct Args {
    /// Synthesize seeded random weights of this shape: tiny, 134m, 7b, 13b, 70b, or a config.json.
    #[arg(long, conflicts_with = "model")]
    random_weights: Option<String>,
    /// A local Hugging Face model directory.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    batch_sizes: Vec<usize>,
    /// Prompt lengths: each is timed as one prefill and used as the decode context.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    prompt_len: Vec<usize>,
    /// Decode steps timed per batch size.
    #[arg(long, default_value_t = 32)]
    gen: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Fused kernels (`auto`), plain Candle ops only (`generic`), or the fused
    /// kernels with prompt attention on CUDA cores (`cuda-cores`), to measure
    /// the kernels' gain in one run.
    #[arg(long, default_value = "auto", value_parser = ["auto", "generic", "cuda-cores"])]
    kernels: String,
    /// After timing, run one prefill and one decode step per row with a device
    /// sync after every stage, and report where the time went.
    #[arg(long)]
    profile: bool,
    /// KV cache element type: auto (the model's), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Decode projections of up to 4 rows by the weight-streaming CUDA kernel
    /// instead of cuBLAS.
    #[arg(long)]
    gemv: bool,
    /// Replay decode steps as CUDA graphs (recorded before the timed steps).
    #[arg(long)]
    cuda_graphs: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn synchronize(model: &LlamaModel) -> Result<()> {
    model.device().synchronize()?;
    Ok(())
}

struct Row {
    batch: usize,
    prompt_len: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    ms_per_step: f64,
    /// Host time to enqueue one step's forward (before reading back the ids).
    submit_ms_per_step: f64,
    /// `--profile`: milliseconds per forward stage.
    prefill_profile: Vec<(&'static str, f64)>,
    decode_profile: Vec<(&'static str, f64)>,
    /// Decode steps served by a CUDA graph replay (`--cuda-graphs`).
    graph_steps: u64,
}

fn stages_ms(stages: Vec<(&'static str, std::time::Duration)>) -> Vec<(&'static str, f64)> {
    stages
        .into_iter()
        .map(|(name, d)| (name, d.as_secs_f64() * 1000.0))
        .collect()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = args.device.parse::<DeviceSpec>()?.open()?;
    let dtype = args.dtype.parse::<DTypeSpec>()?;
    let options = ModelOptions {
        dtype: dtype.dtype(),
        attention: args
            .kernels
            .parse::<AttentionImpl>()
            .map_err(anyhow::Error::msg)?,
        gemv: args.gemv,
    };
    let (model, shape_name) = match (&args.random_weights, &args.model) {
        (Some(shape), None) => {
            let cfg = resolve_shape(shape)?;
            (
                LlamaModel::random(cfg, args.seed, &device, options)?,
                shape.clone(),
            )
        }
        (None, Some(dir)) => (
            LlamaModel::load(dir, &device, options)
                .with_context(|| format!("loading {}", dir.display()))?,
            dir.display().to_string(),
        ),
        _ => bail!("give exactly one of --random-weights SHAPE or --model DIR"),
    };
    let cfg = model.config().clone();
    let max_batch = *args.batch_sizes.iter().max().unwrap_or(&1);
    let max_prompt = *args.prompt_len.iter().max().unwrap_or(&128);
    let per_seq = max_prompt + args.gen + args.warmup + 1;
    if per_seq > cfg.max_position_embeddings {
        bail!(
            "prompt + gen = {per_seq} exceeds the model's {} positions",
            cfg.max_position_embeddings
        );
    }
    let block_size = 16;
    let blocks_per_seq = per_seq.div_ceil(block_size);
    let spec = KvCacheSpec {
        block_size,
        budget: KvBudget::Tokens(max_batch * blocks_per_seq * block_size),
        dtype: KvCacheSpec::parse_dtype(&args.kv_cache_dtype)
            .map_err(|e| anyhow::anyhow!("--kv-cache-dtype: {e}"))?,
    };
    let kv = model.new_kv_cache(&spec)?;
    let mut alloc = kv.allocator();
    let mut graphs = if args.cuda_graphs {
        let g = DecodeGraphs::new(&model, &kv, max_batch)?;
        if g.is_none() {
            bail!("--cuda-graphs: this model does not run the CUDA kernels");
        }
        g
    } else {
        None
    };
    let vocab = cfg.vocab_size as u32;
    let token = |i: usize| ((i as u64 * 2654435761 + 17) % (vocab as u64 - 3)) as u32 + 3;

    let mut rows = Vec::new();
    for &prompt_len in &args.prompt_len {
        // Prefill: one prompt, timed after a warm-up run.
        let prompt: Vec<u32> = (0..prompt_len).map(token).collect();
        let mut table = BlockTable::new();
        alloc.ensure_capacity(&mut table, prompt_len)?;
        let run_prefill = || -> Result<()> {
            let batch = BatchInput::new(vec![SeqChunk {
                tokens: &prompt,
                start_pos: 0,
                block_table: &table,
                all_logits: false,
            }]);
            model.forward(&batch, &kv)?.values.to_vec2::<f32>()?;
            Ok(())
        };
        run_prefill()?;
        synchronize(&model)?;
        let reps = if prompt_len * cfg.num_parameters() > 50_000_000_000 {
            1
        } else {
            3
        };
        let t0 = Instant::now();
        for _ in 0..reps {
            run_prefill()?;
        }
        synchronize(&model)?;
        let prefill_tok_s = (prompt_len * reps) as f64 / t0.elapsed().as_secs_f64();
        let prefill_profile = if args.profile {
            llama_model::profile::start();
            run_prefill()?;
            stages_ms(llama_model::profile::finish())
        } else {
            Vec::new()
        };
        alloc.release(&mut table)?;

        for &batch_size in &args.batch_sizes {
            let mut tables: Vec<BlockTable> = (0..batch_size).map(|_| BlockTable::new()).collect();
            for t in tables.iter_mut() {
                alloc.ensure_capacity(t, prompt_len + args.gen + args.warmup + 1)?;
            }
            let mut last: Vec<u32> = (0..batch_size).map(token).collect();
            let mut pos = prompt_len;
            if let Some(g) = graphs.as_mut() {
                // Every graph the steps below replay, recorded and checked now.
                let last_ctx = prompt_len + args.warmup + args.gen + 2;
                for ctx in prompt_len + 1..=last_ctx {
                    if !g.prepare(&model, &kv, batch_size, ctx)? {
                        bail!(
                            "--cuda-graphs: {}",
                            g.disabled_reason().unwrap_or("graphs are off")
                        );
                    }
                }
            }
            let replayed_before = graphs.as_ref().map_or(0, |g| g.stats().replayed);
            let submit_secs = std::cell::Cell::new(0.0f64);
            let mut decode_step = |pos: usize, last: &mut Vec<u32>| -> Result<()> {
                let toks: Vec<[u32; 1]> = last.iter().map(|&t| [t]).collect();
                let batch = BatchInput::new(
                    toks.iter()
                        .zip(&tables)
                        .map(|(t, table)| SeqChunk {
                            tokens: t,
                            start_pos: pos,
                            block_table: table,
                            all_logits: false,
                        })
                        .collect(),
                );
                let t = Instant::now();
                let logits = model.forward_graphed(&batch, &kv, graphs.as_mut())?;
                // Time to enqueue the step: on a GPU, if this is close to the
                // step time, the host (launch overhead) is the bottleneck.
                submit_secs.set(submit_secs.get() + t.elapsed().as_secs_f64());
                // Greedy on the device, reading back only the ids, as a server would.
                let ids: Vec<u32> = logits.last()?.argmax(candle_core::D::Minus1)?.to_vec1()?;
                *last = ids;
                Ok(())
            };
            for _ in 0..args.warmup {
                decode_step(pos, &mut last)?;
                pos += 1;
            }
            synchronize(&model)?;
            submit_secs.set(0.0);
            let t0 = Instant::now();
            for _ in 0..args.gen {
                decode_step(pos, &mut last)?;
                pos += 1;
            }
            synchronize(&model)?;
            let secs = t0.elapsed().as_secs_f64();
            let decode_profile = if args.profile {
                llama_model::profile::start();
                decode_step(pos, &mut last)?;
                stages_ms(llama_model::profile::finish())
            } else {
                Vec::new()
            };
            for t in tables.iter_mut() {
                alloc.release(t)?;
            }
            let graph_steps = graphs.as_ref().map_or(0, |g| g.stats().replayed) - replayed_before;
            rows.push(Row {
                batch: batch_size,
                prompt_len,
                prefill_tok_s,
                decode_tok_s: (batch_size * args.gen) as f64 / secs,
                ms_per_step: secs * 1000.0 / args.gen as f64,
                submit_ms_per_step: submit_secs.get() * 1000.0 / args.gen as f64,
                prefill_profile: prefill_profile.clone(),
                decode_profile,
                graph_steps,
            });
            if !args.json {
                let r = rows.last().unwrap();
                eprintln!(
                    "batch {:>3} ctx {:>4}: {:>9.1} tok/s decode, {:>8.2} ms/step",
                    r.batch, r.prompt_len, r.decode_tok_s, r.ms_per_step
                );
            }
        }
    }

    let kv_bytes_per_token = cfg.kv_bytes_per_token(dtype.size_in_bytes());
    let rss = peak_rss_bytes();
    if args.json {
        let results: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "batch": r.batch,
                    "prompt_len": r.prompt_len,
                    "prefill_tok_s": r.prefill_tok_s,
                    "decode_tok_s": r.decode_tok_s,
                    "ms_per_step": r.ms_per_step,
                    "submit_ms_per_step": r.submit_ms_per_step,
                    "prefill_profile_ms": r.prefill_profile,
                    "decode_profile_ms": r.decode_profile,
                    "graph_steps": r.graph_steps,
                })
            })
            .collect();
        let out = serde_json::json!({
            "device": args.device,
            "kernels": args.kernels,
            "cuda_graphs": args.cuda_graphs,
            "gemv": args.gemv,
            "dtype": dtype.to_string(),
            "shape": shape_name,
            "parameters": cfg.num_parameters(),
            "kv_bytes_per_token": kv_bytes_per_token,
            "peak_rss_bytes": rss,
            "results": results,
        });
        println!("{out}");
    } else {
        println!(
            "model {shape_name} ({:.1}M params), device {}, dtype {dtype}, KV {} bytes/token, peak RSS {:.1} MiB",
            cfg.num_parameters() as f64 / 1e6,
            args.device,
            kv_bytes_per_token,
            rss.unwrap_or(0) as f64 / (1 << 20) as f64
        );
        println!("| batch | prompt_len | prefill tok/s | decode tok/s | ms/step |");
        println!("|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.2} |",
                r.batch, r.prompt_len, r.prefill_tok_s, r.decode_tok_s, r.ms_per_step
            );
        }
        if args.profile {
            for r in &rows {
                print_profile(&format!("prefill {}", r.prompt_len), &r.prefill_profile);
                print_profile(
                    &format!("decode batch {} ctx {}", r.batch, r.prompt_len),
                    &r.decode_profile,
                );
            }
        }
    }
    Ok(())
}

fn print_profile(title: &str, stages: &[(&'static str, f64)]) {
    let total: f64 = stages.iter().map(|(_, ms)| ms).sum();
    println!("\n{title}: {total:.2} ms");
    for (stage, ms) in stages {
        println!(
            "  {stage:<16} {ms:>8.2} ms {:>5.1}%",
            100.0 * ms / total.max(1e-9)
        );
    }
}
