//! CUDA graphs of decode steps: the whole forward of a step whose every
//! sequence adds one token, recorded once per (batch size, attention warps)
//! and replayed with one launch, so that the host no longer submits some 300
//! kernels one by one (at batch 1 it takes about as long as the GPU runs them).
//!
//! A graph fixes its kernels' arguments and buffers, so a replayed step reads
//! its inputs from buffers that outlive it: token ids, positions, cache slots
//! and block tables (padded to the model's longest context) are copied into
//! them before each replay, and the logits are copied out of a fixed buffer.
//! Batches are padded up to the next captured size ([`graph_batch`]); padding
//! rows compute garbage that is never cached nor returned.
//!
//! Each graph is checked once against the step run without it (on the next
//! step that replays it, so with other inputs than it was recorded with): a
//! graph that reads a stale input fails that check, and graphs are then
//! turned off for good, with a warning, rather than serving wrong tokens.

use crate::error::Result;
use crate::kv::KvCache;
use crate::model::{BatchInput, LlamaModel, Logits};

/// What the graphs have done so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs recorded.
    pub captured: usize,
    /// Steps served by replaying a graph (not counting [`DecodeGraphs::prepare`]).
    pub replayed: u64,
    /// Steps served without a graph: prompt steps, steps larger than the
    /// largest graph, a graph's warm-up and check when they come with a
    /// served step, and every step once graphs are turned off.
    pub eager: u64,
    /// Graphs are off for good (a capture failed or a check disagreed).
    pub disabled: bool,
}

/// Decode-step graphs of one model over one KV cache (the graphs hold the
/// cache's addresses). Made with [`DecodeGraphs::new`], used through
/// [`LlamaModel::forward_graphed`].
pub struct DecodeGraphs(
    #[cfg(feature = "cuda")] crate::cuda_kernels::graphs::Graphs,
    #[cfg(not(feature = "cuda"))] std::convert::Infallible,
);

/// The cache slot of a padding row: its q is rotated, nothing is written to
/// the cache (NO_SLOT in kernels/pointwise.cuh).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA only; tested everywhere
pub(crate) const NO_SLOT: u32 = u32::MAX;

/// Most warps of the decode-attention kernel (MAX_ATTN_WARPS).
const MAX_WARPS: usize = 8;
#[cfg(feature = "cuda")]
const _: () = assert!(MAX_WARPS == crate::cuda_kernels::MAX_ATTN_WARPS);

/// Decode-attention warps of a graph whose longest context is `ctx`: one per
/// 32 keys as without graphs, rounded up to a power of two so that each
/// batch size needs at most four graphs.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA only; tested everywhere
pub(crate) fn graph_warps(ctx: usize) -> usize {
    ctx.div_ceil(32).next_power_of_two().clamp(1, MAX_WARPS)
}

/// The host side of a graph step's inputs: `head` holds `max_batch` token
/// ids, then as many positions, then as many cache slots; `tables` gets the
/// block table of each real row, padded to `max_blocks`. Rows from
/// `batch.seqs.len()` to `rows` are padding: token 0 at position 0, not
/// cached. Every sequence must have one token, and blocks for it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA only; tested everywhere
pub(crate) fn fill_step_inputs(
    batch: &BatchInput,
    rows: usize,
    block_size: usize,
    max_blocks: usize,
    head: &mut [u32],
    tables: &mut Vec<u32>,
) {
    let max_batch = head.len() / 3;
    let (ids, rest) = head.split_at_mut(max_batch);
    let (positions, slots) = rest.split_at_mut(max_batch);
    tables.clear();
    for (i, s) in batch.seqs.iter().enumerate() {
        let p = s.start_pos;
        let blocks = s.block_table.blocks();
        ids[i] = s.tokens[0];
        positions[i] = p as u32;
        slots[i] = blocks[p / block_size] * block_size as u32 + (p % block_size) as u32;
        let used = blocks.len().min(max_blocks);
        tables.extend_from_slice(&blocks[..used]);
        tables.extend(std::iter::repeat_n(0, max_blocks - used));
    }
    for i in batch.seqs.len()..rows {
        (ids[i], positions[i], slots[i]) = (0, 0, NO_SLOT);
    }
}

/// The batch a graph is recorded for, for a step of `n` decode tokens: 1, 2,
/// 4, then multiples of 8 (as vLLM captures), so that a server whose batch
/// wanders between 1 and 256 needs at most 35 sizes.
pub fn graph_batch(n: usize) -> usize {
    match n {
        0..=2 => n.max(1),
        3..=4 => 4,
        _ => n.div_ceil(8) * 8,
    }
}

impl DecodeGraphs {
    /// Graphs for `model`'s decode steps of up to `max_batch` sequences over
    /// `kv`, or `None` where there is nothing to record: not a CUDA device,
    /// or the plain-Candle kernels (`AttentionImpl::Generic`), which cannot
    /// skip the cache write of a padding row.
    pub fn new(model: &LlamaModel, kv: &KvCache, max_batch: usize) -> Result<Option<Self>> {
        #[cfg(feature = "cuda")]
        {
            Ok(crate::cuda_kernels::graphs::Graphs::new(model, kv, max_batch)?.map(DecodeGraphs))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (model, kv, max_batch);
            Ok(None)
        }
    }

    /// Records and checks, ahead of time, the graph that steps of `n` decode
    /// tokens with contexts up to `max_ctx` replay, on made-up inputs that
    /// write nothing to the cache. Without it a graph is recorded the third
    /// time its shape comes (once to warm up, once to record, once to check).
    /// Returns whether that graph is ready.
    pub fn prepare(
        &mut self,
        model: &LlamaModel,
        kv: &KvCache,
        n: usize,
        max_ctx: usize,
    ) -> Result<bool> {
        #[cfg(feature = "cuda")]
        {
            self.0.prepare(model, kv, n, max_ctx)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (model, kv, n, max_ctx);
            match self.0 {}
        }
    }

    /// [`DecodeGraphs::prepare`] for every graph a step can replay: each
    /// batch size up to the largest, each warp bucket up to the model's
    /// longest context. Returns whether all are ready (false once graphs
    /// turned themselves off).
    pub fn prepare_all(&mut self, model: &LlamaModel, kv: &KvCache) -> Result<bool> {
        let max_ctx = model.config().max_position_embeddings;
        let mut sizes: Vec<usize> = (1..=self.max_batch()).map(graph_batch).collect();
        sizes.dedup();
        let mut contexts: Vec<usize> = (0..=MAX_WARPS.ilog2())
            .map(|i| (32usize << i).min(max_ctx))
            .collect();
        contexts.dedup();
        for &rows in &sizes {
            for &ctx in &contexts {
                if !self.prepare(model, kv, rows, ctx)? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// The largest batch a graph is recorded for.
    pub fn max_batch(&self) -> usize {
        #[cfg(feature = "cuda")]
        {
            self.0.max_batch()
        }
        #[cfg(not(feature = "cuda"))]
        match self.0 {}
    }

    pub fn stats(&self) -> GraphStats {
        #[cfg(feature = "cuda")]
        {
            self.0.stats()
        }
        #[cfg(not(feature = "cuda"))]
        match self.0 {}
    }

    /// Why graphs were turned off, once they are.
    pub fn disabled_reason(&self) -> Option<&str> {
        #[cfg(feature = "cuda")]
        {
            self.0.disabled_reason()
        }
        #[cfg(not(feature = "cuda"))]
        match self.0 {}
    }

    fn forward(&mut self, model: &LlamaModel, batch: &BatchInput, kv: &KvCache) -> Result<Logits> {
        #[cfg(feature = "cuda")]
        {
            self.0.forward(model, batch, kv)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (model, batch, kv);
            match self.0 {}
        }
    }
}

impl LlamaModel {
    /// [`LlamaModel::forward`], replaying a CUDA graph for decode-only steps
    /// when `graphs` is given. Same logits, fewer launches.
    pub fn forward_graphed(
        &self,
        batch: &BatchInput,
        kv: &KvCache,
        graphs: Option<&mut DecodeGraphs>,
    ) -> Result<Logits> {
        match graphs {
            Some(graphs) => graphs.forward(self, batch, kv),
            None => self.forward(batch, kv),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fill_step_inputs, graph_batch, graph_warps, NO_SLOT};
    use crate::kv::{BlockAllocator, BlockTable};
    use crate::model::{BatchInput, SeqChunk};

    #[test]
    fn warps_follow_the_longest_context_in_four_sizes() {
        let warps: Vec<usize> = [1, 32, 33, 64, 65, 128, 129, 200, 256, 257, 4096]
            .iter()
            .map(|&c| graph_warps(c))
            .collect();
        assert_eq!(warps, [1, 1, 2, 2, 4, 4, 8, 8, 8, 8, 8]);
    }

    #[test]
    fn step_inputs_hold_each_row_and_pad_the_rest() {
        let block_size = 4;
        let mut pool = BlockAllocator::new(16, block_size).unwrap();
        // A spare block first, so the tables are not 0, 1, 2...
        let mut spare = BlockTable::new();
        pool.ensure_capacity(&mut spare, 1).unwrap();
        let mut a = BlockTable::new();
        let mut b = BlockTable::new();
        pool.ensure_capacity(&mut a, 6).unwrap(); // two blocks
        pool.ensure_capacity(&mut b, 1).unwrap();
        let (ta, tb) = ([7u32], [9u32]);
        let batch = BatchInput::new(vec![
            SeqChunk {
                tokens: &ta,
                start_pos: 5,
                block_table: &a,
                all_logits: false,
            },
            SeqChunk {
                tokens: &tb,
                start_pos: 0,
                block_table: &b,
                all_logits: false,
            },
        ]);
        let (max_batch, max_blocks, rows) = (8, 3, 4);
        let mut head = vec![u32::MAX - 1; 3 * max_batch];
        let mut tables = vec![42];
        fill_step_inputs(&batch, rows, block_size, max_blocks, &mut head, &mut tables);
        let (ids, positions, slots) = (&head[..8], &head[8..16], &head[16..]);
        assert_eq!(&ids[..rows], [7, 9, 0, 0]);
        assert_eq!(&positions[..rows], [5, 0, 0, 0]);
        let (a0, a1, b0) = (a.blocks()[0], a.blocks()[1], b.blocks()[0]);
        // Position 5 is the second slot of a's second block.
        assert_eq!(
            &slots[..rows],
            [
                a1 * block_size as u32 + 1,
                b0 * block_size as u32,
                NO_SLOT,
                NO_SLOT
            ]
        );
        assert_eq!(tables, [a0, a1, 0, b0, 0, 0]);
        // Rows past the graph's are left alone.
        assert_eq!(ids[rows], u32::MAX - 1);
    }

    #[test]
    fn batches_round_up_to_a_few_graph_sizes() {
        let sizes: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 64, 65, 256]
            .iter()
            .map(|&n| graph_batch(n))
            .collect();
        assert_eq!(sizes, [1, 2, 4, 4, 8, 8, 16, 16, 24, 64, 72, 256]);
        let distinct: std::collections::BTreeSet<usize> = (1..=256).map(graph_batch).collect();
        assert_eq!(distinct.len(), 35);
        assert!((1..=256).all(|n| graph_batch(n) >= n));
    }
}
