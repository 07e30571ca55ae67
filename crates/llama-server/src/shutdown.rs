//! Signals and graceful drain.

/// Resolves on the first SIGTERM or SIGINT. A second one ends the process at
/// once, for an operator who does not want to wait for the drain.
pub async fn signal() {
    wait_for_signal().await;
    tracing::info!("shutdown signal received: draining (send it again to exit now)");
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting without waiting for in-flight requests");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
