//! The harness itself: start, answer, SIGTERM, exit status.

use std::time::Duration;

use e2e::Server;

#[tokio::test]
async fn starts_answers_and_exits_cleanly_on_sigterm() {
    let mut server = Server::start().await.unwrap();
    let health = server.get_json("/health").await.unwrap();
    assert_eq!(health.status, 200, "{}", health.text);
    let status = server.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "exit {status:?}\n{}", server.stderr());
}
