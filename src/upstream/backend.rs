//! A backend and the state that must outlive any one configuration snapshot.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::config::{BackendAddr, BackendConfig, PoolConfig};

use super::client::ConnPool;

/// One replica of a pool. Shared by every snapshot that lists it, keyed by its id.
#[derive(Debug)]
pub struct Backend {
    /// Stable identity from the config (`id`, else the address as written).
    pub id: Arc<str>,
    pub address: BackendAddr,
    /// Requests sent and not yet finished (the response body included); read by
    /// least-request selection.
    in_flight: AtomicUsize,
    /// Requests that got a response from this backend, for `/status`.
    requests: AtomicU64,
    /// Idle keep-alive connections to this backend.
    pub pool: ConnPool,
}

impl Backend {
    /// Creates a backend; inside a Tokio runtime it also starts the task that closes its
    /// expired idle connections, which ends when the backend is dropped.
    pub fn new(cfg: &BackendConfig, pool: &PoolConfig) -> Arc<Self> {
        let backend = Arc::new(Backend {
            id: Arc::from(cfg.id.as_str()),
            address: cfg.address.clone(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            pool: ConnPool::new(cfg.address.clone(), pool),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(reap_idle(Arc::downgrade(&backend)));
        }
        backend
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub(crate) fn count_response(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks a request as in flight until the returned guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

async fn reap_idle(backend: Weak<Backend>) {
    let period = match backend.upgrade() {
        Some(b) => (b.pool.idle_timeout() / 2).max(Duration::from_millis(100)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        match backend.upgrade() {
            Some(b) => b.pool.prune(),
            None => return,
        }
    }
}

/// Holds one unit of a backend's in-flight count; releases it on drop.
#[derive(Debug)]
pub struct InFlight(Arc<Backend>);

impl InFlight {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
