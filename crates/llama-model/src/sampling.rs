//! Token picks next to the logits: one id per row instead of the row.
//!
//! Reading a step's logits back from a GPU costs `rows × vocab × 4` bytes
//! (8 MiB at 64 rows of Llama's 32,000) and a host pass over each; with the
//! pick on the device only the ids come back. The engine keeps the rows that
//! need the whole distribution (logit bias, penalties, logprobs) on the host.
//!
//! A row is filtered as the host sampler does (temperature, then top-k,
//! top-p, min-p on the weights `exp((l - max) / T)`), with each filter a
//! threshold on the weight, so that ties at a boundary are all kept; the draw
//! `u` then selects by running sum in vocabulary order. [`pick_row`] is the
//! definition, in plain Rust; the CUDA kernel computes the same thresholds by
//! bisection over the weight's bits.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// How one row is picked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowPick {
    /// 0 (or less, or NaN) takes the argmax.
    pub temperature: f32,
    /// Keep the `top_k` heaviest (and their ties); 0 = off.
    pub top_k: u32,
    /// Keep the heaviest whose mass reaches `top_p` of the rest; 1 = off.
    pub top_p: f32,
    /// Keep weights of at least `min_p` × the best one; 0 = off.
    pub min_p: f32,
    /// The draw, in [0, 1).
    pub u: f32,
}

impl RowPick {
    pub const GREEDY: RowPick = RowPick {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
        u: 0.0,
    };
}

/// One id per row of `logits: [rows, vocab]`, picked where the logits are.
pub fn pick_rows(logits: &Tensor, picks: &[RowPick]) -> Result<Vec<u32>> {
    Ok(pick_rows_lazily(logits, picks)?.to_vec1()?)
}

/// [`pick_rows`], with the ids left where the logits are (a `[rows]` u32
/// tensor): on a GPU nothing waits for the step until they are read, so the
/// host can do other work while it runs.
pub fn pick_rows_lazily(logits: &Tensor, picks: &[RowPick]) -> Result<Tensor> {
    let (rows, _) = logits.dims2()?;
    if rows != picks.len() {
        return Err(candle_core::Error::Msg(format!(
            "pick_rows: {rows} rows of logits, {} picks",
            picks.len()
        ))
        .into());
    }
    if rows == 0 {
        return Ok(Tensor::zeros(0, DType::U32, logits.device())?);
    }
    // Greedy steps (the common case) take Candle's argmax on every device.
    if picks
        .iter()
        .all(|p| p.temperature.is_nan() || p.temperature <= 0.0)
    {
        return Ok(logits.argmax(candle_core::D::Minus1)?);
    }
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() {
        return Ok(crate::cuda_kernels::pick_rows(logits, picks)?);
    }
    let host = logits
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?;
    let ids: Vec<u32> = host
        .iter()
        .zip(picks)
        .map(|(l, p)| pick_row(l, p))
        .collect();
    Ok(Tensor::from_vec(ids, rows, logits.device())?)
}

/// Index of the largest logit; ties go to the lowest id, NaN is never
/// chosen, and a row of only -inf and NaN gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let max = max_logit(logits);
    logits.iter().position(|&l| l == max).unwrap_or(0) as u32
}

/// The largest non-NaN logit, or -inf. Eight independent lanes let the
/// compiler vectorise what a single running max (a serial dependency) would not.
pub fn max_logit(logits: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (m, &l) in lanes.iter_mut().zip(chunk) {
            *m = if l > *m { l } else { *m };
        }
    }
    let max = |m: f32, l: f32| if l > m { l } else { m };
    lanes
        .into_iter()
        .fold(rest.iter().copied().fold(f32::NEG_INFINITY, max), max)
}

/// The definition of a pick (see the module documentation).
pub fn pick_row(logits: &[f32], p: &RowPick) -> u32 {
    let best = argmax(logits);
    let max = logits[best as usize];
    // Anything but a positive temperature (NaN included) is greedy.
    let draws = p.temperature > 0.0;
    if !draws || max == f32::NEG_INFINITY || max.is_nan() {
        return best;
    }
    let w: Vec<f32> = logits
        .iter()
        .map(|&l| {
            if l == max {
                1.0
            } else if l.is_nan() {
                0.0
            } else {
                ((l - max) / p.temperature).exp()
            }
        })
        .collect();
    let mut sorted: Vec<f32> = w.iter().copied().filter(|&w| w > 0.0).collect();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    // Every filter raises one threshold; `floor` is the smallest weight kept.
    let mut floor = sorted[sorted.len() - 1];
    if p.top_k > 0 && (p.top_k as usize) < sorted.len() {
        floor = sorted[p.top_k as usize - 1];
    }
    if p.top_p < 1.0 {
        let kept = &sorted[..sorted.partition_point(|&w| w >= floor)];
        let target = p.top_p * kept.iter().sum::<f32>();
        let mut acc = 0.0;
        for &w in kept {
            acc += w;
            if acc >= target {
                floor = w;
                break;
            }
        }
    }
    floor = floor.max(p.min_p.min(1.0));
    let mass: f32 = w.iter().filter(|&&w| w >= floor).sum();
    let target = p.u * mass;
    let mut acc = 0.0;
    let mut last = best;
    for (i, &w) in w.iter().enumerate() {
        if w >= floor {
            acc += w;
            last = i as u32;
            if target < acc {
                return i as u32;
            }
        }
    }
    // Rounding can leave `target` at the very end of the mass.
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pick(l: &[f32], t: f32, top_k: u32, top_p: f32, min_p: f32, u: f32) -> u32 {
        pick_row(
            l,
            &RowPick {
                temperature: t,
                top_k,
                top_p,
                min_p,
                u,
            },
        )
    }

    #[test]
    fn greedy_and_degenerate_rows() {
        let l = [1.0, 3.0, f32::NAN, 3.0, -1.0];
        assert_eq!(pick(&l, 0.0, 0, 1.0, 0.0, 0.9), 1);
        assert_eq!(
            pick(&[f32::NEG_INFINITY, f32::NAN], 1.0, 0, 1.0, 0.0, 0.5),
            0
        );
        // NaN is never drawn, whatever u.
        for u in [0.0, 0.3, 0.6, 0.999_999] {
            assert_ne!(pick(&l, 1.0, 0, 1.0, 0.0, u), 2);
        }
    }

    #[test]
    fn draws_follow_the_filtered_weights_in_vocabulary_order() {
        // Weights at T = 1: e^0 = 1 for ids 1 and 3, e^-2 for 0, e^-4 for 4.
        let l = [1.0, 3.0, 0.0, 3.0, -1.0];
        let w = [(-2f32).exp(), 1.0, (-3f32).exp(), 1.0, (-4f32).exp()];
        let total: f32 = w.iter().sum();
        // u just inside each id's share of the running sum picks that id.
        let mut acc = 0.0;
        for (i, w) in w.iter().enumerate() {
            let u = (acc + w * 0.5) / total;
            assert_eq!(pick(&l, 1.0, 0, 1.0, 0.0, u), i as u32);
            acc += w;
        }
        // top_k = 1 keeps both tied best tokens.
        assert_eq!(pick(&l, 1.0, 1, 1.0, 0.0, 0.25), 1);
        assert_eq!(pick(&l, 1.0, 1, 1.0, 0.0, 0.75), 3);
        // top_p: the two best weigh 2 of ~2.19; 0.9 of that needs both.
        assert_eq!(pick(&l, 1.0, 0, 0.9, 0.0, 0.99), 3);
        assert_eq!(pick(&l, 1.0, 0, 0.95, 0.0, 0.01), 0);
        // min_p = 0.1 drops e^-3 and e^-4, keeps e^-2 ≈ 0.135.
        for u in [0.0, 0.2, 0.5, 0.8, 0.999] {
            let id = pick(&l, 1.0, 0, 1.0, 0.1, u);
            assert!([0, 1, 3].contains(&id), "{u}: {id}");
        }
    }

    #[test]
    fn pick_rows_on_the_cpu_equals_the_definition() {
        let l = Tensor::randn(0f32, 3.0, (3, 50), &Device::Cpu).unwrap();
        let picks = [
            RowPick::GREEDY,
            RowPick {
                temperature: 0.8,
                top_k: 10,
                top_p: 0.9,
                min_p: 0.05,
                u: 0.37,
            },
            RowPick {
                temperature: 1.3,
                top_k: 0,
                top_p: 1.0,
                min_p: 0.0,
                u: 0.91,
            },
        ];
        let got = pick_rows(&l, &picks).unwrap();
        let rows = l.to_vec2::<f32>().unwrap();
        let want: Vec<u32> = rows
            .iter()
            .zip(&picks)
            .map(|(r, p)| pick_row(r, p))
            .collect();
        assert_eq!(got, want);
        assert_eq!(got[0], argmax(&rows[0]));
    }
}
