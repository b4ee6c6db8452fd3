//! Protocol upgrades (WebSocket and others): after the backend answers 101, the client's
//! and the backend's connections are spliced both ways until either side closes, the
//! tunnel stays idle for `server.limits.idle_timeout`, or shutdown's grace period is over.

use std::sync::Arc;
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    pub fn splice(
        &self,
        client: OnUpgrade,
        backend: OnUpgrade,
        in_flight: InFlight,
        activity: Option<Arc<Activity>>,
        idle: Duration,
    ) {
        let close = self.close.clone();
        self.tracker.spawn(async move {
            let id = &in_flight.backend().id;
            let idle_expired = async {
                match &activity {
                    Some(a) => a.expired(idle, idle).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = tunnel(client, backend) => match r {
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
        });
    }
}

/// Completes both upgrades, then copies both ways until both sides have closed; returns
/// the bytes sent up and down.
async fn tunnel(client: OnUpgrade, backend: OnUpgrade) -> std::io::Result<(u64, u64)> {
    let (client, backend) = tokio::try_join!(client, backend).map_err(std::io::Error::other)?;
    let mut client = TokioIo::new(client);
    let mut backend = TokioIo::new(backend);
    tokio::io::copy_bidirectional(&mut client, &mut backend).await
}
