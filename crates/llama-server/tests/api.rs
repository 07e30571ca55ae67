//! The HTTP surface against a scripted engine and the real bundled tokenizer.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::{body_json, body_text, harness, sse_events};
use llama_server::codec::{ChatRole, ChatTurn, Codec};
use llama_server::generation_defaults::GenerationDefaults;
use llama_server::llama_codec::LlamaCodec;
use llama_server::AppOptions;
use serde_json::{json, Value};

fn chat_body(extra: Value) -> Value {
    let mut body = json!({
        "model": "tiny-llama",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        "max_tokens": 3,
        "temperature": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test]
async fn chat_completion_has_the_openai_shape() {
    let h = harness(AppOptions::default());
    let (status, body) = h.post("/v1/chat/completions", chat_body(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "tiny-llama");
    assert!(body["created"].as_u64().unwrap() > 1_600_000_000);
    assert!(body["system_fingerprint"].is_string());
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["message"]["content"], "t0 t1 t2");
    assert_eq!(choice["finish_reason"], "length");
    assert!(choice["logprobs"].is_null());

    let codec = LlamaCodec::from_model_dir(&common::tiny_dir()).unwrap();
    let ids = codec
        .render_chat(
            &[
                ChatTurn {
                    role: ChatRole::System,
                    content: "Be brief.".into(),
                },
                ChatTurn {
                    role: ChatRole::User,
                    content: "Hello!".into(),
                },
            ],
            None,
        )
        .unwrap();
    assert_eq!(body["usage"]["prompt_tokens"], ids.len());
    assert_eq!(body["usage"]["completion_tokens"], 3);
    assert_eq!(body["usage"]["total_tokens"], ids.len() + 3);
    let sent = h.backend.requests.lock().unwrap()[0].clone();
    assert_eq!(sent.prompt, ids);
    assert!(sent.sampling.is_greedy());
}

#[tokio::test]
async fn chat_stream_is_framed_like_openai() {
    let h = harness(AppOptions::default());
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            chat_body(json!({"stream": true, "n": 2, "stream_options": {"include_usage": true}}))
                .to_string(),
        ))
        .unwrap();
    let response = h.call(request).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = body_text(response).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let events = sse_events(&text);
    assert!(events.iter().all(|(e, _)| e.is_none()));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    assert!(chunks
        .iter()
        .all(|c| c["id"] == id && c["object"] == "chat.completion.chunk"));
    // A role chunk per choice first.
    for (i, c) in chunks[..2].iter().enumerate() {
        assert_eq!(c["choices"][0]["index"], i);
        assert_eq!(c["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(c["choices"][0]["delta"]["content"], "");
    }
    let mut texts = [String::new(), String::new()];
    let mut finished = [false, false];
    for c in &chunks[2..chunks.len() - 1] {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        assert!(!finished[i], "content after finish");
        if let Some(content) = choice["delta"]["content"].as_str() {
            assert!(!content.is_empty());
            texts[i].push_str(content);
        }
        if choice["finish_reason"] == "length" {
            assert_eq!(choice["delta"], json!({}));
            finished[i] = true;
        }
    }
    assert_eq!(finished, [true, true]);
    assert_eq!(texts, ["t0 t1 t2", "t0 t1 t2"]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 6);

    let (_, whole) = h
        .post("/v1/chat/completions", chat_body(json!({"n": 2})))
        .await;
    assert_eq!(whole["choices"][1]["message"]["content"], texts[1].as_str());
}

#[tokio::test]
async fn chat_logprobs_use_the_chat_shape() {
    let h = harness(AppOptions::default());
    let (status, body) = h
        .post(
            "/v1/chat/completions",
            chat_body(json!({"logprobs": true, "top_logprobs": 2})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let content = &body["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().unwrap().len(), 3);
    assert_eq!(content[1]["token"], " t1");
    assert_eq!(content[1]["bytes"], json!(" t1".as_bytes()));
    assert_eq!(content[1]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[1]["top_logprobs"][0]["logprob"].is_number());
}

#[tokio::test]
async fn completions_handle_every_prompt_shape() {
    let h = harness(AppOptions::default());
    let (status, body) = h
        .post(
            "/v1/completions",
            json!({"model": "tiny-llama", "prompt": ["Hello", "Bye"], "n": 2, "max_tokens": 2, "logprobs": 1}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(body["object"], "text_completion");
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"], "t0 t1");
        assert_eq!(c["logprobs"]["tokens"], json!(["t0", " t1"]));
        assert_eq!(c["logprobs"]["text_offset"], json!([0, 2]));
        assert_eq!(
            c["logprobs"]["top_logprobs"][0].as_object().unwrap().len(),
            1
        );
    }
    let sent: usize = h
        .backend
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.prompt.len())
        .sum();
    assert_eq!(body["usage"]["prompt_tokens"], sent);
    assert_eq!(body["usage"]["completion_tokens"], 8);

    // Token ids go to the engine exactly as given; no BOS is added.
    let (status, _) = h
        .post(
            "/v1/completions",
            json!({"prompt": [15043, 29991], "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = h
        .post(
            "/v1/completions",
            json!({"prompt": [[1, 15043], [5]], "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200);
    let sent = h.backend.requests.lock().unwrap().clone();
    assert_eq!(sent[0].prompt[0], 1, "a text prompt starts with BOS");
    assert_eq!(sent[2].prompt, vec![15043, 29991]);
    assert_eq!(sent[4].prompt, vec![5]);
    // Without max_tokens a completion gets 16 tokens, as in OpenAI and vLLM.
    let (_, body) = h.post("/v1/completions", json!({"prompt": "Hi"})).await;
    assert_eq!(body["usage"]["completion_tokens"], 16);
}

#[tokio::test]
async fn completion_stream() {
    let h = harness(AppOptions::default());
    let request = Request::post("/v1/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"prompt": "Hello", "max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}})
                .to_string(),
        ))
        .unwrap();
    let text = body_text(h.call(request).await).await;
    let events = sse_events(&text);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let joined: String = chunks
        .iter()
        .filter_map(|c| {
            c["choices"]
                .get(0)
                .and_then(|ch| ch["text"].as_str())
                .map(str::to_string)
        })
        .collect();
    assert_eq!(joined, "t0 t1 t2");
    assert!(chunks
        .iter()
        .all(|c| c["id"] == chunks[0]["id"] && c["object"] == "text_completion"));
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );
    assert_eq!(chunks.last().unwrap()["usage"]["total_tokens"], 5);
}

#[tokio::test]
async fn generation_config_defaults_apply_when_fields_are_left_out() {
    let h = harness(AppOptions {
        generation_defaults: GenerationDefaults {
            temperature: Some(0.6),
            top_p: Some(0.9),
            ..Default::default()
        },
        ..Default::default()
    });
    let (status, _) = h
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _) = h
        .post(
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "seed": 7, "stop": "x", "top_k": 5}),
        )
        .await;
    assert_eq!(status, 200);
    let sent = h.backend.requests.lock().unwrap().clone();
    assert_eq!(sent[0].sampling.temperature, 0.6);
    assert_eq!(sent[0].sampling.top_p, 0.9);
    assert_eq!(sent[1].sampling.seed, Some(7));
    assert_eq!(sent[1].sampling.top_k, 5);
    assert_eq!(sent[1].stop.stop_strings, vec!["x"]);
    // No max_tokens in chat: the rest of the context.
    assert_eq!(sent[1].stop.max_tokens, 512 - sent[1].prompt.len());
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let h = harness(AppOptions::default());
    let msgs = json!([{"role": "user", "content": "Hi"}]);
    let cases: Vec<(&str, Value, u16, Option<&str>)> = vec![
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}),
            400,
            Some("messages"),
        ),
        ("/v1/chat/completions", json!({}), 400, None),
        (
            "/v1/chat/completions",
            json!({"messages": []}),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "temperature": 5}),
            400,
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "temperature": "hot"}),
            400,
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "top_p": 0}),
            400,
            Some("top_p"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_tokens": -1}),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_tokens": 100000}),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "n": 0}),
            400,
            Some("n"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "top_logprobs": 3}),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logprobs": true, "top_logprobs": 21}),
            400,
            Some("top_logprobs"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "logit_bias": {"x": 1}}),
            400,
            Some("logit_bias"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "stop": 3}),
            400,
            Some("stop"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "tools": [{"type": "function"}]}),
            400,
            Some("tools"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "response_format": {"type": "json_object"}}),
            400,
            Some("response_format"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
            400,
            Some("messages[0].content[0].type"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "wizard", "content": "x"}]}),
            400,
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "model": "gpt-4"}),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "echo": true, "suffix": "y"}),
            400,
            Some("echo"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "suffix": "y"}),
            400,
            Some("suffix"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "best_of": 3}),
            400,
            Some("best_of"),
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 99999999]}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, -5]}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": []}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": {"text": "x"}}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "logprobs": 50}),
            400,
            Some("logprobs"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "word ".repeat(600)}),
            400,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "max_tokens": 0}),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "frequency_penalty": 9}),
            400,
            Some("frequency_penalty"),
        ),
        (
            "/detokenize",
            json!({"tokens": [40000]}),
            400,
            Some("tokens"),
        ),
    ];
    for (path, body, status, param) in cases {
        let (got, error) = h.post(path, body.clone()).await;
        assert_eq!(got, status, "{path} {body} -> {error}");
        let e = &error["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{error}"
        );
        assert!(e["type"].is_string(), "{error}");
        assert_eq!(e["param"].as_str(), param, "{path} {body} -> {error}");
    }
    // Context length errors carry their code and both numbers.
    let (_, error) = h
        .post("/v1/completions", json!({"prompt": "word ".repeat(600)}))
        .await;
    assert_eq!(error["error"]["code"], "context_length_exceeded");
    assert!(error["error"]["message"].as_str().unwrap().contains("512"));
    // The server still answers.
    let (status, _) = h
        .post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn transport_errors_are_json_too() {
    let h = harness(AppOptions {
        max_request_bytes: 1024,
        ..Default::default()
    });
    let malformed = h
        .call(
            Request::post("/v1/completions")
                .header("content-type", "application/json")
                .body(Body::from("{\"prompt\": "))
                .unwrap(),
        )
        .await;
    assert_eq!(malformed.status(), 400);
    assert_eq!(
        body_json(malformed).await["error"]["type"],
        "invalid_request_error"
    );

    let wrong_type = h
        .call(
            Request::post("/v1/completions")
                .header("content-type", "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await;
    assert_eq!(wrong_type.status(), 415);
    assert_eq!(
        body_json(wrong_type).await["error"]["code"],
        "unsupported_media_type"
    );

    let big = json!({"prompt": "x".repeat(4096)}).to_string();
    let too_big = h
        .call(
            Request::post("/v1/completions")
                .header("content-type", "application/json")
                .body(Body::from(big))
                .unwrap(),
        )
        .await;
    assert_eq!(too_big.status(), 413);
    assert!(body_json(too_big).await["error"]["message"]
        .as_str()
        .unwrap()
        .contains("1024"));

    let (status, body) = h.get("/v1/nothing").await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");

    let (status, body) = h.get("/v1/chat/completions").await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");
}

#[tokio::test]
async fn api_keys_guard_everything_but_probes() {
    let h = harness(AppOptions {
        api_keys: vec!["sk-right".into()],
        ..Default::default()
    });
    let with_key = |key: Option<&str>| {
        let mut b = Request::post("/v1/completions").header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(Body::from(
            json!({"prompt": "x", "max_tokens": 1}).to_string(),
        ))
        .unwrap()
    };
    let none = h.call(with_key(None)).await;
    assert_eq!(none.status(), 401);
    assert_eq!(
        body_json(none).await["error"]["type"],
        "authentication_error"
    );
    assert_eq!(h.call(with_key(Some("sk-wrong"))).await.status(), 401);
    assert_eq!(h.call(with_key(Some("sk-right"))).await.status(), 200);
    assert_eq!(h.get("/v1/models").await.0, 401);
    assert_eq!(h.get("/health").await.0, 200);
    assert_eq!(h.get("/ready").await.0, 200);
}

#[tokio::test]
async fn overload_and_drain() {
    let h = harness(AppOptions::default());
    h.backend.overloaded.store(true, Ordering::SeqCst);
    let response = h
        .call(
            Request::post("/v1/completions")
                .header("content-type", "application/json")
                .body(Body::from(json!({"prompt": "x"}).to_string()))
                .unwrap(),
        )
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        body_json(response).await["error"]["type"],
        "rate_limit_error"
    );

    h.backend.overloaded.store(false, Ordering::SeqCst);
    h.backend.draining.store(true, Ordering::SeqCst);
    let (status, body) = h.get("/ready").await;
    assert_eq!((status, body["status"].as_str()), (503, Some("draining")));
    let (status, body) = h.post("/v1/completions", json!({"prompt": "x"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(h.get("/health").await.0, 200);
}

#[tokio::test]
async fn an_engine_failure_mid_stream_is_an_error_event_without_internals() {
    let h = harness(AppOptions::default());
    *h.backend.fail_after.lock().unwrap() = Some(2);
    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            chat_body(json!({"stream": true, "max_tokens": 5})).to_string(),
        ))
        .unwrap();
    let response = h.call(request).await;
    assert_eq!(response.status(), 200);
    let text = body_text(response).await;
    let events = sse_events(&text);
    let (name, data) = events.last().unwrap();
    assert_eq!(name.as_deref(), Some("error"));
    let error: Value = serde_json::from_str(data).unwrap();
    assert_eq!(error["error"]["type"], "server_error");
    assert!(
        !text.contains("secret") && !text.contains("[DONE]"),
        "{text}"
    );

    // Non-streaming: a 500 with the same discretion.
    let (status, body) = h
        .post("/v1/chat/completions", chat_body(json!({"max_tokens": 5})))
        .await;
    assert_eq!(status, 500);
    assert!(!body.to_string().contains("secret"));
}

#[tokio::test]
async fn models_tokenize_and_request_ids() {
    let h = harness(AppOptions::default());
    let (status, body) = h.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][0]["id"], "tiny-llama");
    assert_eq!(body["data"][0]["object"], "model");
    assert_eq!(h.get("/v1/models/tiny-llama").await.0, 200);
    let (status, body) = h.get("/v1/models/meta-llama/Llama-2-7b-chat-hf").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    let (status, body) = h
        .post(
            "/tokenize",
            json!({"prompt": "Hello", "return_token_strs": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens"], json!([1, 15043]));
    assert_eq!(body["count"], 2);
    assert_eq!(body["token_strs"], json!(["<s>", "▁Hello"]));
    let (_, body) = h
        .post(
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
    assert_eq!(body["tokens"][0], 1);
    let (status, body) = h.post("/detokenize", json!({"tokens": [1, 15043]})).await;
    assert_eq!(status, 200);
    assert_eq!(body["prompt"], "<s> Hello");

    let response = h
        .call(
            Request::get("/health")
                .header("x-request-id", "abc-123")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(response.headers()["x-request-id"], "abc-123");
    let response = h
        .call(Request::get("/health").body(Body::empty()).unwrap())
        .await;
    assert!(!response.headers()["x-request-id"].is_empty());
}

#[tokio::test]
async fn cors_preflight() {
    let h = harness(AppOptions {
        cors_allow_origins: vec!["http://ui.example".into()],
        api_keys: vec!["k".into()],
        ..Default::default()
    });
    let response = h
        .call(
            Request::options("/v1/chat/completions")
                .header("origin", "http://ui.example")
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "authorization, content-type, x-stainless-os",
                )
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        response.headers()["access-control-allow-origin"],
        "http://ui.example"
    );
    // An explicit list, never `*`: by the Fetch standard a wildcard does not
    // cover `Authorization`.
    let allowed: Vec<String> = response.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    for header in ["authorization", "content-type", "x-stainless-os"] {
        assert!(
            allowed.iter().any(|h| h == header),
            "{header} in {allowed:?}"
        );
    }
    assert!(!allowed.iter().any(|h| h == "*"), "{allowed:?}");
    let methods = response.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(methods.contains("POST"), "{methods}");
    let vary = response.headers()["vary"].to_str().unwrap().to_string();
    assert!(vary.contains("access-control-request-headers"), "{vary}");
    // Another origin gets no permission.
    let response = h
        .call(
            Request::options("/v1/chat/completions")
                .header("origin", "http://evil.example")
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "authorization")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert!(response
        .headers()
        .get("access-control-allow-origin")
        .is_none());
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_cancels_its_generation() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let h = harness(AppOptions::default());
    *h.backend.token_delay.lock().unwrap() = Duration::from_millis(20);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(llama_server::serve(
        listener,
        h.state.clone(),
        async move {
            let _ = stop_rx.await;
        },
        Duration::from_secs(5),
    ));

    let body = json!({"prompt": "Hello", "max_tokens": 400, "stream": true}).to_string();
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
    assert_eq!(h.backend.live.load(Ordering::SeqCst), 1);
    drop(socket);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while h.backend.live.load(Ordering::SeqCst) != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the generation was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop_tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

fn keys(v: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = v
        .as_object()
        .unwrap_or_else(|| panic!("an object: {v}"))
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    keys
}

/// Field by field against OpenAI's documented chat objects (the
/// `openai/openai-openapi` description marks `message.refusal` and
/// `logprobs.refusal` required; OpenAI sends both as `null`, and `refusal`
/// beside the role in a choice's first delta).
#[tokio::test]
async fn chat_objects_carry_every_field_openai_sends() {
    let h = harness(AppOptions::default());
    let (status, body) = h
        .post(
            "/v1/chat/completions",
            chat_body(json!({"logprobs": true, "top_logprobs": 2})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        keys(&body),
        [
            "choices",
            "created",
            "id",
            "model",
            "object",
            "system_fingerprint",
            "usage"
        ]
    );
    let choice = &body["choices"][0];
    assert_eq!(
        keys(choice),
        ["finish_reason", "index", "logprobs", "message"]
    );
    assert_eq!(keys(&choice["message"]), ["content", "refusal", "role"]);
    assert!(choice["message"]["refusal"].is_null());
    assert_eq!(keys(&choice["logprobs"]), ["content", "refusal"]);
    assert!(choice["logprobs"]["refusal"].is_null());
    let entry = &choice["logprobs"]["content"][0];
    assert_eq!(keys(entry), ["bytes", "logprob", "token", "top_logprobs"]);
    assert_eq!(
        keys(&entry["top_logprobs"][0]),
        ["bytes", "logprob", "token"]
    );
    // Without logprobs the field is there, null.
    let (_, plain) = h.post("/v1/chat/completions", chat_body(json!({}))).await;
    assert!(plain["choices"][0]
        .as_object()
        .unwrap()
        .get("logprobs")
        .is_some_and(Value::is_null));

    let request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(
            chat_body(json!({"stream": true, "logprobs": true,
                             "stream_options": {"include_usage": true}}))
            .to_string(),
        ))
        .unwrap();
    let text = body_text(h.call(request).await).await;
    let events = sse_events(&text);
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for chunk in &chunks {
        assert_eq!(
            keys(chunk)
                .into_iter()
                .filter(|k| *k != "usage")
                .collect::<Vec<_>>(),
            [
                "choices",
                "created",
                "id",
                "model",
                "object",
                "system_fingerprint"
            ]
        );
    }
    let first = &chunks[0]["choices"][0];
    assert_eq!(keys(first), ["delta", "finish_reason", "index", "logprobs"]);
    assert_eq!(
        first["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    let token_chunks: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .filter(|c| !c["logprobs"].is_null())
        .collect();
    assert!(!token_chunks.is_empty());
    for choice in token_chunks {
        assert_eq!(keys(&choice["delta"]), ["content"]);
        assert_eq!(keys(&choice["logprobs"]), ["content", "refusal"]);
        assert!(choice["logprobs"]["refusal"].is_null());
    }
}
