//! Text ↔ token work (prompt encoding, chat templates, `/tokenize`) on a
//! small fixed pool of threads, off the async workers. A fixed pool rather
//! than tokio's blocking threads (up to 512 of them) keeps the memory any
//! per-thread state of the tokenizer may hold bounded by a few threads, and
//! a burst of long prompts cannot start hundreds of threads at once.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// The threads a server gets by default: tokenization is short and the
/// model, not the tokenizer, should have the cores.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

pub struct CodecPool {
    pool: rayon::ThreadPool,
}

/// The job panicked; the panic message, for the log.
#[derive(Debug, thiserror::Error)]
#[error("a tokenizer job panicked: {0}")]
pub struct JobPanicked(pub String);

impl CodecPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("llama-serve-codec-{i}"))
            .build()
            .map_err(std::io::Error::other)?;
        Ok(Self { pool })
    }

    /// Runs `job` on the pool and waits for it without blocking the caller's
    /// async worker. A panic in `job` comes back as an error (rayon would
    /// otherwise abort the process).
    pub async fn run<T, F>(&self, job: F) -> Result<T, JobPanicked>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pool.spawn(move || {
            let result = catch_unwind(AssertUnwindSafe(job)).map_err(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                JobPanicked(message)
            });
            // The caller may have gone (a cancelled request): nothing to do.
            let _ = tx.send(result);
        });
        rx.await
            .unwrap_or_else(|_| Err(JobPanicked("the codec pool dropped the job".into())))
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_on_the_pool_threads_and_panics_come_back() {
        let pool = CodecPool::new(2).unwrap();
        assert_eq!(pool.threads(), 2);
        let name = pool
            .run(|| std::thread::current().name().unwrap_or("").to_string())
            .await
            .unwrap();
        assert!(name.starts_with("llama-serve-codec-"), "{name}");
        let err = pool.run(|| -> u32 { panic!("boom") }).await.unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        // Still serving after a panic.
        assert_eq!(pool.run(|| 7).await.unwrap(), 7);
        // However many jobs, no more threads than the pool has.
        let names: std::collections::HashSet<String> = futures::future::join_all(
            (0..64).map(|_| pool.run(|| std::thread::current().name().unwrap().to_string())),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        assert!(names.len() <= 2, "{names:?}");
    }
}
