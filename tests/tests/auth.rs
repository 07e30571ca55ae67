//! API keys: every generation and metadata route needs one of the configured
//! bearer keys; the probes stay open for orchestrators, which carry no keys.

use e2e::{assert_openai_error, Server};
use serde_json::{json, Value};

fn chat() -> Value {
    json!({
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "temperature": 0,
    })
}

/// (method, path, body) of every protected route.
fn protected() -> Vec<(&'static str, &'static str, Option<Value>)> {
    vec![
        ("POST", "/v1/chat/completions", Some(chat())),
        (
            "POST",
            "/v1/completions",
            Some(json!({"model": "tiny-llama", "prompt": "Hi", "max_tokens": 2})),
        ),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/tiny-llama", None),
        ("POST", "/tokenize", Some(json!({"prompt": "Hi"}))),
        ("POST", "/detokenize", Some(json!({"tokens": [1, 15043]}))),
    ]
}

async fn call(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<&Value>,
    authorization: Option<&str>,
) -> (u16, Value) {
    let client = server.client();
    let mut request = match method {
        "GET" => client.get(server.url(path)),
        _ => client.post(server.url(path)),
    };
    if let Some(body) = body {
        request = request.json(body);
    }
    if let Some(value) = authorization {
        request = request.header("authorization", value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn assert_keys(server: &Server, good: &[&str], bad: &[&str]) {
    for (method, path, body) in protected() {
        let (status, reply) = call(server, method, path, body.as_ref(), None).await;
        assert_eq!(status, 401, "no key on {path}: {reply}");
        assert_openai_error(&reply, path);
        assert_eq!(reply["error"]["type"], "authentication_error", "{reply}");

        for auth in bad {
            let (status, reply) = call(server, method, path, body.as_ref(), Some(auth)).await;
            assert_eq!(status, 401, "{auth:?} on {path}: {reply}");
            assert_openai_error(&reply, path);
            assert_eq!(reply["error"]["type"], "authentication_error");
            let message = reply["error"]["message"].as_str().unwrap();
            for key in good {
                assert!(
                    !message.contains(key),
                    "the error must not echo keys: {message}"
                );
            }
        }
        for key in good {
            let bearer = format!("Bearer {key}");
            let (status, reply) = call(server, method, path, body.as_ref(), Some(&bearer)).await;
            assert_eq!(status, 200, "{key} on {path}: {reply}");
        }
    }
    for probe in ["/health", "/ready"] {
        let (status, reply) = call(server, "GET", probe, None, None).await;
        assert_eq!(status, 200, "{probe} must stay open: {reply}");
    }
}

#[tokio::test]
async fn keys_from_flags() {
    let server = Server::builder()
        .args(["--api-key", "k1", "--api-key", "k2"])
        .start()
        .await
        .unwrap();
    assert_keys(
        &server,
        &["k1", "k2"],
        &[
            "Bearer k3",
            "Bearer k1x",
            "Bearer k",
            "Bearer ",
            "k1",
            "Basic azE6",
            "Bearer K1",
        ],
    )
    .await;
}

#[tokio::test]
async fn auth_comes_before_validation() {
    // An unauthenticated caller learns nothing about the request format.
    let server = Server::builder()
        .args(["--api-key", "k1"])
        .start()
        .await
        .unwrap();
    let (status, reply) = call(
        &server,
        "POST",
        "/v1/chat/completions",
        Some(&json!({"temperature": 99})),
        Some("Bearer wrong"),
    )
    .await;
    assert_eq!(status, 401, "{reply}");
}

#[tokio::test]
async fn keys_from_env_and_file() {
    let dir = std::env::temp_dir().join(format!("e2e-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys");
    std::fs::write(&file, "# operators\nfile-key-1\n\nfile-key-2\n").unwrap();
    let server = Server::builder()
        .env("LLAMA_SERVE_API_KEY", "env-a,env-b")
        .arg("--api-key-file")
        .arg(file.to_str().unwrap())
        .start()
        .await
        .unwrap();
    let result = async {
        for key in ["env-a", "env-b", "file-key-1", "file-key-2"] {
            let (status, reply) = call(
                &server,
                "GET",
                "/v1/models",
                None,
                Some(&format!("Bearer {key}")),
            )
            .await;
            assert_eq!(status, 200, "{key}: {reply}");
        }
        for key in ["# operators", "env-a,env-b", ""] {
            let (status, _) = call(
                &server,
                "GET",
                "/v1/models",
                None,
                Some(&format!("Bearer {key}")),
            )
            .await;
            assert_eq!(status, 401, "{key:?} must not be a key");
        }
    };
    result.await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn no_keys_means_open() {
    let server = Server::start().await.unwrap();
    let (status, reply) = call(&server, "POST", "/v1/chat/completions", Some(&chat()), None).await;
    assert_eq!(status, 200, "{reply}");
    // Clients that always send a key still work against an open server.
    let (status, _) = call(&server, "GET", "/v1/models", None, Some("Bearer anything")).await;
    assert_eq!(status, 200);
}
