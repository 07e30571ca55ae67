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
        self.sched.add(id, prompt, 0, true);
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
        ..Default::default()
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
        ..Default::default()
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
        ..Default::default()
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
    d.sched.add(1, prompt(9, 10), 2, true);
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
    // 10 prompt tokens: two full blocks, shared, and a partial one, copied.
    assert_eq!(
        next.copies.len(),
        2,
        "one copy per child: {:?}",
        next.copies
    );
    let tables: Vec<&[u32]> = next.chunks.iter().map(|c| c.block_table.blocks()).collect();
    assert_eq!(tables.len(), 3);
    for t in &tables[1..] {
        assert_eq!(t[..2], tables[0][..2], "full blocks are shared");
        assert_ne!(t[2], tables[0][2], "the partial block is a copy");
    }
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

/// `prefix` then `len` tokens of its own.
fn with_prefix(prefix: &[u32], seed: u32, len: usize) -> Vec<u32> {
    let mut p = prefix.to_vec();
    p.extend(prompt(seed, len));
    p
}

#[test]
fn a_repeated_prompt_starts_from_its_cached_blocks() {
    let mut d = Driver::new(64, 4, SchedulerConfig::default());
    d.add(1, prompt(1, 10), 3);
    d.run_to_end();
    assert_eq!(d.sched.num_free_blocks(), 64);
    d.add(2, prompt(1, 10), 3);
    let plan = d.step();
    // Two full blocks found; the rest, with the token that samples, computed.
    assert_eq!(plan.chunks[0].start_pos, 8);
    assert_eq!(plan.chunks[0].tokens, prompt(1, 10)[8..]);
    assert_eq!(d.sched.cached_tokens(2), Some(8));
    d.run_to_end();
    assert_eq!(d.outputs[&2], d.outputs[&1]);
    assert_eq!(d.sched.prefix_cache_counts(), (20, 8));

    // All full blocks: the last one is computed again, so that its last
    // token gives the logits (and no cached block is written).
    d.add(3, prompt(2, 8), 2);
    d.run_to_end();
    d.add(4, prompt(2, 8), 2);
    let plan = d.step();
    assert_eq!(
        (plan.chunks[0].start_pos, plan.chunks[0].tokens.len()),
        (4, 4)
    );
    d.run_to_end();
    assert_eq!(d.outputs[&4], d.outputs[&3]);
    assert_eq!(d.sched.num_free_blocks(), 64);
}

#[test]
fn generated_tokens_are_cached_too() {
    // A follow-up prompt that repeats an answer (a chat's next turn) finds it.
    let mut d = Driver::new(64, 4, SchedulerConfig::default());
    d.add(1, prompt(1, 6), 10);
    d.run_to_end();
    let mut turn = prompt(1, 6);
    turn.extend(&d.outputs[&1]);
    turn.extend(prompt(7, 5));
    d.add(2, turn.clone(), 4);
    let plan = d.step();
    // 16 tokens: the prompt and all but the last answer token were computed.
    assert_eq!(plan.chunks[0].start_pos, 12);
    d.run_to_end();
    assert_eq!(d.outputs[&2], solo(turn, 4));
}

#[test]
fn without_prefix_caching_or_reuse_every_token_is_computed() {
    let off = SchedulerConfig {
        prefix_caching: false,
        ..Default::default()
    };
    let mut d = Driver::new(64, 4, off);
    d.add(1, prompt(1, 10), 3);
    d.run_to_end();
    d.add(2, prompt(1, 10), 3);
    assert_eq!(d.step().chunks[0].start_pos, 0);
    d.run_to_end();
    assert_eq!(d.sched.prefix_cache_counts(), (0, 0));

    let mut d = Driver::new(64, 4, SchedulerConfig::default());
    d.add(1, prompt(1, 10), 3);
    d.run_to_end();
    // Prompt logprobs need every position: this one reads nothing cached...
    d.sched.add(2, prompt(1, 10), 0, false);
    d.budget.insert(2, 3);
    d.outputs.insert(2, Vec::new());
    assert_eq!(d.step().chunks[0].start_pos, 0);
    assert_eq!(d.sched.cached_tokens(2), Some(0));
    d.run_to_end();
    assert_eq!(d.outputs[&2], d.outputs[&1]);
    // ...but what it computed is there for the others.
    d.add(3, prompt(1, 10), 3);
    assert_eq!(d.step().chunks[0].start_pos, 8);
}

#[test]
fn shared_prefixes_under_preemption_and_eviction_give_solo_outputs() {
    // Prompts from three shared prefixes (system prompts) with their own
    // tails, through pools from tight (constant preemption and eviction) to
    // roomy, chunked or not: each output equals the sequence's run alone,
    // and every block is free at the end.
    let prefixes: Vec<Vec<u32>> = (0..3)
        .map(|i| prompt(100 + i, 5 + 4 * i as usize))
        .collect();
    for (blocks, block_size, batched) in [
        (14, 4, 64),
        (20, 4, 7),
        (24, 3, 64),
        (64, 4, 512),
        (40, 8, 16),
    ] {
        let config = SchedulerConfig {
            max_num_seqs: 8,
            max_num_batched_tokens: batched,
            ..Default::default()
        };
        let mut d = Driver::new(blocks, block_size, config);
        let specs: Vec<(SeqId, Vec<u32>, usize)> = (1..=18u64)
            .map(|i| {
                let prefix = &prefixes[i as usize % 3];
                // Long enough for blocks of tail tokens alone, which follow
                // different prefixes: only the prefix in the hash tells them apart.
                let own = 4 + (i as usize * 5) % 9;
                (
                    i,
                    with_prefix(prefix, i as u32 % 4, own),
                    4 + (i as usize * 3) % 9,
                )
            })
            .collect();
        // Half at once, half as the first ones finish.
        for (id, p, gen) in &specs[..9] {
            d.add(*id, p.clone(), *gen);
        }
        for _ in 0..6 {
            d.step();
        }
        for (id, p, gen) in &specs[9..] {
            d.add(*id, p.clone(), *gen);
        }
        d.run_to_end();
        if blocks < 30 {
            assert!(d.sched.preemptions() > 0, "{blocks}x{block_size} preempts");
        }
        let (queries, hits) = d.sched.prefix_cache_counts();
        assert!(
            hits > 0 && hits < queries,
            "{blocks}x{block_size}: {hits} of {queries}"
        );
        for (id, p, gen) in &specs {
            assert_eq!(
                d.outputs[id],
                solo(p.clone(), *gen),
                "{blocks}x{block_size}, seq {id}"
            );
        }
        assert_eq!(d.sched.num_free_blocks(), blocks, "{blocks}x{block_size}");
    }
}

#[test]
fn forks_reserve_only_the_block_they_copy() {
    // 8 blocks of 4; another sequence holds 2. A 10-token prompt (3 blocks)
    // with 2 more choices needs 3 + 2 partial-block copies = 5 of the 6
    // free, not 3 whole prompts (9).
    let mut d = Driver::new(8, 4, SchedulerConfig::default());
    d.add(1, prompt(1, 8), 3);
    d.step();
    d.sched.add(2, prompt(2, 10), 2, true);
    let plan = d.sched.schedule();
    assert!(plan.chunks.iter().any(|c| c.seq == 2), "{plan:?}");
    d.sched.mark_computed(1, 1);
    d.sched.mark_computed(2, 10);
    d.sched.fork(2, 3);
    d.sched.fork(2, 4);
    // Both forks got their copy instead of a recompute.
    assert_eq!(d.sched.num_running(), 4);
    assert_eq!(d.sched.schedule().copies.len(), 2);
}
