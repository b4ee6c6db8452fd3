//! Protocol upgrades (WebSocket and others): after the backend answers 101, the client's
//! and the backend's connections are spliced both ways until either side closes, or
//! until shutdown's grace period is over.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

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
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Splices the two upgraded connections in a task of its own. The backend stays
    /// counted as in flight while the tunnel is open; the client connection's slot under
    /// `max_connections` stays taken by the upgraded socket itself.
    pub fn splice(&self, client: OnUpgrade, backend: OnUpgrade, in_flight: InFlight) {
        let close = self.close.clone();
        self.tracker.spawn(async move {
            let (client, backend) = match tokio::try_join!(client, backend) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade did not complete");
                    return;
                }
            };
            let mut client = TokioIo::new(client);
            let mut backend = TokioIo::new(backend);
            let id = &in_flight.backend().id;
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut backend) => match r {
                    Ok((up, down)) => {
                        tracing::debug!(backend = %id, up, down, "upgraded connection closed")
                    }
                    Err(e) => {
                        tracing::debug!(backend = %id, error = %e, "upgraded connection ended with an error")
                    }
                },
                _ = close.cancelled() => {
                    tracing::debug!(backend = %id, "upgraded connection closed at shutdown")
                }
            }
            drop(in_flight);
        });
    }
}
