//! The listener: connections accepted under the bounds of `[limits]`, each request tagged with
//! its TCP peer ([`Peer`]) for the per-address limits.
//!
//! axum's own `serve` sets no header-read timeout and no bound on connections: a client that
//! opens sockets and sends a header a byte a minute (slowloris) would hold a task each, forever.
//! Here every connection takes a slot of `max_connections` (the next one waits in the kernel's
//! accept queue), and a request's head must arrive within `header_read_timeout`, which also
//! closes a keep-alive connection idle that long.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tower_service::Service;

/// What the listener bounds (from [`crate::config::LimitsConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// The read buffer: a request line and headers larger than this get 431.
    pub max_header_bytes: usize,
}

impl Bounds {
    pub fn from_config(limits: &crate::config::LimitsConfig) -> Bounds {
        Bounds {
            max_connections: limits.max_connections,
            header_read_timeout: Duration::from_secs(limits.header_read_timeout_secs),
            max_header_bytes: limits.max_header_bytes,
        }
    }
}

/// A request's TCP peer (a request extension).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// Headers one request may carry at most (hyper's own default, named).
const MAX_HEADERS: usize = 100;

/// How long a shutdown waits for in-flight requests before it drops what is left.
const DRAIN: Duration = Duration::from_secs(30);

/// Serves `router` on `listener` until `stop`, then lets in-flight requests finish (idle
/// keep-alive connections close at once).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    bounds: Bounds,
    stop: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(bounds.header_read_timeout)
        .max_buf_size(bounds.max_header_bytes.max(8192))
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(bounds.max_connections));
    tokio::pin!(stop);
    loop {
        // Connection flood: past the bound, accepting waits; the kernel's backlog holds the rest.
        let slot = tokio::select! {
            biased;
            _ = &mut stop => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors (EMFILE) and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed; retrying in 50 ms");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(Peer(peer));
            router.clone().call(request)
        });
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // An error here is the client's (it went away, or was too slow): nothing to report.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection closed");
            }
            drop(slot);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(DRAIN) => tracing::warn!("shutdown: requests still in flight after {DRAIN:?} were dropped"),
    }
    Ok(())
}
