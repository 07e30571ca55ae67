//! The accept loop: every connection served by hyper (HTTP/1.1, h2c), with
//! the limits a server on an open port needs and `axum::serve` lacks:
//! - a header-read timeout (a client that opens a connection and sends no
//!   complete request head in time is closed: slowloris, silent sockets);
//! - an idle timeout (a connection with no request in progress is closed);
//! - a cap on open connections: at the cap, the connection idle the longest
//!   is closed to make room (as nginx reuses keep-alive connections), and a
//!   new one is refused only when every open connection has a request in
//!   progress, so a probe such as `/health` gets through while idle sockets
//!   pile up;
//! - accept errors (out of file descriptors) back off instead of spinning;
//! - a drain: after the signal, connections finish their requests and close,
//!   while new connections are still accepted and answered (the app answers
//!   503 while draining) with keep-alive off, until no request is in progress.
//!
//! Request-level limits (body size, body-read timeout) live in the app.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

/// Connection limits; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    /// `None`: no limit (not advised on an open port).
    pub header_read_timeout: Option<Duration>,
    pub idle_timeout: Option<Duration>,
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        // nginx closes a request head after 60 s, uvicorn (vLLM) an idle
        // keep-alive connection after 5 s; clients reconnect cheaply.
        Self {
            header_read_timeout: Some(Duration::from_secs(30)),
            idle_timeout: Some(Duration::from_secs(60)),
            max_connections: 4096,
        }
    }
}

/// File descriptors kept for everything but client connections (model
/// files, the Hub, logs, the listener itself).
const RESERVED_FDS: u64 = 64;

/// Raises the soft open-files limit to the hard one and returns the
/// connections the result allows: `max_connections`, or fewer when the
/// process cannot open that many descriptors.
pub fn raise_open_files_limit(max_connections: usize) -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!("cannot read the open-files limit; keeping --max-connections as set");
        return max_connections;
    }
    let before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit.rlim_cur = limit.rlim_max;
        }
    }
    let usable = limit.rlim_cur.saturating_sub(RESERVED_FDS).max(1);
    let allowed = max_connections.min(usize::try_from(usable).unwrap_or(usize::MAX));
    tracing::info!(
        soft_before = before,
        soft = limit.rlim_cur,
        hard = limit.rlim_max,
        max_connections = allowed,
        "open-files limit"
    );
    if allowed < max_connections {
        tracing::warn!(
            max_connections,
            allowed,
            "the open-files limit allows fewer connections than --max-connections"
        );
    }
    allowed
}

struct Connection {
    /// Requests in progress (HTTP/2 may have several).
    busy: usize,
    /// When `busy` last fell to 0 (or the connection opened).
    idle_since: Instant,
    /// Asked to close (idle, evicted or draining).
    closing: bool,
    close: Arc<Notify>,
}

/// Every open connection and its requests in progress.
#[derive(Default)]
struct Tracker {
    connections: Mutex<HashMap<u64, Connection>>,
    next_id: AtomicU64,
}

impl Tracker {
    fn open(&self) -> (u64, Arc<Notify>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let close = Arc::new(Notify::new());
        self.lock().insert(
            id,
            Connection {
                busy: 0,
                idle_since: Instant::now(),
                closing: false,
                close: close.clone(),
            },
        );
        (id, close)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Connection>> {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn closed(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn request_started(self: &Arc<Self>, id: u64) -> RequestGuard {
        if let Some(c) = self.lock().get_mut(&id) {
            c.busy += 1;
        }
        RequestGuard {
            tracker: self.clone(),
            id,
        }
    }

    fn is_busy(&self, id: u64) -> bool {
        self.lock().get(&id).is_some_and(|c| c.busy > 0)
    }

    fn requests_in_progress(&self) -> usize {
        self.lock().values().map(|c| c.busy).sum()
    }

    /// Makes room for one more connection: `true` if there is room (now or
    /// once the connection idle the longest, asked to close, has gone).
    fn make_room(&self, max_connections: usize) -> bool {
        let mut connections = self.lock();
        let open = connections.values().filter(|c| !c.closing).count();
        if open < max_connections {
            return true;
        }
        let oldest_idle = connections
            .values_mut()
            .filter(|c| c.busy == 0 && !c.closing)
            .min_by_key(|c| c.idle_since);
        match oldest_idle {
            Some(c) => {
                c.closing = true;
                c.close.notify_one();
                true
            }
            None => false,
        }
    }

    /// Asks connections idle for at least `idle` (or all, with `None`) to close.
    fn close_idle(&self, idle: Option<Duration>) {
        let now = Instant::now();
        for c in self.lock().values_mut() {
            let expired = idle.is_none_or(|idle| now.duration_since(c.idle_since) >= idle);
            if c.busy == 0 && !c.closing && expired {
                c.closing = true;
                c.close.notify_one();
            }
        }
    }

    /// Asks every connection to finish what it is doing and close.
    fn close_all(&self) {
        for c in self.lock().values_mut() {
            c.closing = true;
            c.close.notify_one();
        }
    }
}

/// Marks a request in progress until its response body is done or dropped.
struct RequestGuard {
    tracker: Arc<Tracker>,
    id: u64,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if let Some(c) = self.tracker.lock().get_mut(&self.id) {
            c.busy = c.busy.saturating_sub(1);
            if c.busy == 0 {
                c.idle_since = Instant::now();
            }
        }
    }
}

/// A response body that holds its request's guard until the last byte (a
/// stream is a request in progress until it ends).
struct GuardedBody {
    inner: Body,
    _guard: RequestGuard,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How long a connection asked to close while idle may take before it is
/// dropped (a half-sent request head does not hold it open).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// How often a drain checks whether requests are still in progress.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Backoff bounds for accept errors (EMFILE, ENFILE, ENOMEM).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(5), Duration::from_secs(1));

fn builder(limits: &ConnectionLimits, keep_alive: bool) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(keep_alive);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Serves `app` on `listener` until `drain` turns true and no request is in
/// progress any more.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    mut drain: watch::Receiver<bool>,
) {
    let tracker = Arc::new(Tracker::default());
    let normal = Arc::new(builder(&limits, true));
    let draining = Arc::new(builder(&limits, false));
    let reaper = tokio::spawn(reap_idle(tracker.clone(), limits.idle_timeout));
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut last_refusal_log: Option<Instant> = None;
    let mut drain_started = false;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.wait_for(|d| *d), if !drain_started => {
                drain_started = true;
                tracker.close_all();
                continue;
            }
            _ = tokio::time::sleep(DRAIN_POLL), if drain_started => {
                if tracker.requests_in_progress() == 0 {
                    break;
                }
                continue;
            }
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF.0;
                accepted
            }
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                continue;
            }
        };
        if !tracker.make_room(limits.max_connections) {
            // Every connection has a request in progress: refuse this one
            // (the client sees a reset and may retry elsewhere).
            if last_refusal_log.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    "connection limit reached with every connection busy; refusing connections"
                );
                last_refusal_log = Some(Instant::now());
            }
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let builder = if drain_started {
            draining.clone()
        } else {
            normal.clone()
        };
        tokio::spawn(serve_connection(
            stream,
            peer,
            app.clone(),
            builder,
            tracker.clone(),
        ));
    }
    reaper.abort();
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    app: Router,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tracker: Arc<Tracker>,
) {
    let (id, close) = tracker.open();
    let service_tracker = tracker.clone();
    let service =
        hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
            let guard = service_tracker.request_started(id);
            let app = app.clone();
            async move {
                let response = app.oneshot(request.map(Body::new)).await?;
                Ok::<_, std::convert::Infallible>(response.map(|body| {
                    Body::new(GuardedBody {
                        inner: body,
                        _guard: guard,
                    })
                }))
            }
        });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut grace: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(%peer, error = %err, "connection ended with an error");
                }
                break;
            }
            _ = close.notified(), if grace.is_none() => {
                connection.as_mut().graceful_shutdown();
                grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
            }
            _ = async { grace.as_mut().expect("set").await }, if grace.is_some() => {
                if !tracker.is_busy(id) {
                    break;
                }
                grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
            }
        }
    }
    tracker.closed(id);
}

/// Closes connections idle past `idle` (checked a few times per timeout).
async fn reap_idle(tracker: Arc<Tracker>, idle: Option<Duration>) {
    let Some(idle) = idle else {
        return;
    };
    let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut ticks = tokio::time::interval(period);
    loop {
        ticks.tick().await;
        tracker.close_idle(Some(idle));
    }
}

/// Errors about one connection, not the listener: accept the next at once.
fn is_connection_error(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_the_cap_the_longest_idle_connection_makes_room() {
        let tracker = Arc::new(Tracker::default());
        let (a, close_a) = tracker.open();
        std::thread::sleep(Duration::from_millis(2));
        let (b, _close_b) = tracker.open();
        assert!(tracker.make_room(3), "below the cap");
        let _busy_b = tracker.request_started(b);
        // At the cap: `a` is idle, so it is asked to close.
        assert!(tracker.make_room(2));
        assert!(tracker.lock()[&a].closing);
        assert!(!tracker.lock()[&b].closing);
        // A stored permit: the connection task sees it when it next waits.
        let notified = close_a.notified();
        futures::executor::block_on(notified);
        // Only busy connections left open: no room.
        tracker.closed(a);
        assert!(!tracker.make_room(1));
        drop(_busy_b);
        assert!(!tracker.is_busy(b));
        assert!(tracker.make_room(1));
    }

    #[test]
    fn idle_connections_expire_busy_ones_do_not() {
        let tracker = Arc::new(Tracker::default());
        let (a, _) = tracker.open();
        let (b, _) = tracker.open();
        let guard = tracker.request_started(b);
        std::thread::sleep(Duration::from_millis(20));
        tracker.close_idle(Some(Duration::from_millis(10)));
        assert!(tracker.lock()[&a].closing);
        assert!(!tracker.lock()[&b].closing);
        assert_eq!(tracker.requests_in_progress(), 1);
        drop(guard);
        assert_eq!(tracker.requests_in_progress(), 0);
        // Idle from the end of its request, not from its opening.
        tracker.close_idle(Some(Duration::from_millis(10)));
        assert!(!tracker.lock()[&b].closing);
    }
}
