//! End-to-end harness: starts the real `llama-serve` binary on 127.0.0.1 with
//! an OS-chosen port and talks to it over real HTTP.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let server = e2e::Server::builder().arg("--api-key").arg("k1").start().await?;
//! let reply = server.post_json("/v1/completions", &serde_json::json!({"prompt": "Hi"})).await?;
//! assert_eq!(reply.status, 401);
//! # Ok(()) }
//! ```
//!
//! Every test gets its own process (ports never collide, a crash stays local);
//! the tiny model loads in well under a second, so this is cheap.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use futures::StreamExt;
use serde_json::Value;

pub use reqwest::{header::HeaderMap, StatusCode};

/// How long a fresh server may take to print its port and turn ready. Generous
/// because a 2-core CI box may be compiling something else at the same time.
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(120);

/// The workspace root (`tests/..`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A file under `tests/fixtures/`, parsed as JSON.
pub fn fixture_json(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading fixture {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// The profile directory (`target/debug` or `target/release`) this test binary
/// was built into. Test binaries live in `<profile>/deps/`, so this follows
/// `CARGO_TARGET_DIR`, `--target-dir` and `--release` without being told.
fn profile_dir_of_current_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let deps = exe.parent()?;
    if deps.file_name()? != "deps" {
        return None;
    }
    Some(deps.parent()?.to_path_buf())
}

fn is_release(profile_dir: &Path) -> bool {
    profile_dir.file_name().is_some_and(|n| n == "release")
}

fn bin_name() -> &'static str {
    if cfg!(windows) {
        "llama-serve.exe"
    } else {
        "llama-serve"
    }
}

/// The newest modification time of the sources the binary is built from.
/// Cheap (a few hundred files) and avoids testing a stale binary after an
/// edit to another crate when the caller did not rebuild it.
fn newest_source_mtime() -> Option<SystemTime> {
    fn walk(dir: &Path, newest: &mut Option<SystemTime>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, newest);
            } else if let Ok(m) = entry.metadata().and_then(|m| m.modified()) {
                if newest.is_none_or(|n| m > n) {
                    *newest = Some(m);
                }
            }
        }
    }
    let root = workspace_root();
    let mut newest = None;
    // The chat page's files are compiled into the binary too (`include_bytes!`).
    walk(&root.join("crates/llama-server/web"), &mut newest);
    for krate in ["llama-model", "llama-engine", "llama-server"] {
        walk(&root.join("crates").join(krate).join("src"), &mut newest);
        if let Ok(m) = std::fs::metadata(root.join("crates").join(krate).join("Cargo.toml"))
            .and_then(|m| m.modified())
        {
            newest = newest.max(Some(m));
        }
    }
    newest
}

fn cargo_build(release: bool) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "-p", "llama-server", "--bin", "llama-serve"]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .context("running cargo build -p llama-server")?;
    if !status.success() {
        bail!("cargo build -p llama-server --bin llama-serve failed: {status}");
    }
    Ok(())
}

/// Path of the `llama-serve` binary, built (once per test process) when it is
/// missing or older than the server's sources. `LLAMA_SERVE_BIN` overrides.
pub fn server_binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn locate_or_build() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("LLAMA_SERVE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let profile_dir = profile_dir_of_current_exe().unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join("target"))
            .join("debug")
    });
    let bin = profile_dir.join(bin_name());
    let stale = match std::fs::metadata(&bin).and_then(|m| m.modified()) {
        Err(_) => true,
        Ok(built) => newest_source_mtime().is_some_and(|src| src > built),
    };
    if stale {
        cargo_build(is_release(&profile_dir))?;
    }
    if !bin.is_file() {
        bail!("{} not found after cargo build", bin.display());
    }
    Ok(bin)
}

/// Output a child writes, kept for assertions and for failure messages.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<String>>);

impl Captured {
    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    fn push_line(&self, line: &str) {
        let mut s = self.0.lock().unwrap();
        s.push_str(line);
        s.push('\n');
    }
}

/// Starts a server: `Server::builder().arg(..).env(..).start().await`.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    args: Vec<String>,
    envs: Vec<(String, String)>,
    wait_ready: bool,
    start_timeout: Duration,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self {
            args: Vec::new(),
            envs: Vec::new(),
            wait_ready: true,
            start_timeout: DEFAULT_START_TIMEOUT,
        }
    }
}

impl ServerBuilder {
    /// An extra command-line argument (after `--host 127.0.0.1 --port 0`, so a
    /// later `--port`/`--host` wins where clap allows it).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the child (the rest of the environment is
    /// inherited, except `LLAMA_SERVE_*`, which is cleared so the developer's
    /// shell cannot change what a test sees).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Return as soon as the port is printed, without waiting for `/ready`
    /// (for tests of the not-ready state).
    pub fn no_wait_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }

    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.start_timeout = timeout;
        self
    }

    pub async fn start(self) -> anyhow::Result<Server> {
        let bin = tokio::task::spawn_blocking(server_binary).await??;
        let mut cmd = Command::new(&bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("LLAMA_SERVE_") {
                cmd.env_remove(key);
            }
        }
        // Tests never touch the network; a typo'd --model must not start a download.
        cmd.env("HF_HUB_OFFLINE", "1");
        cmd.envs(self.envs.iter().map(|(k, v)| (k, v)));
        cmd.current_dir(workspace_root())
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;

        let stdout = Captured::default();
        let stderr = Captured::default();
        let (port_tx, port_rx) = mpsc::channel::<u16>();
        spawn_reader(child.stdout.take().unwrap(), stdout.clone(), Some(port_tx));
        spawn_reader(child.stderr.take().unwrap(), stderr.clone(), None);

        let deadline = Instant::now() + self.start_timeout;
        let port = loop {
            match port_rx.try_recv() {
                Ok(port) => break port,
                Err(mpsc::TryRecvError::Disconnected) | Err(mpsc::TryRecvError::Empty)
                    if matches!(child.try_wait(), Ok(Some(_))) =>
                {
                    // Let the readers drain what the process said before it died.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    bail!(
                        "llama-serve exited before listening ({:?})\nstdout:\n{}\nstderr:\n{}",
                        child.try_wait().ok().flatten(),
                        stdout.text(),
                        stderr.text()
                    );
                }
                _ if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!(
                        "llama-serve printed no port within {:?}\nstdout:\n{}\nstderr:\n{}",
                        self.start_timeout,
                        stdout.text(),
                        stderr.text()
                    );
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };

        let server = Server {
            child: Some(child),
            port,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            stdout,
            stderr,
            exit: None,
        };
        if self.wait_ready {
            server.wait_ready(deadline).await?;
        }
        Ok(server)
    }
}

/// Copies the child's lines into `sink`; the first `listening on http://...`
/// line also yields the port.
fn spawn_reader(
    pipe: impl Read + Send + 'static,
    sink: Captured,
    port_tx: Option<mpsc::Sender<u16>>,
) {
    std::thread::spawn(move || {
        let mut port_tx = port_tx;
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            sink.push_line(&line);
            if let Some(port) = parse_listening_port(&line) {
                if let Some(tx) = port_tx.take() {
                    let _ = tx.send(port);
                }
            }
        }
    });
}

/// `llama-serve listening on http://127.0.0.1:PORT` → PORT.
pub fn parse_listening_port(line: &str) -> Option<u16> {
    let rest = line.split("listening on http://").nth(1)?;
    rest.trim()
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// A running `llama-serve`. Killed (SIGKILL) when dropped, unless it already exited.
pub struct Server {
    child: Option<Child>,
    port: u16,
    base: String,
    client: reqwest::Client,
    stdout: Captured,
    stderr: Captured,
    exit: Option<ExitStatus>,
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// The bundled tiny model with default settings.
    pub async fn start() -> anyhow::Result<Server> {
        Self::builder().start().await
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `http://127.0.0.1:PORT/v1`, what OpenAI clients take as `base_url`.
    pub fn openai_base(&self) -> String {
        format!("{}/v1", self.base)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A shared client (connection pool) for this server.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Everything the server wrote to stdout / stderr so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    async fn wait_ready(&self, deadline: Instant) -> anyhow::Result<()> {
        loop {
            if let Ok(r) = self.client.get(self.url("/ready")).send().await {
                if r.status() == StatusCode::OK {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("llama-serve not ready in time\nstderr:\n{}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// GET a path, parse the JSON body (Null if it is not JSON).
    pub async fn get_json(&self, path: &str) -> anyhow::Result<JsonReply> {
        JsonReply::read(self.client.get(self.url(path)).send().await?).await
    }

    /// The `/metrics` page, as Prometheus scrapes it.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .client
            .get(self.url("/metrics"))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// POST a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<reqwest::Response> {
        Ok(self.client.post(self.url(path)).json(body).send().await?)
    }

    /// POST a JSON body and parse the JSON answer.
    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<JsonReply> {
        JsonReply::read(self.post(path, body).await?).await
    }

    /// POST a JSON body with `stream: true` expected to answer SSE; returns the
    /// raw `data:` payloads up to and excluding `[DONE]`.
    pub async fn post_sse(&self, path: &str, body: &Value) -> anyhow::Result<Vec<String>> {
        let response = self.post(path, body).await?;
        let status = response.status();
        if status != StatusCode::OK {
            bail!(
                "{path}: {status}: {}",
                response.text().await.unwrap_or_default()
            );
        }
        sse_data_until_done(response).await
    }

    /// Sends SIGTERM (graceful drain) without waiting.
    pub fn sigterm(&self) -> anyhow::Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// Sends any signal (e.g. `libc::SIGINT`) without waiting.
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        let pid = self.pid().context("server already reaped")?;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own unreaped child, so it cannot have been recycled.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        if rc != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        if let Some(status) = self.exit {
            return Ok(Some(status));
        }
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("no child")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.exit = Some(status);
                return Ok(Some(status));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, then the exit status (error if it does not exit within `timeout`).
    pub async fn terminate(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        self.sigterm()?;
        self.wait_exit(timeout).await?.ok_or_else(|| {
            anyhow!(
                "llama-serve still running {timeout:?} after SIGTERM\nstderr:\n{}",
                self.stderr()
            )
        })
    }

    /// `/ready`'s JSON (it carries the engine's `running` and `waiting`).
    pub async fn ready_stats(&self) -> anyhow::Result<Value> {
        Ok(self.get_json("/ready").await?.body)
    }

    /// Polls `/ready` until `running` and `waiting` are both 0.
    pub async fn wait_idle(&self, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self.ready_stats().await?;
            if stats["running"] == 0 && stats["waiting"] == 0 {
                return Ok(stats);
            }
            if Instant::now() > deadline {
                bail!("engine not idle after {timeout:?}: {stats}");
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.exit.is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

/// A response's status, headers and JSON body (`Value::Null` when the body is
/// not JSON; `text` keeps it verbatim).
#[derive(Debug, Clone)]
pub struct JsonReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
    pub body: Value,
}

impl JsonReply {
    pub async fn read(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Ok(Self {
            status,
            headers,
            text,
            body,
        })
    }
}

/// Reads a Server-Sent Events body incrementally, one event at a time.
/// Dropping it closes the connection (a client disconnect).
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: Vec<u8>,
    /// Every byte received so far, for framing assertions.
    pub raw: Vec<u8>,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            stream: response.bytes_stream().boxed(),
            buf: Vec::new(),
            raw: Vec::new(),
        }
    }

    /// The next event block, without its terminating blank line (`None` at
    /// end of body). Comment-only blocks (keep-alives) are returned too.
    pub async fn next_event(&mut self) -> anyhow::Result<Option<String>> {
        loop {
            if let Some(end) = find(&self.buf, b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text =
                    String::from_utf8(block[..end].to_vec()).context("SSE event is not UTF-8")?;
                return Ok(Some(text));
            }
            match self.stream.next().await {
                Some(chunk) => {
                    let chunk = chunk?;
                    self.raw.extend_from_slice(&chunk);
                    self.buf.extend_from_slice(&chunk);
                }
                None if self.buf.is_empty() => return Ok(None),
                None => bail!(
                    "SSE body ended inside an event: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    /// The next `data:` payload, skipping comments; `None` at end of body.
    pub async fn next_data(&mut self) -> anyhow::Result<Option<String>> {
        while let Some(event) = self.next_event().await? {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                return Ok(Some(data.join("\n")));
            }
        }
        Ok(None)
    }

    /// `data:` payloads until `[DONE]` (excluded); error if the body ends first.
    pub async fn data_until_done(&mut self) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        loop {
            match self.next_data().await? {
                Some(d) if d == "[DONE]" => return Ok(out),
                Some(d) => out.push(d),
                None => bail!("SSE body ended without [DONE] after {out:?}"),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The raw `data:` payloads of an SSE response until `[DONE]` (excluded).
pub async fn sse_data_until_done(response: reqwest::Response) -> anyhow::Result<Vec<String>> {
    SseReader::new(response).data_until_done().await
}

/// Parses each payload as JSON.
pub fn parse_chunks(data: &[String]) -> Vec<Value> {
    data.iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("chunk {d:?} is not JSON: {e}")))
        .collect()
}

/// Asserts an OpenAI error body: `{"error": {"message", "type", "param", "code"}}`
/// with all four keys present and `message`/`type` non-empty strings.
pub fn assert_openai_error(body: &Value, context: &str) {
    let error = body
        .get("error")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{context}: no error object in {body}"));
    for key in ["message", "type", "param", "code"] {
        assert!(
            error.contains_key(key),
            "{context}: error lacks `{key}`: {body}"
        );
    }
    for key in ["message", "type"] {
        assert!(
            error[key].as_str().is_some_and(|s| !s.is_empty()),
            "{context}: error.{key} is not a non-empty string: {body}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening_port("llama-serve listening on http://127.0.0.1:43121"),
            Some(43121)
        );
        assert_eq!(
            parse_listening_port("llama-serve listening on http://[::1]:80"),
            Some(80)
        );
        assert_eq!(parse_listening_port("loading model"), None);
    }
}
