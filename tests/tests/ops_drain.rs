//! Graceful drain: SIGTERM while 10 streams are in flight. Every stream still
//! ends with `[DONE]`, a request sent after the signal gets 503 (or a refused
//! connection once the listener has closed), and the process exits 0 within
//! the shutdown timeout.

mod ops_support;

use std::time::{Duration, Instant};

use e2e::{Server, SseReader};
use ops_support::stream_chat;

const STREAMS: usize = 10;
const SHUTDOWN_TIMEOUT_S: u64 = 20;

#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_exits_zero() -> anyhow::Result<()> {
    let mut server = Server::builder()
        .args(["--shutdown-timeout", &SHUTDOWN_TIMEOUT_S.to_string()])
        .start()
        .await?;

    // Open 10 streams and read each one's first chunk: all are in flight.
    let mut readers = Vec::new();
    for i in 0..STREAMS {
        let response = server
            .post(
                "/v1/chat/completions",
                &stream_chat(&format!("Story number {i}"), 100),
            )
            .await?;
        assert_eq!(response.status(), 200);
        let mut reader = SseReader::new(response);
        let first = reader.next_data().await?.expect("a first chunk");
        assert_ne!(first, "[DONE]");
        readers.push(reader);
    }

    let signalled = Instant::now();
    server.sigterm()?;
    // The clients keep reading slowly: the streams are still open after the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A new client (no pooled connection) after the signal: 503 or refused.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    match fresh
        .post(server.url("/v1/chat/completions"))
        .json(&stream_chat("too late", 5))
        .send()
        .await
    {
        Ok(response) => assert_eq!(
            response.status(),
            503,
            "a request after SIGTERM must be refused: {:?}",
            response.text().await
        ),
        Err(e) => assert!(
            e.is_connect(),
            "a request after SIGTERM: expected 503 or connection refused, got {e:?}"
        ),
    }

    let mut tasks = Vec::new();
    for mut reader in readers {
        tasks.push(tokio::spawn(async move {
            let rest = reader.data_until_done().await?;
            anyhow::ensure!(!rest.is_empty(), "no chunk after the signal");
            let last: serde_json::Value = serde_json::from_str(rest.last().unwrap())?;
            anyhow::ensure!(
                last["choices"][0]["finish_reason"] == "length",
                "stream did not finish normally: {last}"
            );
            Ok::<_, anyhow::Error>(())
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(SHUTDOWN_TIMEOUT_S), task)
            .await
            .map_err(|_| anyhow::anyhow!("stream {i} hung during the drain"))???;
    }

    let status = server
        .wait_exit(Duration::from_secs(SHUTDOWN_TIMEOUT_S + 5))
        .await?
        .unwrap_or_else(|| panic!("still running after the drain\n{}", server.stderr()));
    let took = signalled.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "exit status {status:?}\n{}",
        server.stderr()
    );
    assert!(
        took < Duration::from_secs(SHUTDOWN_TIMEOUT_S),
        "exit took {took:?}, longer than the shutdown timeout"
    );
    eprintln!("drained {STREAMS} streams and exited 0 in {took:?} after SIGTERM");
    Ok(())
}
