//! Paged attention: the per-step metadata, the decode kernel over the
//! step's decode tokens and the query-tiled prefill kernel.

use super::{cuda_view, dims_i32, suffix, Held, MODULE, PTX};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use half::{bf16, f16};

/// Most warps per decode-attention block; must match MAX_ATTN_WARPS in attention.cuh.
pub const MAX_ATTN_WARPS: usize = 8;
/// What a kernel may take in shared memory without opting in to more.
const SMEM_LIMIT: usize = 48 * 1024;
const MAX_HEAD_DIM: usize = 256;
const MAX_GROUP: usize = 8;

/// The per-step metadata the kernels read, packed in one u32 buffer uploaded
/// once per step: positions, cache slots, each token's sequence row, the
/// block tables padded to the longest, and how attention splits the tokens:
/// decode tokens (one new token in their sequence), prompt tokens, and the
/// prompt tokens' query tiles for the tiled prefill kernel.
pub struct StepMeta {
    pub positions: Tensor,
    pub slots: Tensor,
    pub tok_seq: Tensor,
    pub block_tables: Tensor,
    pub max_blocks: usize,
    pub decode_tokens: Option<Tensor>,
    pub prefill_tokens: Option<Tensor>,
    /// `[num_tiles, 2]`: first token, token count.
    pub tiles: Option<Tensor>,
    pub num_tiles: usize,
    pub tile_tokens: usize,
    /// The same prompt tokens in tiles of [`MMA_TILE_TOKENS`], for the
    /// tensor-core prefill kernel.
    pub mma_tiles: Option<Tensor>,
    pub num_mma_tiles: usize,
    /// The longest context of a decode token, and of a prompt token.
    pub max_decode_ctx: usize,
    pub max_prompt_ctx: usize,
}

/// Query tokens per block of the tensor-core prefill kernel; must match
/// MMA_TILE_TOKENS in prefill_mma.cuh.
const MMA_TILE_TOKENS: usize = 64;
/// Threads per block of that kernel (MMA_WARPS warps).
const MMA_THREADS: u32 = 128;

/// `[first, count]` pairs covering `q_start..q_start + q_len` in tiles of `tile`.
fn push_tiles(tiles: &mut Vec<u32>, q_start: usize, q_len: usize, tile: usize) {
    let mut first = q_start;
    while first < q_start + q_len {
        let count = tile.min(q_start + q_len - first);
        tiles.extend([first as u32, count as u32]);
        first += count;
    }
}

/// One sequence of the step, as the kernels' metadata needs it.
pub struct StepSeq<'a> {
    pub q_start: usize,
    pub q_len: usize,
    pub blocks: &'a [u32],
}

/// Warps per prefill block: tile tokens × query heads per kv head (the
/// kernel's launch bound is 512 threads).
const PREFILL_WARPS: usize = 16;

/// Prompt tokens per prefill tile for this grouping, or `None` when the
/// group is too large for one block (those prompts use the decode kernel).
pub fn prefill_tile_tokens(group: usize) -> Option<usize> {
    (group <= PREFILL_WARPS).then(|| (PREFILL_WARPS / group).max(1))
}

impl StepMeta {
    pub fn new(
        positions: &[u32],
        slots: &[u32],
        tok_seq: &[u32],
        seqs: &[StepSeq],
        group: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let n = positions.len();
        let max_blocks = seqs
            .iter()
            .map(|s| s.blocks.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let tile_tokens = prefill_tile_tokens(group).unwrap_or(1);
        let mut decode = Vec::new();
        let mut prefill = Vec::new();
        let mut tiles = Vec::new();
        let mut mma_tiles = Vec::new();
        let (mut max_decode_ctx, mut max_prompt_ctx) = (0, 0);
        for s in seqs {
            let ctx = positions[s.q_start + s.q_len - 1] as usize + 1;
            let range = s.q_start as u32..(s.q_start + s.q_len) as u32;
            if s.q_len == 1 {
                decode.extend(range);
                max_decode_ctx = max_decode_ctx.max(ctx);
                continue;
            }
            max_prompt_ctx = max_prompt_ctx.max(ctx);
            prefill.extend(range);
            push_tiles(&mut tiles, s.q_start, s.q_len, tile_tokens);
            push_tiles(&mut mma_tiles, s.q_start, s.q_len, MMA_TILE_TOKENS);
        }
        let mut packed = Vec::with_capacity(
            3 * n
                + seqs.len() * max_blocks
                + decode.len()
                + prefill.len()
                + tiles.len()
                + mma_tiles.len(),
        );
        packed.extend_from_slice(positions);
        packed.extend_from_slice(slots);
        packed.extend_from_slice(tok_seq);
        for s in seqs {
            packed.extend_from_slice(s.blocks);
            packed.extend(std::iter::repeat_n(0, max_blocks - s.blocks.len()));
        }
        let (d0, p0) = (packed.len(), packed.len() + decode.len());
        let t0 = p0 + prefill.len();
        let m0 = t0 + tiles.len();
        let (nd, np, nt, nm) = (decode.len(), prefill.len(), tiles.len(), mma_tiles.len());
        packed.extend(decode);
        packed.extend(prefill);
        packed.extend(tiles);
        packed.extend(mma_tiles);
        let len = packed.len();
        let all = Tensor::from_vec(packed, len, device)?;
        let part = |start: usize, len: usize| -> Result<Option<Tensor>> {
            (len > 0).then(|| all.narrow(0, start, len)).transpose()
        };
        Ok(Self {
            positions: all.narrow(0, 0, n)?,
            slots: all.narrow(0, n, n)?,
            tok_seq: all.narrow(0, 2 * n, n)?,
            block_tables: all.narrow(0, 3 * n, seqs.len() * max_blocks)?,
            max_blocks,
            decode_tokens: part(d0, nd)?,
            prefill_tokens: part(p0, np)?,
            tiles: part(t0, nt)?,
            num_tiles: nt / 2,
            tile_tokens,
            mma_tiles: part(m0, nm)?,
            num_mma_tiles: nm / 2,
            max_decode_ctx,
            max_prompt_ctx,
        })
    }
}

/// Paged attention of every token of the step in one launch.
struct PagedAttention<'a> {
    meta: &'a StepMeta,
    k_cache: &'a Tensor,
    v_cache: &'a Tensor,
    kv_heads: usize,
    block_size: usize,
    scale: f32,
    tensor_cores: bool,
}

impl PagedAttention<'_> {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        q: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev: &CudaDevice = &q.device;
        let &[n, h, d] = l.dims() else {
            bail!("paged attention: q must be [tokens, heads, head_dim]")
        };
        let kvh = self.kv_heads;
        let group = h / kvh;
        if d > MAX_HEAD_DIM || group > MAX_GROUP || h % kvh != 0 {
            bail!("paged attention kernel: head_dim {d} (max {MAX_HEAD_DIM}), {h} heads over {kvh} kv heads (ratio max {MAX_GROUP})");
        }
        let pos = Held::new(&self.meta.positions, "positions");
        let seq = Held::new(&self.meta.tok_seq, "token sequences");
        let tables = Held::new(&self.meta.block_tables, "block tables");
        let (kc, vc) = (
            Held::new(self.k_cache, "k cache"),
            Held::new(self.v_cache, "v cache"),
        );
        let q_v = cuda_view::<T>(q, l, "q")?;
        let (pos_v, seq_v, tables_v) = (
            pos.view::<u32>()?,
            seq.view::<u32>()?,
            tables.view::<u32>()?,
        );
        let (kc_v, vc_v) = (kc.view::<T>()?, vc.view::<T>()?);
        let out = unsafe { dev.alloc::<T>(n * h * d)? };
        let ints = dims_i32(&[h, kvh, d, self.block_size, self.meta.max_blocks]);
        let elem = std::mem::size_of::<T>();
        let warps = self.meta.tile_tokens * group;
        let pad = if d % (16 / elem) == 0 {
            16 / elem
        } else {
            4 / elem
        };
        let prefill_smem = 4 * (warps * d + warps * 32 + 32) + 2 * 32 * (d + pad) * elem;
        // Prompt tokens go to the tensor-core kernel where it is built for this
        // dtype and head size (its fragment loads need an even start), else to
        // the tiled kernel where it fits, else to the per-token kernel.
        let mma = self.tensor_cores
            && matches!(q.dtype(), DType::F16 | DType::BF16)
            && matches!(d, 64 | 128)
            && l.start_offset().is_multiple_of(2);
        let tiled = !mma && prefill_tile_tokens(group).is_some() && prefill_smem <= SMEM_LIMIT;
        // Decode: one warp per 32 keys of the longest context, up to as many
        // as shared memory allows: a warp past every context would sit idle
        // and hold a block slot that another token could use (short contexts
        // are latency-bound). The kernel's static arrays are sized for
        // MAX_ATTN_WARPS.
        let bound = group.next_power_of_two();
        let static_smem = 4 * MAX_ATTN_WARPS * 32 * (1 + bound);
        let decode_smem = |w: usize| 4 * (group * d + w * group * (d + 2));
        let smem_warps = [MAX_ATTN_WARPS, 4, 2, 1]
            .into_iter()
            .find(|&w| static_smem + decode_smem(w) <= SMEM_LIMIT)
            .unwrap_or(1);
        let warps_for = |ctx: usize| ctx.div_ceil(32).clamp(1, smem_warps);

        // Decode tokens, plus the prompt tokens when no prefill kernel takes them.
        let mut per_token: Vec<(&Tensor, usize)> = self
            .meta
            .decode_tokens
            .iter()
            .map(|t| (t, warps_for(self.meta.max_decode_ctx)))
            .collect();
        if !tiled && !mma {
            per_token.extend(
                self.meta
                    .prefill_tokens
                    .iter()
                    .map(|t| (t, warps_for(self.meta.max_prompt_ctx))),
            );
        }
        // The kernels take the same arguments (the tensor-core one has the head
        // size built in); only the token or tile list and the launch shape differ.
        let launch = |name: String, list: &Tensor, cfg: LaunchConfig, ints: &[i32]| -> Result<()> {
            let held = Held::new(list, "token list");
            let list_v = held.view::<u32>()?;
            let func = dev.get_or_load_custom_func(&name, MODULE, PTX)?;
            let mut b = func.builder();
            b.arg(&q_v).arg(&kc_v).arg(&vc_v);
            b.arg(&pos_v)
                .arg(&seq_v)
                .arg(&tables_v)
                .arg(&list_v)
                .arg(&out);
            for i in ints {
                b.arg(i);
            }
            b.arg(&self.scale);
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        };
        let dtype = suffix(q.dtype())?;
        // The decode kernel built for the smallest group bound and dims-per-lane
        // that fit (see attention.cuh).
        let dims_per_lane = d.div_ceil(32).next_power_of_two().max(2);
        for (list, warps) in per_token {
            let cfg = LaunchConfig {
                grid_dim: (list.dims()[0] as u32, kvh as u32, 1),
                block_dim: ((warps * 32) as u32, 1, 1),
                shared_mem_bytes: decode_smem(warps) as u32,
            };
            launch(
                format!("paged_attention_g{bound}_d{dims_per_lane}_{dtype}"),
                list,
                cfg,
                &ints,
            )?;
        }
        if let (true, Some(tiles)) = (tiled, &self.meta.tiles) {
            let cfg = LaunchConfig {
                grid_dim: (self.meta.num_tiles as u32, kvh as u32, 1),
                block_dim: ((warps * 32) as u32, 1, 1),
                shared_mem_bytes: prefill_smem as u32,
            };
            launch(format!("prefill_attention_{dtype}"), tiles, cfg, &ints)?;
        }
        if let (true, Some(tiles)) = (mma, &self.meta.mma_tiles) {
            let cfg = LaunchConfig {
                grid_dim: (self.meta.num_mma_tiles as u32, h as u32, 1),
                block_dim: (MMA_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let without_d = [ints[0], ints[1], ints[3], ints[4]];
            launch(
                format!("prefill_attention_mma_d{d}_{dtype}"),
                tiles,
                cfg,
                &without_d,
            )?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, h, d)),
        ))
    }
}
cuda_op1!(PagedAttention, "llama-paged-attention");

pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    meta: &StepMeta,
    block_size: usize,
    scale: f32,
    tensor_cores: bool,
) -> Result<Tensor> {
    let kv_heads = k_cache.dims()[2];
    q.contiguous()?.apply_op1_no_bwd(&PagedAttention {
        meta,
        k_cache,
        v_cache,
        kv_heads,
        block_size,
        scale,
        tensor_cores,
    })
}
