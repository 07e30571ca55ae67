//! `x · Wᵀ` on the CPU in f32, with the weight packed once at load.
//!
//! A general GEMM (candle's `gemm`) repacks the weight on every call, and with
//! the few activation rows of a decode step that packing costs more than the
//! product. The weights never change, so they are packed here once, into
//! panels of [`NR`] output features laid out k-major: each step of the
//! micro-kernel reads 16 consecutive floats. The activations are packed per
//! call (they are small) into tiles of [`MR`] rows, also k-major.
//!
//! The micro-kernel keeps an `MR × NR` = 6 × 16 block of outputs in twelve AVX
//! registers: per `k` it loads two weight vectors and broadcasts six
//! activations, twelve FMAs for eight loads, so it is bound by the FMA units,
//! not by loads. The same kernel serves decode (up to 24 rows: the weight
//! streams from DRAM in memory order, once per step) and prefill (hundreds of
//! rows, compute-bound: a panel's k-block stays in L1 across the row tiles).

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Output features per panel: two 8-float registers.
pub const NR: usize = 16;
/// Activation rows per micro-tile: 12 accumulators + 2 weight vectors + 1
/// broadcast fill 15 of the 16 AVX registers.
pub const MR: usize = 6;
/// k per block: a panel's block is 16 KiB and stays in L1 while the row
/// tiles pass over it.
const KC: usize = 256;
/// Row tiles whose k-block (24 × 256 floats = 144 KiB) shares L2 while the
/// panels pass: prefill of hundreds of rows would otherwise spill L2.
const TILES_PER_GROUP: usize = 24;
/// k per block when streaming: short blocks that every row tile uses at once,
/// so that the weight is consumed at an even rate (each line read by all
/// tiles within a few hundred cycles) rather than in bursts; the price is
/// reloading the outputs once per block.
const KC_STREAM: usize = 64;
/// Up to this many row tiles (24 rows) the weight is streamed in memory
/// order; above, the loops are blocked for cache reuse.
const STREAMING_TILES: usize = 4;
/// Panels per parallel task: small tasks, so that the pool balances the
/// threads to within a few microseconds at every join (a 768-wide projection
/// has 24). Four per task measured 12% slower through the engine at 16
/// sequences: a thread left idle at the end of each of the step's ~80
/// parallel regions adds up.
const PANELS_PER_TASK: usize = 2;

/// A `[n, k]` weight (Hugging Face's `[out_features, in_features]`) packed as
/// `ceil(n / NR)` panels of `[k][NR]`, the last one zero-padded.
#[derive(Debug)]
pub struct PackedWeight {
    data: Vec<f32>,
    n: usize,
    k: usize,
}

impl PackedWeight {
    /// Packs a contiguous CPU f32 `[n, k]` tensor.
    pub fn pack(weight: &Tensor) -> candle_core::Result<Self> {
        let (n, k) = weight.dims2()?;
        let rows = weight.flatten_all()?.to_vec1::<f32>()?;
        Ok(Self::from_rows(&rows, n, k))
    }

    fn from_rows(w: &[f32], n: usize, k: usize) -> Self {
        let panels = n.div_ceil(NR);
        let mut data = crate::hugepages::zeroed_f32(panels * k * NR);
        if k > 0 {
            data.par_chunks_mut(k * NR)
                .enumerate()
                .for_each(|(p, panel)| {
                    for j in 0..NR.min(n - p * NR) {
                        let row = &w[(p * NR + j) * k..(p * NR + j + 1) * k];
                        for (kk, &v) in row.iter().enumerate() {
                            panel[kk * NR + j] = v;
                        }
                    }
                });
        }
        PackedWeight { data, n, k }
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    pub fn in_features(&self) -> usize {
        self.k
    }

    /// `x: [m, k]` row-major → `[m, n]` row-major.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "activation is not [m, k]");
        if m == 0 || n == 0 || k == 0 {
            return vec![0f32; m * n];
        }
        // Every output is stored by the first k-block before any is read
        // (see `Tile::accumulate`), so the buffer need not be zeroed first.
        let mut out = Vec::with_capacity(m * n);
        // SAFETY: f32 has no invalid bit patterns, and the tasks below write
        // every element before anything reads it.
        #[allow(clippy::uninit_vec)]
        unsafe {
            out.set_len(m * n)
        };
        let a = pack_rows(x, m, k);
        let out_ptr = OutPtr(out.as_mut_ptr());
        let panels = n.div_ceil(NR);
        let tasks = panels.div_ceil(PANELS_PER_TASK);
        (0..tasks).into_par_iter().for_each(|t| {
            let first = t * PANELS_PER_TASK;
            let last = (first + PANELS_PER_TASK).min(panels);
            // SAFETY: each task writes only the columns of its own panels.
            unsafe { run_task(&a, &self.data, m, n, k, first..last, &out_ptr) };
        });
        out
    }
}

/// The output buffer, shared by tasks that write disjoint column ranges.
struct OutPtr(*mut f32);
unsafe impl Sync for OutPtr {}

/// The row tiles of `m` rows: `(first row, rows)` of each of `ceil(m / MR)`
/// tiles, the rows spread evenly. A short last tile (16 rows as 6 + 6 + 4, 32
/// as five 6s and a 2) would run its few accumulator chains at the FMA
/// latency rather than the FMA throughput; 6 + 5 + 5 keeps every tile busy.
fn row_tiles(m: usize) -> impl Iterator<Item = (usize, usize)> {
    let tiles = m.div_ceil(MR);
    let (base, extra) = (m / tiles.max(1), m % tiles.max(1));
    (0..tiles).map(move |t| (t * base + t.min(extra), base + usize::from(t < extra)))
}

/// `[m, k]` → `ceil(m / MR)` tiles of `[k][MR]` (see [`row_tiles`]), each
/// zero-padded to `MR` rows.
fn pack_rows(x: &[f32], m: usize, k: usize) -> Vec<f32> {
    let tiles: Vec<(usize, usize)> = row_tiles(m).collect();
    let mut a = vec![0f32; tiles.len() * k * MR];
    let pack_tile = |(t, tile): (usize, &mut [f32])| {
        let (first, rows) = tiles[t];
        for i in 0..rows {
            let row = &x[(first + i) * k..(first + i + 1) * k];
            for (kk, &v) in row.iter().enumerate() {
                tile[kk * MR + i] = v;
            }
        }
    };
    // Packing is a copy of the (small) activations: threads only pay off for prefill.
    if m * k >= 1 << 16 {
        a.par_chunks_mut(k * MR).enumerate().for_each(pack_tile);
    } else {
        a.chunks_mut(k * MR).enumerate().for_each(pack_tile);
    }
    a
}

/// # Safety
/// `out` must point at an `[m, n]` buffer that no other task writes in the
/// columns of `panels`.
unsafe fn run_task(
    a: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    panels: std::ops::Range<usize>,
    out: &OutPtr,
) {
    let kernel = micro_kernel();
    let row_tiles: Vec<(usize, usize)> = row_tiles(m).collect();
    let tiles = row_tiles.len();
    // One k-block of one panel against row tiles `ts`.
    let block = |p: usize, k0: usize, kc: usize, ts: std::ops::Range<usize>| {
        let w_blk = &w[p * k * NR + k0 * NR..p * k * NR + (k0 + kc) * NR];
        for t in ts {
            let a_blk = &a[t * k * MR + k0 * MR..t * k * MR + (k0 + kc) * MR];
            let (first, rows) = row_tiles[t];
            let tile = Tile {
                c: out.0.add(first * n + p * NR),
                ldc: n,
                rows,
                cols: NR.min(n - p * NR),
                accumulate: k0 > 0,
            };
            kernel(a_blk, w_blk, kc, &tile);
        }
    };
    if tiles <= STREAMING_TILES {
        // Decode: few rows, and the step is a stream of weights from DRAM.
        // Panel by panel, k-block by k-block, the weight is read in memory
        // order, so the kernel's prefetch (one block ahead) asks for exactly
        // what comes next and the stream never waits on a cold line.
        for p in panels {
            for k0 in (0..k).step_by(KC_STREAM) {
                block(p, k0, KC_STREAM.min(k - k0), 0..tiles);
            }
        }
        return;
    }
    // Prefill: many rows, compute-bound. Each panel's k-block stays in L1
    // while every row tile of a group (whose k-block stays in L2) passes.
    for k0 in (0..k).step_by(KC) {
        for group in (0..tiles).step_by(TILES_PER_GROUP) {
            for p in panels.clone() {
                block(
                    p,
                    k0,
                    KC.min(k - k0),
                    group..(group + TILES_PER_GROUP).min(tiles),
                );
            }
        }
    }
}

/// Where one micro-kernel call's `rows × cols` outputs go.
struct Tile {
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    /// Add to the outputs (a later k-block) instead of overwriting them.
    accumulate: bool,
}

impl Tile {
    /// Writes a full `MR × NR` register block, keeping only the valid part.
    ///
    /// # Safety
    /// `c` must be valid for `rows` rows of `ldc` and `cols` columns.
    #[inline(always)]
    unsafe fn store(&self, block: &[[f32; NR]; MR]) {
        for (i, row) in block.iter().enumerate().take(self.rows) {
            let dst = std::slice::from_raw_parts_mut(self.c.add(i * self.ldc), self.cols);
            if self.accumulate {
                for (d, v) in dst.iter_mut().zip(row) {
                    *d += v;
                }
            } else {
                dst.copy_from_slice(&row[..self.cols]);
            }
        }
    }
}

type Kernel = unsafe fn(&[f32], &[f32], usize, &Tile);

fn micro_kernel() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::cpu_kernels::has_avx2_fma() {
            return avx2::kernel;
        }
    }
    portable_kernel
}

/// Any CPU: the same blocking, left to the compiler's vectoriser.
unsafe fn portable_kernel(a: &[f32], w: &[f32], kc: usize, tile: &Tile) {
    let mut acc = [[0f32; NR]; MR];
    for kk in 0..kc {
        let wv: &[f32; NR] = w[kk * NR..(kk + 1) * NR].try_into().unwrap();
        for i in 0..MR {
            let av = a[kk * MR + i];
            for j in 0..NR {
                acc[i][j] += av * wv[j];
            }
        }
    }
    tile.store(&acc);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Tile, MR, NR};

    /// Cache lines (= k steps) of weight fetched ahead of use.
    const PREFETCH_AHEAD: usize = 256;
    /// k steps per loop iteration: fewer loop instructions between the FMAs.
    const UNROLL: usize = 4;

    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` holds `kc × MR` and `w` `kc × NR` floats.
    pub unsafe fn kernel(a: &[f32], w: &[f32], kc: usize, tile: &Tile) {
        // Fewer rows, fewer FMAs: a decode step of one sequence does a sixth of
        // the work of a full tile instead of the same.
        match tile.rows {
            1 => rows::<1>(a, w, kc, tile),
            2 => rows::<2>(a, w, kc, tile),
            3 => rows::<3>(a, w, kc, tile),
            4 => rows::<4>(a, w, kc, tile),
            5 => rows::<5>(a, w, kc, tile),
            _ => rows::<MR>(a, w, kc, tile),
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const R: usize>(a: &[f32], w: &[f32], kc: usize, tile: &Tile) {
        debug_assert!(a.len() >= kc * MR && w.len() >= kc * NR);
        let (a, w) = (a.as_ptr(), w.as_ptr());
        let mut lo = [_mm256_setzero_ps(); R];
        let mut hi = [_mm256_setzero_ps(); R];
        // One step of k: two weight vectors, R broadcasts, 2R FMAs.
        let step = |kk: usize, lo: &mut [__m256; R], hi: &mut [__m256; R]| {
            let w0 = _mm256_loadu_ps(w.add(kk * NR));
            let w1 = _mm256_loadu_ps(w.add(kk * NR + 8));
            for i in 0..R {
                let av = _mm256_broadcast_ss(&*a.add(kk * MR + i));
                lo[i] = _mm256_fmadd_ps(av, w0, lo[i]);
                hi[i] = _mm256_fmadd_ps(av, w1, hi[i]);
            }
        };
        let unrolled = kc / UNROLL * UNROLL;
        let mut kk = 0;
        while kk < unrolled {
            // Four k of a panel are four cache lines. The panel's next
            // k-block (contiguous after this one) is fetched while this one is
            // used: without it the first row tile waits on DRAM and computes
            // nothing, and the later tiles compute while DRAM idles.
            for u in 0..UNROLL {
                _mm_prefetch::<_MM_HINT_T0>(w.add((kk + u + PREFETCH_AHEAD) * NR) as *const i8);
                step(kk + u, &mut lo, &mut hi);
            }
            kk += UNROLL;
        }
        while kk < kc {
            step(kk, &mut lo, &mut hi);
            kk += 1;
        }
        if tile.cols == NR {
            for i in 0..R {
                let c = tile.c.add(i * tile.ldc);
                let (mut l, mut h) = (lo[i], hi[i]);
                if tile.accumulate {
                    l = _mm256_add_ps(l, _mm256_loadu_ps(c));
                    h = _mm256_add_ps(h, _mm256_loadu_ps(c.add(8)));
                }
                _mm256_storeu_ps(c, l);
                _mm256_storeu_ps(c.add(8), h);
            }
        } else {
            let mut block = [[0f32; NR]; MR];
            for i in 0..R {
                _mm256_storeu_ps(block[i].as_mut_ptr(), lo[i]);
                _mm256_storeu_ps(block[i].as_mut_ptr().add(8), hi[i]);
            }
            tile.store(&block);
        }
    }
}

/// The weight side of a CPU f32 projection, applied to a tensor.
#[derive(Debug, Clone)]
pub struct PackedLinear(pub Arc<PackedWeight>);

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "llama-packed-f32-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            bail!("packed matmul is f32 only")
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("packed matmul needs a contiguous input")
        };
        let (m, k) = l.shape().dims2()?;
        if k != self.0.k {
            bail!("packed matmul: input has {k} features, weight {}", self.0.k)
        }
        Ok((
            CpuStorage::F32(self.0.matmul(&x[start..end], m)),
            Shape::from((m, self.0.n)),
        ))
    }
}

impl PackedLinear {
    /// `x: [tokens, in]` (CPU f32) → `[tokens, out]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(self)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn max_rel_diff(m: usize, k: usize, n: usize) -> f32 {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
        let want = x.matmul(&w.t().unwrap()).unwrap();
        let got = PackedLinear(Arc::new(PackedWeight::pack(&w).unwrap()))
            .forward(&x)
            .unwrap();
        assert_eq!(got.dims(), &[m, n]);
        let diff: f32 = (&want - got)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        diff / scale.max(1e-6)
    }

    #[test]
    fn matches_gemm_on_every_edge() {
        // Rows around the tile (6), columns around the panel (16), k around
        // the block (256) and odd sizes everywhere.
        for (m, k, n) in [
            (1, 64, 10),
            (3, 67, 9),
            (5, 1, 17),
            (6, 256, 16),
            (7, 257, 33),
            (8, 768, 2304),
            (13, 513, 100),
            (64, 130, 65),
            (130, 300, 50),
        ] {
            let rel = max_rel_diff(m, k, n);
            assert!(rel < 1e-5, "m={m} k={k} n={n}: relative error {rel}");
        }
    }

    #[test]
    fn portable_kernel_matches_the_simd_one() {
        let (m, k, n) = (7, 300, 37);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32) - 6.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32) - 5.0).collect();
        let packed = PackedWeight::from_rows(&w, n, k);
        let want = packed.matmul(&x, m);
        let a = pack_rows(&x, m, k);
        let mut got = vec![0f32; m * n];
        let out = OutPtr(got.as_mut_ptr());
        let mut k0 = 0;
        while k0 < k {
            let kc = KC.min(k - k0);
            for (t, (first, rows)) in row_tiles(m).enumerate() {
                for p in 0..n.div_ceil(NR) {
                    let tile = Tile {
                        c: unsafe { out.0.add(first * n + p * NR) },
                        ldc: n,
                        rows,
                        cols: NR.min(n - p * NR),
                        accumulate: k0 > 0,
                    };
                    unsafe {
                        portable_kernel(
                            &a[t * k * MR + k0 * MR..],
                            &packed.data[p * k * NR + k0 * NR..],
                            kc,
                            &tile,
                        )
                    };
                }
            }
            k0 += kc;
        }
        // Integer-valued inputs: both orders of summation are exact.
        assert_eq!(got, want);
    }

    #[test]
    fn row_tiles_cover_every_row_once_in_even_tiles() {
        for m in 1..100 {
            let tiles: Vec<_> = row_tiles(m).collect();
            assert_eq!(tiles.len(), m.div_ceil(MR), "m={m}");
            let mut next = 0;
            for &(first, rows) in &tiles {
                assert_eq!(first, next, "m={m}");
                assert!((1..=MR).contains(&rows), "m={m}: {tiles:?}");
                next += rows;
            }
            assert_eq!(next, m);
            let (min, max) = tiles
                .iter()
                .fold((MR, 0), |(a, b), t| (a.min(t.1), b.max(t.1)));
            assert!(max - min <= 1, "m={m}: {tiles:?}");
        }
    }

    #[test]
    fn empty_inputs_give_empty_or_zero_outputs() {
        let packed = PackedWeight::from_rows(&[], 0, 4);
        assert!(packed.matmul(&[1.0; 8], 2).is_empty());
        let packed = PackedWeight::from_rows(&[1.0; 12], 3, 4);
        assert!(packed.matmul(&[], 0).is_empty());
        let packed = PackedWeight::from_rows(&[], 3, 0);
        assert_eq!(packed.matmul(&[], 2), vec![0.0; 6]);
    }
}
