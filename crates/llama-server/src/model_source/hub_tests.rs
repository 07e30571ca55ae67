//! Downloads through the real hf-hub client from a stand-in for the Hub's
//! `resolve` endpoint (HF_ENDPOINT), so the file choices are tested without
//! a network: which tokenizer, which weight format, which shards.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// (repo id, file name) → bytes.
type Files = Arc<HashMap<(String, String), Vec<u8>>>;

/// Answers `GET /{owner}/{name}/resolve/{revision}/{file}` as the Hub does
/// for what hf-hub reads: a byte range, its `content-range`, an etag naming
/// the blob and the commit.
async fn resolve_file(
    State(files): State<Files>,
    UrlPath((owner, name, _revision, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(bytes) = files.get(&(format!("{owner}/{name}"), file)) else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
    let (start, end) = range.unwrap_or((0, bytes.len().saturating_sub(1)));
    let end = end.min(bytes.len().saturating_sub(1));
    // FNV-1a: any content hash will do for the blob's name.
    let etag = bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    });
    (
        StatusCode::PARTIAL_CONTENT,
        [
            (
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{}", bytes.len()),
            ),
            (header::ETAG, format!("\"{etag:016x}\"")),
            (
                header::HeaderName::from_static("x-repo-commit"),
                COMMIT.to_string(),
            ),
        ],
        bytes[start..=end].to_vec(),
    )
        .into_response()
}

struct FakeHub {
    options: HubOptions,
    _cache: tempfile::TempDir,
}

/// A repo's files: (name, bytes).
type RepoFiles<'a> = &'a [(&'a str, &'a [u8])];

async fn fake_hub(repos: &[(&str, RepoFiles<'_>)]) -> FakeHub {
    let mut files = HashMap::new();
    for (repo, entries) in repos {
        for (file, bytes) in *entries {
            files.insert((repo.to_string(), file.to_string()), bytes.to_vec());
        }
    }
    let app = axum::Router::new()
        .route(
            "/{owner}/{name}/resolve/{revision}/{file}",
            axum::routing::get(resolve_file),
        )
        .with_state(Arc::new(files));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let cache = tempfile::tempdir().unwrap();
    FakeHub {
        options: HubOptions {
            cache_dir: Some(cache.path().to_path_buf()),
            endpoint: Some(format!("http://{addr}")),
            ..Default::default()
        },
        _cache: cache,
    }
}

fn index(shards: &[&str]) -> Vec<u8> {
    let map: serde_json::Map<String, serde_json::Value> = shards
        .iter()
        .enumerate()
        .map(|(i, shard)| (format!("tensor.{i}"), (*shard).into()))
        .collect();
    serde_json::json!({"metadata": {}, "weight_map": map})
        .to_string()
        .into_bytes()
}

async fn resolved_dir(id: &str, hub: &HubOptions) -> PathBuf {
    match resolve(Some(id), None, hub).await.unwrap().source {
        ModelSource::Local(dir) => dir,
        other => panic!("{other:?}"),
    }
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[tokio::test]
async fn sharded_safetensors_with_tokenizer_json() {
    let index = index(&[
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]);
    let hub = fake_hub(&[(
        "acme/sharded",
        &[
            ("config.json", b"{}"),
            ("tokenizer.json", b"tok-json"),
            ("tokenizer.model", b"never fetched"),
            ("generation_config.json", b"{\"temperature\": 0.6}"),
            ("model.safetensors.index.json", &index),
            ("model-00001-of-00002.safetensors", b"shard one"),
            ("model-00002-of-00002.safetensors", b"shard two"),
            ("pytorch_model.bin", b"never fetched either"),
        ],
    )])
    .await;
    let dir = resolved_dir("acme/sharded", &hub.options).await;
    assert_eq!(read(&dir, "tokenizer.json"), b"tok-json");
    assert_eq!(read(&dir, "model-00002-of-00002.safetensors"), b"shard two");
    assert_eq!(
        read(&dir, "generation_config.json"),
        b"{\"temperature\": 0.6}"
    );
    // The first tokenizer and the first weight format found are the only ones fetched.
    assert!(!dir.join("tokenizer.model").exists());
    assert!(!dir.join("pytorch_model.bin").exists());
}

/// Older checkpoints: SentencePiece's tokenizer.model and PyTorch weights,
/// single or sharded; afterwards HF_HUB_OFFLINE finds them in the cache.
#[tokio::test]
async fn sentencepiece_and_pytorch_checkpoints() {
    let bin_index = index(&[
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ]);
    let mut hub = fake_hub(&[
        (
            "acme/old-single",
            &[
                ("config.json", b"{}"),
                ("tokenizer.model", b"spm"),
                ("pytorch_model.bin", b"torch zip"),
            ],
        ),
        (
            "acme/old-sharded",
            &[
                ("config.json", b"{}"),
                ("tokenizer.model", b"spm"),
                ("pytorch_model.bin.index.json", &bin_index),
                ("pytorch_model-00001-of-00002.bin", b"one"),
                ("pytorch_model-00002-of-00002.bin", b"two"),
            ],
        ),
    ])
    .await;
    let single = resolved_dir("acme/old-single", &hub.options).await;
    assert_eq!(read(&single, "tokenizer.model"), b"spm");
    assert_eq!(read(&single, "pytorch_model.bin"), b"torch zip");
    assert!(!single.join("tokenizer.json").exists());
    let sharded = resolved_dir("acme/old-sharded", &hub.options).await;
    assert_eq!(read(&sharded, "pytorch_model-00001-of-00002.bin"), b"one");
    assert_eq!(read(&sharded, "pytorch_model-00002-of-00002.bin"), b"two");

    hub.options.offline = true;
    hub.options.endpoint = Some("http://127.0.0.1:9".into());
    assert_eq!(resolved_dir("acme/old-single", &hub.options).await, single);
    assert_eq!(
        resolved_dir("acme/old-sharded", &hub.options).await,
        sharded
    );
}

#[tokio::test]
async fn missing_pieces_are_named() {
    let index = index(&[
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]);
    let hub = fake_hub(&[
        (
            "acme/no-weights",
            &[("config.json", b"{}"), ("tokenizer.json", b"t")],
        ),
        (
            "acme/no-tokenizer",
            &[("config.json", b"{}"), ("model.safetensors", b"w")],
        ),
        (
            "acme/lost-shard",
            &[
                ("config.json", b"{}"),
                ("tokenizer.json", b"t"),
                ("model.safetensors.index.json", &index),
                ("model-00001-of-00002.safetensors", b"one"),
            ],
        ),
    ])
    .await;
    let err = |id: &'static str| {
        let hub = hub.options.clone();
        async move { format!("{:#}", resolve(Some(id), None, &hub).await.unwrap_err()) }
    };
    let message = err("acme/no-weights").await;
    assert!(
        message.contains("no safetensors or pytorch_model.bin weights"),
        "{message}"
    );
    let message = err("acme/no-tokenizer").await;
    assert!(
        message.contains("no tokenizer") && message.contains("tokenizer.model"),
        "{message}"
    );
    let message = err("acme/lost-shard").await;
    assert!(
        message.contains("downloading acme/lost-shard/model-00002-of-00002.safetensors"),
        "{message}"
    );
    // Offline, a model never downloaded names what it lacks.
    let offline = HubOptions {
        offline: true,
        ..hub.options.clone()
    };
    let message = format!(
        "{:#}",
        resolve(Some("acme/no-weights"), None, &offline)
            .await
            .unwrap_err()
    );
    assert!(message.contains("HF_HUB_OFFLINE"), "{message}");
}

#[tokio::test]
async fn a_gguf_file_of_a_repo() {
    let hub = fake_hub(&[(
        "acme/quantized",
        &[
            ("tiny.Q8_0.gguf", b"gguf bytes"),
            ("tiny.Q4_K_M.gguf", b"never fetched"),
            ("config.json", b"never fetched"),
        ],
    )])
    .await;
    let resolved = resolve(Some("acme/quantized/tiny.Q8_0.gguf"), None, &hub.options)
        .await
        .unwrap();
    assert_eq!(resolved.name, "tiny.Q8_0");
    assert_eq!(
        resolved.aliases,
        vec!["acme/quantized/tiny.Q8_0.gguf".to_string()]
    );
    let ModelSource::Local(path) = resolved.source else {
        panic!("{:?}", resolved.source)
    };
    assert_eq!(std::fs::read(&path).unwrap(), b"gguf bytes");
    let snapshot = path.parent().unwrap();
    assert!(!snapshot.join("tiny.Q4_K_M.gguf").exists());
    assert!(!snapshot.join("config.json").exists());

    // Offline, from the cache; a file the cache lacks is named.
    let offline = HubOptions {
        offline: true,
        ..hub.options.clone()
    };
    let again = resolve(Some("acme/quantized/tiny.Q8_0.gguf"), None, &offline)
        .await
        .unwrap();
    assert_eq!(again.source, ModelSource::Local(path));
    let err = resolve(Some("acme/quantized/tiny.Q4_K_M.gguf"), None, &offline)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("acme/quantized/tiny.Q4_K_M.gguf is not in the cache"),
        "{err:#}"
    );
    let err = resolve(Some("acme/quantized/missing.gguf"), None, &hub.options)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("downloading acme/quantized/missing.gguf"),
        "{err:#}"
    );
}
