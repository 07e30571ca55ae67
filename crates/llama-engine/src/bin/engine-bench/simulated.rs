//! `--simulate-device`: a stand-in for a GPU that takes a fixed time per
//! step, so that the engine's own host work (scheduling, picking,
//! detokenization, stop checks, events) and how much of it the device time
//! hides can be measured on any machine, with no model at all.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use llama_engine::runner::{ModelRunner, StepOutput};
use llama_engine::scheduler::StepPlan;

/// The device's cost model: `step` of device time per step, of which the
/// host spends the first `launch` submitting it (busy, as a CUDA launch is).
#[derive(Debug, Clone, Copy)]
pub struct DeviceTimes {
    pub step: Duration,
    pub launch: Duration,
}

impl std::str::FromStr for DeviceTimes {
    type Err = anyhow::Error;

    /// `STEP_MS` or `STEP_MS,LAUNCH_MS`.
    fn from_str(s: &str) -> Result<Self> {
        let ms = |v: &str| -> Result<Duration> {
            let v: f64 = v.trim().parse().with_context(|| format!("{v:?} ms"))?;
            if !(v.is_finite() && v >= 0.0) {
                bail!("{v} ms is not a duration");
            }
            Ok(Duration::from_secs_f64(v / 1000.0))
        };
        let (step, launch) = match s.split_once(',') {
            Some((a, b)) => (ms(a)?, ms(b)?),
            None => (ms(s)?, Duration::ZERO),
        };
        if launch > step {
            bail!("the launch ({launch:?}) is part of the step ({step:?})");
        }
        Ok(Self { step, launch })
    }
}

/// Picks ids by a hash of each sequence's position and last token: varied
/// text for the detokenizer, the same for every run.
pub struct SimulatedDevice {
    vocab: usize,
    times: DeviceTimes,
    ready_at: Option<(Instant, StepOutput)>,
}

impl SimulatedDevice {
    pub fn new(vocab: usize, times: DeviceTimes) -> Self {
        Self {
            vocab,
            times,
            ready_at: None,
        }
    }

    fn next_id(&self, position: usize, last: u32) -> u32 {
        let h = (position as u64 ^ (u64::from(last) << 20)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // Skip the control and byte tokens at the start of Llama's vocabulary.
        let low = 259.min(self.vocab as u64 - 1);
        (low + (h >> 33) % (self.vocab as u64 - low)) as u32
    }
}

impl ModelRunner for SimulatedDevice {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn draws_on_device(&self) -> bool {
        true
    }

    fn launches_async(&self) -> bool {
        true
    }

    fn launch(&mut self, plan: &StepPlan) -> Result<(), String> {
        let start = Instant::now();
        let mut output = StepOutput {
            vocab: self.vocab,
            ..StepOutput::default()
        };
        for (i, chunk) in plan.chunks.iter().filter(|c| c.sample).enumerate() {
            let last = chunk.tokens.last().copied().unwrap_or(0);
            let id = self.next_id(chunk.start_pos + chunk.tokens.len(), last);
            if plan.picks.get(i).copied().flatten().is_some() {
                output.ids.resize(i + 1, None);
                output.ids[i] = Some(id);
            } else {
                let row = output.logits.len();
                output.logits.resize(row + self.vocab, 0.0);
                output.logits[row + id as usize] = 30.0;
            }
        }
        // The host is busy submitting the step's kernels.
        while start.elapsed() < self.times.launch {
            std::hint::spin_loop();
        }
        self.ready_at = Some((start + self.times.step, output));
        Ok(())
    }

    fn collect(&mut self) -> Result<StepOutput, String> {
        let (at, output) = self
            .ready_at
            .take()
            .ok_or_else(|| "collect without a launched step".to_string())?;
        // Sleep most of the wait, spin the rest: a sleep overshoots by tens
        // of microseconds, which would be charged to the engine.
        let spin = Duration::from_micros(300);
        let now = Instant::now();
        if at > now + spin {
            std::thread::sleep(at - now - spin);
        }
        while Instant::now() < at {
            std::hint::spin_loop();
        }
        Ok(output)
    }
}
