//! `EngineHandle`: the server's only way into the engine thread.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::request::{EngineError, GenerateRequest, StreamEvent, SubmitError};

pub(crate) type EventSender = mpsc::UnboundedSender<Result<StreamEvent, EngineError>>;

/// A request on its way to the engine thread.
pub(crate) struct Submission {
    pub request: GenerateRequest,
    pub events: EventSender,
    pub submitted_at: Instant,
}

pub(crate) enum Command {
    Submit(Box<Submission>),
    Shutdown,
}

/// Live counters, written by the engine thread and read by anyone (for `/metrics`).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub prompt_tokens_total: AtomicU64,
    pub generation_tokens_total: AtomicU64,
    pub preemptions_total: AtomicU64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_cache_queries_total: AtomicU64,
    pub prefix_cache_hits_total: AtomicU64,
    pub requests_finished_total: AtomicU64,
    pub requests_cancelled_total: AtomicU64,
    pub requests_failed_total: AtomicU64,
    pub steps_total: AtomicU64,
    pub step_failures_total: AtomicU64,
    /// Time spent in the engine loop's phases, for the overhead breakdown:
    /// they add up to the loop's wall time. `forward` runs from the step's
    /// launch to its output, so it includes the host work done while the
    /// device runs the step (`sent_during_step_ns`, see
    /// [`EngineConfig::overlap`](crate::EngineConfig::overlap)); schedule and
    /// postprocess are the host time the device waits on.
    pub schedule_ns: AtomicU64,
    pub forward_ns: AtomicU64,
    pub postprocess_ns: AtomicU64,
    pub sent_during_step_ns: AtomicU64,
    /// Steps with no prompt token (every chunk one decode token), and their
    /// forward time: the rest of the forward time went to prompts.
    pub decode_steps_total: AtomicU64,
    pub decode_forward_ns: AtomicU64,
    /// Tokens those steps decoded, and their whole wall time (schedule,
    /// forward and output processing): the engine's sustained decode rate.
    pub decode_tokens_total: AtomicU64,
    pub decode_step_ns: AtomicU64,
    /// Steps served by replaying a CUDA graph (`--cuda-graphs on`).
    pub graph_steps_total: AtomicU64,
}

/// A copy of [`EngineStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub prompt_tokens_total: u64,
    pub generation_tokens_total: u64,
    pub preemptions_total: u64,
    pub prefix_cache_queries_total: u64,
    pub prefix_cache_hits_total: u64,
    pub requests_finished_total: u64,
    pub requests_cancelled_total: u64,
    pub requests_failed_total: u64,
    pub steps_total: u64,
    pub step_failures_total: u64,
    pub schedule_ns: u64,
    pub forward_ns: u64,
    pub postprocess_ns: u64,
    pub sent_during_step_ns: u64,
    pub decode_steps_total: u64,
    pub decode_forward_ns: u64,
    pub decode_tokens_total: u64,
    pub decode_step_ns: u64,
    pub graph_steps_total: u64,
}

impl EngineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let r = Ordering::Relaxed;
        StatsSnapshot {
            running: self.running.load(r),
            waiting: self.waiting.load(r),
            kv_blocks_used: self.kv_blocks_used.load(r),
            kv_blocks_total: self.kv_blocks_total.load(r),
            prompt_tokens_total: self.prompt_tokens_total.load(r),
            generation_tokens_total: self.generation_tokens_total.load(r),
            preemptions_total: self.preemptions_total.load(r),
            prefix_cache_queries_total: self.prefix_cache_queries_total.load(r),
            prefix_cache_hits_total: self.prefix_cache_hits_total.load(r),
            requests_finished_total: self.requests_finished_total.load(r),
            requests_cancelled_total: self.requests_cancelled_total.load(r),
            requests_failed_total: self.requests_failed_total.load(r),
            steps_total: self.steps_total.load(r),
            step_failures_total: self.step_failures_total.load(r),
            schedule_ns: self.schedule_ns.load(r),
            forward_ns: self.forward_ns.load(r),
            postprocess_ns: self.postprocess_ns.load(r),
            sent_during_step_ns: self.sent_during_step_ns.load(r),
            decode_steps_total: self.decode_steps_total.load(r),
            decode_forward_ns: self.decode_forward_ns.load(r),
            decode_tokens_total: self.decode_tokens_total.load(r),
            decode_step_ns: self.decode_step_ns.load(r),
            graph_steps_total: self.graph_steps_total.load(r),
        }
    }
}

/// Limits the handle enforces before anything reaches the engine thread.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_queue: usize,
    pub max_context: usize,
    pub vocab_size: usize,
    pub max_n: usize,
    pub max_logprobs: usize,
}

pub(crate) struct Shared {
    pub commands: std::sync::mpsc::Sender<Command>,
    pub stats: EngineStats,
    pub limits: Limits,
    pub accepting: AtomicBool,
    /// Set by the engine thread when its loop ends (normally or not).
    pub stopped: AtomicBool,
}

/// Cheap to clone, `Send + Sync`. Dropping every handle does not stop the
/// engine; call [`EngineHandle::shutdown`].
#[derive(Clone)]
pub struct EngineHandle {
    pub(crate) shared: Arc<Shared>,
}

impl EngineHandle {
    /// Queues a request. Never blocks: a full queue is [`SubmitError::Overloaded`].
    pub fn submit(&self, request: GenerateRequest) -> Result<Generation, SubmitError> {
        let limits = &self.shared.limits;
        if !self.is_accepting() {
            return Err(SubmitError::Unavailable(if self.is_alive() {
                "the server is shutting down".into()
            } else {
                "the engine has stopped".into()
            }));
        }
        validate(&request, limits)?;
        // Reserve a queue place first so that concurrent submits cannot overshoot the bound.
        let waiting = &self.shared.stats.waiting;
        let mut current = waiting.load(Ordering::Relaxed);
        loop {
            if current >= limits.max_queue {
                return Err(SubmitError::Overloaded { waiting: current });
            }
            match waiting.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let prompt_tokens = request.prompt.len();
        let submission = Submission {
            request,
            events: tx,
            submitted_at: Instant::now(),
        };
        if self
            .shared
            .commands
            .send(Command::Submit(Box::new(submission)))
            .is_err()
        {
            waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Unavailable("the engine has stopped".into()));
        }
        Ok(Generation {
            prompt_tokens,
            events: rx,
        })
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Context length of the model, in tokens.
    pub fn max_context(&self) -> usize {
        self.shared.limits.max_context
    }

    pub fn max_queue(&self) -> usize {
        self.shared.limits.max_queue
    }

    /// The engine thread is running its loop.
    pub fn is_alive(&self) -> bool {
        !self.shared.stopped.load(Ordering::Acquire)
    }

    pub fn is_accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::Acquire) && self.is_alive()
    }

    /// Refuse new requests from now on; requests already queued or running finish.
    pub fn stop_accepting(&self) {
        self.shared.accepting.store(false, Ordering::Release);
    }

    /// Ends the engine thread after the current step; unfinished requests get [`EngineError::Shutdown`].
    pub fn shutdown(&self) {
        self.stop_accepting();
        let _ = self.shared.commands.send(Command::Shutdown);
    }
}

fn validate(request: &GenerateRequest, limits: &Limits) -> Result<(), SubmitError> {
    if request.prompt.is_empty() {
        return Err(SubmitError::Invalid("the prompt is empty".into()));
    }
    if let Some(&bad) = request
        .prompt
        .iter()
        .find(|&&t| t as usize >= limits.vocab_size)
    {
        return Err(SubmitError::Invalid(format!(
            "token id {bad} is out of range: the vocabulary has {} tokens",
            limits.vocab_size
        )));
    }
    if request.n == 0 || request.n > limits.max_n {
        return Err(SubmitError::Invalid(format!(
            "n must be between 1 and {}",
            limits.max_n
        )));
    }
    if let Some(k) = request.logprobs {
        if k > limits.max_logprobs {
            return Err(SubmitError::Invalid(format!(
                "top_logprobs must be at most {}",
                limits.max_logprobs
            )));
        }
    }
    let requested = request.prompt.len().saturating_add(request.stop.max_tokens);
    if requested > limits.max_context {
        return Err(SubmitError::ContextLength {
            max_context: limits.max_context,
            requested,
            prompt: request.prompt.len(),
            max_tokens: request.stop.max_tokens,
        });
    }
    Ok(())
}

/// The events of one request. Dropping it cancels the request: the engine
/// removes the sequence at its next step and frees its KV blocks.
pub struct Generation {
    pub prompt_tokens: usize,
    events: mpsc::UnboundedReceiver<Result<StreamEvent, EngineError>>,
}

impl std::fmt::Debug for Generation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generation")
            .field("prompt_tokens", &self.prompt_tokens)
            .finish_non_exhaustive()
    }
}

impl Generation {
    /// The next event, or `None` once every choice is done.
    pub async fn next_event(&mut self) -> Option<Result<StreamEvent, EngineError>> {
        self.events.recv().await
    }

    /// Blocking variant for threads outside an async runtime.
    pub fn blocking_next(&mut self) -> Option<Result<StreamEvent, EngineError>> {
        self.events.blocking_recv()
    }
}

impl futures::Stream for Generation {
    type Item = Result<StreamEvent, EngineError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.events.poll_recv(cx)
    }
}
