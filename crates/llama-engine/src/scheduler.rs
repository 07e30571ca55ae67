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
//!
//! Automatic prefix caching (as vLLM's): every full block a sequence computes
//! is indexed by the hash of its prefix ([`block_hash`]); a sequence admitted
//! from scratch (new, or recomputed after preemption) first takes, shared and
//! read-only, the cached blocks of its longest known prefix, and computes
//! only the rest. Blocks stay cached once free until the pool needs them. The
//! choices of an n > 1 request share their prompt's full blocks the same way.

use std::collections::{HashMap, VecDeque};

use llama_model::sampling::RowPick;
use llama_model::{BlockAllocator, BlockHash, BlockTable};

use block_hash::BlockHasher;

mod block_hash;

pub type SeqId = u64;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_num_seqs: usize,
    /// Most tokens (prompt chunks + decodes) in one step.
    pub max_num_batched_tokens: usize,
    /// Reuse the cached blocks of earlier sequences' identical prefixes.
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 256,
            max_num_batched_tokens: 512,
            prefix_caching: true,
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
    /// The prefix hashes of the first full blocks of `tokens`, as far as needed so far.
    hashes: Vec<BlockHash>,
    /// Leading blocks of `table` that the cache knows (found there or registered).
    registered: usize,
    /// May start from cached blocks: false when every prompt position must
    /// be computed (its logprobs are wanted).
    reuse_cached: bool,
    /// Prompt tokens found in the cache at the first admission.
    cached_tokens: usize,
}

impl Sequence {
    /// Gives up the sequence's KV (preemption): it is recomputed later, from
    /// whatever the cache still holds.
    fn drop_kv(&mut self, alloc: &mut BlockAllocator) {
        alloc
            .release(&mut self.table)
            .expect("a sequence's blocks are its own");
        self.computed = 0;
        self.registered = 0;
    }
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
    hasher: BlockHasher,
    /// Prompt tokens looked up in the prefix cache at admission, and found.
    prefix_queries: u64,
    prefix_hits: u64,
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
            hasher: BlockHasher::new(),
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    /// Queues a new sequence. `forks` more sequences will be forked from it
    /// when its prompt is computed (the other choices of an n > 1 request).
    /// `reuse_cached`: it may skip the prompt blocks the cache holds (false
    /// when the logits of every prompt position are wanted).
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, forks: usize, reuse_cached: bool) {
        debug_assert!(!prompt.is_empty());
        self.seqs.insert(
            id,
            Sequence {
                tokens: prompt,
                computed: 0,
                table: BlockTable::new(),
                arrival: u64::MAX,
                reserve_forks: forks,
                hashes: Vec::new(),
                registered: 0,
                reuse_cached,
                cached_tokens: 0,
            },
        );
        self.waiting.push_back(id);
    }

    /// Creates `child` as a copy of `parent` (same tokens, same KV): it
    /// shares the parent's full blocks, which neither writes again, and gets
    /// a copy of the partly filled last one. When blocks are short the child
    /// recomputes its KV instead: never an error.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let Some(p) = self.seqs.get_mut(&parent) else {
            return;
        };
        p.reserve_forks = p.reserve_forks.saturating_sub(1);
        let tokens = p.tokens.clone();
        let hashes = p.hashes.clone();
        let computed = p.computed;
        let src_blocks = p.table.blocks().to_vec();
        let arrival = p.arrival;
        let reuse_cached = p.reuse_cached;
        let cached_tokens = p.cached_tokens;
        let full = computed / self.alloc.block_size();
        let mut table = BlockTable::new();
        let mut copied = false;
        if computed > 0 {
            self.alloc.share(&mut table, &src_blocks[..full]);
            copied = self.alloc.ensure_capacity(&mut table, computed).is_ok();
            if copied {
                self.pending_copies.extend(
                    src_blocks[full..]
                        .iter()
                        .zip(&table.blocks()[full..])
                        .map(|(&s, &d)| (s, d)),
                );
            } else {
                self.alloc.release(&mut table).expect("just shared");
            }
        }
        self.seqs.insert(
            child,
            Sequence {
                tokens,
                computed: if copied { computed } else { 0 },
                table,
                arrival,
                reserve_forks: 0,
                hashes,
                // The shared blocks are the parent's, registered by it.
                registered: if copied {
                    full.min(self.seqs[&parent].registered)
                } else {
                    0
                },
                reuse_cached,
                cached_tokens,
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

    /// Marks `len` tokens of the chunk just run as computed, and offers the
    /// blocks this fills to the prefix cache.
    pub fn mark_computed(&mut self, id: SeqId, len: usize) {
        let Some(s) = self.seqs.get_mut(&id) else {
            return;
        };
        s.computed = (s.computed + len).min(s.tokens.len());
        let full = s.computed / self.alloc.block_size();
        if self.config.prefix_caching && full > s.registered {
            self.hasher
                .extend(&mut s.hashes, &s.tokens, self.alloc.block_size(), full);
            for i in s.registered..full {
                self.alloc.register(s.table.blocks()[i], s.hashes[i]);
            }
            s.registered = full;
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

    /// Prompt tokens of `id` found in the prefix cache when it was first admitted.
    pub fn cached_tokens(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.cached_tokens)
    }

    /// Tokens looked up in the prefix cache at admissions, and those found
    /// (vLLM's `prefix_cache_queries` and `prefix_cache_hits`).
    pub fn prefix_cache_counts(&self) -> (u64, u64) {
        (self.prefix_queries, self.prefix_hits)
    }

    /// The cached blocks a sequence admitted from scratch can start from.
    fn cached_prefix(&mut self, id: SeqId) -> Vec<u32> {
        let bs = self.alloc.block_size();
        let s = self.seqs.get_mut(&id).expect("queued");
        if !self.config.prefix_caching || !s.reuse_cached || !s.table.is_empty() {
            return Vec::new();
        }
        // The last token is always computed: its logits pick the next one.
        // (So no cached block is ever written, not even its last slot.)
        let blocks = (s.tokens.len() - 1) / bs;
        self.hasher.extend(&mut s.hashes, &s.tokens, bs, blocks);
        self.alloc.cached_prefix(&s.hashes[..blocks])
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
        self.seqs
            .get_mut(&victim)
            .expect("running sequences exist")
            .drop_kv(&mut self.alloc);
        self.running.retain(|&r| r != victim);
        self.waiting.push_front(victim);
        plan.preempted.push(victim);
        self.preemptions += 1;
        true
    }

    /// Forks that running prompts will still add to the running batch.
    fn promised_forks(&self) -> usize {
        self.running
            .iter()
            .map(|id| self.seqs[id].reserve_forks)
            .sum()
    }

    /// Blocks other sequences have been promised for their forks.
    fn reserved_for_forks(&self) -> usize {
        self.running
            .iter()
            .map(|id| {
                let s = &self.seqs[id];
                s.reserve_forks * self.fork_blocks(s.tokens.len())
            })
            .sum()
    }

    /// Blocks one fork of a `prompt_len`-token prompt takes: it shares the
    /// parent's full blocks and copies only the partly filled last one.
    fn fork_blocks(&self, prompt_len: usize) -> usize {
        usize::from(!prompt_len.is_multiple_of(self.alloc.block_size()))
    }

    fn chunk(&self, id: SeqId, len: usize) -> ScheduledChunk {
        let s = &self.seqs[&id];
        // Shared blocks are read-only: every write lands past them.
        debug_assert!(s.registered * self.alloc.block_size() <= s.computed);
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
                    self.seqs
                        .get_mut(&id)
                        .expect("running")
                        .drop_kv(&mut self.alloc);
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
            // The running batch (vLLM's running queue) holds at most
            // max_num_seqs sequences, the forks promised to running prompts
            // counted, so a sequence never holds KV blocks it cannot step with.
            if self.running.len() + self.promised_forks() + 1 + s.reserve_forks
                > self.config.max_num_seqs
            {
                break;
            }
            let hits = self.cached_prefix(id);
            let s = &self.seqs[&id];
            // Admit only when the whole prompt (and promised forks) fits now, so
            // an admitted prompt is not preempted halfway through its prefill.
            // Alone in the engine, forks that do not fit simply recompute.
            let forks = if self.running.is_empty() {
                0
            } else {
                s.reserve_forks
            };
            let whole = self.alloc.blocks_for(s.tokens.len());
            // Cached blocks nobody holds leave the free list when shared.
            let need_blocks = whole - hits.len()
                + self.alloc.num_unreferenced(&hits)
                + forks * self.fork_blocks(s.tokens.len());
            if need_blocks + self.reserved_for_forks() > self.alloc.num_free() {
                break;
            }
            let bs = self.alloc.block_size();
            let s = self.seqs.get_mut(&id).expect("waiting");
            if !hits.is_empty() {
                self.alloc.share(&mut s.table, &hits);
                s.computed = hits.len() * bs;
                s.registered = hits.len();
            }
            let len = (s.tokens.len() - s.computed).min(budget);
            let need = s.computed + len;
            if self.alloc.ensure_capacity(&mut s.table, need).is_err() {
                s.drop_kv(&mut self.alloc);
                break;
            }
            if self.config.prefix_caching && s.reuse_cached {
                self.prefix_queries += s.tokens.len() as u64;
                self.prefix_hits += s.computed as u64;
            }
            if s.arrival == u64::MAX {
                s.arrival = self.next_arrival;
                self.next_arrival += 1;
                s.cached_tokens = s.computed;
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
