//! Opt-in per-stage timing of the forward pass, for finding where a step's
//! time goes on a device that has no profiler at hand (the GPU machine). When
//! on, every stage ends with a device synchronisation, so the timings are
//! exact but the step is slower: never on in serving.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use candle_core::Device;

/// When recording: the last mark's time and every stage seen since `start`.
type Recording = Option<(Instant, Vec<(&'static str, Duration)>)>;

thread_local! {
    static STAGES: RefCell<Recording> = const { RefCell::new(None) };
}

/// Starts recording on this thread (clears what was recorded).
pub fn start() {
    STAGES.with_borrow_mut(|s| *s = Some((Instant::now(), Vec::new())));
}

/// Stops recording and returns the total per stage, in first-seen order.
pub fn finish() -> Vec<(&'static str, Duration)> {
    let recorded = STAGES.with_borrow_mut(|s| s.take());
    let mut totals: Vec<(&'static str, Duration)> = Vec::new();
    for (name, d) in recorded.map(|(_, v)| v).unwrap_or_default() {
        match totals.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += d,
            None => totals.push((name, d)),
        }
    }
    totals
}

/// Whether this thread is recording (a CUDA graph cannot hold the marks'
/// synchronisations).
pub fn is_recording() -> bool {
    STAGES.with_borrow(|s| s.is_some())
}

/// Ends a stage: when recording, waits for the device and charges the time
/// since the previous mark to `name`.
pub fn mark(name: &'static str, device: &Device) {
    let on = STAGES.with_borrow(|s| s.is_some());
    if !on {
        return;
    }
    let _ = device.synchronize();
    STAGES.with_borrow_mut(|s| {
        if let Some((last, v)) = s {
            let now = Instant::now();
            v.push((name, now - *last));
            *last = now;
        }
    });
}
