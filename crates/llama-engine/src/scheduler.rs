//! The scheduler: a pure state machine deciding, each step, which sequences
//! run and how many of their tokens. It knows token counts and KV blocks, not
//! tensors, samplers or channels, so it is tested with a scripted runner.
//!
//! Policy (as vLLM's v1 scheduler):
//! - running sequences in decode go first, one token each, so a long prompt
//!   never stalls them for more than one chunk;
//! - then prompts being prefilled, then newly admitted ones (FCFS), in chunks
//!   that fit the step's token budget (chunked prefill);
//! - a sequence that cannot get the block it needs preempts the youngest
//!   running sequence, which loses its KV and is recomputed later (never an
//!   out-of-memory error, never a dropped request).

use std::collections::{HashMap, VecDeque};

use llama_model::sampling::RowPick;
use llama_model::{BlockAllocator, BlockTable};

pub type SeqId = u64;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks + decodes) in one step.
    pub max_num_batched_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 512,
        }
    }
}

#[derive(Debug)]
struct Sequence {
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose keys/values are in the cache.
    computed: usize,
    table: BlockTable,
    /// Admission order; preemption takes the largest.
    arrival: u64,
    /// Blocks to keep free for sequences this one will fork into (n > 1).
    reserve_forks: usize,
}

/// One sequence's part of a step.
#[derive(Debug, Clone)]
pub struct ScheduledChunk {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    pub block_table: BlockTable,
    /// This chunk reaches the sequence's last token: its logits pick the next token.
    pub sample: bool,
    /// The logits of every position are wanted, not only the last (prompt
    /// logprobs; set by the engine, not the scheduler).
    pub all_logits: bool,
}

#[derive(Debug, Clone, Default)]
pub struct StepPlan {
    pub chunks: Vec<ScheduledChunk>,
    /// Sequences that lost their KV this step (they stay queued and are recomputed).
    pub preempted: Vec<SeqId>,
    /// KV blocks to copy `(src, dst)` before this step's forward (forked choices).
    pub copies: Vec<(u32, u32)>,
    /// Per sampled chunk, in order: how the runner picks the next token
    /// itself, next to the logits, or `None` for a row the engine samples
    /// from the whole logits row (set by the engine, not the scheduler; empty
    /// means all `None`).
    pub picks: Vec<Option<RowPick>>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.chunks.iter().map(|c| c.tokens.len()).sum()
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    alloc: BlockAllocator,
    seqs: HashMap<SeqId, Sequence>,
    /// Waiting to start (or restart after preemption), front first.
    waiting: VecDeque<SeqId>,
    /// Holding KV blocks, in admission order.
    running: Vec<SeqId>,
    next_arrival: u64,
    pending_copies: Vec<(u32, u32)>,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, alloc: BlockAllocator) -> Self {
        Self {
            config,
            alloc,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_arrival: 0,
            pending_copies: Vec::new(),
            preemptions: 0,
        }
    }

    /// Queues a new sequence. `forks` more sequences will be forked from it
    /// when its prompt is computed (the other choices of an n > 1 request).
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, forks: usize) {
        debug_assert!(!prompt.is_empty());
        self.seqs.insert(
            id,
            Sequence {
                tokens: prompt,
                computed: 0,
                table: BlockTable::new(),
                arrival: u64::MAX,
                reserve_forks: forks,
            },
        );
        self.waiting.push_back(id);
    }

    /// Creates `child` as a copy of `parent` (same tokens, same KV). When
    /// blocks are short the child recomputes its KV instead: never an error.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let Some(p) = self.seqs.get_mut(&parent) else {
            return;
        };
        p.reserve_forks = p.reserve_forks.saturating_sub(1);
        let tokens = p.tokens.clone();
        let computed = p.computed;
        let src_blocks = p.table.blocks().to_vec();
        let arrival = p.arrival;
        let mut table = BlockTable::new();
        let copied = computed > 0 && self.alloc.ensure_capacity(&mut table, computed).is_ok();
        if copied {
            self.pending_copies
                .extend(src_blocks.iter().zip(table.blocks()).map(|(&s, &d)| (s, d)));
        }
        self.seqs.insert(
            child,
            Sequence {
                tokens,
                computed: if copied { computed } else { 0 },
                table,
                arrival,
                reserve_forks: 0,
            },
        );
        if copied {
            // Right after its parent, so preemption order stays by arrival.
            let at = self
                .running
                .iter()
                .position(|&s| s == parent)
                .map_or(self.running.len(), |i| i + 1);
            self.running.insert(at, child);
        } else {
            self.waiting.push_front(child);
        }
    }

    /// Appends a sampled token to a sequence.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Marks `len` tokens of the chunk just run as computed.
    pub fn mark_computed(&mut self, id: SeqId, len: usize) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.computed = (s.computed + len).min(s.tokens.len());
        }
    }

    /// Removes a sequence (finished, cancelled or failed) and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(mut s) = self.seqs.remove(&id) {
            self.alloc
                .release(&mut s.table)
                .expect("a sequence's blocks are its own");
            self.running.retain(|&r| r != id);
            self.waiting.retain(|&w| w != id);
        }
    }

    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    pub fn tokens(&self, id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&id).map(|s| s.tokens.as_slice())
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty()
    }

    pub fn num_free_blocks(&self) -> usize {
        self.alloc.num_free()
    }

    pub fn num_blocks(&self) -> usize {
        self.alloc.num_blocks()
    }

    pub fn block_size(&self) -> usize {
        self.alloc.block_size()
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Frees the youngest running sequence other than `keep`; false if there is none.
    fn preempt_youngest(&mut self, keep: SeqId, plan: &mut StepPlan) -> bool {
        let victim = self
            .running
            .iter()
            .copied()
            .filter(|&id| id != keep && !plan.chunks.iter().any(|c| c.seq == id))
            .max_by_key(|id| self.seqs[id].arrival);
        let Some(victim) = victim else { return false };
        let s = self.seqs.get_mut(&victim).expect("running sequences exist");
        self.alloc
            .release(&mut s.table)
            .expect("a sequence's blocks are its own");
        s.computed = 0;
        self.running.retain(|&r| r != victim);
        self.waiting.push_front(victim);
        plan.preempted.push(victim);
        self.preemptions += 1;
        true
    }

    /// Blocks other sequences have been promised for their forks.
    fn reserved_for_forks(&self) -> usize {
        self.running
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                s.reserve_forks * self.alloc.blocks_for(s.tokens.len())
            })
            .sum()
    }

    fn chunk(&self, id: SeqId, len: usize) -> ScheduledChunk {
        let s = &self.seqs[&id];
        ScheduledChunk {
            seq: id,
            tokens: s.tokens[s.computed..s.computed + len].to_vec(),
            start_pos: s.computed,
            block_table: s.table.clone(),
            sample: s.computed + len == s.tokens.len(),
            all_logits: false,
        }
    }

    /// Plans the next step. The plan's chunks already own their blocks.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan {
            copies: std::mem::take(&mut self.pending_copies),
            ..Default::default()
        };
        let mut budget = self.config.max_num_batched_tokens;

        // 1. Running sequences, oldest first: decodes and unfinished prefills.
        let mut i = 0;
        while i < self.running.len() && budget > 0 && plan.chunks.len() < self.config.max_num_seqs {
            let id = self.running[i];
            let s = &self.seqs[&id];
            let remaining = s.tokens.len() - s.computed;
            if remaining == 0 {
                i += 1;
                continue;
            }
            let len = remaining.min(budget);
            let need = s.computed + len;
            loop {
                let s = self.seqs.get_mut(&id).expect("running");
                if self.alloc.ensure_capacity(&mut s.table, need).is_ok() {
                    break;
                }
                if !self.preempt_youngest(id, &mut plan) {
                    break;
                }
            }
            if self.seqs[&id].table.capacity(self.alloc.block_size()) < need {
                // Even alone it cannot grow: preempt itself so others can run.
                if let Some(pos) = self.running.iter().position(|&r| r == id) {
                    let s = self.seqs.get_mut(&id).expect("running");
                    self.alloc.release(&mut s.table).expect("own blocks");
                    s.computed = 0;
                    self.running.remove(pos);
                    self.waiting.push_front(id);
                    plan.preempted.push(id);
                    self.preemptions += 1;
                }
                continue;
            }
            plan.chunks.push(self.chunk(id, len));
            budget -= len;
            // The list may have shrunk by preemption of younger sequences only.
            i = self
                .running
                .iter()
                .position(|&r| r == id)
                .map_or(i, |p| p + 1);
        }

        // 2. Admit waiting sequences, FCFS, while blocks and budget allow.
        while budget > 0 && plan.chunks.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            if plan.preempted.contains(&id) {
                break; // preempted this very step: give memory a step to free up
            }
            let s = &self.seqs[&id];
            // Admit only when the whole prompt (and promised forks) fits now, so
            // an admitted prompt is not preempted halfway through its prefill.
            // Alone in the engine, forks that do not fit simply recompute.
            let forks = if self.running.is_empty() {
                0
            } else {
                s.reserve_forks
            };
            let need_blocks = self.alloc.blocks_for(s.tokens.len()) * (1 + forks);
            if need_blocks + self.reserved_for_forks() > self.alloc.num_free() {
                break;
            }
            let len = (s.tokens.len() - s.computed).min(budget);
            let need = s.computed + len;
            let s = self.seqs.get_mut(&id).expect("waiting");
            if self.alloc.ensure_capacity(&mut s.table, need).is_err() {
                break;
            }
            if s.arrival == u64::MAX {
                s.arrival = self.next_arrival;
                self.next_arrival += 1;
            }
            self.waiting.pop_front();
            self.running.push(id);
            plan.chunks.push(self.chunk(id, len));
            budget -= len;
        }
        plan
    }
}

#[cfg(test)]
mod tests;
