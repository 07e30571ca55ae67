//! Load balancer: two replicas behind nginx running the repository's own
//! `deploy/nginx/nginx.conf` (the file docker-compose mounts), rendered with
//! loopback ports. Streams arrive through nginx incrementally (no proxy
//! buffering); after one replica is SIGKILLed mid-load, later requests all
//! succeed on the other. Skipped (with a message) when nginx is not installed.

mod ops_support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use e2e::{Server, SseReader};
use ops_support::stream_chat;

fn nginx_binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([
            PathBuf::from("/usr/sbin/nginx"),
            PathBuf::from("/usr/local/sbin/nginx"),
        ])
        .find(|p| p.is_file())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// nginx in the foreground on a private prefix; killed on drop.
struct Nginx {
    child: Child,
    port: u16,
    prefix: PathBuf,
}

impl Nginx {
    fn start(upstream_ports: &[u16]) -> anyhow::Result<Nginx> {
        let bin = nginx_binary().context("nginx not found")?;
        let port = free_port()?;
        let prefix = std::env::temp_dir().join(format!(
            "llama-serve-ops-nginx-{}-{}",
            std::process::id(),
            port
        ));
        std::fs::create_dir_all(&prefix)?;
        let template =
            std::fs::read_to_string(e2e::workspace_root().join("deploy/nginx/nginx.conf"))?;
        let upstreams: String = upstream_ports
            .iter()
            .map(|p| format!("server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;\n        "))
            .collect();
        let conf = template
            .replace("${LLAMA_UPSTREAMS}", &upstreams)
            .replace("${LISTEN_PORT}", &format!("127.0.0.1:{port}"))
            .replace("${NGINX_PREFIX}", prefix.to_str().context("temp path")?);
        assert!(!conf.contains("${"), "unsubstituted placeholder in\n{conf}");
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(bin)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .arg("-e")
            .arg(prefix.join("error.log"))
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("spawning nginx")?;
        Ok(Nginx {
            child,
            port,
            prefix,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }

    async fn wait_up(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client.get(self.url("/health")).send().await {
                if r.status() == 200 {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("nginx not proxying /health\n{}", self.error_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}

/// One stream through nginx: (time to first data chunk, time to [DONE], chunks).
async fn timed_stream(
    client: &reqwest::Client,
    url: &str,
    max_tokens: u32,
) -> anyhow::Result<(Duration, Duration, usize)> {
    let start = Instant::now();
    let response = client
        .post(url)
        .json(&stream_chat("Tell me a story", max_tokens))
        .send()
        .await?;
    if response.status() != 200 {
        bail!(
            "status {}: {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    let mut reader = SseReader::new(response);
    let mut first = None;
    let mut chunks = 0;
    loop {
        match reader.next_data().await? {
            Some(d) if d == "[DONE]" => break,
            Some(_) => {
                first.get_or_insert_with(|| start.elapsed());
                chunks += 1;
            }
            None => bail!("stream ended without [DONE] after {chunks} chunks"),
        }
    }
    Ok((first.context("no chunk")?, start.elapsed(), chunks))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_streams_incrementally_and_survives_a_dead_replica() -> anyhow::Result<()> {
    if nginx_binary().is_none() {
        eprintln!("SKIPPED: nginx is not installed (scripts/test.sh installs it)");
        return Ok(());
    }
    let a = Server::start().await?;
    let b = Server::start().await?;
    let nginx = Nginx::start(&[a.port(), b.port()])?;
    let client = reqwest::Client::new();
    nginx.wait_up(&client).await?;
    let url = nginx.url("/v1/chat/completions");

    // Incremental delivery: the first chunk arrives well before the stream ends.
    let (first, done, chunks) = timed_stream(&client, &url, 200).await?;
    eprintln!("through nginx: first chunk {first:?}, [DONE] {done:?}, {chunks} chunks");
    assert!(chunks > 100);
    assert!(
        first < done,
        "first chunk {first:?} not before the end {done:?}"
    );
    assert!(done - first > Duration::ZERO);

    // Mid-load: 16 streams in flight, then replica A dies.
    let mut in_flight = Vec::new();
    for _ in 0..16 {
        let client = client.clone();
        let url = url.clone();
        in_flight.push(tokio::spawn(async move {
            timed_stream(&client, &url, 200).await
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.signal(libc::SIGKILL)?;
    let mut survived = 0;
    for task in in_flight {
        // Streams on the killed replica may break; none may hang.
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .context("a stream hung after the replica died")?
        {
            survived += 1;
        }
    }
    eprintln!("{survived}/16 in-flight streams completed across the kill");

    // Every later request succeeds (nginx retries the dead upstream's refused connections).
    for i in 0..20 {
        let (first, done, chunks) = timed_stream(&client, &url, 16)
            .await
            .with_context(|| format!("request {i} after the kill\n{}", nginx.error_log()))?;
        assert!(chunks >= 16 && first <= done);
    }
    b.wait_idle(Duration::from_secs(10)).await?;
    Ok(())
}
