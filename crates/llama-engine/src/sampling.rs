//! Per-sequence logits processing and sampling on host logits.
//!
//! The order follows vLLM: logit bias, repetition penalty, frequency and
//! presence penalties, then logprobs (of these processed logits, before
//! temperature), then temperature, top-k, top-p, min-p and one draw from the
//! renormalised distribution. This runs for every sequence at every decode
//! step over the whole vocabulary, so nothing here sorts the vocabulary,
//! greedy decoding without penalties is a bare argmax, and the passes over
//! the vocabulary are written so that the compiler can vectorise them.

use std::cell::RefCell;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use llama_model::sampling::{argmax, max_logit, RowPick};

use crate::request::SamplingParams;

/// The most alternatives a caller may ask for, as in the OpenAI API.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// The token picked at one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub id: u32,
    /// Log-probability of `id` under the processed logits; 0 when logprobs were not asked for.
    pub logprob: f32,
    /// The most likely `(id, logprob)` pairs, best first; empty when not asked for.
    pub top: Vec<(u32, f32)>,
}

/// The sampling state of one choice of one request.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// Vocabulary-sized buffers. Sampling runs on the engine thread one sequence
/// at a time, so one set per thread serves every sequence: per-sampler
/// buffers would cost ~400 KiB for each running sequence.
#[derive(Default)]
struct Scratch {
    seen: Vec<u64>,
    counts: Vec<u32>,
    weights: Vec<f32>,
    candidates: Vec<(u32, f32)>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl Sampler {
    /// `choice` distinguishes the n choices of one request: with a seed, choice
    /// `i` draws from ChaCha stream `i` of that seed, so a seeded request gives
    /// the same output whatever else is batched with it.
    pub fn new(params: &SamplingParams, choice: usize) -> Self {
        let mut rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        rng.set_stream(choice as u64);
        Self {
            params: params.clone(),
            rng,
        }
    }

    /// True when the next token is the bare argmax of the raw logits: no
    /// temperature, bias or penalty, and no logprobs asked. Such steps can
    /// pick on the device and read back one id per row instead of the logits.
    pub fn is_plain_greedy(&self, logprobs: Option<usize>) -> bool {
        // Same test as `sample`: anything but a positive temperature is greedy.
        let draws = self.params.temperature > 0.0;
        !draws && self.plain(logprobs)
    }

    /// No logit processing (bias, penalties) and no logprobs: only the
    /// temperature and the filters act on the row.
    fn plain(&self, logprobs: Option<usize>) -> bool {
        let p = &self.params;
        p.logit_bias.is_empty()
            && (p.repetition_penalty == 1.0 || p.repetition_penalty <= 0.0)
            && p.frequency_penalty == 0.0
            && p.presence_penalty == 0.0
            && logprobs.is_none()
    }

    /// The pick the runner can make next to the logits, or `None` where the
    /// whole row is needed here (logit bias, penalties, logprobs; or draws,
    /// unless `draws_on_device`). Draws the step's `u` for a sampled pick, as
    /// [`Sampler::sample`] would have.
    pub fn device_pick(
        &mut self,
        logprobs: Option<usize>,
        draws_on_device: bool,
    ) -> Option<RowPick> {
        if self.is_plain_greedy(logprobs) {
            return Some(RowPick::GREEDY);
        }
        if !(draws_on_device && self.plain(logprobs)) {
            return None;
        }
        let p = &self.params;
        Some(RowPick {
            temperature: p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            min_p: p.min_p,
            u: self.rng.random(),
        })
    }

    /// Picks the next token. `logits` is used as scratch: it holds the
    /// processed (biased and penalised) logits afterwards. `prompt` and
    /// `generated` are the sequence's tokens so far; `logprobs` is `None` to
    /// skip them, or `Some(k)` for the chosen token's logprob and the top `k`
    /// (at most [`MAX_TOP_LOGPROBS`]).
    pub fn sample(
        &mut self,
        logits: &mut [f32],
        prompt: &[u32],
        generated: &[u32],
        logprobs: Option<usize>,
    ) -> Sampled {
        let p = &self.params;
        for &(id, bias) in &p.logit_bias {
            // Out-of-vocabulary ids are the server's to reject; here they must not panic.
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        let repetition = p.repetition_penalty != 1.0 && p.repetition_penalty > 0.0;
        let frequency = p.frequency_penalty != 0.0 || p.presence_penalty != 0.0;
        if repetition || frequency {
            SCRATCH.with_borrow_mut(|s| {
                if repetition {
                    repetition_penalty(
                        p.repetition_penalty,
                        logits,
                        prompt,
                        generated,
                        &mut s.seen,
                    );
                }
                if frequency {
                    frequency_presence(p, logits, generated, &mut s.counts);
                }
            });
        }
        let id = if p.temperature > 0.0 {
            // Exactly one draw per step keeps a seeded stream aligned with the
            // step count, whatever the filters leave.
            let u: f32 = self.rng.random();
            SCRATCH.with_borrow_mut(|s| draw(p, logits, u, s))
        } else {
            argmax(logits)
        };
        let Some(k) = logprobs else {
            return Sampled {
                id,
                logprob: 0.0,
                top: Vec::new(),
            };
        };
        let (logprob, top) = log_probs(logits, id, k.min(MAX_TOP_LOGPROBS));
        Sampled { id, logprob, top }
    }
}

/// HF semantics: each distinct token of prompt ∪ output is penalised once.
fn repetition_penalty(
    penalty: f32,
    logits: &mut [f32],
    prompt: &[u32],
    generated: &[u32],
    seen: &mut Vec<u64>,
) {
    // A vocabulary bitset (4 KiB for Llama) dedups in O(tokens) without hashing.
    seen.clear();
    seen.resize(logits.len().div_ceil(64), 0);
    for &t in prompt.iter().chain(generated) {
        let i = t as usize;
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if i < logits.len() && seen[word] & bit == 0 {
            seen[word] |= bit;
            let l = &mut logits[i];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// OpenAI semantics: only the generated tokens count, not the prompt.
fn frequency_presence(
    p: &SamplingParams,
    logits: &mut [f32],
    generated: &[u32],
    counts: &mut Vec<u32>,
) {
    // Sorting the output (short next to the vocabulary) counts without a map.
    counts.clear();
    counts.extend(
        generated
            .iter()
            .copied()
            .filter(|&t| (t as usize) < logits.len()),
    );
    counts.sort_unstable();
    for run in counts.chunk_by(|a, b| a == b) {
        logits[run[0] as usize] -= p.frequency_penalty * run.len() as f32 + p.presence_penalty;
    }
}

/// Temperature, top-k, top-p, min-p and the draw `u` ∈ [0, 1). Works on
/// copies so that `logits` keeps the pre-temperature values logprobs need.
fn draw(p: &SamplingParams, logits: &[f32], u: f32, s: &mut Scratch) -> u32 {
    let max = max_logit(logits);
    if max == f32::NEG_INFINITY {
        return argmax(logits);
    }
    let t = p.temperature;
    let c = &mut s.candidates;
    // Weights are relative to the best token (weight 1), so a weight is
    // already the ratio min-p compares, and `mass` is what top-p splits.
    let mass = if p.top_k > 0 && p.top_k < logits.len() {
        best_k(logits, p.top_k, c);
        c.iter_mut().for_each(|c| c.1 = weight(c.1, max, t));
        c.iter().map(|c| c.1).sum()
    } else {
        let total = fill_weights(logits, max, t, &mut s.weights);
        let w = &s.weights;
        if p.top_p >= 1.0 && p.min_p <= 0.0 {
            return pick_dense(w, u * total).unwrap_or_else(|| argmax(logits));
        }
        // The tokens under `floor` weigh less than (1 - top_p) of the mass all
        // together, so the rest already reach top_p and the nucleus lies
        // within them; the filtering then scans the vocabulary once.
        let mut floor = p.min_p;
        if p.top_p < 1.0 {
            floor = floor.max((1.0 - p.top_p) * total / w.len() as f32);
        }
        c.clear();
        c.extend(
            w.iter()
                .enumerate()
                .filter(|&(_, &w)| w > 0.0 && w >= floor)
                .map(|(i, &w)| (i as u32, w)),
        );
        total
    };
    if p.top_p < 1.0 {
        let n = nucleus(c, p.top_p * mass);
        c.truncate(n);
    }
    if p.min_p > 0.0 {
        c.retain(|c| c.1 >= p.min_p);
    }
    let target = u * c.iter().map(|c| c.1).sum::<f32>();
    let mut acc = 0.0;
    for &(id, w) in c.iter() {
        acc += w;
        if target < acc {
            return id;
        }
    }
    // Rounding can leave `target` at the very end of the mass.
    c.iter()
        .rev()
        .find(|c| c.1 > 0.0)
        .map_or_else(|| argmax(logits), |c| c.0)
}

/// The first index where the running sum of `w` passes `target`, skipping
/// whole chunks by their (vectorised) sums.
fn pick_dense(w: &[f32], target: f32) -> Option<u32> {
    const CHUNK: usize = 256;
    let mut acc = 0.0;
    for (ci, chunk) in w.chunks(CHUNK).enumerate() {
        let sum = lane_sum(chunk);
        if target < acc + sum {
            for (j, &w) in chunk.iter().enumerate() {
                acc += w;
                if target < acc {
                    return Some((ci * CHUNK + j) as u32);
                }
            }
            // The element-wise sum rounded below the chunk sum.
            return chunk
                .iter()
                .rposition(|&w| w > 0.0)
                .map(|j| (ci * CHUNK + j) as u32);
        }
        acc += sum;
    }
    w.iter().rposition(|&w| w > 0.0).map(|i| i as u32)
}

/// A sum in eight lanes, for the same reason as [`max_logit`].
fn lane_sum(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (s, &x) in lanes.iter_mut().zip(chunk) {
            *s += x;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// Fills `w` with [`weight`]s and returns their sum, as a plain loop over
/// slices that the compiler vectorises.
fn fill_weights(logits: &[f32], max: f32, t: f32, w: &mut Vec<f32>) -> f32 {
    w.resize(logits.len(), 0.0);
    for (w, &l) in w.iter_mut().zip(logits) {
        *w = weight(l, max, t);
    }
    lane_sum(w)
}

/// e^((l - max) / t): 1 at the max even when it is +inf (not inf - inf =
/// NaN), 0 for -inf and NaN. Dividing (not multiplying by 1/t) keeps a
/// subnormal temperature from turning 0 · inf into NaN.
#[inline(always)]
fn weight(l: f32, max: f32, t: f32) -> f32 {
    exp_neg(if l == max { 0.0 } else { (l - max) / t })
}

/// e^x for x ≤ 0 to about 1e-7 relative error, 0 below -87 (where f32
/// leaves normal numbers) and for NaN. Branch-free and integer-conversion-free,
/// so loops over the vocabulary vectorise, which libm's `expf` calls prevent.
#[inline(always)]
fn exp_neg(x: f32) -> f32 {
    // e^x = 2^n · e^f, n the integer nearest x·log2(e) so |f| ≤ ln(2)/2. Adding
    // 1.5 · 2^23 rounds to an integer held in the low mantissa bits; ln 2 in
    // two parts (Cody-Waite) keeps f exact where one product would lose 1e-6.
    const ROUND: f32 = 12_582_912.0;
    let in_range = x >= -87.0;
    let x = if in_range { x } else { -87.0 };
    let r = x * std::f32::consts::LOG2_E + ROUND;
    let n = r - ROUND;
    let f = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    // Taylor to degree 7 on |f| ≤ 0.35: the remainder is below 1e-8.
    let mut poly = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        poly = poly * f + c;
    }
    let scale = f32::from_bits(r.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    if in_range {
        poly * scale
    } else {
        0.0
    }
}

/// Moves the smallest set of heaviest candidates whose weight reaches `target`
/// to the front and returns its size (all of them if none does).
///
/// A bisection over selections instead of a sort: each round partitions only
/// the undecided range, which halves, so the whole search is expected O(n).
/// Invariant: `c[..lo]` are the `lo` heaviest, weighing `acc < target`; every
/// element of `c[lo..hi]` outweighs every element of `c[hi..]`; and the
/// heaviest `hi` reach `target`, or `hi` is everything.
fn nucleus(c: &mut [(u32, f32)], target: f32) -> usize {
    let (mut lo, mut hi, mut acc) = (0, c.len(), 0.0f32);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        c[lo..hi].select_nth_unstable_by(mid - lo, |a, b| b.1.total_cmp(&a.1));
        let mass = acc + c[lo..mid].iter().map(|c| c.1).sum::<f32>();
        if mass >= target {
            hi = mid;
        } else {
            (lo, acc) = (mid, mass);
        }
    }
    hi
}

/// The `k` largest logits into `out` (NaN skipped). For small k, best first
/// with ties to the lower id, by insertion: almost every logit is rejected by
/// one compare. For large k, a selection, in no order.
fn best_k(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    out.clear();
    if k > 64 {
        out.extend(
            logits
                .iter()
                .enumerate()
                .filter(|l| !l.1.is_nan())
                .map(|(i, &l)| (i as u32, l)),
        );
        if k < out.len() {
            out.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            out.truncate(k);
        }
        return;
    }
    if k == 0 {
        return;
    }
    let mut rest = logits.iter().enumerate().filter(|l| !l.1.is_nan());
    for (i, &l) in rest.by_ref() {
        let at = out.partition_point(|&(_, b)| b >= l);
        out.insert(at, (i as u32, l));
        if out.len() == k {
            break;
        }
    }
    // Once full, `>` sends ties to the lower id already listed.
    let Some(&(_, mut floor)) = out.last() else {
        return;
    };
    for (i, &l) in rest {
        if l > floor {
            let at = out.partition_point(|&(_, b)| b >= l);
            out.insert(at, (i as u32, l));
            out.pop();
            floor = out[k - 1].1;
        }
    }
}

/// Log-softmax of the processed logits at `id` and at the `k` best tokens.
pub(crate) fn log_probs(logits: &[f32], id: u32, k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = max_logit(logits);
    let sum = SCRATCH.with_borrow_mut(|s| fill_weights(logits, max, 1.0, &mut s.weights));
    let log_sum = sum.ln();
    // Relative to `max` so that a +inf logit gets -ln(count) rather than NaN.
    let logprob = |l: f32| match l {
        _ if max == f32::NEG_INFINITY || l.is_nan() => f32::NEG_INFINITY,
        _ if l == max => -log_sum,
        _ => l - max - log_sum,
    };
    let chosen = logits
        .get(id as usize)
        .map_or(f32::NEG_INFINITY, |&l| logprob(l));
    let mut top = Vec::with_capacity(k + 1);
    best_k(logits, k, &mut top);
    top.iter_mut().for_each(|t| t.1 = logprob(t.1));
    (chosen, top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Edit = fn(&mut SamplingParams);

    fn sp(temperature: f32, seed: u64, edit: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams {
            temperature,
            seed: Some(seed),
            ..Default::default()
        };
        edit(&mut p);
        p
    }

    /// Deterministic pseudo-logits in [0, 5) with one clear winner at `best`.
    fn logits(n: usize, best: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 / 200.0).collect();
        v[best] = 6.0;
        v
    }

    /// The runner's picks next to the logits (`llama_model::sampling`) and
    /// this sampler filter alike: over many draws, the two give the same
    /// distribution (they differ only in which draw maps to which token).
    #[test]
    fn device_picks_follow_the_same_distribution_as_host_draws() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let row: Vec<f32> = (0..300)
            .map(|_| (0..4).map(|_| rng.random::<f32>()).sum::<f32>() * 4.0)
            .collect();
        // Each filter binds: top-p 0.5 keeps about 15 of the 300 tokens,
        // min-p 0.2 about 10, top-k 5 five.
        let cases: [(f32, usize, f32, f32); 5] = [
            (0.7, 5, 1.0, 0.0),
            (1.0, 0, 0.5, 0.0),
            (1.2, 0, 1.0, 0.2),
            (0.9, 50, 0.8, 0.05),
            (1.0, 0, 1.0, 0.0),
        ];
        const DRAWS: usize = 40_000;
        for (temperature, top_k, top_p, min_p) in cases {
            let p = sp(temperature, 3, |p| {
                p.top_k = top_k;
                p.top_p = top_p;
                p.min_p = min_p;
            });
            let mut host = vec![0f64; row.len()];
            let mut sampler = Sampler::new(&p, 0);
            for _ in 0..DRAWS {
                host[sampler.sample(&mut row.clone(), &[], &[], None).id as usize] += 1.0;
            }
            let mut device = vec![0f64; row.len()];
            for i in 0..DRAWS {
                let pick = sampler
                    .device_pick(None, true)
                    .expect("a plain sampled row");
                assert_eq!(
                    (pick.top_k as usize, pick.top_p, pick.min_p),
                    (top_k, top_p, min_p)
                );
                // Evenly spread draws: the exact distribution, without noise.
                let pick = RowPick {
                    u: (i as f32 + 0.5) / DRAWS as f32,
                    ..pick
                };
                device[llama_model::sampling::pick_row(&row, &pick) as usize] += 1.0;
            }
            let distance: f64 = host
                .iter()
                .zip(&device)
                .map(|(h, d)| (h - d).abs() / DRAWS as f64)
                .sum::<f64>()
                / 2.0;
            // 40,000 host draws over at most 300 tokens: sampling noise is
            // about 0.02 in total variation; a wrong filter is far more.
            assert!(
                distance < 0.04,
                "{temperature} {top_k} {top_p} {min_p}: {distance}"
            );
            // Where a filter binds it keeps a few dozen tokens at most, each
            // drawn hundreds of times by both sides: the same set.
            let kept = |c: &[f64]| -> Vec<usize> { (0..c.len()).filter(|&i| c[i] > 0.0).collect() };
            if top_k > 0 || top_p < 1.0 || min_p > 0.0 {
                assert_eq!(
                    kept(&host),
                    kept(&device),
                    "{temperature} {top_k} {top_p} {min_p}"
                );
                assert!(top_k == 0 || kept(&device).len() <= top_k);
            }
        }
        // Greedy and processed rows are not drawn next to the logits.
        assert_eq!(
            Sampler::new(&sp(0.0, 1, |_| {}), 0).device_pick(None, false),
            Some(RowPick::GREEDY)
        );
        let mut biased = Sampler::new(&sp(1.0, 1, |p| p.logit_bias = vec![(3, 1.0)]), 0);
        assert_eq!(biased.device_pick(None, true), None);
        assert_eq!(
            Sampler::new(&sp(1.0, 1, |_| {}), 0).device_pick(Some(1), true),
            None
        );
        assert_eq!(
            Sampler::new(&sp(1.0, 1, |_| {}), 0).device_pick(None, false),
            None
        );
    }

    fn run(p: &SamplingParams, l: &[f32], history: [&[u32]; 2], lp: Option<usize>) -> Sampled {
        Sampler::new(p, 0).sample(&mut l.to_vec(), history[0], history[1], lp)
    }

    fn id(p: &SamplingParams, l: &[f32]) -> u32 {
        run(p, l, [&[], &[]], None).id
    }

    fn seq(p: &SamplingParams, choice: usize) -> Vec<u32> {
        let mut s = Sampler::new(p, choice);
        (0..30)
            .map(|_| s.sample(&mut [0.0; 50], &[], &[], None).id)
            .collect()
    }

    #[test]
    fn exp_neg_is_accurate_and_total() {
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let rel = (exp_neg(x) as f64 / (x as f64).exp() - 1.0).abs();
            assert!(rel < 3e-7, "e^{x}: {rel}");
        }
        assert_eq!(exp_neg(0.0), 1.0);
        for x in [-87.5, f32::NEG_INFINITY, f32::NAN] {
            assert_eq!(exp_neg(x), 0.0);
        }
    }

    #[test]
    fn argmax_ties_nan_and_infinities() {
        assert_eq!(argmax(&[1.0, 3.0, 2.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0, f32::NAN]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 5]), 0);
        assert_eq!(argmax(&[]), 0);
        assert_eq!(argmax(&logits(32003, 32001)), 32001);
    }

    #[test]
    fn greedy_is_argmax_and_leaves_logits_alone() {
        let l = logits(1000, 417);
        let mut work = l.clone();
        let s = Sampler::new(&SamplingParams::default(), 0).sample(&mut work, &[1], &[3], None);
        assert_eq!((s.id, s.logprob, s.top.len(), work), (417, 0.0, 0, l));
    }

    #[test]
    fn plain_greedy_means_nothing_but_the_argmax() {
        let plain = Sampler::new(&SamplingParams::default(), 0);
        assert!(plain.is_plain_greedy(None));
        assert!(!plain.is_plain_greedy(Some(0)));
        let edits: [fn(&mut SamplingParams); 5] = [
            |p| p.temperature = 0.7,
            |p| p.logit_bias = vec![(5, 1.0)],
            |p| p.repetition_penalty = 1.2,
            |p| p.frequency_penalty = 0.5,
            |p| p.presence_penalty = -0.5,
        ];
        for edit in edits {
            let mut p = SamplingParams::default();
            edit(&mut p);
            assert!(!Sampler::new(&p, 0).is_plain_greedy(None), "{p:?}");
        }
    }

    #[test]
    fn degenerate_filters_are_greedy() {
        let l = logits(32000, 1234);
        let steep: Vec<f32> = l.iter().map(|x| x * 100.0).collect();
        let edits: [Edit; 6] = [
            |_| (),
            |p| p.top_k = 1,
            |p| p.top_p = 1e-6,
            |p| p.top_p = 0.0,
            |p| p.min_p = 1.0,
            |p| p.temperature = 1e-40,
        ];
        for seed in 0..20 {
            assert_eq!(id(&sp(1e-6, seed, |_| ()), &l), 1234);
            assert_eq!(id(&sp(1.5, seed, |p| p.top_k = 1000), &steep), 1234);
            for edit in edits.iter().skip(1) {
                assert_eq!(id(&sp(1.5, seed, edit), &l), 1234);
            }
        }
    }

    #[test]
    fn seeded_streams_are_reproducible_and_distinct_per_choice() {
        let p = sp(1.0, 42, |_| ());
        assert_eq!(seq(&p, 0), seq(&p, 0));
        assert_eq!(seq(&p, 1), seq(&p, 1));
        assert_ne!(seq(&p, 0), seq(&p, 1));
        assert_ne!(seq(&p, 0), seq(&sp(1.0, 43, |_| ()), 0));
        let unseeded = SamplingParams { seed: None, ..p };
        assert_ne!(seq(&unseeded, 0), seq(&unseeded, 0));
    }

    #[test]
    fn samples_follow_the_distribution() {
        let probs = [0.1f32, 0.2, 0.3, 0.4];
        let mut l: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
        l.extend([f32::NEG_INFINITY; 4]);
        let mut s = Sampler::new(&sp(1.0, 7, |_| ()), 0);
        let (n, mut counts) = (20_000, [0usize; 8]);
        for _ in 0..n {
            counts[s.sample(&mut l.clone(), &[], &[], None).id as usize] += 1;
        }
        for (i, p) in probs.iter().enumerate() {
            // Five standard deviations of a binomial frequency at n = 20k is under 0.02.
            let f = counts[i] as f32 / n as f32;
            assert!((f - p).abs() < 0.02, "token {i}: {f} vs {p}");
        }
        assert_eq!(counts[4..], [0; 4], "-inf tokens are never drawn");
    }

    #[test]
    fn filters_exclude_what_they_should() {
        // Probabilities 0.4, 0.3, 0.2, 0.1 (ids shuffled) at temperature 1.
        let l: Vec<f32> = [0.2f32, 0.4, 0.1, 0.3].iter().map(|p| p.ln()).collect();
        let check = |edit: Edit, allowed: &[u32]| {
            let mut s = Sampler::new(&sp(1.0, 1, edit), 0);
            let mut seen = [false; 4];
            for _ in 0..2000 {
                let id = s.sample(&mut l.clone(), &[], &[], None).id;
                assert!(allowed.contains(&id), "{id} is not in {allowed:?}");
                seen[id as usize] = true;
            }
            assert!(
                allowed.iter().all(|&a| seen[a as usize]),
                "{seen:?} vs {allowed:?}"
            );
        };
        check(|p| p.top_k = 2, &[1, 3]);
        check(|p| p.top_k = 3, &[0, 1, 3]);
        // 0.4 + 0.3 reaches 0.65 and 0.7 but not 0.75.
        check(|p| p.top_p = 0.65, &[1, 3]);
        check(|p| p.top_p = 0.75, &[0, 1, 3]);
        // Within the top 3, renormalised: 0.4 / 0.9 + 0.3 / 0.9 reaches 0.75.
        check(|p| (p.top_k, p.top_p) = (3, 0.75), &[1, 3]);
        // Ratios to the best are 0.75, 0.5 and 0.25.
        check(|p| p.min_p = 0.45, &[0, 1, 3]);
        check(|p| p.min_p = 0.55, &[1, 3]);
        check(|p| (p.top_p, p.min_p) = (0.95, 0.3), &[0, 1, 3]);
        check(|_| (), &[0, 1, 2, 3]);
    }

    #[test]
    fn nucleus_finds_the_smallest_reaching_set() {
        let mut c: Vec<(u32, f32)> = (0..100)
            .map(|i| (i, ((i * 37) % 100) as f32 + 1.0))
            .collect();
        let total: f32 = c.iter().map(|c| c.1).sum();
        let n = nucleus(&mut c, 0.5 * total);
        let mut w: Vec<f32> = c.iter().map(|c| c.1).collect();
        let kept: f32 = w[..n].iter().sum();
        w.sort_by(|a, b| b.total_cmp(a));
        // Reaches the target, with the heaviest tokens, and no fewer would do.
        assert!(kept >= 0.5 * total && kept == w[..n].iter().sum::<f32>());
        assert!(w[..n - 1].iter().sum::<f32>() < 0.5 * total);
        assert_eq!(nucleus(&mut c, 2.0 * total), 100);
        assert_eq!(nucleus(&mut [], 1.0), 0);
    }

    #[test]
    fn penalties_change_the_choice() {
        let greedy = |edit: Edit, l: &[f32], history: [&[u32]; 2]| {
            run(&sp(0.0, 0, edit), l, history, None).id
        };
        let rep: Edit = |p| p.repetition_penalty = 1.2;
        // 2.0 / 1.2 < 1.9: a positive logit is divided, in prompt or output.
        assert_eq!(greedy(rep, &[2.0, 1.9], [&[0], &[]]), 1);
        assert_eq!(greedy(rep, &[2.0, 1.9], [&[], &[0]]), 1);
        // -1.0 * 1.2 < -1.1: a negative one is multiplied.
        assert_eq!(greedy(rep, &[-1.0, -1.1], [&[0], &[]]), 1);
        // Once per distinct token: 2.0 / 1.2 > 1.6, however often 0 repeats.
        assert_eq!(greedy(rep, &[2.0, 1.6], [&[0, 0, 0], &[0, 0]]), 0);
        let freq: Edit = |p| p.frequency_penalty = 0.3;
        assert_eq!(greedy(freq, &[2.0, 1.5], [&[], &[0]]), 0);
        assert_eq!(greedy(freq, &[2.0, 1.5], [&[], &[0, 0]]), 1);
        assert_eq!(greedy(freq, &[2.0, 1.5], [&[0, 0, 0], &[]]), 0);
        let pres: Edit = |p| p.presence_penalty = 0.6;
        assert_eq!(greedy(pres, &[2.0, 1.5], [&[], &[0]]), 1);
        assert_eq!(greedy(pres, &[2.0, 1.3], [&[], &[0, 0, 0]]), 0);
        // Out-of-vocabulary ids are ignored rather than panicking.
        let all: Edit = |p| {
            (p.repetition_penalty, p.frequency_penalty) = (1.1, 0.1);
            p.logit_bias = vec![(99, 1.0)];
        };
        assert_eq!(greedy(all, &[1.0, 0.0], [&[7], &[9]]), 0);
    }

    #[test]
    fn logit_bias_forces_and_bans() {
        let l = logits(32000, 5);
        for seed in 0..20 {
            let p = sp(1.0, seed, |p| p.logit_bias = vec![(31000, 100.0)]);
            assert_eq!(id(&p, &l), 31000);
        }
        let ban = sp(0.0, 0, |p| p.logit_bias = vec![(5, f32::NEG_INFINITY)]);
        assert_ne!(id(&ban, &l), 5);
    }

    #[test]
    fn logprobs_are_a_log_softmax_before_temperature() {
        let l: Vec<f32> = (0..20)
            .map(|i| ((i * 13) % 20) as f32 / 3.0 - 2.0)
            .collect();
        for temperature in [0.0, 0.7, 5.0] {
            let out = run(&sp(temperature, 11, |_| ()), &l, [&[], &[]], Some(20));
            let total: f32 = out.top.iter().map(|t| t.1.exp()).sum();
            assert!((total - 1.0).abs() < 1e-5, "{total}");
            assert!(out.top.windows(2).all(|w| w[0].1 >= w[1].1));
            assert_eq!(out.top[0].0, argmax(&l));
            let chosen = out.top.iter().find(|t| t.0 == out.id).unwrap();
            assert_eq!(chosen.1, out.logprob);
        }
        let out = run(&sp(1.0, 1, |_| ()), &logits(32000, 3), [&[], &[]], Some(50));
        assert_eq!((out.top.len(), out.top[0].0), (MAX_TOP_LOGPROBS, 3));
        let out = run(&sp(1.0, 1, |_| ()), &logits(100, 3), [&[], &[]], Some(0));
        assert!(out.top.is_empty() && out.logprob < 0.0);
    }

    #[test]
    fn non_finite_logits_are_safe() {
        let mut only = vec![f32::NEG_INFINITY; 1000];
        (only[321], only[5]) = (-50.0, f32::NAN);
        for seed in 0..50 {
            let out = run(&sp(1.0, seed, |_| ()), &only, [&[], &[]], Some(3));
            assert_eq!((out.id, out.logprob, out.top[0]), (321, 0.0, (321, 0.0)));
            assert_eq!(out.top[1].1, f32::NEG_INFINITY);
            assert_eq!(id(&sp(1.0, seed, |p| p.top_p = 0.5), &only), 321);
        }
        let p = sp(1.0, 0, |_| ());
        let out = run(
            &p,
            &[1.0, f32::INFINITY, 2.0, f32::INFINITY],
            [&[], &[]],
            Some(2),
        );
        assert!((out.id == 1 || out.id == 3) && (out.logprob - 0.5f32.ln()).abs() < 1e-6);
        let out = run(&p, &[f32::NEG_INFINITY, f32::NAN], [&[], &[]], Some(2));
        assert_eq!((out.id, out.logprob), (0, f32::NEG_INFINITY));
    }

    proptest! {
        /// The drawn token is finite, among the top k, and inside the top-p
        /// nucleus of the top-k distribution, checked against a plain f64 reference.
        #[test]
        fn draws_stay_inside_the_filters(
            l in prop::collection::vec(prop_oneof![-20.0f32..20.0, Just(f32::NEG_INFINITY)], 1..300),
            top_k in prop_oneof![Just(0usize), 1usize..100],
            top_p in prop_oneof![Just(1.0f32), 0.0f32..1.0],
            temperature in 0.05f32..3.0,
            seed: u64,
        ) {
            prop_assume!(l.iter().any(|x| x.is_finite()));
            let chosen = id(&sp(temperature, seed, |p| (p.top_k, p.top_p) = (top_k, top_p)), &l);
            let picked = l[chosen as usize];
            prop_assert!(picked.is_finite());
            let rank = |x: f32| l.iter().filter(|&&y| y > x).count();
            let kept = |x: &&f32| top_k == 0 || rank(**x) < top_k;
            prop_assert!(kept(&&picked));
            let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let w = |x: f32| ((x as f64 - max) / temperature as f64).exp();
            let total: f64 = l.iter().filter(kept).map(|&x| w(x)).sum();
            let heavier: f64 = l.iter().filter(kept).filter(|&&x| x > picked).map(|&x| w(x)).sum();
            prop_assert!(heavier < (top_p as f64 + 1e-4) * total, "{heavier} of {total}");
        }
    }
}
