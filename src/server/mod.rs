//! Client-facing listeners: accept loop, connection limit, per-connection timeouts and
//! graceful shutdown.
//!
//! Every listener serves HTTP/1.1 and HTTP/2 with prior knowledge (h2c): a connection
//! that opens with the HTTP/2 preface gets hyper's HTTP/2 server, any other its HTTP/1
//! server. A [`ListenerKind`] says how a connection is set up before HTTP, so TLS
//! listeners (where ALPN picks the protocol) can join as another kind.

pub mod idle;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::proxy::{ClientInfo, Proxy, ProxyBody};

use idle::{Activity, Expiry, TrackedIo};

/// How long a connection closed for idleness has to close gracefully (an HTTP/2 client's
/// GOAWAY) before it is cut.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

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

/// hyper's HTTP/1 and HTTP/2 connection builders, with the configured limits.
#[derive(Debug)]
struct HttpBuilders {
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
}

impl HttpBuilders {
    fn new(limits: &Limits) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            // Enforced per request head by `idle::Activity` instead; see there.
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes)
            // A client may shut its side down once its request is sent (`shutdown(SHUT_WR)`,
            // `nc -N`): it still gets its answers, as from HAProxy.
            .half_close(true)
            .keep_alive(true);
        // The write strategy stays hyper's default (vectored writes of the head and
        // body chunks as they are), not `writev(false)`: flattening saves about 400
        // instructions per request, but copies every body chunk into one buffer per
        // connection, which keeps its largest size (near a megabyte after a large
        // download) for as long as the client keeps the connection open.
        let mut http2 = http2::Builder::new(TokioExecutor::new());
        http2
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
        HttpBuilders { http1, http2 }
    }
}

/// What a client connection opens with: the HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The HTTP version a cleartext connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Http {
    One,
    Two,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The socket of a client connection, with its slot and gauge.
type ClientIo = TrackedIo<TcpStream, (OwnedSemaphorePermit, Open)>;

/// Reads until the bytes either are the HTTP/2 preface or cannot be, then puts them back.
/// `None` when the client closed first.
pub(crate) async fn sniff<T: AsyncRead + Unpin, G: Unpin>(
    io: &mut TrackedIo<T, G>,
) -> std::io::Result<Option<Http>> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    let version = loop {
        let read = io.read(&mut buf[n..]).await?;
        if read == 0 {
            // Closed before a whole preface: whatever came is left to HTTP/1 to refuse.
            break (n > 0).then_some(Http::One);
        }
        n += read;
        if buf[..n] != H2_PREFACE[..n] {
            break Some(Http::One);
        }
        if n == H2_PREFACE.len() {
            break Some(Http::Two);
        }
    };
    io.unread(Bytes::copy_from_slice(&buf[..n]));
    Ok(version)
}

/// Serves one client connection until it closes, shutting it down gracefully (the
/// request in progress finishes, an HTTP/2 client gets GOAWAY) once its activity says
/// the server is stopping.
async fn serve_connection<S, F>(
    builders: Arc<HttpBuilders>,
    mut io: ClientIo,
    activity: Arc<Activity>,
    svc: S,
    peer: SocketAddr,
    refused: impl FnOnce(u16),
) where
    S: hyper::service::Service<Request<Incoming>, Response = Response<ProxyBody>, Future = F>,
    S::Error: Into<BoxError>,
    F: Future<Output = Result<Response<ProxyBody>, S::Error>> + Send + 'static,
{
    let version = tokio::select! {
        v = sniff(&mut io) => v,
        _ = activity.stopped() => return,
    };
    let result = match version {
        Ok(None) => return,
        Err(e) => Err(BoxError::from(e)),
        Ok(Some(Http::One)) => {
            let conn = builders
                .http1
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            drive(pin!(conn), &activity, |c| c.graceful_shutdown()).await
        }
        Ok(Some(Http::Two)) => {
            activity.speaks_http2();
            let conn = builders.http2.serve_connection(TokioIo::new(io), svc);
            drive(pin!(conn), &activity, |c| c.graceful_shutdown()).await
        }
    };
    activity.clear_stop_waker();
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "client connection error");
        if let Some(status) = e.downcast_ref::<hyper::Error>().and_then(parser_refusal) {
            refused(status);
        }
    }
}

/// The status hyper's HTTP/1 server answered a request head with that its parser
/// refused (see hyper's `Server::on_error`), if it did.
fn parser_refusal(e: &hyper::Error) -> Option<u16> {
    if e.is_parse_too_large() {
        // Too large a head, or a request target too long for the parser.
        Some(if e.to_string().contains("URI") {
            414
        } else {
            431
        })
    } else if e.is_parse()
        && !e.is_parse_status()
        && !e.is_parse_version_h2()
        // hyper's own failure, answered with nothing.
        && !e.to_string().starts_with("internal error")
    {
        Some(400)
    } else {
        None
    }
}

/// Polls `conn` to its end, asking it once to shut down gracefully when `activity` says
/// the server is stopping.
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    activity: &Activity,
    shutdown: impl Fn(Pin<&mut C>),
) -> Result<(), BoxError>
where
    C: Future<Output = Result<(), E>>,
    E: Into<BoxError>,
{
    let mut registered = None;
    let mut asked = false;
    std::future::poll_fn(|cx| {
        if !asked && activity.poll_stop(cx, &mut registered) {
            asked = true;
            shutdown(conn.as_mut());
        }
        conn.as_mut().poll(cx).map_err(Into::into)
    })
    .await
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
    let builders = Arc::new(HttpBuilders::new(&limits));
    let connections = TaskTracker::new();
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
        let io = TrackedIo::new(stream, activity.clone(), guard);
        let info = ClientInfo::new(peer, tls);
        let refusing = proxy.clone();
        let refused = move |status| refusing.refused_unparsed(status, peer.ip());
        let proxy = proxy.clone();
        let svc_activity = activity.clone();
        let svc = service_fn(move |req| {
            let active = svc_activity.begin();
            proxy.clone().handle(info.clone(), Some(active), req)
        });
        let idle_timeout = limits.idle_timeout;
        let header_timeout = limits.header_read_timeout;
        let mut served = tokio::spawn(serve_connection(
            builders.clone(),
            io,
            activity.clone(),
            svc,
            peer,
            refused,
        ));
        // The timers, shutdown and the end of the grace period watch from a task of
        // their own: polled with the connection, they would be polled on every wake-up
        // of it. Serving ends when this task does.
        let close = close.clone();
        let mut shutdown = shutdown.clone();
        connections.spawn(async move {
            let mut stopping = false;
            loop {
                tokio::select! {
                    _ = &mut served => break,
                    why = activity.expired(idle_timeout, header_timeout) => {
                        tracing::debug!(client = %peer, ?why, "closing client connection");
                        if why == Expiry::Idle && !stopping {
                            // Nothing in progress: closed as at shutdown, so that an
                            // HTTP/2 client gets GOAWAY and knows that no request of its
                            // was dropped; given a moment for that, then cut, unless a
                            // request crossed the GOAWAY: that one is served, as at
                            // shutdown, and the timers go on watching.
                            activity.request_stop();
                            stopping = true;
                            tokio::select! {
                                _ = &mut served => break,
                                _ = close.cancelled() => break,
                                () = tokio::time::sleep(IDLE_CLOSE_GRACE) => {}
                            }
                            if activity.busy() {
                                continue;
                            }
                        }
                        break;
                    }
                    _ = close.cancelled() => break,
                    _ = stopped(&mut shutdown), if !stopping => {
                        stopping = true;
                        activity.request_stop();
                    }
                }
            }
            // Closed by a timer or at the end of the grace period: the tracker counts this
            // task until the connection (its socket, slot and unfinished response, whose
            // access log line is written when it drops) is really gone.
            if !served.is_finished() {
                served.abort();
                let _ = served.await;
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Resolves once `rx` holds `true` (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;

    /// A socket that delivers the given chunks, one per read, then end of stream.
    struct Chunks(VecDeque<&'static [u8]>);

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(chunk) = self.0.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.0.push_front(&chunk[n..]);
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// What `sniff` finds in `chunks`, and every byte read after it.
    async fn sniffed(chunks: &[&'static [u8]]) -> (Option<Http>, Vec<u8>) {
        let mut io = TrackedIo::new(
            Chunks(chunks.iter().copied().collect()),
            Activity::new(),
            (),
        );
        let version = sniff(&mut io).await.unwrap();
        // Small reads, so that the bytes put back take more than one.
        let mut all = Vec::new();
        let mut buf = [0u8; 5];
        loop {
            let n = io.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        (version, all)
    }

    #[tokio::test]
    async fn the_http2_preface_is_recognised_however_it_is_split() {
        let frames: &[u8] = b"\0\0\0\x04\0\0\0\0\0";
        for split in [
            &[H2_PREFACE.as_slice(), frames][..],
            &[b"PRI * HT", b"TP/2.0\r\n\r\nSM\r", b"\n\r\n", frames],
        ] {
            let (version, bytes) = sniffed(split).await;
            assert_eq!(version, Some(Http::Two));
            assert_eq!(bytes, [H2_PREFACE.as_slice(), frames].concat());
        }
    }

    #[tokio::test]
    async fn anything_else_is_http1_and_reads_back_whole() {
        let cases: [&[&'static [u8]]; 4] = [
            &[b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"],
            // A first read that could still have been the preface.
            &[b"P", b"OST /form HTTP/1.1\r\n", b"Host: x\r\n\r\n"],
            &[b"PRI * HTTP/1.1\r\n\r\n"],
            // Closed after part of the preface: HTTP/1 refuses what came.
            &[b"PRI * HT"],
        ];
        for chunks in cases {
            let (version, bytes) = sniffed(chunks).await;
            assert_eq!(version, Some(Http::One), "{chunks:?}");
            assert_eq!(bytes, chunks.concat(), "{chunks:?}");
        }
    }

    #[tokio::test]
    async fn a_connection_closed_at_once_is_neither() {
        assert_eq!(sniffed(&[]).await, (None, Vec::new()));
    }
}
