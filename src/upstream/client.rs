//! A small per-backend pool of HTTP/1.1 keep-alive connections.
//!
//! Each idle connection is a hyper `SendRequest` whose connection task runs on its own.
//! A connection goes back to the pool only after its response body was read to the end
//! (see `proxy::body`), and is checked with `ready()` before reuse. Idle connections
//! expire after `upstream_idle_timeout`; at most `max_idle_per_backend` are kept.
//! The lock is per backend and held only to push or pop a vector entry; the pool's
//! settings sit under the same lock, so that a reload can change them for a backend it
//! carries over.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::Sleep;

use crate::config::{BackendAddr, PoolConfig};

use super::stats::BackendStats;
use super::upload::Upload;

/// A request body sent upstream: the client's, or nothing when a bodyless request is
/// sent again.
pub type UpstreamBody = Either<Upload, Empty<Bytes>>;

/// The sending half of an upstream HTTP/1.1 connection, with the timer that bounds each
/// wait for a response on it, and each wait for more of a response body. The timer is
/// armed once per connection and pushed later for each wait, which is an atomic update
/// when the new deadline lies beyond the last one (the usual case); a timer per request
/// would be registered and deregistered under the timer driver's lock every time (about
/// 0.4k instructions). While the connection idles in the pool, the timer may still be
/// set; it goes off once, waking nothing that is still waiting.
#[derive(Debug)]
pub struct Sender {
    pub tx: http1::SendRequest<UpstreamBody>,
    pub timer: Pin<Box<Sleep>>,
    state: Arc<ConnState>,
}

impl Sender {
    /// A response body is being read on this connection from now until [`Self::body_ended`]:
    /// should the client stop taking it, the connection is closed (see [`watch`]).
    pub fn body_started(&self) {
        self.state.reading.store(true, Ordering::Relaxed);
    }

    pub fn body_ended(&self) {
        self.state.reading.store(false, Ordering::Relaxed);
    }
}

/// What a connection's task, its watchdog and the request using it share.
#[derive(Debug, Default)]
struct ConnState {
    /// Counts the reads and writes that moved bytes.
    progress: AtomicU64,
    /// The last read found nothing: the connection waits on the backend, not on the
    /// client.
    read_pending: AtomicBool,
    /// A response body is being read.
    reading: AtomicBool,
}

impl ConnState {
    fn moved(&self) {
        // One writer (the task holding the socket): no read-modify-write needed.
        let n = self.progress.load(Ordering::Relaxed);
        self.progress.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// A response body is under way and the connection has stopped reading it: the
    /// body's reader, which takes each part before the next is read, takes nothing.
    fn held_up(&self) -> bool {
        self.reading.load(Ordering::Relaxed) && !self.read_pending.load(Ordering::Relaxed)
    }
}

/// A backend socket that reports its progress to the connection's watchdog.
struct Watched {
    io: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.state
            .read_pending
            .store(r.is_pending(), Ordering::Relaxed);
        if buf.filled().len() > before {
            this.state.moved();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.moved();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.state.moved();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Closes the connection driven by `conn` once a response body has been under way for
/// `limit` without a byte moving either way while the connection was not waiting on the
/// backend: the client is taking none of the body (an HTTP/2 stream that gets no flow
/// control window, which nothing else notices), and the backend would otherwise be held
/// for as long as the client likes. A backend that sends nothing is the body's own
/// stall limit's to catch. Looks every `limit / 2`, so it acts within 1.5 × `limit`;
/// ends with the connection. The body's reader then gets an error, not an early end:
/// hyper fails a response body whose connection is dropped under it.
async fn watch(state: Arc<ConnState>, conn: AbortHandle, limit: Duration) {
    let period = (limit / 2).max(Duration::from_millis(10));
    let mut last = state.progress.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    loop {
        tokio::time::sleep(period).await;
        if conn.is_finished() {
            return;
        }
        let progress = state.progress.load(Ordering::Relaxed);
        if progress != last || !state.held_up() {
            last = progress;
            quiet = Duration::ZERO;
            continue;
        }
        quiet += period;
        if quiet >= limit {
            conn.abort();
            tracing::warn!(
                after = ?limit,
                "closed a backend connection: the client took none of its response"
            );
            return;
        }
    }
}

/// Why no connection to a backend could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("HTTP/1.1 handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: hyper::Error },
    #[error("connection to {addr} closed before the request was sent: {source}")]
    Closed { addr: String, source: hyper::Error },
}

#[derive(Debug)]
struct Idle {
    tx: Sender,
    since: Instant,
}

/// The pool's settings from the configuration.
#[derive(Debug, Clone, Copy)]
struct Settings {
    max_idle: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl Settings {
    fn of(pool: &PoolConfig) -> Self {
        Settings {
            max_idle: pool.max_idle_per_backend,
            idle_timeout: pool.upstream_idle_timeout,
            connect_timeout: pool.connect_timeout,
        }
    }
}

#[derive(Debug)]
struct Slots {
    /// Oldest first.
    conns: Vec<Idle>,
    settings: Settings,
}

/// Idle connections to one backend.
#[derive(Debug)]
pub struct ConnPool {
    addr: BackendAddr,
    idle: Mutex<Slots>,
    /// How long a response body may go untaken before its connection is closed.
    body_stall: Duration,
    /// Counts connections opened: against the request count it shows reuse.
    stats: Arc<BackendStats>,
}

/// A connection checked out of the pool (or freshly opened).
#[derive(Debug)]
pub struct PooledConn {
    pub tx: Sender,
    /// True when it came from the idle list: a failure to send on it may only mean the
    /// backend closed it meanwhile, so the request is worth one more try on a new one.
    pub reused: bool,
}

impl ConnPool {
    /// `body_stall`: the client connection's idle timeout, see [`watch`].
    pub fn new(
        addr: BackendAddr,
        pool: &PoolConfig,
        body_stall: Duration,
        stats: Arc<BackendStats>,
    ) -> Self {
        ConnPool {
            addr,
            body_stall,
            idle: Mutex::new(Slots {
                conns: Vec::new(),
                settings: Settings::of(pool),
            }),
            stats,
        }
    }

    pub fn connections_opened(&self) -> u64 {
        self.stats.connections_opened()
    }

    pub fn idle_count(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn idle_timeout(&self) -> Duration {
        self.lock().settings.idle_timeout
    }

    /// Applies a reloaded pool's settings; idle connections beyond a lowered
    /// `max_idle_per_backend` are closed, the oldest first.
    pub fn configure(&self, pool: &PoolConfig) {
        let settings = Settings::of(pool);
        let gone: Vec<Idle> = {
            let mut slots = self.lock();
            slots.settings = settings;
            let over = slots.conns.len().saturating_sub(settings.max_idle);
            slots.conns.drain(..over).collect()
        };
        drop(gone);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic while holding this lock cannot leave the vector inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection that is ready for a request, or a new one.
    pub async fn checkout(&self) -> Result<PooledConn, UpstreamError> {
        loop {
            let (idle, settings) = {
                let mut slots = self.lock();
                (slots.conns.pop(), slots.settings)
            };
            let Some(Idle { mut tx, since }) = idle else {
                break;
            };
            if tx.tx.is_closed() || since.elapsed() >= settings.idle_timeout {
                continue;
            }
            // Usually ready at once: then no timer is armed. Otherwise bounded: a
            // connection whose previous request is still uploading is not worth waiting for.
            if tx.tx.is_ready()
                || matches!(
                    tokio::time::timeout(settings.connect_timeout, tx.tx.ready()).await,
                    Ok(Ok(()))
                )
            {
                return Ok(PooledConn { tx, reused: true });
            }
        }
        // Boxed: connecting is the cold path, and its future is large; inline, it would
        // grow every request's future (and each move of it).
        Box::pin(self.connect())
            .await
            .map(|tx| PooledConn { tx, reused: false })
    }

    /// Opens a new connection within the connect timeout.
    pub async fn connect(&self) -> Result<Sender, UpstreamError> {
        let addr = || self.addr.to_string();
        let connect_timeout = self.lock().settings.connect_timeout;
        let stream = match tokio::time::timeout(connect_timeout, connect_tcp(&self.addr)).await {
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    addr: addr(),
                    after: connect_timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect {
                    addr: addr(),
                    source,
                })
            }
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::<ConnState>::default();
        let stream = Watched {
            io: stream,
            state: state.clone(),
        };
        // hyper's default write strategy, not `writev(false)`: that would save about
        // 250 instructions per request, but copy every uploaded body chunk into one
        // buffer per connection, which keeps its largest size while the connection
        // idles in the pool.
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| UpstreamError::Handshake {
                addr: addr(),
                source,
            })?;
        let task = tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        tokio::spawn(watch(state.clone(), task.abort_handle(), self.body_stall));
        self.stats.count_connection_opened();
        // Set for each request before it is polled.
        let timer = Box::pin(tokio::time::sleep(Duration::ZERO));
        Ok(Sender { tx, timer, state })
    }

    /// Returns a connection whose last response was read to the end.
    pub fn checkin(&self, tx: Sender) {
        if tx.tx.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut slots = self.lock();
        let Settings {
            max_idle,
            idle_timeout,
            ..
        } = slots.settings;
        // The oldest entry sits at the front; drop it if it expired, so a busy pool
        // sheds stale connections without waiting for the reaper.
        if slots
            .conns
            .first()
            .is_some_and(|c| now.duration_since(c.since) >= idle_timeout)
        {
            slots.conns.remove(0);
        }
        if slots.conns.len() < max_idle {
            slots.conns.push(Idle { tx, since: now });
        }
    }

    /// Closes idle connections that expired or that the backend closed.
    pub fn prune(&self) {
        let now = Instant::now();
        let expired: Vec<Idle> = {
            let mut slots = self.lock();
            let Settings {
                max_idle,
                idle_timeout,
                ..
            } = slots.settings;
            let (mut keep, mut gone): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut slots.conns)
                .into_iter()
                .partition(|c| !c.tx.tx.is_closed() && now.duration_since(c.since) < idle_timeout);
            // Over a lowered limit: the oldest go.
            let over = keep.len().saturating_sub(max_idle);
            gone.extend(keep.drain(..over));
            slots.conns = keep;
            gone
        };
        drop(expired);
    }

    /// Closes every idle connection.
    pub fn clear(&self) {
        let all = std::mem::take(&mut self.lock().conns);
        drop(all);
    }
}

pub(crate) async fn connect_tcp(addr: &BackendAddr) -> io::Result<TcpStream> {
    match addr {
        BackendAddr::Ip(a) => TcpStream::connect(a).await,
        BackendAddr::Name { host, port } => TcpStream::connect((host.as_str(), *port)).await,
    }
}
