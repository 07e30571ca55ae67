//! Where the model comes from: a local directory, a Hugging Face repo id
//! (downloaded into the standard cache, so Python tools share it), or
//! `random:SHAPE` for random weights with the bundled tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hf_hub::{Cache, Repo, RepoType};

use crate::config::HubOptions;

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A directory with config.json, tokenizer.json (or SentencePiece's
    /// tokenizer.model) and safetensors weights; or a GGUF file, or a
    /// directory holding only one.
    Local(PathBuf),
    /// Random weights of a named shape; text goes through the bundled tokenizer.
    Random {
        shape: String,
        tokenizer_dir: PathBuf,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedModel {
    pub source: ModelSource,
    /// What clients call it unless `--served-model-name` says otherwise.
    pub name: String,
    /// Other names requests may use.
    pub aliases: Vec<String>,
}

/// The tiny model shipped in the repository, found from the current directory
/// or from this crate's source tree (so `cargo run` works from anywhere in it).
pub fn bundled_model_dir() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from("models/tiny-llama"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/tiny-llama"),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("config.json").is_file())
        .map(|p| p.canonicalize().unwrap_or(p))
}

fn looks_like_repo_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.starts_with('.')
        })
}

pub async fn resolve(
    spec: Option<&str>,
    revision: Option<&str>,
    hub: &HubOptions,
) -> anyhow::Result<ResolvedModel> {
    let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty()) else {
        let dir = bundled_model_dir().context(
            "no --model given and the bundled model (models/tiny-llama) was not found; pass --model DIR or a Hugging Face repo id",
        )?;
        return Ok(ResolvedModel {
            source: ModelSource::Local(dir),
            name: "tiny-llama".into(),
            aliases: Vec::new(),
        });
    };
    if let Some(shape) = spec.strip_prefix("random:") {
        let tokenizer_dir = bundled_model_dir()
            .context("random weights need the bundled tokenizer (models/tiny-llama)")?;
        return Ok(ResolvedModel {
            source: ModelSource::Random {
                shape: shape.to_string(),
                tokenizer_dir,
            },
            name: format!("random-{shape}"),
            aliases: vec![spec.to_string()],
        });
    }
    let path = Path::new(spec);
    let gguf = llama_model::gguf_path(path)?;
    if path.is_dir() || gguf.is_some() {
        if gguf.is_none() && !path.join("config.json").is_file() {
            bail!(
                "{} is a directory without a config.json or a .gguf file",
                path.display()
            );
        }
        // A GGUF file is named without its extension, as llama.cpp's server does.
        let name = path
            .canonicalize()
            .ok()
            .and_then(|p| {
                let name = if p.is_file() {
                    p.file_stem()
                } else {
                    p.file_name()
                };
                name.map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| spec.to_string());
        let aliases = if name == spec {
            Vec::new()
        } else {
            vec![spec.to_string()]
        };
        return Ok(ResolvedModel {
            source: ModelSource::Local(path.to_path_buf()),
            name,
            aliases,
        });
    }
    if let Some((id, file)) = gguf_on_hub(spec) {
        let path = fetch_file_from_hub(id, file, revision, hub).await?;
        let name = Path::new(file)
            .file_stem()
            .map_or_else(|| spec.to_string(), |s| s.to_string_lossy().into_owned());
        return Ok(ResolvedModel {
            source: ModelSource::Local(path),
            name,
            aliases: vec![spec.to_string()],
        });
    }
    if !looks_like_repo_id(spec) {
        let what = if path.exists() {
            "not a directory, not a .gguf file"
        } else {
            "no such file or directory"
        };
        bail!("--model {spec}: {what}; and not a Hugging Face repo id (owner/name), a GGUF file in one (owner/name/FILE.gguf) or random:SHAPE");
    }
    let dir = fetch_from_hub(spec, revision, hub).await?;
    Ok(ResolvedModel {
        source: ModelSource::Local(dir),
        name: spec.to_string(),
        aliases: Vec::new(),
    })
}

const CONFIG: &str = "config.json";
/// The first of these a repo has is the tokenizer: tokenizer.model is
/// converted on load for checkpoints that ship no tokenizer.json.
const TOKENIZERS: &[&str] = &["tokenizer.json", "tokenizer.model"];
const OPTIONAL: &[&str] = &[
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];
/// Weights as (index, single file), in the order they are looked for:
/// safetensors first, as transformers prefers it; PyTorch's .bin for
/// checkpoints published before safetensors.
const WEIGHTS: &[(&str, &str)] = &[
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
];

/// `owner/name/FILE.gguf` (the file may be in a folder of the repo): one
/// GGUF file of a Hub repo, as llama.cpp's quantizations are published.
fn gguf_on_hub(spec: &str) -> Option<(&str, &str)> {
    let (owner, rest) = spec.split_once('/')?;
    let (name, file) = rest.split_once('/')?;
    let id = &spec[..owner.len() + 1 + name.len()];
    let is_gguf = file.to_ascii_lowercase().ends_with(".gguf");
    (is_gguf && looks_like_repo_id(id) && !file.split('/').any(|p| p.is_empty() || p == ".."))
        .then_some((id, file))
}

fn cache_of(hub: &HubOptions) -> Cache {
    match &hub.cache_dir {
        Some(dir) => Cache::new(dir.clone()),
        None => Cache::default(),
    }
}

fn api_of(cache: Cache, hub: &HubOptions) -> anyhow::Result<hf_hub::api::tokio::Api> {
    let mut builder = hf_hub::api::tokio::ApiBuilder::from_cache(cache).with_progress(true);
    if let Some(token) = &hub.token {
        builder = builder.with_token(Some(token.clone()));
    }
    if let Some(endpoint) = &hub.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    builder.build().context("building the Hugging Face client")
}

/// One file of a Hub repo: downloaded, or with `HF_HUB_OFFLINE` found in the cache.
async fn fetch_file_from_hub(
    id: &str,
    file: &str,
    revision: Option<&str>,
    hub: &HubOptions,
) -> anyhow::Result<PathBuf> {
    let cache = cache_of(hub);
    if hub.offline {
        return cache.repo(repo(id, revision)).get(file).with_context(|| {
            format!(
                "HF_HUB_OFFLINE is set and {id}/{file} is not in the cache at {}",
                cache.path().display()
            )
        });
    }
    let api = api_of(cache, hub)?;
    tracing::info!(
        repo = id,
        file,
        "fetching a GGUF file from the Hugging Face Hub (a cached copy is reused)"
    );
    api.repo(repo(id, revision)).get(file).await.with_context(|| {
        format!("downloading {id}/{file} (gated models need HF_TOKEN with access granted on huggingface.co)")
    })
}

fn repo(id: &str, revision: Option<&str>) -> Repo {
    match revision {
        Some(rev) => Repo::with_revision(id.to_string(), RepoType::Model, rev.to_string()),
        None => Repo::model(id.to_string()),
    }
}

fn shard_names(index_path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(index_path)?;
    let index: serde_json::Value = serde_json::from_str(&text)?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{} has no weight_map", index_path.display()))?;
    let mut names: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// Downloads (or, offline, looks up) the files a Llama checkpoint needs and
/// returns the snapshot directory holding them.
async fn fetch_from_hub(
    id: &str,
    revision: Option<&str>,
    hub: &HubOptions,
) -> anyhow::Result<PathBuf> {
    let cache = cache_of(hub);
    if hub.offline {
        let cached = cache.repo(repo(id, revision));
        let get = |file: &str| cached.get(file);
        let missing = |file: &str| {
            anyhow::anyhow!(
                "HF_HUB_OFFLINE is set and {id}/{file} is not in the cache at {}",
                cache.path().display()
            )
        };
        let config = get(CONFIG).ok_or_else(|| missing(CONFIG))?;
        if !TOKENIZERS.iter().any(|file| get(file).is_some()) {
            return Err(missing(TOKENIZERS[0]));
        }
        let weights = WEIGHTS.iter().find_map(|(index, single)| match get(index) {
            Some(index) => Some(shard_names(&index)),
            None => get(single).map(|_| Ok(vec![single.to_string()])),
        });
        let weights = weights.ok_or_else(|| missing(WEIGHTS[0].1))??;
        for file in &weights {
            if get(file).is_none() {
                return Err(missing(file));
            }
        }
        return Ok(config.parent().map(Path::to_path_buf).unwrap_or_default());
    }

    let api = api_of(cache, hub)?;
    let remote = api.repo(repo(id, revision));
    tracing::info!(
        repo = id,
        "fetching model files from the Hugging Face Hub (cached files are reused)"
    );
    let config = remote.get(CONFIG).await.with_context(|| {
        format!("downloading {id}/{CONFIG} (gated models need HF_TOKEN with access granted on huggingface.co)")
    })?;
    let mut tokenizer_errors = Vec::new();
    for file in TOKENIZERS {
        match remote.get(file).await {
            Ok(_) => break,
            Err(err) => tokenizer_errors.push(format!("{file}: {err}")),
        }
    }
    if tokenizer_errors.len() == TOKENIZERS.len() {
        bail!("{id} has no tokenizer ({})", tokenizer_errors.join("; "));
    }
    for file in OPTIONAL {
        if let Err(err) = remote.get(file).await {
            tracing::debug!(file, %err, "optional file not fetched");
        }
    }
    let mut weight_errors = Vec::new();
    'formats: for (index, single) in WEIGHTS {
        let (files, from_index) = match remote.get(index).await {
            Ok(index) => (shard_names(&index)?, true),
            Err(err) => {
                weight_errors.push(format!("{index}: {err}"));
                (vec![single.to_string()], false)
            }
        };
        for file in &files {
            if let Err(err) = remote.get(file).await {
                // A shard an index names must download; a missing single
                // file only means the repo uses the next format.
                if !from_index {
                    weight_errors.push(format!("{file}: {err}"));
                    continue 'formats;
                }
                return Err(err).with_context(|| format!("downloading {id}/{file}"));
            }
        }
        return Ok(config.parent().map(Path::to_path_buf).unwrap_or_default());
    }
    bail!(
        "{id} has no safetensors or pytorch_model.bin weights ({})",
        weight_errors.join("; ")
    )
}

#[cfg(test)]
mod hub_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_the_bundled_model_and_random_shapes() {
        let hub = HubOptions::default();
        let bundled = resolve(None, None, &hub).await.unwrap();
        assert_eq!(bundled.name, "tiny-llama");
        assert!(
            matches!(bundled.source, ModelSource::Local(ref d) if d.join("tokenizer.json").is_file())
        );

        let random = resolve(Some("random:7b"), None, &hub).await.unwrap();
        assert_eq!(random.name, "random-7b");
        assert!(matches!(random.source, ModelSource::Random { ref shape, .. } if shape == "7b"));

        assert!(resolve(Some("not a model!"), None, &hub).await.is_err());
    }

    #[tokio::test]
    async fn offline_without_cache_is_a_clear_error() {
        let dir =
            std::env::temp_dir().join(format!("llama-serve-empty-cache-{}", std::process::id()));
        let hub = HubOptions {
            cache_dir: Some(dir),
            offline: true,
            ..Default::default()
        };
        let err = resolve(Some("meta-llama/Llama-2-7b-chat-hf"), None, &hub)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[tokio::test]
    async fn local_paths_that_are_no_model_say_why() {
        let hub = HubOptions::default();
        let missing = resolve(Some("/nonexistent/llama-2-7b.Q4_K_M.gguf"), None, &hub)
            .await
            .unwrap_err()
            .to_string();
        assert!(missing.contains("no such file or directory"), "{missing}");
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
        let not_a_model = resolve(Some(manifest), None, &hub)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            not_a_model.contains("not a directory, not a .gguf file"),
            "{not_a_model}"
        );
    }

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("meta-llama/Llama-2-7b-chat-hf"));
        assert!(!looks_like_repo_id("./x/y/z"));
        assert!(!looks_like_repo_id("single"));
        let hub_gguf = [
            (
                "TheBloke/Llama-2-7B-Chat-GGUF/llama-2-7b-chat.Q4_K_M.gguf",
                true,
            ),
            ("acme/repo/q4/model.GGUF", true),
            ("acme/repo", false),
            ("acme/repo/model.safetensors", false),
            ("acme/repo/../model.gguf", false),
            ("./x/y/z.gguf", false),
        ];
        for (spec, expected) in hub_gguf {
            assert_eq!(gguf_on_hub(spec).is_some(), expected, "{spec}");
        }
        assert_eq!(
            gguf_on_hub("acme/repo/q4/model.gguf"),
            Some(("acme/repo", "q4/model.gguf"))
        );
    }
}
