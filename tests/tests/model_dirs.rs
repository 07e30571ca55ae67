//! Model directories in the layouts checkpoints are published in, served
//! with `--model DIR` and compared with the bundled model over HTTP.

#[path = "../../crates/llama-model/tests/torch_save/mod.rs"]
mod torch_save;

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::{workspace_root, Server};
use serde_json::{json, Value};

/// A copy of the bundled model's directory under a fresh temporary path,
/// leaving out `skip`.
fn copy_of_bundled_model(name: &str, skip: &[&str]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llama-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bundled = workspace_root().join("models/tiny-llama");
    for entry in std::fs::read_dir(&bundled).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if !skip.contains(&file.as_str()) {
            std::fs::copy(&path, dir.join(&file)).unwrap();
        }
    }
    dir
}

/// What a server answers to a fixed greedy chat, plus the chat's token ids.
async fn greedy_answer(model: Option<&Path>) -> (Value, Value) {
    let mut builder = Server::builder();
    if let Some(dir) = model {
        builder = builder.args([
            "--model",
            dir.to_str().unwrap(),
            "--served-model-name",
            "tiny-llama",
        ]);
    }
    let mut server = builder.start().await.unwrap();
    let messages = json!([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a café in Zürich 🦙, then count: 1 2 3"},
    ]);
    let reply = server
        .post_json(
            "/v1/chat/completions",
            &json!({"model": "tiny-llama", "messages": messages, "max_tokens": 24, "temperature": 0}),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text);
    let ids = server
        .post_json(
            "/tokenize",
            &json!({"model": "tiny-llama", "messages": messages}),
        )
        .await
        .unwrap();
    assert_eq!(ids.status, 200, "{}", ids.text);
    server.terminate(Duration::from_secs(30)).await.unwrap();
    (
        reply.body["choices"][0]["message"].clone(),
        ids.body["tokens"].clone(),
    )
}

/// Checkpoints from before safetensors and fast tokenizers (many Llama 2
/// fine-tunes): SentencePiece's `tokenizer.model` instead of
/// `tokenizer.json`, PyTorch's `pytorch_model.bin` instead of safetensors.
/// They get the same prompt ids and the same answer as the bundled model.
#[tokio::test]
async fn an_old_style_checkpoint_answers_as_the_bundled_one() {
    let dir = copy_of_bundled_model("old-style", &["tokenizer.json", "model.safetensors"]);
    std::fs::copy(
        workspace_root().join("tests/fixtures/llama2-tokenizer.model"),
        dir.join("tokenizer.model"),
    )
    .unwrap();
    let tensors = candle_core::safetensors::load(
        workspace_root().join("models/tiny-llama/model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let entries: Vec<torch_save::Entry> = names
        .iter()
        .map(|name| torch_save::Entry {
            name,
            tensor: &tensors[*name],
            dtype: tensors[*name].dtype(),
            offset: 0,
        })
        .collect();
    torch_save::save(&entries, &dir.join("pytorch_model.bin"));

    let (bundled_message, bundled_ids) = greedy_answer(None).await;
    let (message, ids) = greedy_answer(Some(&dir)).await;
    assert!(
        bundled_ids.as_array().is_some_and(|ids| ids.len() > 20),
        "{bundled_ids}"
    );
    assert_eq!(ids, bundled_ids);
    assert_eq!(message, bundled_message);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A directory without any tokenizer stops the server at startup with a
/// message that names both files it looked for.
#[tokio::test]
async fn a_checkpoint_without_a_tokenizer_is_refused_at_startup() {
    let dir = copy_of_bundled_model("no-tokenizer", &["tokenizer.json"]);
    let err = Server::builder()
        .args(["--model", dir.to_str().unwrap()])
        .start()
        .await
        .err()
        .expect("a model without a tokenizer must not start")
        .to_string();
    assert!(
        err.contains("neither tokenizer.json nor tokenizer.model"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
