//! `ModelRunner`: what the engine loop needs from a model, so that the loop
//! and the scheduler can be tested with a scripted stand-in.

use llama_model::sampling::{pick_rows_lazily, RowPick};
use llama_model::{BatchInput, DecodeGraphs, KvCache, LlamaModel, SeqChunk, Tensor};

use crate::scheduler::StepPlan;

/// What a step gives per sampling chunk, in plan order: the id the runner
/// picked (`ids[i]`, for rows with a [`StepPlan::picks`] entry), or else the
/// row's logits, row-major `[rows, vocab]` over those rows only, in order.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub vocab: usize,
    pub logits: Vec<f32>,
    /// Empty, or one entry per sampling chunk.
    pub ids: Vec<Option<u32>>,
    /// For each chunk with [`ScheduledChunk::all_logits`](crate::scheduler::ScheduledChunk):
    /// its index in the plan and the logits of all its positions, row-major
    /// `[tokens, vocab]`.
    pub all_logits: Vec<(usize, Vec<f32>)>,
}

impl StepOutput {
    /// The id picked for sampling chunk `i`, if the runner picked it.
    pub fn picked(&self, i: usize) -> Option<u32> {
        self.ids.get(i).copied().flatten()
    }

    /// Logits row `i` of those returned (the `i`-th chunk without a pick).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }

    pub fn rows(&self) -> usize {
        self.logits.len().checked_div(self.vocab).unwrap_or(0)
    }
}

pub trait ModelRunner: Send {
    fn vocab_size(&self) -> usize;
    /// Whether sampled (not only greedy) rows should be picked by the runner:
    /// where the logits are on a GPU, picking there saves reading them back.
    fn draws_on_device(&self) -> bool {
        false
    }
    /// Whether [`launch`](Self::launch) returns while the device still runs
    /// the step (a GPU), so that host work done before
    /// [`collect`](Self::collect) overlaps it.
    fn launches_async(&self) -> bool {
        false
    }
    /// Starts one batched forward for `plan`; [`collect`](Self::collect)
    /// returns its output. One step is in flight at a time.
    fn launch(&mut self, plan: &StepPlan) -> Result<(), String>;
    /// Waits for the step [`launch`](Self::launch) started: one logits row
    /// (or pick) per chunk with `sample` set.
    fn collect(&mut self) -> Result<StepOutput, String>;
    /// Steps served by replaying a CUDA graph so far.
    fn graph_steps(&self) -> u64 {
        0
    }
}

/// A launched step whose results are still where the model ran.
struct InFlight {
    /// Sampling chunks of the step.
    rows: usize,
    /// Chunks the runner picked for, and their ids (`[len]` u32).
    picked: Option<(Vec<usize>, Tensor)>,
    /// The other sampling chunks' logits, `[len, vocab]`.
    logits: Option<Tensor>,
    /// Chunks that asked for every position's logits: plan index, `[tokens, vocab]`.
    all_logits: Vec<(usize, Tensor)>,
}

/// The real thing: a Candle [`LlamaModel`] and its [`KvCache`].
pub struct CandleRunner {
    model: LlamaModel,
    kv: KvCache,
    draws_on_device: bool,
    graphs: Option<DecodeGraphs>,
    in_flight: Option<InFlight>,
}

impl CandleRunner {
    /// `draws_on_device`: `None` picks sampled rows next to the logits where
    /// they are on a GPU (on the CPU the engine's sampler is the faster).
    pub fn new(model: LlamaModel, kv: KvCache, draws_on_device: Option<bool>) -> Self {
        let draws_on_device = draws_on_device.unwrap_or_else(|| model.device().is_cuda());
        Self {
            model,
            kv,
            draws_on_device,
            graphs: None,
            in_flight: None,
        }
    }

    /// Turns on CUDA graphs for decode steps of up to `max_batch` sequences
    /// and records them all now, for every context size, so that no request
    /// waits on a recording. Does nothing off CUDA. Should recording fail,
    /// the engine serves without graphs (with a warning): never a reason not
    /// to start.
    pub fn record_graphs(&mut self, max_batch: usize) {
        let t0 = std::time::Instant::now();
        match self.try_record_graphs(max_batch) {
            Ok(None) => {
                tracing::info!(
                    "CUDA graphs asked for, but the model does not run the fused CUDA kernels \
                     (not on a CUDA device, or --kernels generic): steps run without graphs"
                )
            }
            Err(e) => tracing::warn!("serving without CUDA graphs: recording failed: {e}"),
            Ok(Some(graphs)) => {
                match graphs.disabled_reason() {
                    Some(why) => tracing::warn!("serving without CUDA graphs: {why}"),
                    None => tracing::info!(
                        graphs = graphs.stats().captured,
                        seconds = t0.elapsed().as_secs_f64(),
                        "CUDA graphs recorded for decode steps"
                    ),
                }
                self.graphs = Some(graphs);
            }
        }
    }

    fn try_record_graphs(&mut self, max_batch: usize) -> llama_model::Result<Option<DecodeGraphs>> {
        let Some(mut graphs) = DecodeGraphs::new(&self.model, &self.kv, max_batch)? else {
            return Ok(None);
        };
        graphs.prepare_all(&self.model, &self.kv)?;
        Ok(Some(graphs))
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    /// Enqueues the step's work; on a GPU nothing here waits for it.
    fn start(&mut self, plan: &StepPlan) -> llama_model::Result<InFlight> {
        self.kv.copy_blocks(&plan.copies)?;
        let batch = BatchInput::new(
            plan.chunks
                .iter()
                .map(|c| SeqChunk {
                    tokens: &c.tokens,
                    start_pos: c.start_pos,
                    block_table: &c.block_table,
                    all_logits: c.all_logits,
                })
                .collect(),
        );
        let logits = self
            .model
            .forward_graphed(&batch, &self.kv, self.graphs.as_mut())?;
        let rows: Vec<u32> = plan
            .chunks
            .iter()
            .zip(&logits.last_row)
            .filter(|(c, _)| c.sample)
            .map(|(_, &r)| r as u32)
            .collect();
        // Rows the runner picks, and rows whose logits go back to the engine.
        let pick = |i: usize| plan.picks.get(i).copied().flatten();
        let (on_device, to_host): (Vec<usize>, Vec<usize>) =
            (0..rows.len()).partition(|&i| pick(i).is_some());
        let picked = if on_device.is_empty() {
            None
        } else {
            let picks: Vec<RowPick> = on_device.iter().filter_map(|&i| pick(i)).collect();
            let values = select_rows(&logits.values, &rows, &on_device)?;
            Some((on_device, pick_rows_lazily(&values, &picks)?))
        };
        let all_logits = logits
            .all_rows
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.map(|(first, len)| (i, first, len)))
            .map(|(i, first, len)| Ok((i, logits.values.narrow(0, first, len)?)))
            .collect::<llama_model::Result<Vec<_>>>()?;
        let logits = if to_host.is_empty() {
            None
        } else {
            Some(select_rows(&logits.values, &rows, &to_host)?)
        };
        Ok(InFlight {
            rows: rows.len(),
            picked,
            logits,
            all_logits,
        })
    }

    /// Reads back what the host needs of a launched step: the step's sync.
    fn finish(&self, step: InFlight) -> llama_model::Result<StepOutput> {
        let vocab = self.model.config().vocab_size;
        let mut ids = Vec::new();
        if let Some((chunks, picked)) = step.picked {
            ids = vec![None; step.rows];
            for (i, id) in chunks.into_iter().zip(picked.to_vec1::<u32>()?) {
                ids[i] = Some(id);
            }
        }
        let logits = match step.logits {
            Some(l) => l.flatten_all()?.to_vec1()?,
            None => Vec::new(),
        };
        let all_logits = step
            .all_logits
            .into_iter()
            .map(|(i, rows)| Ok((i, rows.flatten_all()?.to_vec1()?)))
            .collect::<llama_model::Result<_>>()?;
        Ok(StepOutput {
            vocab,
            logits,
            ids,
            all_logits,
        })
    }
}

/// Rows `rows[which[..]]` of `values`, without a copy when that is all of them.
fn select_rows(values: &Tensor, rows: &[u32], which: &[usize]) -> llama_model::Result<Tensor> {
    let wanted: Vec<u32> = which.iter().map(|&i| rows[i]).collect();
    if wanted.len() == values.dims()[0] && wanted.iter().enumerate().all(|(i, &r)| r as usize == i)
    {
        return Ok(values.clone());
    }
    let n = wanted.len();
    Ok(values.index_select(&Tensor::from_vec(wanted, n, values.device())?, 0)?)
}

impl ModelRunner for CandleRunner {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn draws_on_device(&self) -> bool {
        self.draws_on_device
    }

    fn launches_async(&self) -> bool {
        self.model.device().is_cuda()
    }

    fn launch(&mut self, plan: &StepPlan) -> Result<(), String> {
        // A step whose output was never collected is dropped with its tensors.
        self.in_flight = Some(self.start(plan).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn collect(&mut self) -> Result<StepOutput, String> {
        let step = self
            .in_flight
            .take()
            .ok_or_else(|| "collect without a launched step".to_string())?;
        self.finish(step).map_err(|e| e.to_string())
    }

    fn graph_steps(&self) -> u64 {
        self.graphs.as_ref().map_or(0, |g| g.stats().replayed)
    }
}
