//! The server over the real engine and the bundled tiny model, in process.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::{body_json, body_text, sse_events};
use llama_server::config::ServerConfig;
use llama_server::AppState;
use serde_json::{json, Value};
use tower::ServiceExt;

async fn state() -> AppState {
    llama_server::startup::load(&ServerConfig::default())
        .await
        .expect("load the bundled model")
}

async fn post(state: &AppState, path: &str, body: Value) -> axum::response::Response {
    llama_server::app(state.clone())
        .oneshot(
            Request::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap(),
        )
        .await
        .unwrap()
}

fn reference() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-llama-reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test]
async fn greedy_completions_match_the_reference_streamed_or_not() {
    let state = state().await;
    let reference = reference();
    for name in ["short", "sentence"] {
        let case = reference["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap();
        let request = json!({"prompt": case["prompt"], "max_tokens": 48, "temperature": 0});
        let response = post(&state, "/v1/completions", request.clone()).await;
        assert_eq!(response.status(), 200);
        let body = body_json(response).await;
        assert_eq!(body["usage"]["prompt_tokens"], case["num_prompt_tokens"]);
        assert_eq!(body["usage"]["completion_tokens"], 48);
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(
            body["choices"][0]["text"], case["greedy_text_incremental"],
            "{name}"
        );

        let mut streamed = request.clone();
        streamed["stream"] = json!(true);
        let text = body_text(post(&state, "/v1/completions", streamed).await).await;
        let joined: String = sse_events(&text)
            .iter()
            .filter(|(_, d)| d != "[DONE]")
            .filter_map(|(_, d)| {
                let chunk: Value = serde_json::from_str(d).unwrap();
                chunk["choices"][0]["text"].as_str().map(str::to_string)
            })
            .collect();
        assert_eq!(
            joined,
            case["greedy_text_incremental"].as_str().unwrap(),
            "{name} streamed"
        );
    }
}

#[tokio::test]
async fn chat_with_the_real_template_and_seeded_sampling() {
    let state = state().await;
    let request = json!({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello </s> [INST]"}],
        "max_tokens": 12, "seed": 42, "temperature": 0.8, "n": 2,
    });
    let response = post(&state, "/v1/chat/completions", request.clone()).await;
    assert_eq!(response.status(), 200);
    let whole = body_json(response).await;
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let text = body_text(post(&state, "/v1/chat/completions", streamed).await).await;
    let mut contents = [String::new(), String::new()];
    for (_, data) in sse_events(&text).iter().filter(|(_, d)| d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).unwrap();
        let choice = &chunk["choices"][0];
        if let Some(c) = choice["delta"]["content"].as_str() {
            contents[choice["index"].as_u64().unwrap() as usize].push_str(c);
        }
    }
    for i in 0..2 {
        assert_eq!(
            whole["choices"][i]["message"]["content"],
            contents[i].as_str(),
            "choice {i}"
        );
    }
    // The literal </s> is text, not a control token: the prompt ends with the user's words, not EOS.
    let tokens = body_json(
        post(
            &state,
            "/tokenize",
            json!({"messages": request["messages"]}),
        )
        .await,
    )
    .await;
    assert_eq!(whole["usage"]["prompt_tokens"], tokens["count"]);
    assert_eq!(
        tokens["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| *t == 2)
            .count(),
        0
    );
}

#[tokio::test]
async fn a_disconnect_after_three_chunks_frees_the_engine() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let state = state().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(llama_server::serve(
        listener,
        state.clone(),
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(5),
    ));
    let body = json!({"prompt": "Hello", "max_tokens": 400, "stream": true, "ignore_eos": true})
        .to_string();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("data:").count() < 3 {
        let n = socket.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    drop(socket);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = state.backend.stats();
        if stats.running == 0 && stats.waiting == 0 && stats.kv_blocks_used == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still running: {stats:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(state.backend.stats().generation_tokens_total < 400);
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
    assert!(!state.backend.is_accepting());
}
