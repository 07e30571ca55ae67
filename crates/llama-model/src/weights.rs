//! The model's parameters: read-only after load, shared by every step.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::config::LlamaConfig;
use crate::error::Result;
use crate::linear::Linear;
use crate::loader::CheckpointWeights;

pub struct LayerWeights {
    pub input_norm: Tensor,
    /// q, k and v projections concatenated on the output axis: one matmul instead of three.
    pub qkv: Linear,
    pub o: Linear,
    pub post_norm: Tensor,
    /// gate and up projections concatenated on the output axis.
    pub gate_up: Linear,
    pub down: Linear,
}

pub struct LlamaWeights {
    pub embed: Tensor,
    pub layers: Vec<LayerWeights>,
    pub norm: Tensor,
    pub lm_head: Linear,
}

/// Where the tensors come from: a checkpoint, or seeded random numbers.
trait TensorSource {
    fn tensor(&mut self, name: &str, shape: &[usize], kind: Init) -> Result<Tensor>;
}

/// How a random tensor is initialised; ignored when loading a checkpoint.
#[derive(Clone, Copy)]
enum Init {
    /// Uniform with this standard deviation.
    Std(f64),
    /// RMSNorm gains: all ones.
    Ones,
}

struct Checkpoint<'a> {
    st: &'a CheckpointWeights,
    dtype: DType,
    device: &'a Device,
}

impl TensorSource for Checkpoint<'_> {
    fn tensor(&mut self, name: &str, shape: &[usize], _kind: Init) -> Result<Tensor> {
        self.st.load(name, shape, self.dtype, self.device)
    }
}

struct Random<'a> {
    seed: u64,
    counter: u64,
    dtype: DType,
    device: &'a Device,
}

/// splitmix64: a fast, well-mixed stream so that each element is independent
/// of how the work is split across threads.
fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl TensorSource for Random<'_> {
    fn tensor(&mut self, _name: &str, shape: &[usize], kind: Init) -> Result<Tensor> {
        self.counter += 1;
        let std = match kind {
            Init::Ones => return Ok(Tensor::ones(shape, self.dtype, self.device)?),
            Init::Std(s) => s,
        };
        // Uniform on [-a, a] has standard deviation a / sqrt(3).
        let a = std * 3f64.sqrt();
        let tensor = if self.device.is_cpu() {
            let n: usize = shape.iter().product();
            let stream = splitmix(self.seed ^ self.counter.wrapping_mul(0xA24B_AED4_963E_E407));
            let data: Vec<f32> = (0..n as u64)
                .into_par_iter()
                .map(|i| {
                    let u = (splitmix(stream.wrapping_add(i)) >> 40) as f64 / (1u64 << 24) as f64;
                    ((2.0 * u - 1.0) * a) as f32
                })
                .collect();
            Tensor::from_vec(data, shape, self.device)?
        } else {
            self.device.set_seed(self.seed.wrapping_add(self.counter))?;
            Tensor::rand(-a as f32, a as f32, shape, self.device)?
        };
        Ok(tensor.to_dtype(self.dtype)?)
    }
}

fn build(cfg: &LlamaConfig, src: &mut dyn TensorSource) -> Result<LlamaWeights> {
    let h = cfg.hidden_size;
    let q_out = cfg.num_attention_heads * cfg.head_dim;
    let kv_out = cfg.kv_width();
    let inter = cfg.intermediate_size;
    let in_std = 1.0 / (h as f64).sqrt();
    let embed = src.tensor(
        "model.embed_tokens.weight",
        &[cfg.vocab_size, h],
        Init::Std(1.0),
    )?;
    let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let q = src.tensor(
            &format!("{p}.self_attn.q_proj.weight"),
            &[q_out, h],
            Init::Std(in_std),
        )?;
        let k = src.tensor(
            &format!("{p}.self_attn.k_proj.weight"),
            &[kv_out, h],
            Init::Std(in_std),
        )?;
        let v = src.tensor(
            &format!("{p}.self_attn.v_proj.weight"),
            &[kv_out, h],
            Init::Std(in_std),
        )?;
        let o = src.tensor(
            &format!("{p}.self_attn.o_proj.weight"),
            &[h, q_out],
            Init::Std(1.0 / (q_out as f64).sqrt()),
        )?;
        let gate = src.tensor(
            &format!("{p}.mlp.gate_proj.weight"),
            &[inter, h],
            Init::Std(in_std),
        )?;
        let up = src.tensor(
            &format!("{p}.mlp.up_proj.weight"),
            &[inter, h],
            Init::Std(in_std),
        )?;
        let down = src.tensor(
            &format!("{p}.mlp.down_proj.weight"),
            &[h, inter],
            Init::Std(1.0 / (inter as f64).sqrt()),
        )?;
        let input_norm = src.tensor(&format!("{p}.input_layernorm.weight"), &[h], Init::Ones)?;
        let post_norm = src.tensor(
            &format!("{p}.post_attention_layernorm.weight"),
            &[h],
            Init::Ones,
        )?;
        layers.push(LayerWeights {
            input_norm,
            qkv: Linear::dense(Tensor::cat(&[&q, &k, &v], 0)?)?,
            o: Linear::dense(o)?,
            post_norm,
            gate_up: Linear::dense(Tensor::cat(&[&gate, &up], 0)?)?,
            down: Linear::dense(down)?,
        });
    }
    let norm = src.tensor("model.norm.weight", &[h], Init::Ones)?;
    // A tied checkpoint may still ship an lm_head copy; the config decides, as in transformers.
    let lm_head = if cfg.tie_word_embeddings {
        embed.clone()
    } else {
        src.tensor("lm_head.weight", &[cfg.vocab_size, h], Init::Std(in_std))?
    };
    Ok(LlamaWeights {
        embed,
        layers,
        norm,
        lm_head: Linear::dense(lm_head)?,
    })
}

impl LlamaWeights {
    pub fn from_safetensors(
        cfg: &LlamaConfig,
        st: &CheckpointWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        build(cfg, &mut Checkpoint { st, dtype, device })
    }

    /// Seeded random weights made on `device`, for benchmarks without a checkpoint.
    pub fn random(cfg: &LlamaConfig, seed: u64, dtype: DType, device: &Device) -> Result<Self> {
        let mut src = Random {
            seed,
            counter: 0,
            dtype,
            device,
        };
        build(cfg, &mut src)
    }
}
