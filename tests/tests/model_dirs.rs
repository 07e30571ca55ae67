//! Model directories in the layouts checkpoints are published in, served
//! with `--model DIR` and compared with the bundled model over HTTP.

#[path = "../../crates/llama-model/tests/gguf_writer/mod.rs"]
mod gguf_writer;
#[path = "../../crates/llama-model/tests/torch_save/mod.rs"]
mod torch_save;

use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::quantized::GgmlDType;
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

/// A Code Llama-shaped checkpoint: the bundled model with Code Llama's 16
/// extra vocabulary pieces (ids 32000–32015; `▁<PRE>`, `▁<SUF>`, `▁<MID>`,
/// `▁<EOT>` special), their embedding and output rows zero.
fn code_llama_dir() -> PathBuf {
    let dir = copy_of_bundled_model("code-llama", &["model.safetensors"]);
    let bundled = workspace_root().join("models/tiny-llama");
    let mut tensors = candle_core::safetensors::load(
        bundled.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let rows = &tensors[name];
        let extra = rows.narrow(0, 0, 16).unwrap().zeros_like().unwrap();
        let grown = candle_core::Tensor::cat(&[rows, &extra], 0).unwrap();
        tensors.insert(name.to_string(), grown);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();

    let mut config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = json!(32016);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();

    let mut tokenizer: Value =
        serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    let extra: Vec<String> = [
        "<SU", "<SUF", "<PRE", "<M", "<MID", "<E", "<EOT", "<PRE>", "<SUF>", "<MID>",
    ]
    .iter()
    .map(|p| p.to_string())
    .chain((1..=6).map(|n| "<EOT>".repeat(n)))
    .map(|p| format!("\u{2581}{p}"))
    .collect();
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    for (id, piece) in (32000..).zip(&extra) {
        vocab.insert(piece.clone(), json!(id));
    }
    let added = tokenizer["added_tokens"].as_array_mut().unwrap();
    for (id, piece) in (32007..).zip(&extra[7..11]) {
        added.push(json!({
            "id": id, "content": piece, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true,
        }));
    }
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    dir
}

/// `suffix` on a Code Llama model asks for the text between prompt and
/// suffix: the prompt is Meta's `<PRE> prefix <SUF>suffix <MID>` and the
/// answer ends at `<EOT>`, streamed or not.
#[tokio::test]
async fn code_llama_fills_in_the_middle() {
    let dir = code_llama_dir();
    let mut server = Server::builder()
        .args([
            "--model",
            dir.to_str().unwrap(),
            "--served-model-name",
            "code",
        ])
        .start()
        .await
        .unwrap();
    let prefix = "def add(a, b):\n    ";
    let suffix = "\n\nprint(add(1, 2))\n";
    let completion = |body: Value| {
        let server = &server;
        async move {
            let reply = server.post_json("/v1/completions", &body).await.unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text);
            reply.body
        }
    };
    let infilled = completion(json!({
        "model": "code", "prompt": prefix, "suffix": suffix, "max_tokens": 12, "temperature": 0,
    }))
    .await;

    // The same prompt spelled out as ids: BOS, <PRE>, the prefix, <SUF>, the
    // suffix without a leading space piece, <MID>; generation stops at <EOT>.
    let tokenize = |text: String| {
        let server = &server;
        async move {
            let reply = server
                .post_json(
                    "/tokenize",
                    &json!({"prompt": text, "add_special_tokens": false}),
                )
                .await
                .unwrap();
            assert_eq!(reply.status, 200, "{}", reply.text);
            reply.body["tokens"].as_array().unwrap().clone()
        }
    };
    let mut ids = vec![json!(1), json!(32007)];
    ids.extend(tokenize(prefix.to_string()).await);
    ids.push(json!(32008));
    let marked = tokenize(format!("\u{263A}{suffix}")).await;
    assert_eq!(marked[..2], tokenize("\u{263A}".into()).await[..]);
    ids.extend_from_slice(&marked[2..]);
    ids.push(json!(32009));
    let spelled_out = completion(json!({
        "model": "code", "prompt": ids, "max_tokens": 12, "temperature": 0, "stop_token_ids": [32010],
    }))
    .await;
    assert_eq!(
        infilled["choices"][0]["text"],
        spelled_out["choices"][0]["text"]
    );
    for key in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(infilled["usage"][key], spelled_out["usage"][key], "{key}");
    }
    assert_eq!(infilled["usage"]["prompt_tokens"], ids.len());
    // Random weights do not pick <EOT> by themselves: 12 tokens of text.
    assert_eq!(infilled["usage"]["completion_tokens"], 12, "{infilled}");
    assert!(!infilled["choices"][0]["text"].as_str().unwrap().is_empty());

    // Streamed: the same text in chunks.
    let data = server
        .post_sse(
            "/v1/completions",
            &json!({"model": "code", "prompt": prefix, "suffix": suffix, "max_tokens": 12,
                    "temperature": 0, "stream": true}),
        )
        .await
        .unwrap();
    let streamed: String = e2e::parse_chunks(&data)
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(json!(streamed), infilled["choices"][0]["text"]);

    // <EOT> ends an infill; without a suffix it is just a token.
    let forced_eot = json!({"32010": 100});
    let ended = completion(json!({
        "model": "code", "prompt": prefix, "suffix": suffix, "max_tokens": 5, "temperature": 0,
        "logit_bias": forced_eot,
    }))
    .await;
    assert_eq!(ended["choices"][0]["finish_reason"], "stop", "{ended}");
    assert_eq!(ended["choices"][0]["text"], "");
    let plain = completion(json!({
        "model": "code", "prompt": prefix, "max_tokens": 5, "temperature": 0,
        "logit_bias": forced_eot,
    }))
    .await;
    assert_eq!(plain["choices"][0]["finish_reason"], "length", "{plain}");

    // A suffix needs text prompts.
    let reply = server
        .post_json(
            "/v1/completions",
            &json!({"model": "code", "prompt": [1, 2, 3], "suffix": "x"}),
        )
        .await
        .unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.body["error"]["param"], "suffix");
    server.terminate(Duration::from_secs(30)).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The bundled model as llama.cpp's converter would write it: one GGUF file
/// holding the weights (2-D ones in `format`), the config and the tokenizer
/// (from Meta's `tokenizer.model`), with `chat_template` if given.
fn bundled_as_gguf(name: &str, format: GgmlDType, chat_template: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("llama-serve-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bundled = workspace_root().join("models/tiny-llama");
    let tensors = candle_core::safetensors::load(
        bundled.join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let config: Value =
        serde_json::from_slice(&std::fs::read(bundled.join("config.json")).unwrap()).unwrap();
    let sp = std::fs::read(workspace_root().join("tests/fixtures/llama2-tokenizer.model")).unwrap();
    let sp = llama_engine::sentencepiece::SentencePieceVocab::parse(&sp).unwrap();
    let vocab = gguf_writer::Vocab {
        tokens: sp.pieces.iter().map(|p| p.text.clone()).collect(),
        scores: sp.pieces.iter().map(|p| p.score).collect(),
        types: sp.pieces.iter().map(|p| p.kind.as_proto()).collect(),
        bos: 1,
        eos: 2,
        unk: 0,
        chat_template: chat_template.map(str::to_string),
    };
    let path = dir.join(format!("{name}.gguf"));
    gguf_writer::write_gguf(
        &path,
        &config,
        &tensors,
        &|_, shape| gguf_writer::or_f16(format, shape),
        Some(&vocab),
    );
    path
}

/// `--model FILE.gguf`: in F16 the file holds the bundled weights exactly,
/// so the prompt ids and the greedy answer are the bundled model's. In Q8_0
/// it serves under the file's name, streams, and tokenizes the same; with a
/// chat template in its metadata, chats are rendered by that template.
#[tokio::test]
async fn a_gguf_file_is_served_like_the_bundled_model() {
    let f16 = bundled_as_gguf("tiny-llama-f16", GgmlDType::F16, None);
    let (bundled_message, bundled_ids) = greedy_answer(None).await;
    let (message, ids) = greedy_answer(Some(&f16)).await;
    assert_eq!(ids, bundled_ids);
    assert_eq!(message, bundled_message);

    let chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{{ '<|im_start|>assistant\n' }}";
    let q8 = bundled_as_gguf("tiny-llama-q8_0", GgmlDType::Q8_0, Some(chatml));
    let mut server = Server::builder()
        .args(["--model", q8.to_str().unwrap()])
        .start()
        .await
        .unwrap();
    let models = server.get_json("/v1/models").await.unwrap();
    assert_eq!(
        models.body["data"][0]["id"], "tiny-llama-q8_0",
        "{}",
        models.text
    );
    let prompt = "Name a café in Zürich 🦙, then count: 1 2 3";
    let tokenized = server
        .post_json("/tokenize", &json!({"prompt": prompt}))
        .await
        .unwrap();
    let bundled = Server::start().await.unwrap();
    let expected = bundled
        .post_json("/tokenize", &json!({"prompt": prompt}))
        .await
        .unwrap();
    assert_eq!(tokenized.body["tokens"], expected.body["tokens"]);
    let rendered = server
        .post_json(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "Hi"}], "return_token_strs": true}),
        )
        .await
        .unwrap();
    let text = server
        .post_json("/detokenize", &json!({"tokens": rendered.body["tokens"]}))
        .await
        .unwrap();
    assert_eq!(
        text.body["prompt"], "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
        "{}",
        text.text
    );
    let chunks = server
        .post_sse(
            "/v1/chat/completions",
            &json!({"model": "tiny-llama-q8_0", "stream": true, "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "Hello!"}]}),
        )
        .await
        .unwrap();
    let last: Value = serde_json::from_str(chunks.last().unwrap()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{chunks:?}");
    server.terminate(Duration::from_secs(30)).await.unwrap();
    std::fs::remove_file(&f16).unwrap();
    std::fs::remove_file(&q8).unwrap();
}
