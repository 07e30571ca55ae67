//! From a [`ServerConfig`] to a running engine and the [`AppState`] over it:
//! resolve the model, open the device, load weights, tokenizer and chat
//! template, start the engine thread.

use std::sync::Arc;

use anyhow::Context;
use llama_engine::{
    parse_draws_on_device, parse_on_off, parse_overlap, start_engine, EngineConfig,
};
use llama_model::attention::AttentionImpl;
use llama_model::{
    resolve_shape, DTypeSpec, DeviceSpec, KvBudget, KvCacheSpec, LlamaModel, ModelOptions,
};

use crate::config::ServerConfig;
use crate::generation_defaults::GenerationDefaults;
use crate::llama_codec::LlamaCodec;
use crate::model_source::{self, ModelSource};
use crate::state::{AppState, ServedModel};

/// Seed of `random:SHAPE` weights: fixed, so two replicas answer alike.
const RANDOM_WEIGHTS_SEED: u64 = 0;

/// The engine's settings: the user's where given, else defaults for the device.
/// A GPU gets vLLM's: the KV pool takes what 90% of the device leaves after
/// the weights, and steps carry up to 2048 tokens (a GPU is underused by the
/// CPU's 512-token chunks).
pub fn engine_config(config: &ServerConfig, device: DeviceSpec) -> anyhow::Result<EngineConfig> {
    let mut engine = EngineConfig::default();
    if device != DeviceSpec::Cpu {
        engine.kv_cache.budget = KvBudget::DeviceFraction(0.9);
        engine.max_num_batched_tokens = 2048;
    }
    let settings = &config.engine;
    if let Some(budget) = &settings.kv_cache_memory {
        let budget: KvBudget = budget
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--kv-cache-memory: {e}"))?;
        engine.kv_cache = KvCacheSpec {
            budget,
            ..engine.kv_cache
        };
    }
    if let Some(name) = &settings.kv_cache_dtype {
        engine.kv_cache.dtype =
            KvCacheSpec::parse_dtype(name).map_err(|e| anyhow::anyhow!("--kv-cache-dtype: {e}"))?;
    }
    if let Some(name) = &settings.sampling {
        engine.draws_on_device =
            parse_draws_on_device(name).map_err(|e| anyhow::anyhow!("--sampling: {e}"))?;
    }
    if let Some(name) = &settings.overlap {
        engine.overlap = parse_overlap(name).map_err(|e| anyhow::anyhow!("--overlap: {e}"))?;
    }
    if let Some(name) = &settings.cuda_graphs {
        engine.cuda_graphs = on_or_off("cuda-graphs", name)?;
    }
    if let Some(name) = &settings.prefix_caching {
        engine.prefix_caching = on_or_off("prefix-caching", name)?;
    }
    if let Some(v) = settings.max_num_seqs {
        engine.max_num_seqs = v;
    }
    if let Some(v) = settings.max_num_batched_tokens {
        engine.max_num_batched_tokens = v;
    }
    if let Some(v) = settings.max_queue {
        engine.max_queue = v;
    }
    Ok(engine)
}

fn on_or_off(flag: &str, name: &str) -> anyhow::Result<bool> {
    parse_on_off(name).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

/// The model's kernels: the fused ones unless the user asks otherwise.
pub fn kernels(config: &ServerConfig) -> anyhow::Result<AttentionImpl> {
    match &config.model.kernels {
        None => Ok(AttentionImpl::Auto),
        Some(name) => name
            .trim()
            .parse()
            .map_err(|e: String| anyhow::anyhow!("--{e}")),
    }
}

/// Loads everything and starts the engine; the returned state serves requests.
pub async fn load(config: &ServerConfig) -> anyhow::Result<AppState> {
    let resolved = model_source::resolve(
        config.model.model.as_deref(),
        config.model.revision.as_deref(),
        &config.model.hub,
    )
    .await?;
    let device_spec: DeviceSpec = config.model.device.parse()?;
    let dtype = match &config.model.dtype {
        Some(d) => d.parse::<DTypeSpec>()?,
        None if device_spec == DeviceSpec::Cpu => DTypeSpec::F32,
        // Llama 2 was trained in bf16; f32 would double GPU memory for nothing.
        None => DTypeSpec::BF16,
    };
    let engine_config = engine_config(config, device_spec)?;
    let attention = kernels(config)?;
    let mut options = config.app.clone();
    options.limits.max_n = engine_config.max_n;
    options.limits.max_logprobs = engine_config.max_logprobs;

    let source = resolved.source.clone();
    let (handle, codec, defaults) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let device = device_spec.open()?;
        let model_options = ModelOptions {
            dtype: dtype.dtype(),
            attention,
            ..ModelOptions::default()
        };
        let started = std::time::Instant::now();
        let (model, text_dir, defaults) = match &source {
            ModelSource::Local(dir) => (
                LlamaModel::load(dir, &device, model_options)
                    .with_context(|| format!("loading {}", dir.display()))?,
                dir.clone(),
                GenerationDefaults::from_model_dir(dir)?,
            ),
            ModelSource::Random {
                shape,
                tokenizer_dir,
            } => (
                LlamaModel::random(
                    resolve_shape(shape)?,
                    RANDOM_WEIGHTS_SEED,
                    &device,
                    model_options,
                )?,
                tokenizer_dir.clone(),
                GenerationDefaults::default(),
            ),
        };
        let codec = LlamaCodec::from_model_dir(&text_dir)?;
        tracing::info!(
            device = %device_spec,
            dtype = %dtype,
            context = model.config().max_position_embeddings,
            seconds = started.elapsed().as_secs_f32(),
            "model loaded"
        );
        let handle = start_engine(model, codec.tokenizer().clone(), engine_config)?;
        Ok((handle, codec, defaults))
    })
    .await??;

    options.generation_defaults = defaults;
    let mut served = ServedModel::new(
        config
            .model
            .served_model_name
            .clone()
            .unwrap_or(resolved.name.clone()),
    );
    if config.model.served_model_name.is_some() {
        served.aliases.push(resolved.name);
    }
    served.aliases.extend(resolved.aliases);
    Ok(AppState::new(
        Arc::new(handle),
        Arc::new(codec),
        served,
        options,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine config of the default server config with `set` applied to
    /// its engine settings.
    fn engine_with(
        set: impl FnOnce(&mut crate::config::EngineSettings),
    ) -> anyhow::Result<EngineConfig> {
        let mut config = ServerConfig::default();
        set(&mut config.engine);
        engine_config(&config, DeviceSpec::Cpu)
    }

    fn with_kv_dtype(name: &str) -> anyhow::Result<EngineConfig> {
        engine_with(|e| e.kv_cache_dtype = Some(name.into()))
    }

    #[test]
    fn kv_cache_dtype_is_parsed_and_checked() {
        assert_eq!(with_kv_dtype("auto").unwrap().kv_cache.dtype, None);
        assert_eq!(
            with_kv_dtype("f16").unwrap().kv_cache.dtype,
            Some(llama_model::DType::F16)
        );
        assert_eq!(
            with_kv_dtype("bfloat16").unwrap().kv_cache.dtype,
            Some(llama_model::DType::BF16)
        );
        let err = with_kv_dtype("int8").unwrap_err().to_string();
        assert!(err.contains("--kv-cache-dtype"), "{err}");
        // Unset: the cache takes the model's dtype.
        let default = engine_with(|_| {}).unwrap();
        assert_eq!(default.kv_cache.dtype, None);
    }

    #[test]
    fn sampling_place_is_parsed_and_checked() {
        let with = |name: &str| engine_with(|e| e.sampling = Some(name.into()));
        assert_eq!(with("auto").unwrap().draws_on_device, None);
        assert_eq!(with("device").unwrap().draws_on_device, Some(true));
        assert_eq!(with("host").unwrap().draws_on_device, Some(false));
        let err = with("gpu").unwrap_err().to_string();
        assert!(err.contains("--sampling"), "{err}");
        let default = engine_with(|_| {}).unwrap();
        assert_eq!(default.draws_on_device, None);
    }

    #[test]
    fn overlap_is_parsed_and_checked() {
        let with = |name: &str| engine_with(|e| e.overlap = Some(name.into()));
        assert_eq!(with("auto").unwrap().overlap, None);
        assert_eq!(with("on").unwrap().overlap, Some(true));
        assert_eq!(with(" off ").unwrap().overlap, Some(false));
        let err = with("yes").unwrap_err().to_string();
        assert!(err.starts_with("--overlap: auto, on or off"), "{err}");
        let default = engine_with(|_| {}).unwrap();
        assert_eq!(default.overlap, None);
    }

    #[test]
    fn cuda_graphs_are_off_unless_asked_for() {
        let with = |name: &str| engine_with(|e| e.cuda_graphs = Some(name.into()));
        assert!(with("on").unwrap().cuda_graphs);
        assert!(!with("off").unwrap().cuda_graphs);
        let err = with("yes").unwrap_err().to_string();
        assert!(err.starts_with("--cuda-graphs"), "{err}");
        let default = engine_with(|_| {}).unwrap();
        assert!(!default.cuda_graphs);
    }

    #[test]
    fn prefix_caching_is_on_unless_turned_off() {
        let with = |name: &str| engine_with(|e| e.prefix_caching = Some(name.into()));
        assert!(with("on").unwrap().prefix_caching);
        assert!(!with(" off").unwrap().prefix_caching);
        let err = with("true").unwrap_err().to_string();
        assert!(err.starts_with("--prefix-caching: on or off"), "{err}");
        assert!(engine_with(|_| {}).unwrap().prefix_caching);
    }

    #[test]
    fn kernels_are_parsed_and_checked() {
        let with = |name: &str| {
            let mut config = ServerConfig::default();
            config.model.kernels = Some(name.into());
            kernels(&config)
        };
        assert_eq!(with("auto").unwrap(), AttentionImpl::Auto);
        assert_eq!(with("generic").unwrap(), AttentionImpl::Generic);
        assert_eq!(with("cuda-cores").unwrap(), AttentionImpl::CudaCorePrefill);
        let err = with("flash").unwrap_err().to_string();
        assert!(err.starts_with("--kernels"), "{err}");
        assert_eq!(
            kernels(&ServerConfig::default()).unwrap(),
            AttentionImpl::Auto
        );
    }
}
