//! Scheduler tests against a scripted model that keeps a fake KV cache: every
//! slot remembers which (token, position) was written to it, and a step reads
//! its sequence's whole context back through the block table. Any scheduling
//! mistake (wrong position, lost KV after preemption, bad fork copy) either
//! panics or changes the "model" output, which is a hash of the context.

use std::collections::HashMap;

use llama_model::BlockAllocator;

use super::*;

const VOCAB: u64 = 1000;

struct FakeModel {
    block_size: usize,
    slots: HashMap<u32, (u32, usize)>,
}

impl FakeModel {
    fn new(block_size: usize) -> Self {
        Self {
            block_size,
            slots: HashMap::new(),
        }
    }

    /// Runs a plan; returns the next token of each sampling chunk.
    fn step(&mut self, plan: &StepPlan) -> Vec<(SeqId, u32)> {
        for &(src, dst) in &plan.copies {
            for off in 0..self.block_size as u32 {
                let bs = self.block_size as u32;
                if let Some(v) = self.slots.get(&(src * bs + off)).copied() {
                    self.slots.insert(dst * bs + off, v);
                }
            }
        }
        let mut out = Vec::new();
        for c in &plan.chunks {
            for (i, &t) in c.tokens.iter().enumerate() {
                let pos = c.start_pos + i;
                self.slots
                    .insert(c.block_table.slot(pos, self.block_size), (t, pos));
            }
        }
        for c in &plan.chunks {
            if !c.sample {
                continue;
            }
            let ctx = c.start_pos + c.tokens.len();
            let mut h: u64 = 1469598103934665603;
            for pos in 0..ctx {
                let (tok, at) = self.slots[&c.block_table.slot(pos, self.block_size)];
                assert_eq!(
                    at, pos,
                    "seq {} reads a stale slot at position {pos}",
                    c.seq
                );
                h = (h ^ tok as u64).wrapping_mul(1099511628211);
            }
            out.push((c.seq, (h % VOCAB) as u32));
        }
        out
    }
}

struct Driver {
    sched: Scheduler,
    model: FakeModel,
    /// tokens still to generate per sequence
    budget: HashMap<SeqId, usize>,
    outputs: HashMap<SeqId, Vec<u32>>,
    steps: usize,
}

impl Driver {
    fn new(blocks: usize, block_size: usize, config: SchedulerConfig) -> Self {
        Self {
            sched: Scheduler::new(config, BlockAllocator::new(blocks, block_size).unwrap()),
            model: FakeModel::new(block_size),
            budget: HashMap::new(),
            outputs: HashMap::new(),
            steps: 0,
        }
    }

    fn add(&mut self, id: SeqId, prompt: Vec<u32>, max_tokens: usize) {
        self.sched.add(id, prompt, 0);
        self.budget.insert(id, max_tokens);
        self.outputs.insert(id, Vec::new());
    }

    fn step(&mut self) -> StepPlan {
        let plan = self.sched.schedule();
        let sampled = self.model.step(&plan);
        for c in &plan.chunks {
            self.sched.mark_computed(c.seq, c.tokens.len());
        }
        for (seq, tok) in sampled {
            self.sched.append_token(seq, tok);
            self.outputs.get_mut(&seq).unwrap().push(tok);
            let left = self.budget.get_mut(&seq).unwrap();
            *left -= 1;
            if *left == 0 {
                self.sched.remove(seq);
            }
        }
        self.steps += 1;
        plan
    }

    fn run_to_end(&mut self) {
        while self.sched.has_work() {
            self.step();
            assert!(self.steps < 100_000, "no progress");
        }
    }
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 31 + i * 7) % 500 + 1)
        .collect()
}

fn solo(prompt: Vec<u32>, max_tokens: usize) -> Vec<u32> {
    let mut d = Driver::new(256, 4, SchedulerConfig::default());
    d.add(1, prompt, max_tokens);
    d.run_to_end();
    d.outputs.remove(&1).unwrap()
}

#[test]
fn admits_by_free_blocks() {
    // 4 blocks of 4 tokens; each prompt needs 2 blocks: only two fit at once.
    let mut d = Driver::new(4, 4, SchedulerConfig::default());
    for id in 1..=3 {
        d.add(id, prompt(id as u32, 8), 1);
    }
    let plan = d.sched.schedule();
    let admitted: Vec<SeqId> = plan.chunks.iter().map(|c| c.seq).collect();
    assert_eq!(admitted, vec![1, 2]);
    assert_eq!(d.sched.num_waiting(), 1);
    assert_eq!(d.sched.num_free_blocks(), 0);
}

#[test]
fn chunked_prefill_never_stalls_running_decodes() {
    let config = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 16,
    };
    let mut d = Driver::new(128, 4, config);
    d.add(1, prompt(1, 5), 40);
    d.step(); // prefill of seq 1
    d.add(2, prompt(2, 100), 5);
    let mut saw_chunks = 0;
    for _ in 0..10 {
        let plan = d.step();
        assert!(plan.num_tokens() <= 16);
        let decode = plan
            .chunks
            .iter()
            .find(|c| c.seq == 1)
            .expect("seq 1 decodes every step");
        assert_eq!(decode.tokens.len(), 1);
        if let Some(c) = plan.chunks.iter().find(|c| c.seq == 2) {
            // The rest of the budget goes to the prompt; only its last chunk is shorter.
            assert!(
                c.tokens.len() == 15 || c.sample,
                "chunk of {}",
                c.tokens.len()
            );
            saw_chunks += 1;
        }
    }
    assert!(saw_chunks >= 6);
    d.run_to_end();
    assert_eq!(d.outputs[&1], solo(prompt(1, 5), 40));
    assert_eq!(d.outputs[&2], solo(prompt(2, 100), 5));
}

#[test]
fn preemption_recomputes_and_gives_the_same_output() {
    // 12 sequences that together need far more than 20 blocks as they grow.
    let config = SchedulerConfig {
        max_num_seqs: 16,
        max_num_batched_tokens: 64,
    };
    let mut d = Driver::new(20, 4, config);
    let specs: Vec<(SeqId, usize, usize)> = (1..=12)
        .map(|i| (i, 3 + (i as usize * 5) % 11, 10 + (i as usize * 7) % 17))
        .collect();
    for &(id, len, gen) in &specs {
        d.add(id, prompt(id as u32, len), gen);
    }
    d.run_to_end();
    assert!(
        d.sched.preemptions() > 0,
        "the pool is small enough to force preemption"
    );
    for &(id, len, gen) in &specs {
        assert_eq!(
            d.outputs[&id],
            solo(prompt(id as u32, len), gen),
            "seq {id}"
        );
    }
    assert_eq!(d.sched.num_free_blocks(), 20);
}

#[test]
fn preempts_the_youngest() {
    let config = SchedulerConfig {
        max_num_seqs: 8,
        max_num_batched_tokens: 64,
    };
    let mut d = Driver::new(4, 4, config);
    d.add(1, prompt(1, 4), 100);
    d.add(2, prompt(2, 4), 100);
    d.step(); // both prefilled: 2 blocks used, next decodes need a block each
    d.step();
    d.step();
    let mut preempted = Vec::new();
    for _ in 0..10 {
        preempted.extend(d.step().preempted);
    }
    assert_eq!(preempted.first(), Some(&2));
}

#[test]
fn removed_sequence_frees_its_blocks_at_once() {
    let mut d = Driver::new(16, 4, SchedulerConfig::default());
    d.add(1, prompt(1, 10), 50);
    d.add(2, prompt(2, 10), 50);
    d.step();
    d.step();
    let used = 16 - d.sched.num_free_blocks();
    assert!(used >= 6);
    d.sched.remove(2);
    assert_eq!(16 - d.sched.num_free_blocks(), used / 2);
    let plan = d.step();
    assert!(plan.chunks.iter().all(|c| c.seq != 2));
}

#[test]
fn forked_sequences_share_the_prompt_kv() {
    let mut d = Driver::new(64, 4, SchedulerConfig::default());
    d.sched.add(1, prompt(9, 10), 2);
    d.budget.insert(1, 5);
    d.outputs.insert(1, Vec::new());
    let plan = d.sched.schedule();
    let sampled = d.model.step(&plan);
    d.sched.mark_computed(1, 10);
    // The engine forks right after the parent's prompt is computed, before appending.
    d.sched.fork(1, 2);
    d.sched.fork(1, 3);
    for child in [2, 3] {
        d.budget.insert(child, 5);
        d.outputs.insert(child, vec![]);
    }
    for seq in [1, 2, 3] {
        d.sched.append_token(seq, sampled[0].1);
        d.outputs.get_mut(&seq).unwrap().push(sampled[0].1);
        *d.budget.get_mut(&seq).unwrap() -= 1;
    }
    let next = d.sched.schedule();
    assert_eq!(
        next.copies.len(),
        6,
        "three prompt blocks copied per child: {:?}",
        next.copies
    );
    assert!(
        next.chunks.iter().all(|c| c.tokens.len() == 1),
        "children do not recompute the prompt"
    );
    let sampled = d.model.step(&next);
    for c in &next.chunks {
        d.sched.mark_computed(c.seq, 1);
    }
    let toks: Vec<u32> = sampled.iter().map(|s| s.1).collect();
    assert!(
        toks.windows(2).all(|w| w[0] == w[1]),
        "same context gives the same next token"
    );
}
