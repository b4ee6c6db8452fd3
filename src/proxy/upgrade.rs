//! Protocol upgrades (WebSocket and others): after the backend answers 101, the client's
//! and the backend's connections are spliced both ways until either side closes.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use crate::upstream::InFlight;

/// Splices the two upgraded connections in a task of its own. The backend stays counted
/// as in flight while the tunnel is open.
pub fn splice(client: OnUpgrade, backend: OnUpgrade, in_flight: InFlight) {
    tokio::spawn(async move {
        let (client, backend) = match tokio::try_join!(client, backend) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut backend = TokioIo::new(backend);
        match tokio::io::copy_bidirectional(&mut client, &mut backend).await {
            Ok((up, down)) => {
                tracing::debug!(backend = %in_flight.backend().id, up, down, "upgraded connection closed")
            }
            Err(e) => {
                tracing::debug!(backend = %in_flight.backend().id, error = %e, "upgraded connection ended with an error")
            }
        }
        drop(in_flight);
    });
}
