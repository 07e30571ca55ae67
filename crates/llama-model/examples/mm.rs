use candle_core::{DType, Device, Tensor};
use std::time::Instant;
fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(k, n) in &[(768usize, 2304usize), (768, 32000), (2048, 768)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?; // [out, in]
        let wt = w.t()?.contiguous()?; // [in, out]
        for m in [1usize, 8, 32, 128] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
            let reps = 20;
            let _ = x.matmul(&w.t()?)?;
            let t = Instant::now();
            for _ in 0..reps {
                let _ = x.matmul(&w.t()?)?;
            }
            let a = t.elapsed().as_secs_f64() / reps as f64 * 1e3;
            let _ = x.matmul(&wt)?;
            let t = Instant::now();
            for _ in 0..reps {
                let _ = x.matmul(&wt)?;
            }
            let b = t.elapsed().as_secs_f64() / reps as f64 * 1e3;
            let gflop = 2.0 * (m * k * n) as f64 / 1e9;
            println!("k={k} n={n} m={m}: w.t() {a:.2} ms ({:.1} GF/s), pre-transposed {b:.2} ms ({:.1} GF/s)", gflop / a * 1e3, gflop / b * 1e3);
        }
    }
    let _ = DType::F32;
    Ok(())
}
