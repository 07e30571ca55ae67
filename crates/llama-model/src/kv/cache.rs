use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};

use super::{BlockAllocator, KvError};
use crate::config::LlamaConfig;
use crate::error::Result;

/// How much memory the KV pool may take.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvBudget {
    Bytes(u64),
    Tokens(usize),
    /// A fraction of the device's memory for the whole process, as vLLM's
    /// `--gpu-memory-utilization`: the pool gets that share of the total less
    /// what is already in use (weights, other processes) and an activation reserve.
    DeviceFraction(f64),
}

impl fmt::Display for KvBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvBudget::Bytes(b) => write!(f, "{b} bytes"),
            KvBudget::Tokens(t) => write!(f, "{t} tokens"),
            KvBudget::DeviceFraction(x) => write!(f, "{}% of device memory", x * 100.0),
        }
    }
}

/// `2097152`, `2MiB`, `512KiB`, `1MB`, `4G`: a byte count with an optional unit.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim().to_ascii_lowercase().replace([' ', '_'], "");
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 4GiB or 512MiB"))?;
    let scale: f64 = match unit {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}`")),
    };
    Ok((value * scale) as u64)
}

impl FromStr for KvBudget {
    type Err = String;

    /// A byte size (see [`parse_byte_size`]), a token count (`8192tokens` /
    /// `8192tok`) or a share of device memory (`90%`).
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase().replace([' ', '_'], "");
        if let Some(num) = t.strip_suffix('%') {
            let pct: f64 = num
                .parse()
                .map_err(|_| format!("`{s}` is not a percentage like 90%"))?;
            if !(pct > 0.0 && pct <= 100.0) {
                return Err(format!("`{s}`: a share of device memory is in (0%, 100%]"));
            }
            return Ok(KvBudget::DeviceFraction(pct / 100.0));
        }
        if let Some(num) = t.strip_suffix("tokens").or_else(|| t.strip_suffix("tok")) {
            let tokens: usize = num
                .parse()
                .map_err(|_| format!("`{s}` is not a token count like 8192tokens"))?;
            return Ok(KvBudget::Tokens(tokens));
        }
        parse_byte_size(s)
            .map(KvBudget::Bytes)
            .map_err(|e| format!("{e} (or a token count like 8192tokens, or a share like 90%)"))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct KvCacheSpec {
    /// Tokens per block. 16 as in vLLM: small enough to waste little, large
    /// enough that block tables stay short.
    pub block_size: usize,
    pub budget: KvBudget,
    /// The cache's element type; `None` is the model's. A narrower type than
    /// the activations (f16 for an f32 model, as llama.cpp does by default)
    /// halves the cache's memory and the bytes each decode step reads, at a
    /// small loss of precision. CPU only.
    pub dtype: Option<DType>,
}

impl KvCacheSpec {
    /// The user-facing name of [`KvCacheSpec::dtype`]: `auto` (the model's),
    /// or a dtype name (`f32`, `f16`, `bf16`, ...).
    pub fn parse_dtype(name: &str) -> std::result::Result<Option<DType>, String> {
        match name.trim() {
            "auto" => Ok(None),
            other => other
                .parse::<crate::DTypeSpec>()
                .map(|d| Some(d.dtype()))
                .map_err(|e| format!("{e} (auto, f32, f16 or bf16)")),
        }
    }
}

impl Default for KvCacheSpec {
    fn default() -> Self {
        Self {
            block_size: 16,
            budget: KvBudget::Bytes(1 << 30),
            dtype: None,
        }
    }
}

/// Memory kept free beside the KV pool for a step's activations, cuBLAS
/// workspace and allocator slack: 1 GiB or 4% of the device, the larger.
fn activation_reserve(total: u64) -> u64 {
    (1u64 << 30).max(total / 25)
}

impl KvCacheSpec {
    /// The same spec with a `DeviceFraction` budget turned into bytes, given
    /// the device's `(free, total)` memory now (after the weights are loaded).
    pub fn resolve_budget(&self, memory: Option<(u64, u64)>) -> Result<KvCacheSpec, String> {
        let KvBudget::DeviceFraction(fraction) = self.budget else {
            return Ok(*self);
        };
        let Some((free, total)) = memory else {
            return Err(format!(
                "a KV budget of {} needs the device's memory size, which cannot be read here; give bytes or tokens",
                self.budget
            ));
        };
        let allowed = (total as f64 * fraction) as u64;
        let in_use = total.saturating_sub(free);
        let bytes = allowed
            .saturating_sub(in_use)
            .saturating_sub(activation_reserve(total));
        if bytes == 0 {
            return Err(format!(
                "a KV budget of {}: {allowed} bytes allowed, {in_use} already in use and {} kept for activations leave nothing for the cache",
                self.budget,
                activation_reserve(total)
            ));
        }
        Ok(KvCacheSpec {
            budget: KvBudget::Bytes(bytes),
            ..*self
        })
    }

    /// The element type of a cache for a model of `model_dtype` on `device`.
    pub fn cache_dtype(&self, model_dtype: DType, device: &Device) -> Result<DType, KvError> {
        let Some(dtype) = self.dtype else {
            return Ok(model_dtype);
        };
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(KvError::Dtype(format!(
                "a KV cache of {dtype:?}: f32, f16 or bf16 only"
            )));
        }
        // The CUDA kernels read the cache as the activations' type.
        if dtype != model_dtype && !device.is_cpu() {
            return Err(KvError::Dtype(format!(
                "a {dtype:?} KV cache for a {model_dtype:?} model runs on the CPU only; on this device the cache takes the model's dtype"
            )));
        }
        Ok(dtype)
    }

    pub fn num_blocks(&self, cfg: &LlamaConfig, dtype: DType) -> Result<usize, KvError> {
        if self.block_size == 0 {
            return Err(KvError::ZeroBlockSize);
        }
        let bytes_per_block = cfg.kv_bytes_per_token(dtype.size_in_bytes()) * self.block_size;
        let blocks = match self.budget {
            KvBudget::Bytes(b) => (b / bytes_per_block as u64) as usize,
            KvBudget::Tokens(t) => t / self.block_size,
            // Resolved against the device by `resolve_budget` before this point.
            KvBudget::DeviceFraction(_) => 0,
        };
        if blocks == 0 {
            return Err(KvError::BudgetTooSmall {
                budget: self.budget.to_string(),
                block_size: self.block_size,
                bytes_per_block,
            });
        }
        Ok(blocks)
    }
}

/// The KV tensors of every layer, `[num_blocks, block_size, kv_heads, head_dim]`,
/// allocated once. The model writes into them in place; which block belongs to
/// which sequence is the [`BlockAllocator`]'s business, not the cache's.
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    num_blocks: usize,
    block_size: usize,
    bytes_per_token: usize,
}

impl KvCache {
    pub fn new(
        cfg: &LlamaConfig,
        spec: &KvCacheSpec,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let spec = &spec
            .resolve_budget(crate::device::memory_info(device))
            .map_err(KvError::Budget)?;
        let dtype = spec.cache_dtype(dtype, device)?;
        let num_blocks = spec.num_blocks(cfg, dtype)?;
        let shape = (
            num_blocks,
            spec.block_size,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    crate::hugepages::zeros(shape, dtype, device)?,
                    crate::hugepages::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size: spec.block_size,
            bytes_per_token: cfg.kv_bytes_per_token(dtype.size_in_bytes()),
        })
    }

    pub fn layer(&self, index: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[index];
        (k, v)
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    pub fn bytes_per_token(&self) -> usize {
        self.bytes_per_token
    }

    pub fn total_bytes(&self) -> usize {
        self.bytes_per_token * self.num_slots()
    }

    /// Copies whole blocks `(src, dst)` in every layer: forked sequences
    /// (n > 1 choices) start from their parent's prompt without recomputing it.
    pub fn copy_blocks(&self, pairs: &[(u32, u32)]) -> Result<()> {
        if pairs.is_empty() {
            return Ok(());
        }
        for (k, v) in &self.layers {
            for cache in [k, v] {
                if cache.device().is_cpu() {
                    cache.inplace_op1(&CopyBlocks { pairs })?;
                } else {
                    for &(src, dst) in pairs {
                        let block = cache.narrow(0, src as usize, 1)?.copy()?;
                        cache.slice_set(&block, 0, dst as usize)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A fresh allocator over this cache's blocks.
    pub fn allocator(&self) -> BlockAllocator {
        BlockAllocator::new(self.num_blocks, self.block_size)
            .expect("block size checked at creation")
    }
}

/// In-place block copy within one cache tensor (CPU).
struct CopyBlocks<'a> {
    pairs: &'a [(u32, u32)],
}

impl CopyBlocks<'_> {
    fn run<T: Copy>(
        &self,
        data: &mut [T],
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("kv cache must be contiguous")
        };
        let data = &mut data[start..end];
        let block_len = layout.dims()[1..].iter().product::<usize>();
        for &(src, dst) in self.pairs {
            let (s, d) = (src as usize * block_len, dst as usize * block_len);
            if s.max(d) + block_len > data.len() {
                candle_core::bail!("block copy {src} -> {dst} outside the cache");
            }
            data.copy_within(s..s + block_len, d);
        }
        Ok(())
    }
}

impl candle_core::InplaceOp1 for CopyBlocks<'_> {
    fn name(&self) -> &'static str {
        "llama-copy-blocks"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as S;
        match storage {
            S::F32(d) => self.run(d, layout),
            S::F16(d) => self.run(d, layout),
            S::BF16(d) => self.run(d, layout),
            _ => candle_core::bail!("kv cache dtype must be f32, f16 or bf16"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_budgets() {
        assert_eq!(
            "4GiB".parse::<KvBudget>().unwrap(),
            KvBudget::Bytes(4 << 30)
        );
        assert_eq!(
            "512 MiB".parse::<KvBudget>().unwrap(),
            KvBudget::Bytes(512 << 20)
        );
        assert_eq!(
            "2G".parse::<KvBudget>().unwrap(),
            KvBudget::Bytes(2_000_000_000)
        );
        assert_eq!(
            "8192tokens".parse::<KvBudget>().unwrap(),
            KvBudget::Tokens(8192)
        );
        assert_eq!("1000".parse::<KvBudget>().unwrap(), KvBudget::Bytes(1000));
        assert_eq!(
            "90%".parse::<KvBudget>().unwrap(),
            KvBudget::DeviceFraction(0.9)
        );
        assert!("0%".parse::<KvBudget>().is_err());
        assert!("150%".parse::<KvBudget>().is_err());
        assert!("lots".parse::<KvBudget>().is_err());
        assert!("3 parsecs".parse::<KvBudget>().is_err());
    }

    #[test]
    fn sizes_the_pool_from_the_budget() {
        let cfg = crate::shapes::ModelShape::Tiny.config();
        // 2 layers * 2 kv heads * 16 dims * 2 (k and v) * 4 bytes = 512 bytes per token.
        assert_eq!(cfg.kv_bytes_per_token(4), 512);
        let spec = KvCacheSpec {
            block_size: 16,
            budget: KvBudget::Bytes(512 * 16 * 10 + 100),
            dtype: None,
        };
        let cache = KvCache::new(&cfg, &spec, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(cache.num_blocks(), 10);
        assert_eq!(cache.total_bytes(), 512 * 160);
        let spec = KvCacheSpec {
            block_size: 16,
            budget: KvBudget::Tokens(100),
            dtype: None,
        };
        assert_eq!(spec.num_blocks(&cfg, DType::F32).unwrap(), 6);
        let spec = KvCacheSpec {
            block_size: 16,
            budget: KvBudget::Bytes(10),
            dtype: None,
        };
        assert!(matches!(
            spec.num_blocks(&cfg, DType::F32),
            Err(KvError::BudgetTooSmall { .. })
        ));
    }

    #[test]
    fn a_device_share_leaves_room_for_what_is_in_use_and_activations() {
        const GIB: u64 = 1 << 30;
        let spec = KvCacheSpec {
            block_size: 16,
            budget: KvBudget::DeviceFraction(0.9),
            dtype: None,
        };
        // 80 GiB device, 14 GiB in use (weights): 72 - 14 - 3.2 (4% reserve) GiB for the pool.
        let resolved = spec.resolve_budget(Some((66 * GIB, 80 * GIB))).unwrap();
        let expected = (80.0 * GIB as f64 * 0.9) as u64 - 14 * GIB - 80 * GIB / 25;
        assert_eq!(resolved.budget, KvBudget::Bytes(expected));
        // Already past the share: a clear error, not a zero-block pool.
        let err = spec.resolve_budget(Some((4 * GIB, 80 * GIB))).unwrap_err();
        assert!(err.contains("leave nothing"), "{err}");
        assert!(spec.resolve_budget(None).is_err());
        // Bytes and tokens pass through untouched.
        let bytes = KvCacheSpec::default();
        assert_eq!(bytes.resolve_budget(None).unwrap().budget, bytes.budget);
        // On the CPU the share is of the machine's memory.
        let cfg = crate::shapes::ModelShape::Tiny.config();
        let spec = KvCacheSpec {
            block_size: 16,
            budget: KvBudget::DeviceFraction(0.99),
            dtype: None,
        };
        if let Some((free, total)) = crate::device::memory_info(&Device::Cpu) {
            if free > total / 2 {
                let resolved = spec.resolve_budget(Some((free, total))).unwrap();
                assert!(matches!(resolved.budget, KvBudget::Bytes(b) if b > 0 && b < total));
                // Only the arithmetic is checked: allocating a real pool that size is not the point.
                assert!(resolved.num_blocks(&cfg, DType::F32).unwrap() > 0);
            }
        }
    }

    #[test]
    fn copies_blocks_in_every_layer() {
        let cfg = crate::shapes::ModelShape::Tiny.config();
        let spec = KvCacheSpec {
            block_size: 4,
            budget: KvBudget::Tokens(16),
            dtype: None,
        };
        let cache = KvCache::new(&cfg, &spec, DType::F32, &Device::Cpu).unwrap();
        let (k, _) = cache.layer(1);
        let ones = Tensor::ones((1, 4, 2, 16), DType::F32, &Device::Cpu).unwrap();
        k.slice_set(&ones, 0, 1).unwrap();
        cache.copy_blocks(&[(1, 3)]).unwrap();
        let sums: Vec<f32> = cache.layer(1).0.sum((1, 2, 3)).unwrap().to_vec1().unwrap();
        assert_eq!(sums, vec![0.0, 128.0, 0.0, 128.0]);
    }
}
