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
    /// Steps served by replaying a graph.
    pub replayed: u64,
    /// Steps run without a graph: prompt steps, steps larger than the
    /// largest graph, each graph's warm-up and check, and every step once
    /// graphs are turned off.
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
    use super::graph_batch;

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
