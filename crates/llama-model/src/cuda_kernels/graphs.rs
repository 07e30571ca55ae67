//! The CUDA side of [`crate::decode_graphs`]: the persistent step buffers,
//! capture, replay and the one-time check of each graph.

use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUdeviceptr, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{
    result, CudaGraph, CudaStream, DevicePtr, DeviceRepr,
};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};

use super::StepMeta;
use crate::attention::{AttentionImpl, AttentionMeta};
use crate::decode_graphs::{fill_step_inputs, graph_batch, graph_warps, GraphStats, NO_SLOT};
use crate::error::{ModelError, Result};
use crate::kv::KvCache;
use crate::model::{BatchInput, LlamaModel, Logits};

/// Largest per-row ‖graph − plain‖/‖plain‖ a graph's check accepts. The two
/// run the same kernels, so they agree to rounding (cuBLAS may pick another
/// algorithm while capturing); a graph that read a stale input is off by
/// order 1 on at least one row.
const CHECK_TOLERANCE: f32 = 1e-2;

/// A recorded graph. `CudaGraph` holds raw driver handles and is not `Send`;
/// it is only ever used by the thread that owns the runner, one call at a
/// time, which is all CUDA asks of a graph (its calls must not be concurrent).
struct Recorded(CudaGraph);
unsafe impl Send for Recorded {}

enum Entry {
    /// Run once without a graph: kernels and cuBLAS handles are loaded for
    /// this shape, so capture sees no first-use work.
    WarmedUp,
    Recorded {
        graph: Recorded,
        checked: bool,
    },
}

pub struct Graphs {
    /// Rows of the largest graph: the buffers' section size.
    max_batch: usize,
    /// Block-table width: the model's longest context in blocks.
    max_blocks: usize,
    block_size: usize,
    /// The cache the graphs write into (its first k tensor's id).
    kv_id: candle_core::TensorId,
    /// u32 sections of `max_batch`: token ids, positions, cache slots, the
    /// row index 0..max_batch (each token's sequence row, and the decode
    /// kernel's token list), then the block tables `[max_batch, max_blocks]`.
    inputs: Tensor,
    /// `[max_batch, vocab]` f32: where a replay leaves its logits.
    out: Tensor,
    /// Host side of the first three sections, and of the block tables.
    head: Vec<u32>,
    tables: Vec<u32>,
    cuda: candle_core::CudaDevice,
    stream: std::sync::Arc<CudaStream>,
    graphs: HashMap<(usize, usize), Entry>,
    disabled: Option<String>,
    stats: GraphStats,
}

/// The device address of a contiguous tensor's first element.
fn device_ptr<T: CudaDType + DeviceRepr>(t: &Tensor, stream: &CudaStream) -> Result<CUdeviceptr> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        return Err(ModelError::Candle(candle_core::Error::Msg(
            "graph buffer is not on the CUDA device".into(),
        )));
    };
    let view = super::cuda_view::<T>(s, layout, "graph buffer")?;
    let (ptr, _sync) = view.device_ptr(stream);
    Ok(ptr)
}

fn driver(e: impl std::fmt::Display) -> ModelError {
    ModelError::Candle(candle_core::Error::Msg(format!("CUDA graph: {e}")))
}

impl Graphs {
    /// Records, and checks, the graph that steps of `n` decode tokens with
    /// contexts up to `max_ctx` will replay, before any such step comes, on
    /// made-up inputs that write nothing to the cache (every row is padding):
    /// so that no served step pays for the recording. Returns whether that
    /// graph is ready (false once graphs are off).
    pub fn prepare(
        &mut self,
        model: &LlamaModel,
        kv: &KvCache,
        n: usize,
        max_ctx: usize,
    ) -> Result<bool> {
        let rows = graph_batch(n.clamp(1, self.max_batch));
        let warps = graph_warps(max_ctx.max(1));
        let vocab = model.config().vocab_size as u32;
        let top = (warps * 32).min(model.config().max_position_embeddings);
        // Warm-up, record, check: each on other tokens and positions (within
        // the same warp count), so that the check sees an input the graph
        // was not recorded with.
        for round in 0..3u32 {
            if self.disabled.is_some() {
                return Ok(false);
            }
            if let Some(Entry::Recorded { checked: true, .. }) = self.graphs.get(&(rows, warps)) {
                return Ok(true);
            }
            let mb = self.max_batch;
            let pos = (top - 1).saturating_sub(round as usize % 2) as u32;
            for i in 0..rows {
                self.head[i] = (i as u32 * 7 + round * 13 + 1) % vocab;
                self.head[mb + i] = pos;
                self.head[2 * mb + i] = NO_SLOT;
            }
            self.tables.clear();
            self.copy_inputs()?;
            self.run(model, kv, (rows, rows, warps))?;
        }
        Ok(matches!(
            self.graphs.get(&(rows, warps)),
            Some(Entry::Recorded { checked: true, .. })
        ))
    }

    pub fn new(model: &LlamaModel, kv: &KvCache, max_batch: usize) -> Result<Option<Self>> {
        let Device::Cuda(cuda) = model.device() else {
            return Ok(None);
        };
        if model.attention() == AttentionImpl::Generic || max_batch == 0 {
            return Ok(None);
        }
        let stream = cuda.cuda_stream();
        if stream.context().is_managing_stream_synchronization() {
            // Event records on every buffer use would be captured as well.
            tracing::warn!(
                "CUDA graphs are off: LLAMA_CUDA_EVENT_TRACKING=1 keeps event tracking on"
            );
            return Ok(None);
        }
        let max_batch = graph_batch(max_batch);
        let block_size = kv.block_size();
        let max_blocks = model
            .config()
            .max_position_embeddings
            .div_ceil(block_size)
            .min(kv.num_blocks())
            .max(1);
        let mut init = vec![0u32; 4 * max_batch + max_batch * max_blocks];
        for (i, row) in init[3 * max_batch..4 * max_batch].iter_mut().enumerate() {
            *row = i as u32;
        }
        let len = init.len();
        let inputs = Tensor::from_vec(init, len, model.device())?;
        let vocab = model.config().vocab_size;
        let out = Tensor::zeros((max_batch, vocab), DType::F32, model.device())?;
        Ok(Some(Self {
            max_batch,
            max_blocks,
            block_size,
            kv_id: kv.layer(0).0.id(),
            inputs,
            out,
            head: vec![0; 3 * max_batch],
            tables: Vec::with_capacity(max_batch * max_blocks),
            cuda: cuda.clone(),
            stream,
            graphs: HashMap::new(),
            disabled: None,
            stats: GraphStats::default(),
        }))
    }

    pub fn stats(&self) -> GraphStats {
        GraphStats {
            disabled: self.disabled.is_some(),
            ..self.stats
        }
    }

    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn disabled_reason(&self) -> Option<&str> {
        self.disabled.as_deref()
    }

    pub fn forward(
        &mut self,
        model: &LlamaModel,
        batch: &BatchInput,
        kv: &KvCache,
    ) -> Result<Logits> {
        if kv.layer(0).0.id() != self.kv_id {
            return Err(ModelError::BadBatch(
                "decode graphs were made for another KV cache".into(),
            ));
        }
        let n = batch.seqs.len();
        let decode_only = batch
            .seqs
            .iter()
            .all(|s| s.tokens.len() == 1 && !s.all_logits);
        if self.disabled.is_some()
            || !decode_only
            || n == 0
            || n > self.max_batch
            || crate::profile::is_recording()
        {
            self.stats.eager += 1;
            return model.forward(batch, kv);
        }
        model.check(batch, kv)?;
        let rows = graph_batch(n);
        let max_ctx = batch
            .seqs
            .iter()
            .map(|s| s.start_pos + 1)
            .max()
            .unwrap_or(1);
        let warps = graph_warps(max_ctx);
        self.upload(batch, rows)?;
        let (values, replayed) = self.run(model, kv, (n, rows, warps))?;
        if replayed {
            self.stats.replayed += 1;
        } else {
            self.stats.eager += 1;
        }
        Ok(Logits {
            // Its own buffer: the next replay overwrites the graph's.
            values: fresh_copy(&values.narrow(0, 0, n)?)?,
            last_row: (0..n).collect(),
            all_rows: vec![None; n],
        })
    }

    /// Copies the step's inputs into the graph buffers; rows `n..rows` are
    /// padding (token 0 at position 0, not cached).
    fn upload(&mut self, batch: &BatchInput, rows: usize) -> Result<()> {
        fill_step_inputs(
            batch,
            rows,
            self.block_size,
            self.max_blocks,
            &mut self.head,
            &mut self.tables,
        );
        self.copy_inputs()
    }

    /// Ids, positions and slots of every row, and the tables of the rows
    /// in `self.tables`. Padding rows keep whatever tables they had: they
    /// attend to keys of valid blocks and their output is dropped.
    fn copy_inputs(&self) -> Result<()> {
        let base = device_ptr::<u32>(&self.inputs, &self.stream)?;
        let stream = self.stream.cu_stream();
        let tables_at = (4 * self.max_batch * std::mem::size_of::<u32>()) as u64;
        unsafe {
            result::memcpy_htod_async(base, &self.head, stream).map_err(driver)?;
            if !self.tables.is_empty() {
                result::memcpy_htod_async(base + tables_at, &self.tables, stream)
                    .map_err(driver)?;
            }
        }
        Ok(())
    }

    /// The step's device metadata, views of the graph buffers.
    fn meta(&self, model: &LlamaModel, rows: usize, warps: usize) -> Result<AttentionMeta> {
        let mb = self.max_batch;
        let section = |i: usize| self.inputs.narrow(0, i * mb, rows);
        let cfg = model.config();
        let step = StepMeta {
            positions: section(1)?,
            slots: section(2)?,
            tok_seq: section(3)?,
            block_tables: self.inputs.narrow(0, 4 * mb, rows * self.max_blocks)?,
            max_blocks: self.max_blocks,
            decode_tokens: Some(section(3)?),
            prefill_tokens: None,
            tiles: None,
            num_tiles: 0,
            tile_tokens: 1,
            mma_tiles: None,
            num_mma_tiles: 0,
            // The decode kernel launches one warp per 32 keys of this context.
            max_decode_ctx: warps * 32,
            max_prompt_ctx: 0,
        };
        Ok(AttentionMeta::new(
            Vec::new(),
            self.block_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            model.attention(),
        )
        .with_cuda_meta(step))
    }

    /// The forward over the uploaded inputs, without a graph: `[rows, vocab]`.
    fn run_plain(
        &self,
        model: &LlamaModel,
        kv: &KvCache,
        rows: usize,
        warps: usize,
    ) -> Result<Tensor> {
        // Candle uploads some kernels' shape parameters (index_select's) from
        // the host, which a capture cannot record: this keeps them on the
        // device, keyed by their values, so the warm-up run leaves them there
        // for the capture (a miss while capturing is an error, not a stale
        // value). Step data never goes through it: it is in `inputs`.
        let _cache = self.cuda.enable_cuda_graph_htod_cache();
        let meta = self.meta(model, rows, warps)?;
        let ids = self.inputs.narrow(0, 0, rows)?;
        let positions = self.inputs.narrow(0, self.max_batch, rows)?;
        model.run_layers(&ids, &positions, &meta, kv, None)
    }

    /// The step over the uploaded inputs, `[rows, vocab]`, and whether a
    /// graph replay gave it: warms up, records, checks or replays the graph
    /// of this shape, whichever comes next.
    fn run(
        &mut self,
        model: &LlamaModel,
        kv: &KvCache,
        (n, rows, warps): (usize, usize, usize),
    ) -> Result<(Tensor, bool)> {
        let key = (rows, warps);
        match self.graphs.remove(&key) {
            None => {
                let values = self.run_plain(model, kv, rows, warps)?;
                self.graphs.insert(key, Entry::WarmedUp);
                Ok((values, false))
            }
            Some(Entry::WarmedUp) => match self.capture(model, kv, rows, warps) {
                Ok(graph) => {
                    graph.0.launch().map_err(driver)?;
                    self.stats.captured += 1;
                    tracing::debug!(rows, warps, "CUDA graph recorded");
                    let checked = false;
                    self.graphs.insert(key, Entry::Recorded { graph, checked });
                    Ok((self.out.narrow(0, 0, rows)?, true))
                }
                Err(e) => {
                    self.disable(format!("recording a graph of {rows} rows failed: {e}"));
                    Ok((self.run_plain(model, kv, rows, warps)?, false))
                }
            },
            Some(Entry::Recorded {
                graph,
                checked: true,
            }) => {
                graph.0.launch().map_err(driver)?;
                let checked = true;
                self.graphs.insert(key, Entry::Recorded { graph, checked });
                Ok((self.out.narrow(0, 0, rows)?, true))
            }
            Some(Entry::Recorded {
                graph,
                checked: false,
            }) => {
                // The first replay after recording has other inputs than the
                // recording had: compare it with the plain forward on them
                // (which writes the same keys and values again).
                graph.0.launch().map_err(driver)?;
                let replayed = self.out.narrow(0, 0, n)?;
                let plain = self.run_plain(model, kv, rows, warps)?;
                let worst = worst_row_error(&replayed, &plain.narrow(0, 0, n)?)?;
                if worst.is_nan() || worst > CHECK_TOLERANCE {
                    self.disable(format!(
                        "the graph of {rows} rows, {warps} attention warps disagrees with the plain forward (worst row error {worst:.3e}, limit {CHECK_TOLERANCE:.0e})"
                    ));
                } else {
                    let checked = true;
                    self.graphs.insert(key, Entry::Recorded { graph, checked });
                }
                Ok((plain, false))
            }
        }
    }

    /// Records the forward over the graph buffers. The stream always leaves
    /// capture mode, whatever failed inside.
    fn capture(
        &self,
        model: &LlamaModel,
        kv: &KvCache,
        rows: usize,
        warps: usize,
    ) -> Result<Recorded> {
        let ctx = self.stream.context();
        // Errors recorded earlier by buffer drops belong to no capture.
        ctx.check_err().map_err(driver)?;
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(driver)?;
        let body = (|| -> Result<()> {
            let values = self.run_plain(model, kv, rows, warps)?;
            let src = device_ptr::<f32>(&values, &self.stream)?;
            let dst = device_ptr::<f32>(&self.out, &self.stream)?;
            let bytes = values.elem_count() * std::mem::size_of::<f32>();
            unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
                .map_err(driver)?;
            // Every buffer made while recording is freed while recording too,
            // so a replay owns no memory once it ends.
            Ok(())
        })();
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        // Frees into an invalidated capture leave an error behind; it is
        // reported through `body` or `ended`, not by the next unrelated call.
        let dropped = ctx.check_err();
        body?;
        let graph = ended
            .map_err(driver)?
            .ok_or_else(|| driver("the capture recorded nothing"))?;
        dropped.map_err(driver)?;
        Ok(Recorded(graph))
    }

    fn disable(&mut self, why: String) {
        tracing::warn!("CUDA graphs turned off, decode steps run without them: {why}");
        self.graphs.clear();
        self.disabled = Some(why);
    }
}

/// A copy of a contiguous tensor in a buffer of its own size (Candle's
/// `Tensor::copy` clones the whole storage a view is part of).
fn fresh_copy(t: &Tensor) -> Result<Tensor> {
    Ok(t.apply_op1_no_bwd(&FreshCopy)?)
}

struct FreshCopy;

impl FreshCopy {
    fn run<T>(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)>
    where
        T: CudaDType + DeviceRepr,
    {
        let view = super::cuda_view::<T>(s, l, "logits")?;
        let mut out = unsafe { s.device.alloc::<T>(l.shape().elem_count())? };
        s.device.memcpy_dtod(&view, &mut out)?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, s.device.clone()),
            l.shape().clone(),
        ))
    }
}

impl CustomOp1 for FreshCopy {
    fn name(&self) -> &'static str {
        "llama-fresh-copy"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
        candle_core::bail!("llama-fresh-copy runs on CUDA only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        match s.dtype() {
            DType::F32 => self.run::<f32>(s, l),
            other => candle_core::bail!("llama-fresh-copy: unsupported dtype {other:?}"),
        }
    }
}

/// The largest ‖a_r − b_r‖ / ‖b_r‖ over rows, in f32.
fn worst_row_error(a: &Tensor, b: &Tensor) -> Result<f32> {
    let diff = (a - b)?.sqr()?.sum_keepdim(1)?;
    let norm = b.sqr()?.sum_keepdim(1)?;
    let ratio = (diff / norm)?.sqrt()?.flatten_all()?.max(0)?;
    Ok(ratio.to_scalar::<f32>()?)
}
