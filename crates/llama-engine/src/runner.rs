//! `ModelRunner`: what the engine loop needs from a model, so that the loop
//! and the scheduler can be tested with a scripted stand-in.

use llama_model::{BatchInput, KvCache, LlamaModel, SeqChunk, Tensor};

use crate::scheduler::StepPlan;

/// Logits of a step's sampling chunks, row-major `[rows, vocab]`, in plan
/// order; or, for a `greedy_only` plan, just each row's argmax.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    pub vocab: usize,
    pub logits: Vec<f32>,
    /// One id per sampled row when the runner picked greedily on the device.
    pub greedy_ids: Vec<u32>,
}

impl StepOutput {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.logits[i * self.vocab..(i + 1) * self.vocab]
    }

    pub fn rows(&self) -> usize {
        self.logits.len().checked_div(self.vocab).unwrap_or(0)
    }
}

pub trait ModelRunner: Send {
    fn vocab_size(&self) -> usize;
    /// Runs one batched forward for `plan`; returns one logits row per chunk with `sample` set.
    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, String>;
}

/// The real thing: a Candle [`LlamaModel`] and its [`KvCache`].
pub struct CandleRunner {
    model: LlamaModel,
    kv: KvCache,
}

impl CandleRunner {
    pub fn new(model: LlamaModel, kv: KvCache) -> Self {
        Self { model, kv }
    }

    pub fn kv(&self) -> &KvCache {
        &self.kv
    }

    pub fn model(&self) -> &LlamaModel {
        &self.model
    }

    fn run(&mut self, plan: &StepPlan) -> llama_model::Result<StepOutput> {
        self.kv.copy_blocks(&plan.copies)?;
        let batch = BatchInput::new(
            plan.chunks
                .iter()
                .map(|c| SeqChunk {
                    tokens: &c.tokens,
                    start_pos: c.start_pos,
                    block_table: &c.block_table,
                    all_logits: false,
                })
                .collect(),
        );
        let logits = self.model.forward(&batch, &self.kv)?;
        let vocab = self.model.config().vocab_size;
        let rows: Vec<u32> = plan
            .chunks
            .iter()
            .zip(&logits.last_row)
            .filter(|(c, _)| c.sample)
            .map(|(_, &r)| r as u32)
            .collect();
        if rows.is_empty() {
            return Ok(StepOutput {
                vocab,
                ..StepOutput::default()
            });
        }
        let n = rows.len();
        let picked = if n == logits.last_row.len()
            && rows.iter().enumerate().all(|(i, &r)| r as usize == i)
        {
            logits.values
        } else {
            logits
                .values
                .index_select(&Tensor::from_vec(rows, n, self.model.device())?, 0)?
        };
        if plan.greedy_only {
            // On a GPU this reads back 4 bytes per row instead of the whole vocabulary.
            let ids: Vec<u32> = picked.argmax(candle_core::D::Minus1)?.to_vec1()?;
            return Ok(StepOutput {
                vocab,
                greedy_ids: ids,
                ..StepOutput::default()
            });
        }
        let flat: Vec<f32> = picked.flatten_all()?.to_vec1()?;
        Ok(StepOutput {
            vocab,
            logits: flat,
            ..StepOutput::default()
        })
    }
}

impl ModelRunner for CandleRunner {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, String> {
        self.run(plan).map_err(|e| e.to_string())
    }
}
