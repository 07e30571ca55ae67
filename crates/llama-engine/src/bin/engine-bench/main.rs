//! `engine-bench`: aggregate output tokens/s and time to first token through
//! the engine (scheduler + batched forward + sampling + detokenization), at
//! several concurrency levels, with the engine's own time breakdown.

mod simulated;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use llama_engine::tokenizer::Tokenizer;
use llama_engine::{
    parse_draws_on_device, parse_on_off, parse_overlap, start_engine, start_with_runner,
    EngineConfig, EngineHandle, GenerateRequest, StreamEvent,
};
use llama_model::{
    resolve_shape, BlockAllocator, DTypeSpec, DeviceSpec, KvCacheSpec, LlamaModel, ModelOptions,
};
use simulated::{DeviceTimes, SimulatedDevice};

#[derive(Parser, Debug)]
#[command(name = "engine-bench", about = "Engine throughput at concurrency")]
struct Args {
    /// Random weights of this shape (tiny, 134m, 7b, ...) or --model DIR.
    #[arg(long, default_value = "134m", conflicts_with = "model")]
    random_weights: String,
    #[arg(long)]
    model: Option<PathBuf>,
    /// Tokenizer directory (the bundled one by default).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,128")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    gen: usize,
    /// The first N prompt tokens are the same in every request (a shared
    /// system prompt); the rest differ. 0: nothing is shared, not even across
    /// levels.
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// Automatic prefix caching: on or off.
    #[arg(long, default_value = "on")]
    prefix_caching: String,
    /// Requests per level = concurrency × rounds.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[arg(long, default_value = "2GiB")]
    kv_cache_memory: String,
    #[arg(long, default_value_t = 512)]
    max_num_batched_tokens: usize,
    /// KV cache element type: auto (the model's), f32, f16 or bf16.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Sampling temperature of every request (0 = greedy), seeded per request.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Where sampled rows are picked: auto (next to the logits on a GPU),
    /// device (next to the logits) or host (the engine's sampler).
    #[arg(long, default_value = "auto")]
    draws: String,
    /// Model kernels: auto (fused), generic (plain Candle) or cuda-cores
    /// (fused, with prompt attention on CUDA cores instead of tensor cores).
    #[arg(long, default_value = "auto")]
    kernels: String,
    /// Decode projections of up to 4 rows by the weight-streaming CUDA kernel.
    #[arg(long)]
    gemv: bool,
    /// Replay decode steps as CUDA graphs, recorded before the first request.
    #[arg(long)]
    cuda_graphs: bool,
    /// Send each step's tokens while the next step runs: auto (where steps
    /// run asynchronously, a GPU), on or off.
    #[arg(long, default_value = "auto")]
    overlap: String,
    /// No model: a stand-in device taking STEP_MS per step, the first
    /// LAUNCH_MS of it keeping the host busy (`STEP_MS[,LAUNCH_MS]`), to
    /// measure the engine's own host work and how much of it overlaps.
    #[arg(long, value_name = "STEP_MS[,LAUNCH_MS]")]
    simulate_device: Option<DeviceTimes>,

    #[arg(long)]
    json: bool,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let dtype = args.dtype.parse::<DTypeSpec>()?;
    let max_conc = *args.concurrency.iter().max().unwrap_or(&1);
    let config = EngineConfig {
        max_num_seqs: max_conc.max(1),
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_queue: max_conc * args.rounds + 16,
        kv_cache: KvCacheSpec {
            block_size: 16,
            budget: args.kv_cache_memory.parse().map_err(anyhow::Error::msg)?,
            dtype: KvCacheSpec::parse_dtype(&args.kv_cache_dtype)
                .map_err(|e| anyhow::anyhow!("--kv-cache-dtype: {e}"))?,
        },
        draws_on_device: parse_draws_on_device(&args.draws)
            .map_err(|e| anyhow::anyhow!("--draws: {e}"))?,
        cuda_graphs: args.cuda_graphs,
        overlap: parse_overlap(&args.overlap).map_err(|e| anyhow::anyhow!("--overlap: {e}"))?,
        prefix_caching: parse_on_off(&args.prefix_caching)
            .map_err(|e| anyhow::anyhow!("--prefix-caching: {e}"))?,
        ..Default::default()
    };
    if args.shared_prefix >= args.prompt_len {
        bail!("--shared-prefix must be shorter than --prompt-len");
    }
    let handle = match args.simulate_device {
        Some(times) => simulated_engine(&args, times, max_conc, config)?,
        None => model_engine(&args, dtype, config)?,
    };
    if args.prompt_len + args.gen > handle.max_context() {
        bail!(
            "prompt + gen exceeds the context of {}",
            handle.max_context()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // One short request first, so that one-time costs (CUDA's PTX JIT, the
    // allocator's first growth) are not charged to the first level.
    rt.block_on(async {
        let mut req = GenerateRequest::new(vec![1, 100, 200, 300], 4);
        req.stop.ignore_eos = true;
        let mut g = handle.submit(req).expect("empty queue");
        while let Some(ev) = g.next_event().await {
            ev.expect("warm-up request failed");
        }
    });
    let mut rows = Vec::new();
    // Numbers requests across levels, so that no level finds another's
    // prompts in the prefix cache.
    let mut next_request = 0;
    for &conc in &args.concurrency {
        let before = handle.stats();
        let t0 = Instant::now();
        let results: Vec<(Duration, usize)> = rt.block_on(async {
            let mut tasks = Vec::new();
            let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(conc));
            for _ in 0..conc * args.rounds {
                let i = next_request;
                next_request += 1;
                // BOS, the shared prefix, then tokens of this request's own.
                let prompt: Vec<u32> = std::iter::once(1)
                    .chain((1..args.prompt_len).map(|k| {
                        // The shared prefix belongs to no request: an owner
                        // past any request number.
                        let owner = if k <= args.shared_prefix {
                            u32::MAX as usize
                        } else {
                            i
                        };
                        let mixed = owner.wrapping_mul(7919).wrapping_add(k * 104729);
                        100 + (mixed % 30000) as u32
                    }))
                    .collect();
                let mut req = GenerateRequest::new(prompt, args.gen);
                req.stop.ignore_eos = true;
                req.sampling.temperature = args.temperature;
                req.sampling.top_p = args.top_p;
                req.sampling.seed = Some(i as u64);
                let handle = handle.clone();
                let slots = slots.clone();
                tasks.push(tokio::spawn(async move {
                    let _permit = slots.acquire_owned().await.expect("semaphore open");
                    let start = Instant::now();
                    let mut g = handle.submit(req).expect("queue sized for the run");
                    let mut ttft = None;
                    let mut tokens = 0;
                    while let Some(ev) = g.next_event().await {
                        if let StreamEvent::Token { .. } = ev.expect("no engine error") {
                            ttft.get_or_insert_with(|| start.elapsed());
                            tokens += 1;
                        }
                    }
                    (ttft.unwrap_or_default(), tokens)
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task"));
            }
            out
        });
        let secs = t0.elapsed().as_secs_f64();
        // Every request has finished: the engine must hold no sequence and no block.
        let idle_by = Instant::now() + Duration::from_secs(5);
        let mut after = handle.stats();
        while (after.running > 0 || after.kv_blocks_used > 0) && Instant::now() < idle_by {
            std::thread::sleep(Duration::from_millis(5));
            after = handle.stats();
        }
        if after.running > 0 || after.kv_blocks_used > 0 {
            bail!(
                "after {} requests at concurrency {conc}: {} running, {} KV blocks still used",
                results.len(),
                after.running,
                after.kv_blocks_used
            );
        }
        let tokens: usize = results.iter().map(|r| r.1).sum();
        let mut ttft: Vec<f64> = results.iter().map(|r| r.0.as_secs_f64() * 1000.0).collect();
        ttft.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let step_ns = (after.schedule_ns + after.forward_ns + after.postprocess_ns)
            - (before.schedule_ns + before.forward_ns + before.postprocess_ns);
        let overhead_ns = (after.schedule_ns - before.schedule_ns)
            + (after.postprocess_ns - before.postprocess_ns);
        let steps = after.steps_total - before.steps_total;
        let decode_steps = after.decode_steps_total - before.decode_steps_total;
        let decode_ns = after.decode_forward_ns - before.decode_forward_ns;
        let prompt_ns = (after.forward_ns - before.forward_ns) - decode_ns;
        let decode_tokens = after.decode_tokens_total - before.decode_tokens_total;
        let decode_step_ns = after.decode_step_ns - before.decode_step_ns;
        let row = serde_json::json!({
            "concurrency": conc,
            "requests": results.len(),
            "output_tok_s": tokens as f64 / secs,
            "ttft_ms_p50": percentile(&ttft, 0.5),
            "ttft_ms_p99": percentile(&ttft, 0.99),
            "steps": steps,
            "ms_per_step": step_ns as f64 / 1e6 / steps.max(1) as f64,
            // Host time the device waits on (schedule, pick, and sending
            // when not overlapped), and host time hidden behind the device.
            "engine_overhead_pct": 100.0 * overhead_ns as f64 / step_ns.max(1) as f64,
            "sent_during_step_ms_per_step": (after.sent_during_step_ns - before.sent_during_step_ns) as f64 / 1e6 / steps.max(1) as f64,
            // Where the forward time went: steps carrying prompt tokens, and
            // decode-only steps (with their mean batch).
            "prompt_steps_s": prompt_ns as f64 / 1e9,
            "decode_steps": decode_steps,
            "decode_ms_per_step": decode_ns as f64 / 1e6 / decode_steps.max(1) as f64,
            // The sustained decode rate: tokens of decode-only steps over
            // those steps' whole wall time, engine overhead included.
            "decode_tok_s": decode_tokens as f64 / (decode_step_ns.max(1) as f64 / 1e9),
            "preemptions": after.preemptions_total - before.preemptions_total,
            // Prompt tokens whose KV came from the prefix cache.
            "prefix_cache_hit_pct": 100.0 * (after.prefix_cache_hits_total - before.prefix_cache_hits_total) as f64
                / (after.prefix_cache_queries_total - before.prefix_cache_queries_total).max(1) as f64,
            "graph_steps": after.graph_steps_total - before.graph_steps_total,
            "kv_blocks_used_after": after.kv_blocks_used,
            "kv_blocks_total": after.kv_blocks_total,
        });
        if !args.json {
            eprintln!("{row}");
        }
        rows.push(row);
    }
    if args.json {
        println!(
            "{}",
            serde_json::json!({"device": args.device, "dtype": dtype.to_string(), "prompt_len": args.prompt_len, "gen": args.gen, "cuda_graphs": args.cuda_graphs, "overlap": args.overlap, "shared_prefix": args.shared_prefix, "prefix_caching": args.prefix_caching, "simulated_device": args.simulate_device.map(|t| [t.step.as_secs_f64() * 1000.0, t.launch.as_secs_f64() * 1000.0]), "results": rows})
        );
    } else {
        println!("| concurrency | output tok/s | decode tok/s | TTFT p50 ms | TTFT p99 ms | ms/step | prompt steps s | decode ms/step | engine overhead % | sent during step ms | preemptions | graph steps | prefix cache hits % |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.1} | {:.2} | {:.1} | {:.2} | {:.2} | {} | {} | {:.0} |",
                r["concurrency"],
                r["output_tok_s"].as_f64().unwrap(),
                r["decode_tok_s"].as_f64().unwrap(),
                r["ttft_ms_p50"].as_f64().unwrap(),
                r["ttft_ms_p99"].as_f64().unwrap(),
                r["ms_per_step"].as_f64().unwrap(),
                r["prompt_steps_s"].as_f64().unwrap(),
                r["decode_ms_per_step"].as_f64().unwrap(),
                r["engine_overhead_pct"].as_f64().unwrap(),
                r["sent_during_step_ms_per_step"].as_f64().unwrap(),
                r["preemptions"],
                r["graph_steps"],
                r["prefix_cache_hit_pct"].as_f64().unwrap()
            );
        }
    }
    handle.shutdown();
    Ok(())
}

fn model_engine(args: &Args, dtype: DTypeSpec, config: EngineConfig) -> Result<EngineHandle> {
    let device = args.device.parse::<DeviceSpec>()?.open()?;
    let opts = ModelOptions {
        dtype: dtype.dtype(),
        attention: args.kernels.parse().map_err(anyhow::Error::msg)?,
        gemv: args.gemv,
    };
    let (model, tok_dir) = match &args.model {
        Some(dir) => (LlamaModel::load(dir, &device, opts)?, dir.clone()),
        None => (
            LlamaModel::random(resolve_shape(&args.random_weights)?, 1234, &device, opts)?,
            bundled_model_dir(),
        ),
    };
    let tokenizer = Tokenizer::from_model_dir(args.tokenizer.as_ref().unwrap_or(&tok_dir))
        .context("tokenizer")?;
    Ok(start_engine(model, tokenizer, config)?)
}

fn simulated_engine(
    args: &Args,
    times: DeviceTimes,
    max_conc: usize,
    config: EngineConfig,
) -> Result<EngineHandle> {
    let tokenizer =
        Tokenizer::from_model_dir(args.tokenizer.as_ref().unwrap_or(&bundled_model_dir()))
            .context("tokenizer")?;
    let block_size = config.kv_cache.block_size;
    let max_context = args.prompt_len + args.gen + 1;
    // Every request of a level at once, plus the warm-up's.
    let blocks = (max_conc + 1) * max_context.div_ceil(block_size);
    let runner = SimulatedDevice::new(tokenizer.vocab_size(), times);
    let eos = tokenizer.eos_id().into_iter().collect();
    Ok(start_with_runner(
        Box::new(runner),
        BlockAllocator::new(blocks, block_size)?,
        tokenizer,
        eos,
        max_context,
        config,
    )?)
}

fn bundled_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama")
}
