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

/// `--kernels generic` (plain Candle ops, the escape hatch from the fused
/// kernels) answers exactly as the default fused kernels; a kernel set that
/// does not exist stops the server at startup, naming the flag.
#[tokio::test]
async fn plain_kernels_answer_as_the_fused_ones() {
    let body = serde_json::json!({
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "Tell me a story about a llama."}],
        "max_tokens": 40,
        "temperature": 0,
    });
    let mut answers = Vec::new();
    // CUDA graphs asked for on the CPU: nothing to record, the same answer;
    // tokens sent while the next step runs (forced on the CPU): the same answer.
    for args in [
        [
            "--kernels",
            "auto",
            "--cuda-graphs",
            "on",
            "--overlap",
            "auto",
        ],
        [
            "--kernels",
            "generic",
            "--cuda-graphs",
            "off",
            "--overlap",
            "on",
        ],
    ] {
        let mut server = Server::builder().args(args).start().await.unwrap();
        let reply = server
            .post_json("/v1/chat/completions", &body)
            .await
            .unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text);
        assert_eq!(
            reply.body["usage"]["completion_tokens"], 40,
            "{}",
            reply.text
        );
        answers.push(reply.body["choices"][0]["message"]["content"].clone());
        let metrics = server.metrics().await.unwrap();
        assert!(
            metrics.contains("\nllama_serve_cuda_graph_steps_total 0\n"),
            "{metrics}"
        );
        server.terminate(Duration::from_secs(30)).await.unwrap();
    }
    assert_eq!(answers[0], answers[1]);

    let err = startup_error(&["--cuda-graphs", "yes"]).await;
    assert!(err.contains("--cuda-graphs: on or off"), "{err}");

    let err = startup_error(&["--overlap", "maybe"]).await;
    assert!(err.contains("--overlap: auto, on or off"), "{err}");

    let err = startup_error(&["--kernels", "flash"]).await;
    assert!(err.contains("exited before listening"), "{err}");
    assert!(
        err.contains("--kernels: auto, generic or cuda-cores"),
        "{err}"
    );
}

/// What the server said when it refused to start with `args`.
async fn startup_error(args: &[&str]) -> String {
    Server::builder()
        .args(args.iter().copied())
        .start()
        .await
        .err()
        .unwrap_or_else(|| panic!("{args:?} must stop the server"))
        .to_string()
}
