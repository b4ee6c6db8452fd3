//! Protocol upgrades (WebSocket and others): after the backend answers 101, the client's
//! and the backend's connections are spliced both ways until either side closes, the
//! tunnel stays idle for `server.limits.idle_timeout`, or shutdown's grace period is over.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessRecord;
use crate::server::idle::Activity;
use crate::upstream::InFlight;

/// The open tunnels: shutdown waits for them within its grace period, then closes them.
#[derive(Debug, Clone)]
pub struct Tunnels {
    tracker: TaskTracker,
    close: CancellationToken,
}

impl Tunnels {
    /// Tunnels that end when `close` is cancelled.
    pub fn new(close: CancellationToken) -> Self {
        Tunnels {
            tracker: TaskTracker::new(),
            close,
        }
    }

    /// Resolves once every tunnel has ended; for shutdown, when no new request comes.
    pub async fn closed(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// How many tunnels are open.
    pub(crate) fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Splices the two upgraded connections in a task of its own. The backend stays
    /// counted as in flight while the tunnel is open; the client connection's slot under
    /// `max_connections` stays taken by the upgraded socket itself. With `activity`, the
    /// client connection's, the tunnel closes once no byte moved either way for `idle`.
    /// The request's access log line, if any, is written when the tunnel has closed, with
    /// the bytes that went to the client through it.
    pub fn splice(
        &self,
        client: OnUpgrade,
        backend: OnUpgrade,
        in_flight: InFlight,
        activity: Option<Arc<Activity>>,
        idle: Duration,
        log: Option<Box<AccessRecord>>,
    ) {
        let close = self.close.clone();
        self.tracker.spawn(async move {
            let id = &in_flight.backend().id;
            // Counted as they go: the tunnel may be dropped half-way (idle, shutdown).
            let down = AtomicU64::new(0);
            // Whether the client's side of the upgrade completed: the 101 went out to it.
            let reached = AtomicBool::new(false);
            let idle_expired = async {
                match &activity {
                    Some(a) => a.expired(idle, idle).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = tunnel(client, backend, &down, &reached) => match r {
                    Ok((up, down)) => {
                        tracing::debug!(backend = %id, up, down, "upgraded connection closed")
                    }
                    Err(e) => {
                        tracing::debug!(backend = %id, error = %e, "upgraded connection ended with an error")
                    }
                },
                _ = idle_expired => {
                    tracing::debug!(backend = %id, ?idle, "idle upgraded connection closed")
                }
                _ = close.cancelled() => {
                    tracing::debug!(backend = %id, "upgraded connection closed at shutdown")
                }
            }
            drop(in_flight);
            if let Some(mut l) = log {
                l.bytes = down.load(Ordering::Relaxed);
                if !reached.load(Ordering::Relaxed) {
                    // The client was gone before its 101 could be written.
                    l.status = 499;
                }
                (*l).emit();
            }
        });
    }
}

/// Completes both upgrades, then copies both ways until both sides have closed; returns
/// the bytes sent up and down. The bytes written to the client are also added to `down`
/// as they go; `reached` is set once the client's upgrade completed.
async fn tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    down: &AtomicU64,
    reached: &AtomicBool,
) -> io::Result<(u64, u64)> {
    let client = async {
        let c = client.await?;
        reached.store(true, Ordering::Relaxed);
        Ok(c)
    };
    let (client, backend) = tokio::try_join!(client, backend).map_err(io::Error::other)?;
    let mut client = Counted {
        io: TokioIo::new(client),
        written: down,
    };
    let mut backend = TokioIo::new(backend);
    tokio::io::copy_bidirectional(&mut client, &mut backend).await
}

/// A connection that counts the bytes written to it.
struct Counted<'a, T> {
    io: T,
    written: &'a AtomicU64,
}

impl<T> Counted<'_, T> {
    fn count(&self, r: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.count(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.count(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
