//! `matmul-bench`: one projection `x · Wᵀ` timed alone, our `Linear` (on the
//! CPU in f32: the packed GEMM) against Candle's general matmul, on the
//! projection shapes of a model. Tells the kernel's speed apart from the rest
//! of a step: GFLOP/s against the FMA peak, GB/s of weight against DRAM.

use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use llama_model::linear::Linear;
use llama_model::{resolve_shape, DTypeSpec, DeviceSpec, Tensor};

#[derive(Parser, Debug)]
#[command(
    name = "matmul-bench",
    about = "Projection matmul time, ours vs Candle's"
)]
struct Args {
    /// Model shape whose projections are timed: tiny, 134m, 7b, ... or a config.json.
    #[arg(long, default_value = "134m")]
    shape: String,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Activation rows (tokens in the step).
    #[arg(long, value_delimiter = ',', default_value = "1,16,32,64,128,512")]
    rows: Vec<usize>,
    /// Timed repetitions per case (the median is reported).
    #[arg(long, default_value_t = 9)]
    iters: usize,
    /// "ours" is `Linear::forward_gemv` with the weight-streaming CUDA kernel
    /// (up to 4 rows) instead of `Linear::forward`.
    #[arg(long)]
    gemv: bool,
    /// Also time Candle's matmul (`x.matmul(wᵀ)`) for the same case.
    #[arg(long)]
    baseline: bool,
}

/// Weight bytes cycled through per case: twice a large L3.
const COLD_BYTES: usize = 128 << 20;

fn median_ms(iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() -> Result<()> {
    let args = Args::parse();
    let device = args.device.parse::<DeviceSpec>()?.open()?;
    let dtype = args.dtype.parse::<DTypeSpec>()?.dtype();
    let cfg = resolve_shape(&args.shape)?;
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let d = h / cfg.num_attention_heads;
    let qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d;
    let shapes = [
        ("qkv", qkv, h),
        ("o", h, h),
        ("gate_up", 2 * i, h),
        ("down", h, i),
        ("lm_head", v, h),
    ];
    println!("| proj | n×k | rows | ours ms | GFLOP/s | weight GB/s | candle ms | speed-up |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (name, n, k) in shapes {
        // In a model step every weight comes from DRAM (the model is larger
        // than the caches): rotate over enough copies to keep it so here.
        let bytes = n * k * dtype.size_in_bytes();
        let copies = (COLD_BYTES / bytes).clamp(1, 64);
        let w = Tensor::randn(0f32, 0.02, (n, k), &device)?.to_dtype(dtype)?;
        let ws = (0..copies)
            .map(|_| w.copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let linears = ws
            .iter()
            .map(|w| Linear::dense(w.copy()?))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // A GPU call takes microseconds: time a run of calls per sample, so
        // that one synchronisation does not dominate.
        let calls = if device.is_cpu() { 1 } else { 20 };
        for &m in &args.rows {
            let x = Tensor::randn(0f32, 1.0, (m, k), &device)?.to_dtype(dtype)?;
            let mut turn = 0;
            let ours = median_ms(args.iters, || {
                for _ in 0..calls {
                    turn += 1;
                    linears[turn % copies].forward_gemv(&x, args.gemv)?;
                }
                device.synchronize()?;
                Ok(())
            })? / calls as f64;
            let candle = if args.baseline {
                let mut turn = 0;
                Some(
                    median_ms(args.iters, || {
                        for _ in 0..calls {
                            turn += 1;
                            x.matmul(&ws[turn % copies].t()?)?;
                        }
                        device.synchronize()?;
                        Ok(())
                    })? / calls as f64,
                )
            } else {
                None
            };
            let flops = 2.0 * (m * n * k) as f64;
            let bytes = (n * k * dtype.size_in_bytes()) as f64;
            println!(
                "| {name} | {n}×{k} | {m} | {ours:.3} | {:.1} | {:.1} | {} | {} |",
                flops / ours / 1e6,
                bytes / ours / 1e6,
                candle.map_or("-".into(), |c| format!("{c:.3}")),
                candle.map_or("-".into(), |c| format!("{:.2}×", c / ours)),
            );
        }
    }
    Ok(())
}
