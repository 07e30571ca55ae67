//! The engine thread: drain requests → schedule → one batched forward →
//! sample → detokenize → stop checks → events. No lock around any of it.

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use llama_model::sampling::RowPick;
use llama_model::{BlockAllocator, KvCacheSpec, LlamaModel};

use crate::detokenizer::IncrementalDetokenizer;
use crate::handle::{Command, EngineHandle, EngineStats, EventSender, Limits, Shared, Submission};
use crate::request::{
    EngineError, FinishReason, GenerateRequest, SampledLogprobs, StreamEvent, TokenLogprob, Usage,
};
use crate::runner::{CandleRunner, ModelRunner, StepOutput};
use crate::sampling::{log_probs, Sampled, Sampler, MAX_TOP_LOGPROBS};
use crate::scheduler::{ScheduledChunk, Scheduler, SchedulerConfig, SeqId, StepPlan};
use crate::stop::StopMatcher;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens in one step: bounds how long a prompt chunk can stall decodes.
    pub max_num_batched_tokens: usize,
    /// Most requests waiting to start; more are refused with `Overloaded`.
    pub max_queue: usize,
    pub kv_cache: KvCacheSpec,
    pub max_n: usize,
    pub max_logprobs: usize,
    /// Whether sampled rows are picked next to the logits (see
    /// [`llama_model::sampling`]); `None`: where the model runs on a GPU.
    /// Greedy rows always are.
    pub draws_on_device: Option<bool>,
    /// Replay decode-only steps as CUDA graphs, recorded at start for every
    /// batch size up to `max_num_seqs` (see [`llama_model::DecodeGraphs`]).
    /// Ignored off CUDA.
    pub cuda_graphs: bool,
    /// Send a step's tokens (detokenization, stop strings, events) while the
    /// next step runs on the device. `None`: where the runner's steps run
    /// asynchronously (a GPU); on the CPU a token would wait a step longer.
    pub overlap: Option<bool>,
    /// Automatic prefix caching: prompts start from the cached KV blocks of
    /// the longest prefix already computed (see [`crate::scheduler`]).
    pub prefix_caching: bool,
}

/// `draws_on_device` from its user-facing name: `auto` (`None`), `device` or
/// `host`; the one parser behind the server's `--sampling` and engine-bench's
/// `--draws`.
pub fn parse_draws_on_device(name: &str) -> Result<Option<bool>, String> {
    parse_auto_choice(name, "device", "host")
}

/// [`EngineConfig::overlap`] from its user-facing name: `auto` (`None`), `on`
/// or `off`; behind the server's and engine-bench's `--overlap`.
pub fn parse_overlap(name: &str) -> Result<Option<bool>, String> {
    parse_auto_choice(name, "on", "off")
}

/// A plain `on`/`off` switch (the server's `--prefix-caching` and
/// `--cuda-graphs`, engine-bench's `--prefix-caching`).
pub fn parse_on_off(name: &str) -> Result<bool, String> {
    match name.trim() {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(format!("on or off, not {other:?}")),
    }
}

fn parse_auto_choice(name: &str, yes: &str, no: &str) -> Result<Option<bool>, String> {
    match name.trim() {
        "auto" => Ok(None),
        n if n == yes => Ok(Some(true)),
        n if n == no => Ok(Some(false)),
        other => Err(format!("auto, {yes} or {no}, not {other:?}")),
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 512,
            max_queue: 1024,
            kv_cache: KvCacheSpec::default(),
            max_n: 16,
            max_logprobs: 20,
            draws_on_device: None,
            cuda_graphs: false,
            overlap: None,
            prefix_caching: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineStartError {
    #[error(transparent)]
    Model(#[from] llama_model::ModelError),
    #[error("cannot start the engine thread: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("invalid engine config: {0}")]
    Config(String),
}

/// Starts the engine thread over a Candle model.
pub fn start_engine(
    model: LlamaModel,
    tokenizer: Tokenizer,
    config: EngineConfig,
) -> Result<EngineHandle, EngineStartError> {
    let kv = model.new_kv_cache(&config.kv_cache)?;
    let alloc = kv.allocator();
    let model_cfg = model.config().clone();
    let mut eos = model_cfg.eos_token_ids.clone();
    eos.extend(tokenizer.eos_id());
    tracing::info!(
        blocks = kv.num_blocks(),
        block_size = kv.block_size(),
        kv_bytes = kv.total_bytes(),
        bytes_per_token = kv.bytes_per_token(),
        "KV cache allocated"
    );
    let mut runner = CandleRunner::new(model, kv, config.draws_on_device);
    if config.cuda_graphs {
        runner.record_graphs(config.max_num_seqs);
    }
    start_with_runner(
        Box::new(runner),
        alloc,
        tokenizer,
        eos,
        model_cfg.max_position_embeddings,
        config,
    )
}

/// Starts the engine thread over any runner (the scripted one in tests).
pub fn start_with_runner(
    runner: Box<dyn ModelRunner>,
    alloc: BlockAllocator,
    tokenizer: Tokenizer,
    mut eos: Vec<u32>,
    max_positions: usize,
    config: EngineConfig,
) -> Result<EngineHandle, EngineStartError> {
    if config.max_num_seqs == 0 || config.max_num_batched_tokens == 0 {
        return Err(EngineStartError::Config(
            "max_num_seqs and max_num_batched_tokens must be positive".into(),
        ));
    }
    eos.sort_unstable();
    eos.dedup();
    // A sequence must fit the KV pool on its own, or it could never run.
    let max_context = max_positions.min(alloc.num_blocks() * alloc.block_size());
    let (tx, rx) = std::sync::mpsc::channel();
    let shared = Arc::new(Shared {
        commands: tx,
        stats: EngineStats::default(),
        limits: Limits {
            max_queue: config.max_queue,
            max_context,
            vocab_size: runner.vocab_size(),
            // The choices of one request run side by side: more than a
            // step holds could never all be admitted.
            max_n: config.max_n.min(config.max_num_seqs),
            max_logprobs: config.max_logprobs,
        },
        accepting: AtomicBool::new(true),
        stopped: AtomicBool::new(false),
    });
    shared
        .stats
        .kv_blocks_total
        .store(alloc.num_blocks(), Ordering::Relaxed);
    let scheduler = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: config.max_num_seqs,
            max_num_batched_tokens: config.max_num_batched_tokens,
            prefix_caching: config.prefix_caching,
        },
        alloc,
    );
    let overlap = config.overlap.unwrap_or_else(|| runner.launches_async());
    let mut engine = Engine {
        overlap,
        runner,
        scheduler,
        hf: Arc::new(tokenizer.hf().clone()),
        tokenizer,
        eos,
        max_context,
        shared: shared.clone(),
        commands: rx,
        requests: HashMap::new(),
        seqs: HashMap::new(),
        next_id: 0,
        row: Vec::new(),
    };
    std::thread::Builder::new()
        .name("llama-engine".into())
        .spawn(move || engine.run())?;
    Ok(EngineHandle { shared })
}

struct RequestState {
    request: GenerateRequest,
    events: EventSender,
    submitted_at: Instant,
    /// The sequence that runs the shared prompt; the other choices fork from it.
    parent: SeqId,
    admitted: bool,
    queue_time: std::time::Duration,
    /// Prompt tokens whose KV came from the prefix cache.
    cached_tokens: usize,
    /// Choices not yet forked from the parent (n > 1).
    pending_forks: usize,
    live_seqs: Vec<SeqId>,
}

struct SeqState {
    request: u64,
    choice: usize,
    sampler: Sampler,
    detok: IncrementalDetokenizer,
    stop: StopMatcher,
    prompt_len: usize,
    generated: usize,
    /// The prompt's scores so far, when its request wants them: entry `i`
    /// scores prompt token `i` (entry 0 is always `None`). Only the choice
    /// that runs the prompt has them, until they are sent.
    prompt_scores: Option<Vec<Option<SampledLogprobs>>>,
}

/// A token picked for a sequence, whose detokenization, stop-string check
/// and events are still to come.
struct Picked {
    seq: SeqId,
    sampled: Sampled,
    /// What the token alone ends the sequence with: `Stop` for EOS or a stop
    /// id, `Length` for max_tokens or the context. A stop string can still
    /// end it when its text is sent.
    finish: Option<FinishReason>,
}

impl Picked {
    /// An EOS or stop id: ends the sequence, and has no text of its own.
    fn ends_by_token(&self) -> bool {
        self.finish == Some(FinishReason::Stop)
    }
}

struct Engine {
    runner: Box<dyn ModelRunner>,
    /// Send picked tokens while the next step runs (see [`EngineConfig::overlap`]).
    overlap: bool,
    scheduler: Scheduler,
    tokenizer: Tokenizer,
    /// One shared copy for every sequence's detokenizer.
    hf: Arc<tokenizers::Tokenizer>,
    eos: Vec<u32>,
    max_context: usize,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    requests: HashMap<u64, RequestState>,
    seqs: HashMap<SeqId, SeqState>,
    next_id: u64,
    /// Scratch copy of one logits row: samplers modify logits in place.
    row: Vec<f32>,
}

impl Engine {
    fn stats(&self) -> &EngineStats {
        &self.shared.stats
    }

    fn run(&mut self) {
        // Tokens picked by the last step and not yet sent.
        let mut picked = Vec::new();
        loop {
            if !self.drain_commands(picked.is_empty()) {
                break;
            }
            self.drop_cancelled_and_expired();
            if !self.scheduler.has_work() {
                self.send_tokens(&mut picked);
                // Idle from here on: gauges must show the freed blocks before the loop blocks.
                self.publish_gauges();
                continue;
            }
            let t0 = Instant::now();
            let mut plan = self.scheduler.schedule();
            self.after_schedule(&plan);
            plan.picks = self.row_picks(&plan);
            self.mark_prompt_scoring(&mut plan);
            if plan.is_empty() {
                self.send_tokens(&mut picked);
                // Nothing fits right now (e.g. blocks held by forks); yield instead of spinning hot.
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            let t1 = Instant::now();
            let launched = guarded(|| self.runner.launch(&plan));
            let t_launched = Instant::now();
            // The device runs the step while the host sends the last one's
            // tokens. A sequence that a stop string ends here is in the step:
            // its row is dropped, and its blocks are reused only by a later
            // step, which runs after this one.
            if launched.is_ok() {
                self.send_tokens(&mut picked);
            }
            let t_sent = Instant::now();
            let result = launched.and_then(|()| guarded(|| self.runner.collect()));
            let t2 = Instant::now();
            match result {
                Ok(output) => {
                    self.pick_tokens(&plan, &output, &mut picked);
                    if !self.overlap {
                        self.send_tokens(&mut picked);
                    }
                }
                Err(message) => {
                    self.send_tokens(&mut picked);
                    self.fail_step(&plan, &message);
                }
            }
            let t3 = Instant::now();
            let s = self.stats();
            s.steps_total.fetch_add(1, Ordering::Relaxed);
            s.schedule_ns
                .fetch_add((t1 - t0).as_nanos() as u64, Ordering::Relaxed);
            s.forward_ns
                .fetch_add((t2 - t1).as_nanos() as u64, Ordering::Relaxed);
            s.sent_during_step_ns
                .fetch_add((t_sent - t_launched).as_nanos() as u64, Ordering::Relaxed);
            s.postprocess_ns
                .fetch_add((t3 - t2).as_nanos() as u64, Ordering::Relaxed);
            if plan.num_tokens() == plan.chunks.len() {
                s.decode_steps_total.fetch_add(1, Ordering::Relaxed);
                s.decode_forward_ns
                    .fetch_add((t2 - t1).as_nanos() as u64, Ordering::Relaxed);
                s.decode_tokens_total
                    .fetch_add(plan.chunks.len() as u64, Ordering::Relaxed);
                s.decode_step_ns
                    .fetch_add((t3 - t0).as_nanos() as u64, Ordering::Relaxed);
            }
            s.graph_steps_total
                .store(self.runner.graph_steps(), Ordering::Relaxed);
            self.publish_gauges();
        }
        self.send_tokens(&mut picked);
        self.shared.stopped.store(true, Ordering::Release);
        self.fail_all(EngineError::Shutdown);
    }

    /// Takes every queued command; blocks only when there is nothing to do
    /// and `may_block`. False = shut down.
    fn drain_commands(&mut self, may_block: bool) -> bool {
        if may_block && !self.scheduler.has_work() {
            match self.commands.recv() {
                Ok(cmd) => {
                    if !self.handle_command(cmd) {
                        return false;
                    }
                }
                Err(_) => return false,
            }
        }
        loop {
            match self.commands.try_recv() {
                Ok(cmd) => {
                    if !self.handle_command(cmd) {
                        return false;
                    }
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return self.scheduler.has_work(),
            }
        }
    }

    fn handle_command(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Shutdown => false,
            Command::Submit(sub) => {
                self.add_request(*sub);
                true
            }
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn add_request(&mut self, sub: Submission) {
        let Submission {
            request,
            events,
            submitted_at,
        } = sub;
        let req_id = self.new_id();
        let seq_id = self.new_id();
        let n = request.n.max(1);
        // A prompt whose every position is scored cannot skip any of them.
        let reuse_cached = request.prompt_logprobs.is_none();
        self.scheduler
            .add(seq_id, request.prompt.clone(), n - 1, reuse_cached);
        self.seqs
            .insert(seq_id, self.new_seq_state(req_id, 0, &request));
        self.requests.insert(
            req_id,
            RequestState {
                events,
                submitted_at,
                parent: seq_id,
                admitted: false,
                queue_time: std::time::Duration::ZERO,
                cached_tokens: 0,
                pending_forks: n - 1,
                live_seqs: vec![seq_id],
                request,
            },
        );
        // A one-token prompt has nothing to score: its scores are complete.
        self.send_prompt_scores(seq_id);
    }

    fn new_seq_state(&self, request_id: u64, choice: usize, request: &GenerateRequest) -> SeqState {
        SeqState {
            request: request_id,
            choice,
            sampler: Sampler::new(&request.sampling, choice),
            detok: IncrementalDetokenizer::new(self.hf.clone(), &request.prompt),
            stop: StopMatcher::new(request.stop.stop_strings.clone()),
            prompt_len: request.prompt.len(),
            generated: 0,
            prompt_scores: (choice == 0 && request.prompt_logprobs.is_some()).then(|| vec![None]),
        }
    }

    fn drop_cancelled_and_expired(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (&id, r) in &self.requests {
            if r.events.is_closed() {
                gone.push((id, None));
            } else if r.request.deadline.is_some_and(|d| now >= d) {
                gone.push((id, Some(EngineError::Timeout)));
            }
        }
        for (id, error) in gone {
            match error {
                None => {
                    self.stats()
                        .requests_cancelled_total
                        .fetch_add(1, Ordering::Relaxed);
                    self.remove_request(id, None);
                }
                Some(e) => {
                    self.stats()
                        .requests_failed_total
                        .fetch_add(1, Ordering::Relaxed);
                    self.remove_request(id, Some(e));
                }
            }
        }
    }

    /// Drops a request and all its sequences, freeing their blocks; sends `error` first if given.
    fn remove_request(&mut self, id: u64, error: Option<EngineError>) {
        let Some(r) = self.requests.remove(&id) else {
            return;
        };
        if !r.admitted {
            self.stats().waiting.fetch_sub(1, Ordering::AcqRel);
        }
        for seq in &r.live_seqs {
            self.scheduler.remove(*seq);
            self.seqs.remove(seq);
        }
        if let Some(e) = error {
            let _ = r.events.send(Err(e));
        }
    }

    fn after_schedule(&mut self, plan: &StepPlan) {
        if !plan.preempted.is_empty() {
            self.stats()
                .preemptions_total
                .fetch_add(plan.preempted.len() as u64, Ordering::Relaxed);
        }
        for chunk in &plan.chunks {
            let Some(seq) = self.seqs.get(&chunk.seq) else {
                continue;
            };
            let Some(r) = self.requests.get_mut(&seq.request) else {
                continue;
            };
            if !r.admitted {
                r.admitted = true;
                r.queue_time = r.submitted_at.elapsed();
                r.cached_tokens = self.scheduler.cached_tokens(chunk.seq).unwrap_or(0);
                self.shared.stats.waiting.fetch_sub(1, Ordering::AcqRel);
                self.shared
                    .stats
                    .prompt_tokens_total
                    .fetch_add(r.request.prompt.len() as u64, Ordering::Relaxed);
                tracing::debug!(request = %r.request.request_id, queued_ms = r.submitted_at.elapsed().as_millis() as u64, "admitted");
            }
        }
    }

    /// The step's next token for each sequence that samples, appended to it
    /// so that the next step can be scheduled, and into `picked` to be sent.
    fn pick_tokens(&mut self, plan: &StepPlan, output: &StepOutput, picked: &mut Vec<Picked>) {
        let (mut sampled, mut host_rows) = (0, 0);
        let mut all_logits = output.all_logits.iter().peekable();
        for (i, chunk) in plan.chunks.iter().enumerate() {
            self.scheduler.mark_computed(chunk.seq, chunk.tokens.len());
            if let Some((_, rows)) = all_logits.next_if(|(c, _)| *c == i) {
                self.score_prompt(chunk, rows, output.vocab);
                self.send_prompt_scores(chunk.seq);
            }
            if !chunk.sample {
                continue;
            }
            let id = output.picked(sampled);
            sampled += 1;
            let host_row = id.is_none().then(|| {
                host_rows += 1;
                host_rows - 1
            });
            // Gone since the step was launched: cancelled, or ended by a stop string.
            if !self.seqs.contains_key(&chunk.seq) {
                continue;
            }
            if self.ends_at_prompt(chunk.seq) {
                self.finish_at_prompt(chunk.seq);
                continue;
            }
            let mut targets = vec![chunk.seq];
            targets.extend(self.fork_choices(chunk.seq));
            for seq in targets {
                if let Some(row) = host_row {
                    self.row.clear();
                    self.row.extend_from_slice(output.row(row));
                }
                picked.extend(self.pick(seq, id));
            }
        }
    }

    /// Asks for every position's logits of chunks whose sequence scores its
    /// prompt and still lacks the scores of some of the chunk's positions
    /// (a recomputed prompt after preemption is not scored twice).
    fn mark_prompt_scoring(&self, plan: &mut StepPlan) {
        for chunk in &mut plan.chunks {
            let Some(st) = self.seqs.get(&chunk.seq) else {
                continue;
            };
            let Some(scores) = &st.prompt_scores else {
                continue;
            };
            // The logits at position p score prompt token p + 1.
            let unscored = scores.len() - 1..st.prompt_len.saturating_sub(1);
            let positions = chunk.start_pos..chunk.start_pos + chunk.tokens.len();
            chunk.all_logits = positions.start < unscored.end && unscored.start < positions.end;
        }
    }

    /// Scores the prompt tokens that `rows`, the logits of every position of
    /// `chunk`, predict.
    fn score_prompt(&mut self, chunk: &ScheduledChunk, rows: &[f32], vocab: usize) {
        let Some(st) = self.seqs.get_mut(&chunk.seq) else {
            return;
        };
        let Some(r) = self.requests.get(&st.request) else {
            return;
        };
        let (Some(k), Some(scores)) = (r.request.prompt_logprobs, st.prompt_scores.as_mut()) else {
            return;
        };
        let prompt = &r.request.prompt;
        for (j, row) in rows.chunks_exact(vocab).enumerate() {
            let target = chunk.start_pos + j + 1;
            if target != scores.len() || target >= prompt.len() {
                continue;
            }
            let (logprob, top) = log_probs(row, prompt[target], k.min(MAX_TOP_LOGPROBS));
            scores.push(Some(token_logprobs(
                &self.tokenizer,
                prompt[target],
                logprob,
                &top,
            )));
        }
    }

    /// Sends a sequence's prompt scores to every choice once they are complete.
    fn send_prompt_scores(&mut self, seq_id: SeqId) {
        let Some(st) = self.seqs.get_mut(&seq_id) else {
            return;
        };
        if st
            .prompt_scores
            .as_ref()
            .is_none_or(|s| s.len() < st.prompt_len)
        {
            return;
        }
        let scores = st.prompt_scores.take().unwrap_or_default();
        let Some(r) = self.requests.get(&st.request) else {
            return;
        };
        for index in 0..r.request.n.max(1) {
            let _ = r.events.send(Ok(StreamEvent::PromptLogprobs {
                index,
                logprobs: scores.clone(),
            }));
        }
    }

    /// A request with `max_tokens` 0: only its prompt was to run.
    fn ends_at_prompt(&self, seq_id: SeqId) -> bool {
        self.seqs
            .get(&seq_id)
            .and_then(|st| self.requests.get(&st.request))
            .is_some_and(|r| r.request.stop.max_tokens == 0)
    }

    /// Ends every choice of `seq_id`'s request without a token.
    fn finish_at_prompt(&mut self, seq_id: SeqId) {
        let Some(st) = self.seqs.get(&seq_id) else {
            return;
        };
        let request_id = st.request;
        let Some(r) = self.requests.get_mut(&request_id) else {
            return;
        };
        // The other choices would fork from this prompt: they never start.
        r.pending_forks = 0;
        let usage = Usage {
            prompt_tokens: st.prompt_len,
            completion_tokens: 0,
            cached_tokens: r.cached_tokens,
            queue_time: r.queue_time,
        };
        for index in 0..r.request.n.max(1) {
            let _ = r.events.send(Ok(StreamEvent::Done {
                index,
                finish_reason: FinishReason::Length,
                usage,
            }));
        }
        self.finish_seq(seq_id);
    }

    /// On the parent's first sampled step, creates the other n-1 choices sharing its prompt KV.
    fn fork_choices(&mut self, parent: SeqId) -> Vec<SeqId> {
        let req_id = self.seqs[&parent].request;
        let Some(r) = self.requests.get(&req_id) else {
            return Vec::new();
        };
        if r.parent != parent || r.pending_forks == 0 {
            return Vec::new();
        }
        let n = r.request.n;
        let request = r.request.clone();
        let mut children = Vec::new();
        for choice in 1..n {
            let child = self.new_id();
            self.scheduler.fork(parent, child);
            self.seqs
                .insert(child, self.new_seq_state(req_id, choice, &request));
            children.push(child);
        }
        let r = self.requests.get_mut(&req_id).expect("checked above");
        r.pending_forks = 0;
        r.live_seqs.extend(&children);
        children
    }

    /// Per sampled chunk: the pick the runner can make itself, or `None` to
    /// sample here from the row. A row that will fork into n choices is
    /// picked by the runner only when greedy (every choice takes the same
    /// id); sampled choices each draw from the row here.
    fn row_picks(&mut self, plan: &StepPlan) -> Vec<Option<RowPick>> {
        let draws_on_device = self.runner.draws_on_device();
        plan.chunks
            .iter()
            .filter(|c| c.sample)
            .map(|c| {
                let st = self.seqs.get_mut(&c.seq)?;
                let r = self.requests.get(&st.request)?;
                let logprobs = r.request.logprobs;
                let forks = r.parent == c.seq && r.pending_forks > 0;
                st.sampler.device_pick(logprobs, draws_on_device && !forks)
            })
            .collect()
    }

    /// Picks the next token of `seq_id` (or takes the one the runner already
    /// picked), appends it, and ends the sequence in the scheduler if the
    /// token alone ends it (EOS, a stop id, max_tokens, the context).
    /// Samples from `self.row`.
    fn pick(&mut self, seq_id: SeqId, picked: Option<u32>) -> Option<Picked> {
        let tokens = self.scheduler.tokens(seq_id)?;
        let st = self.seqs.get_mut(&seq_id)?;
        let r = self.requests.get(&st.request)?;
        let sampled = match picked {
            Some(id) => Sampled {
                id,
                logprob: 0.0,
                top: Vec::new(),
            },
            None => {
                let (prompt, generated) = tokens.split_at(st.prompt_len);
                st.sampler
                    .sample(&mut self.row, prompt, generated, r.request.logprobs)
            }
        };
        let token = sampled.id;
        let total_len = tokens.len() + 1;
        st.generated += 1;
        let conditions = &r.request.stop;
        let ends_by_token = (!conditions.ignore_eos && self.eos.binary_search(&token).is_ok())
            || conditions.stop_token_ids.contains(&token);
        let finish = if ends_by_token {
            Some(FinishReason::Stop)
        } else if st.generated >= conditions.max_tokens || total_len >= self.max_context {
            Some(FinishReason::Length)
        } else {
            None
        };
        self.shared
            .stats
            .generation_tokens_total
            .fetch_add(1, Ordering::Relaxed);
        self.scheduler.append_token(seq_id, token);
        if finish.is_some() {
            // Its blocks are free for the next step; its state stays until
            // the token is sent.
            self.scheduler.remove(seq_id);
        }
        Some(Picked {
            seq: seq_id,
            sampled,
            finish,
        })
    }

    fn send_tokens(&mut self, picked: &mut Vec<Picked>) {
        for p in picked.drain(..) {
            self.send_token(p);
        }
    }

    /// Detokenizes a picked token, runs the stop strings over its text, and
    /// sends its events; ends the sequence if it is done.
    fn send_token(&mut self, p: Picked) {
        let Some(st) = self.seqs.get_mut(&p.seq) else {
            return;
        };
        let Some(r) = self.requests.get(&st.request) else {
            return;
        };
        let mut finish = p.finish;
        let mut stopped_by_string = false;
        let mut text = String::new();
        if !p.ends_by_token() {
            let piece = st.detok.push(p.sampled.id);
            let out = st.stop.push(&piece);
            text = out.emit;
            if out.stopped {
                finish = Some(FinishReason::Stop);
                stopped_by_string = true;
            }
        }
        if finish.is_some() && !stopped_by_string {
            // Release what the detokenizer and the stop matcher still hold.
            let tail = st.detok.finish();
            let out = st.stop.push(&tail);
            text.push_str(&out.emit);
            if out.stopped {
                finish = Some(FinishReason::Stop);
            } else {
                text.push_str(&st.stop.flush());
            }
        }
        let want_logprobs = r.request.logprobs.is_some();
        let (choice, request_id) = (st.choice, st.request);
        let usage = Usage {
            prompt_tokens: st.prompt_len,
            completion_tokens: st.generated,
            cached_tokens: r.cached_tokens,
            queue_time: r.queue_time,
        };
        let logprobs = want_logprobs.then(|| {
            let mut lp = self.logprobs(&p.sampled);
            if p.ends_by_token() {
                // Counted in usage and scored like any token (log-likelihood
                // clients read the last entry as the generated one), but it
                // adds no text, as OpenAI and vLLM report it.
                lp.chosen.token.clear();
                lp.chosen.bytes.clear();
            }
            lp
        });
        let events = &self.requests[&request_id].events;
        if p.ends_by_token() && logprobs.is_some() && !text.is_empty() {
            // Text held back from earlier tokens goes out on its own, so the
            // end token's entry begins where the answer's text ends.
            let _ = events.send(Ok(StreamEvent::Token {
                index: choice,
                id: p.sampled.id,
                text: std::mem::take(&mut text),
                logprobs: None,
            }));
        }
        if !(p.ends_by_token() && text.is_empty() && logprobs.is_none()) {
            let _ = events.send(Ok(StreamEvent::Token {
                index: choice,
                id: p.sampled.id,
                text,
                logprobs,
            }));
        }
        if let Some(finish_reason) = finish {
            let _ = events.send(Ok(StreamEvent::Done {
                index: choice,
                finish_reason,
                usage,
            }));
            self.finish_seq(p.seq);
        }
    }

    fn logprobs(&self, sampled: &Sampled) -> SampledLogprobs {
        token_logprobs(&self.tokenizer, sampled.id, sampled.logprob, &sampled.top)
    }

    fn finish_seq(&mut self, seq_id: SeqId) {
        self.scheduler.remove(seq_id);
        let Some(st) = self.seqs.remove(&seq_id) else {
            return;
        };
        let Some(r) = self.requests.get_mut(&st.request) else {
            return;
        };
        r.live_seqs.retain(|&s| s != seq_id);
        if r.live_seqs.is_empty() && r.pending_forks == 0 {
            // Counted before its event channel closes: a client that saw
            // its stream end then sees the request counted.
            self.stats()
                .requests_finished_total
                .fetch_add(1, Ordering::Relaxed);
            self.requests.remove(&st.request);
        }
    }

    /// A failed step fails only the requests that were in it.
    fn fail_step(&mut self, plan: &StepPlan, message: &str) {
        tracing::error!(
            error = message,
            sequences = plan.chunks.len(),
            "step failed"
        );
        self.stats()
            .step_failures_total
            .fetch_add(1, Ordering::Relaxed);
        let mut requests: Vec<u64> = plan
            .chunks
            .iter()
            .filter_map(|c| self.seqs.get(&c.seq).map(|s| s.request))
            .collect();
        requests.sort_unstable();
        requests.dedup();
        for id in requests {
            self.stats()
                .requests_failed_total
                .fetch_add(1, Ordering::Relaxed);
            self.remove_request(id, Some(EngineError::Model(message.to_string())));
        }
    }

    fn fail_all(&mut self, error: EngineError) {
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        for id in ids {
            self.remove_request(id, Some(error.clone()));
        }
        // Requests still in the channel never reached the engine.
        while let Ok(cmd) = self.commands.try_recv() {
            if let Command::Submit(sub) = cmd {
                self.stats().waiting.fetch_sub(1, Ordering::AcqRel);
                let _ = sub.events.send(Err(error.clone()));
            }
        }
        self.publish_gauges();
    }

    fn publish_gauges(&self) {
        let s = self.stats();
        s.running
            .store(self.scheduler.num_running(), Ordering::Relaxed);
        s.kv_blocks_used.store(
            self.scheduler.num_blocks() - self.scheduler.num_free_blocks(),
            Ordering::Relaxed,
        );
        let (queries, hits) = self.scheduler.prefix_cache_counts();
        s.prefix_cache_queries_total
            .store(queries, Ordering::Relaxed);
        s.prefix_cache_hits_total.store(hits, Ordering::Relaxed);
    }
}

/// A token's logprob and its top alternatives, with their texts.
fn token_logprobs(
    tokenizer: &Tokenizer,
    id: u32,
    logprob: f32,
    top: &[(u32, f32)],
) -> SampledLogprobs {
    let entry = |id: u32, logprob: f32| TokenLogprob {
        id,
        token: tokenizer.token_text(id),
        bytes: tokenizer.token_bytes(id),
        logprob,
    };
    SampledLogprobs {
        chosen: entry(id, logprob),
        top: top.iter().map(|&(id, lp)| entry(id, lp)).collect(),
    }
}

/// Runs a runner call, turning a panic into the step's error.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| Err(panic_message(panic)))
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = panic.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic in the model step".into()
    }
}
