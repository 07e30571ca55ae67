//! Bad requests, table-driven: each gets its HTTP status and an OpenAI error
//! body `{"error": {"message", "type", "param", "code"}}`, because OpenAI
//! clients parse that envelope and fail obscurely on anything else. The whole
//! table runs against one server, which must still answer afterwards.

use e2e::{assert_openai_error, Server};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
const CMPL: &str = "/v1/completions";
const CONTEXT: u64 = 512;

enum Body {
    Json(Value),
    Raw(&'static str, Vec<u8>),
    None,
}

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: Body,
    status: u16,
    kind: &'static str,
    /// `Some(p)`: `error.param` must be `p` (`None` inside: must be null).
    param: Option<Option<&'static str>>,
    code: Option<&'static str>,
    /// Substrings the message must contain.
    mentions: Vec<String>,
}

fn case(name: &'static str, path: &'static str, body: Value, status: u16) -> Case {
    Case {
        name,
        method: "POST",
        path,
        body: Body::Json(body),
        status,
        kind: if status == 401 {
            "authentication_error"
        } else {
            "invalid_request_error"
        },
        param: None,
        code: None,
        mentions: Vec::new(),
    }
}

impl Case {
    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(Some(param));
        self
    }
    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    fn mentions(mut self, s: impl ToString) -> Self {
        self.mentions.push(s.to_string());
        self
    }
    fn raw(mut self, content_type: &'static str, bytes: impl Into<Vec<u8>>) -> Self {
        self.body = Body::Raw(content_type, bytes.into());
        self
    }
    fn method(mut self, method: &'static str) -> Self {
        self.method = method;
        self.body = Body::None;
        self
    }
}

fn user() -> Value {
    json!([{"role": "user", "content": "Hi"}])
}

/// A chat request with `field` set to `value` (`Value::Null` removes it).
fn chat_with(field: &str, value: Value) -> Value {
    let mut body = json!({"model": "tiny-llama", "messages": user(), "max_tokens": 4});
    if value.is_null() {
        body.as_object_mut().unwrap().remove(field);
    } else {
        body[field] = value;
    }
    body
}

fn cmpl_with(field: &str, value: Value) -> Value {
    let mut body = json!({"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4});
    if value.is_null() {
        body.as_object_mut().unwrap().remove(field);
    } else {
        body[field] = value;
    }
    body
}

fn messages(list: Value) -> Value {
    chat_with("messages", list)
}

fn table(long_prompt: &str, long_prompt_tokens: u64) -> Vec<Case> {
    let ten_mb = format!(
        "{{\"model\":\"tiny-llama\",\"prompt\":\"{}\"}}",
        "a".repeat(10 * 1024 * 1024)
    );
    vec![
        // Not JSON, or not the right JSON.
        case("truncated json", CHAT, json!(null), 400).raw("application/json", "{\"model\":"),
        case("trailing garbage", CHAT, json!(null), 400)
            .raw("application/json", "{\"messages\": []} x"),
        case("empty body", CHAT, json!(null), 400).raw("application/json", ""),
        case("body is an array", CHAT, json!([1, 2]), 400),
        case("body is a string", CMPL, json!("hello"), 400),
        case("messages is a string", CHAT, messages(json!("hi")), 400).param("messages"),
        case("messages missing", CHAT, messages(Value::Null), 400).mentions("messages"),
        case("content is a number", CHAT, messages(json!([{"role": "user", "content": 5}])), 400),
        case("role missing", CHAT, messages(json!([{"content": "hi"}])), 400),
        case("max_tokens is a string", CHAT, chat_with("max_tokens", json!("ten")), 400)
            .param("max_tokens"),
        case("max_tokens is a float", CHAT, chat_with("max_tokens", json!(2.5)), 400)
            .param("max_tokens"),
        case("stream is a string", CHAT, chat_with("stream", json!("yes")), 400).param("stream"),
        case("seed is a string", CMPL, cmpl_with("seed", json!("seven")), 400).param("seed"),
        case("temperature is a string", CHAT, chat_with("temperature", json!("hot")), 400)
            .param("temperature"),
        // Numbers out of range.
        case("negative max_tokens", CHAT, chat_with("max_tokens", json!(-1)), 400)
            .param("max_tokens"),
        case("zero max_tokens", CMPL, cmpl_with("max_tokens", json!(0)), 400).param("max_tokens"),
        case("max_tokens beyond u64", CMPL, cmpl_with("max_tokens", json!(1e30)), 400)
            .param("max_tokens"),
        case("huge max_tokens", CHAT, chat_with("max_tokens", json!(1_000_000_000u64)), 400)
            .code("context_length_exceeded")
            .mentions(CONTEXT),
        case(
            "negative max_completion_tokens",
            CHAT,
            chat_with("max_completion_tokens", json!(-5)),
            400,
        )
        .param("max_completion_tokens"),
        case("temperature 5", CHAT, chat_with("temperature", json!(5)), 400)
            .param("temperature"),
        case("negative temperature", CMPL, cmpl_with("temperature", json!(-0.1)), 400)
            .param("temperature"),
        case("top_p 0", CHAT, chat_with("top_p", json!(0)), 400).param("top_p"),
        case("top_p 1.5", CMPL, cmpl_with("top_p", json!(1.5)), 400).param("top_p"),
        case("n 0", CHAT, chat_with("n", json!(0)), 400).param("n"),
        case("n 1000", CMPL, cmpl_with("n", json!(1000)), 400).param("n"),
        case("presence_penalty 3", CHAT, chat_with("presence_penalty", json!(3)), 400)
            .param("presence_penalty"),
        case("frequency_penalty -3", CMPL, cmpl_with("frequency_penalty", json!(-3)), 400)
            .param("frequency_penalty"),
        case("top_k -2", CHAT, chat_with("top_k", json!(-2)), 400).param("top_k"),
        case("min_p 2", CHAT, chat_with("min_p", json!(2)), 400).param("min_p"),
        case("repetition_penalty 0", CMPL, cmpl_with("repetition_penalty", json!(0)), 400)
            .param("repetition_penalty"),
        case("logit_bias token out of vocab", CHAT, chat_with("logit_bias", json!({"99999999": 1})), 400)
            .param("logit_bias"),
        case("logit_bias value 500", CHAT, chat_with("logit_bias", json!({"5": 500})), 400)
            .param("logit_bias"),
        case("top_logprobs 100", CHAT, {
            let mut b = chat_with("logprobs", json!(true));
            b["top_logprobs"] = json!(100);
            b
        }, 400)
        .param("top_logprobs"),
        case("too many stop sequences", CHAT, chat_with("stop", json!(vec!["x"; 100])), 400)
            .param("stop"),
        case("stop is a number", CMPL, cmpl_with("stop", json!(5)), 400).param("stop"),
        // Conversations the template cannot take.
        case("empty messages", CHAT, messages(json!([])), 400).param("messages"),
        case(
            "assistant last",
            CHAT,
            messages(json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])),
            400,
        )
        .param("messages"),
        case(
            "two users in a row",
            CHAT,
            messages(json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])),
            400,
        )
        .param("messages"),
        case(
            "system after user",
            CHAT,
            messages(json!([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}])),
            400,
        )
        .param("messages"),
        case(
            "starts with assistant",
            CHAT,
            messages(json!([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}])),
            400,
        )
        .param("messages"),
        case("unknown role", CHAT, messages(json!([{"role": "wizard", "content": "a"}])), 400)
            .param("messages[0].role"),
        case(
            "image content",
            CHAT,
            messages(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])),
            400,
        )
        .mentions("image"),
        // Parameters we cannot honour are refused by name.
        case(
            "tools",
            CHAT,
            chat_with("tools", json!([{"type": "function", "function": {"name": "f", "parameters": {}}}])),
            400,
        )
        .param("tools")
        .mentions("tools"),
        // `"auto"`/`"none"` without tools are harmless and some clients always send them.
        case("tool_choice required", CHAT, chat_with("tool_choice", json!("required")), 400)
            .param("tool_choice"),
        case(
            "response_format json",
            CHAT,
            chat_with("response_format", json!({"type": "json_object"})),
            400,
        )
        .param("response_format"),
        case(
            "echo with suffix",
            CMPL,
            json!({"model": "tiny-llama", "prompt": "Hi", "echo": true, "suffix": "x"}),
            400,
        )
        .param("echo"),
        case("suffix", CMPL, cmpl_with("suffix", json!("end")), 400).param("suffix"),
        // Prompts.
        case("prompt missing", CMPL, cmpl_with("prompt", Value::Null), 400),
        // An empty string is fine (BOS alone, as OpenAI allows); no tokens at all is not.
        case("empty token prompt", CMPL, cmpl_with("prompt", json!([])), 400).param("prompt"),
        case("empty prompt list", CMPL, cmpl_with("prompt", json!([[]])), 400).param("prompt"),
        case("token id out of vocab", CMPL, cmpl_with("prompt", json!([1, 99_999_999])), 400)
            .param("prompt"),
        case("negative token id", CMPL, cmpl_with("prompt", json!([1, -1])), 400).param("prompt"),
        case("mixed token ids", CMPL, cmpl_with("prompt", json!([1, "a"])), 400).param("prompt"),
        case("prompt is an object", CMPL, cmpl_with("prompt", json!({"a": 1})), 400)
            .param("prompt"),
        case("prompt over context", CMPL, cmpl_with("prompt", json!(long_prompt)), 400)
            .code("context_length_exceeded")
            .mentions(CONTEXT)
            .mentions(long_prompt_tokens),
        case("prompt + max_tokens over context", CMPL, cmpl_with("max_tokens", json!(CONTEXT)), 400)
            .code("context_length_exceeded")
            .mentions(CONTEXT)
            .mentions(CONTEXT + 2),
        // Unknown things.
        case("unknown model", CHAT, chat_with("model", json!("gpt-4")), 404)
            .param("model")
            .code("model_not_found")
            .mentions("gpt-4"),
        case("unknown model (completions)", CMPL, cmpl_with("model", json!("gpt-4")), 404)
            .code("model_not_found"),
        case("unknown route", "/v1/embeddings", json!({}), 404),
        case("unknown path", "/nope", json!({}), 404).method("GET"),
        case("GET on a POST route", CHAT, json!(null), 405).method("GET"),
        case("DELETE a model", "/v1/models/tiny-llama", json!(null), 405).method("DELETE"),
        // Transport.
        case("10 MB body", CMPL, json!(null), 413).raw("application/json", ten_mb),
        case("text/plain body", CHAT, json!(null), 415)
            .raw("text/plain", chat_with("stream", json!(false)).to_string()),
        case("form body", CMPL, json!(null), 415)
            .raw("application/x-www-form-urlencoded", "prompt=hi"),
        // Side routes.
        case("detokenize bad id", "/detokenize", json!({"tokens": [99_999_999]}), 400)
            .param("tokens"),
        case("tokenize neither prompt nor messages", "/tokenize", json!({}), 400),
    ]
}

/// Bodies above this go over a raw socket: see [`send_oversized`].
const RAW_SOCKET_ABOVE: usize = 1 << 20;

/// Uploads a body the server will refuse part-way. The server may answer 413
/// and close before the upload ends; an HTTP client library then reports the
/// failed write and drops the answer, so this writes and reads concurrently
/// and keeps whatever answer arrived.
async fn send_oversized(
    server: &Server,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut read, mut write) = stream.into_split();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let body = body.to_vec();
    let upload = tokio::spawn(async move {
        if write.write_all(head.as_bytes()).await.is_ok() {
            // A refused upload fails here; the answer is read below either way.
            let _ = write.write_all(&body).await;
        }
    });
    let mut answer = Vec::new();
    let read_all = read.read_to_end(&mut answer);
    // A reset after the answer arrived is fine; no answer at all is not.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), read_all).await;
    upload.abort();
    let text = String::from_utf8_lossy(&answer).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP answer: {text:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line: {head:?}"))?;
    Ok((status, body.to_string()))
}

async fn send(server: &Server, case: &Case) -> Result<(u16, String), String> {
    if let Body::Raw(content_type, bytes) = &case.body {
        if bytes.len() > RAW_SOCKET_ABOVE {
            return send_oversized(server, case.path, content_type, bytes).await;
        }
    }
    // A fresh connection per case: a 413 may close the connection mid-upload.
    let client = reqwest::Client::new();
    let url = server.url(case.path);
    let request = match case.method {
        "GET" => client.get(&url),
        "DELETE" => client.delete(&url),
        _ => client.post(&url),
    };
    let request = match &case.body {
        Body::Json(v) => request.json(v),
        Body::Raw(content_type, bytes) => request
            .header("content-type", *content_type)
            .body(bytes.clone()),
        Body::None => request,
    };
    let response = request.send().await.map_err(|e| format!("send: {e}"))?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| format!("body: {e}"))?;
    Ok((status, text))
}

fn check(case: &Case, status: u16, text: &str) -> Result<(), String> {
    if status != case.status {
        return Err(format!("status {status}, want {}: {text}", case.status));
    }
    let body: Value =
        serde_json::from_str(text).map_err(|e| format!("body is not JSON ({e}): {text:?}"))?;
    std::panic::catch_unwind(|| assert_openai_error(&body, case.name))
        .map_err(|_| format!("not an OpenAI error body: {body}"))?;
    let error = &body["error"];
    if error["type"] != case.kind {
        return Err(format!("type {}, want {}", error["type"], case.kind));
    }
    if let Some(param) = case.param {
        if error["param"].as_str() != param {
            return Err(format!("param {}, want {param:?}: {body}", error["param"]));
        }
    }
    if let Some(code) = case.code {
        if error["code"] != code {
            return Err(format!("code {}, want {code}: {body}", error["code"]));
        }
    }
    let message = error["message"].as_str().unwrap_or_default();
    for needle in &case.mentions {
        if !message.contains(needle.as_str()) {
            return Err(format!("message does not mention {needle:?}: {message}"));
        }
    }
    if message.contains(".rs:") || message.contains("panicked") {
        return Err(format!("message leaks internals: {message}"));
    }
    Ok(())
}

#[tokio::test]
async fn bad_requests_get_openai_errors() {
    let server = Server::start().await.unwrap();

    // A prompt longer than the context, with its exact token count for the message check.
    let long_prompt = "hello world ".repeat(300);
    let counted = server
        .post_json("/tokenize", &json!({"prompt": long_prompt}))
        .await
        .unwrap();
    assert_eq!(counted.status, 200, "{}", counted.text);
    let long_tokens = counted.body["count"].as_u64().unwrap();
    assert!(long_tokens > CONTEXT, "{long_tokens}");
    assert_eq!(counted.body["max_model_len"].as_u64(), Some(CONTEXT));

    let cases = table(&long_prompt, long_tokens);
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for case in &cases {
        let outcome = match send(&server, case).await {
            Ok((status, text)) => check(case, status, &text),
            Err(e) => Err(e),
        };
        if let Err(why) = outcome {
            failures.push(format!(
                "{} ({} {}): {why}",
                case.name, case.method, case.path
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );

    // Still serving, and nothing is left running in the engine.
    let good = server
        .post_json(
            CHAT,
            &json!({"model": "tiny-llama", "messages": user(), "max_tokens": 3, "temperature": 0}),
        )
        .await
        .unwrap();
    assert_eq!(good.status, 200, "{}", good.text);
    assert_eq!(good.body["usage"]["completion_tokens"], 3);
    let health = server.get_json("/health").await.unwrap();
    assert_eq!(health.status, 200);
    server
        .wait_idle(std::time::Duration::from_secs(10))
        .await
        .unwrap();
}

#[tokio::test]
async fn streaming_requests_fail_before_the_stream_starts() {
    // Validation must happen before the 200 and the SSE headers go out:
    // afterwards the client could only get an in-band error event.
    let server = Server::start().await.unwrap();
    let reply = server
        .post_json(CHAT, &{
            let mut b = chat_with("temperature", json!(5));
            b["stream"] = json!(true);
            b
        })
        .await
        .unwrap();
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(
        reply.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        reply.headers
    );
    assert_openai_error(&reply.body, "streamed temperature 5");
}
