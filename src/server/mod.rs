//! Client-facing listeners: accept loop, connection limit, per-connection timeouts and
//! graceful shutdown.
//!
//! Every listener serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c) through
//! hyper-util's auto builder. A [`ListenerKind`] says how a connection is set up before
//! HTTP, so TLS listeners can join as another kind.

pub mod idle;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::config::Limits;
use crate::proxy::{ClientInfo, Proxy};

use idle::{Activity, TrackedIo};

/// How connections on a listener are set up before HTTP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Plain TCP: HTTP/1.1 and h2c.
    Plain,
}

/// A bound client listener, ready to serve.
#[derive(Debug)]
pub struct Listener {
    pub listener: TcpListener,
    pub local_addr: SocketAddr,
    pub kind: ListenerKind,
    /// Client connections open on this listener, for metrics.
    pub active: Arc<AtomicUsize>,
}

/// Counts one open connection until dropped.
#[derive(Debug)]
struct Open(Arc<AtomicUsize>);

impl Open {
    fn new(counter: &Arc<AtomicUsize>) -> Open {
        counter.fetch_add(1, Ordering::Relaxed);
        Open(counter.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Listener {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let local_addr = listener.local_addr()?;
        Ok(Listener {
            listener,
            local_addr,
            kind: ListenerKind::Plain,
            active: Arc::default(),
        })
    }
}

/// The HTTP connection builder with the configured limits.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // Enforced per request head by `idle::Activity` instead; see there.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true)
        // One flattened write per response head and body chunk: fewer syscalls.
        .writev(false);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    b
}

/// Accepts and serves connections until `shutdown` turns true, then stops accepting and
/// returns once open connections have finished their requests (gracefully), or were
/// closed by `close` (when the grace period is over).
pub async fn serve(
    listener: Listener,
    proxy: Proxy,
    limits: Limits,
    conn_limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    close: CancellationToken,
) {
    let builder = Arc::new(http_builder(&limits));
    let graceful = GracefulShutdown::new();
    let tls = listener.kind != ListenerKind::Plain;
    loop {
        let permit = tokio::select! {
            p = conn_limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stopped(&mut shutdown) => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of descriptors or similar: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        // The connection's slot and gauge go with the socket: an upgraded connection
        // (WebSocket) keeps both until the tunnel closes.
        let guard = (permit, Open::new(&listener.active));
        let activity = Activity::new();
        let io = TokioIo::new(TrackedIo::new(stream, activity.clone(), guard));
        let info = ClientInfo { addr: peer, tls };
        let proxy = proxy.clone();
        let svc_activity = activity.clone();
        let svc = service_fn(move |req| {
            let active = svc_activity.begin(req.version());
            proxy.clone().handle(info, Some(active), req)
        });
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        let conn = graceful.watch(conn);
        let idle_timeout = limits.idle_timeout;
        let header_timeout = limits.header_read_timeout;
        let mut served = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(client = %peer, error = %e, "client connection error");
            }
        });
        // The timers and the end of the grace period watch from a task of their own:
        // polled with the connection, they would be polled on every wake-up of it.
        let close = close.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = &mut served => {}
                why = activity.expired(idle_timeout, header_timeout) => {
                    tracing::debug!(client = %peer, ?why, "closing client connection");
                    served.abort();
                }
                _ = close.cancelled() => served.abort(),
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Resolves once `rx` holds `true` (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}
