//! The built-in chat page at `/` (`--web-ui on|off`).
//!
//! Over HTTP: the page and its assets, their headers, no key needed for them
//! while the API still wants one, and `--web-ui off` turning them into 404s.
//!
//! In a real browser: `tests/web/ui.test.mjs` drives Debian's Chromium
//! (playwright-core, headless) against four servers started here, then this
//! test checks what the page reported against the API itself: every answer
//! the page streamed equals the non-streamed answer to the same request (same
//! seed). Screenshots land in `target/web-ui-screenshots/`. Without Chromium
//! or `tests/web/node_modules` the browser test is skipped with a message,
//! except under CI (`CI` set), where it fails: `scripts/test.sh` installs both.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::{assert_openai_error, Server, StatusCode};
use serde_json::{json, Value};

const API_KEY: &str = "web-ui-test-key";

const ASSETS: [(&str, &str); 6] = [
    ("/", "text/html; charset=utf-8"),
    ("/app.js", "text/javascript; charset=utf-8"),
    ("/api.js", "text/javascript; charset=utf-8"),
    ("/markdown.js", "text/javascript; charset=utf-8"),
    ("/app.css", "text/css; charset=utf-8"),
    ("/favicon.svg", "image/svg+xml"),
];

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn the_page_and_its_assets_are_served_without_a_key() {
    let server = Server::builder()
        .args(["--api-key", API_KEY])
        .start()
        .await
        .unwrap();
    let client = server.client();
    for (path, content_type) in ASSETS {
        let response = client.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        assert_eq!(
            header(&response, "content-type"),
            Some(content_type),
            "{path}"
        );
        assert_eq!(
            header(&response, "cache-control"),
            Some("no-cache"),
            "{path}"
        );
        assert_eq!(header(&response, "x-content-type-options"), Some("nosniff"));
        let etag = header(&response, "etag").expect("an ETag").to_string();
        let csp = header(&response, "content-security-policy").map(str::to_string);
        let body = response.text().await.unwrap();
        assert!(!body.is_empty(), "{path}");
        if path == "/" {
            let csp = csp.expect("the page has a Content-Security-Policy");
            assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"));
            assert!(!csp.contains("unsafe-inline"), "{csp}");
            assert!(body.contains(r#"<script type="module" src="app.js"></script>"#));
        }

        // Revalidation: the same ETag gets a bodiless 304.
        let again = client
            .get(server.url(path))
            .header("if-none-match", &etag)
            .send()
            .await
            .unwrap();
        assert_eq!(again.status(), StatusCode::NOT_MODIFIED, "{path}");
        assert!(again.text().await.unwrap().is_empty());

        let head = client.head(server.url(path)).send().await.unwrap();
        assert_eq!(head.status(), StatusCode::OK, "HEAD {path}");
    }

    // The page is public; the API it calls is not.
    let models = server.get_json("/v1/models").await.unwrap();
    assert_eq!(models.status, StatusCode::UNAUTHORIZED, "{}", models.text);
    let with_key = client
        .get(server.url("/v1/models"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(with_key.status(), StatusCode::OK);

    let post = server.post_json("/", &json!({})).await.unwrap();
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_openai_error(&post.body, "POST /");
}

#[tokio::test]
async fn web_ui_off_makes_the_page_a_404() {
    let by_flag = Server::builder().args(["--web-ui", "off"]).start();
    let by_env = Server::builder().env("LLAMA_SERVE_WEB_UI", "off").start();
    let (by_flag, by_env) = tokio::try_join!(by_flag, by_env).unwrap();
    for server in [by_flag, by_env] {
        let unknown = server.get_json("/no-such-page").await.unwrap();
        for (path, _) in ASSETS {
            let reply = server.get_json(path).await.unwrap();
            assert_eq!(
                reply.status,
                StatusCode::NOT_FOUND,
                "{path}: {}",
                reply.text
            );
            assert_openai_error(&reply.body, path);
            // Exactly what any unknown path gets.
            assert_eq!(reply.body["error"]["code"], unknown.body["error"]["code"]);
            assert!(!reply.headers.contains_key("content-security-policy"));
        }
        let models = server.get_json("/v1/models").await.unwrap();
        assert_eq!(models.status, StatusCode::OK, "the API stays on");
    }
}

/// `CI` set to anything but empty, `0` or `false`.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

struct BrowserKit {
    node: PathBuf,
    chromium: PathBuf,
    dir: PathBuf,
}

fn browser_kit() -> Result<BrowserKit, String> {
    let dir = e2e::workspace_root().join("tests").join("web");
    let chromium = std::env::var_os("WEB_UI_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    if !chromium.is_file() {
        return Err(format!(
            "{} is missing (apt-get install chromium)",
            chromium.display()
        ));
    }
    let node = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("node"))
        .find(|p| p.is_file())
        .ok_or("node is not installed")?;
    if !dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return Err("tests/web/node_modules is missing (cd tests/web && npm ci)".into());
    }
    Ok(BrowserKit {
        node,
        chromium,
        dir,
    })
}

fn screenshot_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| e2e::workspace_root().join("target"))
        .join("web-ui-screenshots")
}

/// A PNG's width and height, from its IHDR chunk.
fn png_size(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[..8] != b"\x89PNG\r\n\x1a\n" || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn chat_in_a_real_browser() {
    let kit = match browser_kit() {
        Ok(kit) => kit,
        Err(why) if in_ci() => panic!("the browser test cannot run under CI: {why}"),
        Err(why) => {
            eprintln!("skipping the browser test of the chat page: {why}");
            return;
        }
    };

    let (main, slow, keyed, timeout) = tokio::try_join!(
        Server::start(),
        // Slow enough on a CPU (tens of tokens a second) to press Stop mid-answer.
        Server::builder().args(["--model", "random:134m"]).start(),
        Server::builder()
            .args(["--api-key", API_KEY, "--max-queue", "0"])
            .start(),
        Server::builder()
            .args(["--request-timeout", "0.15"])
            .start(),
    )
    .unwrap();

    let shots = screenshot_dir();
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let report_path = shots.join("report.json");

    let started = Instant::now();
    let child = tokio::process::Command::new(&kit.node)
        .arg("ui.test.mjs")
        .current_dir(&kit.dir)
        .env("WEB_UI_BASE", main.base_url())
        .env("WEB_UI_SLOW_BASE", slow.base_url())
        .env("WEB_UI_KEYED_BASE", keyed.base_url())
        .env("WEB_UI_API_KEY", API_KEY)
        .env("WEB_UI_TIMEOUT_BASE", timeout.base_url())
        .env("WEB_UI_SCREENSHOTS", &shots)
        .env("WEB_UI_REPORT", &report_path)
        .env("WEB_UI_CHROMIUM", &kit.chromium)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("starting node");
    let output = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("the browser tests ran for more than 3 minutes")
        .expect("waiting for node");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "browser tests failed ({}); screenshots in {}\n{log}\n--- main server stderr:\n{}",
        output.status,
        shots.display(),
        main.stderr()
    );
    println!("{log}browser tests took {:?}", started.elapsed());

    // Every answer the page streamed, asked again without streaming.
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&report_path).unwrap()).unwrap();
    let answers = report["exchange"]["answers"].as_array().unwrap();
    assert_eq!(answers.len(), 4, "{report}");
    for (i, answer) in answers.iter().enumerate() {
        let mut request = answer["request"].clone();
        assert_eq!(request["stream"], true);
        assert_eq!(request["stream_options"], json!({"include_usage": true}));
        assert!(request["seed"].is_i64(), "the page sent a seed: {request}");
        let object = request.as_object_mut().unwrap();
        object.remove("stream");
        object.remove("stream_options");
        let reply = main
            .post_json("/v1/chat/completions", &request)
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
        assert_eq!(
            answer["content"], reply.body["choices"][0]["message"]["content"],
            "answer {i}: the page's streamed text differs from the API's answer to {request}"
        );
        assert_eq!(
            answer["completionTokens"], reply.body["usage"]["completion_tokens"],
            "answer {i}"
        );
    }
    assert_eq!(report["exchange"]["clipboard"], answers[0]["content"]);

    // The two stops cancelled two generations, and nothing is left running.
    let metrics = slow.metrics().await.unwrap();
    assert_eq!(sample(&metrics, "llama_serve_num_requests_running"), 0.0);
    assert_eq!(
        sample(
            &metrics,
            "llama_serve_engine_requests_total{outcome=\"cancelled\"}"
        ),
        2.0,
        "{metrics}"
    );

    for (name, size) in [("desktop.png", (1280, 800)), ("mobile.png", (390, 844))] {
        let bytes = std::fs::read(shots.join(name)).unwrap();
        assert_eq!(png_size(&bytes), Some(size), "{name}");
    }
}
