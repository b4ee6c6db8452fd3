//! A backend and the state that must outlive any one configuration snapshot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::config::{BackendAddr, BackendConfig, HealthConfig, Limits, PoolConfig};

use super::client::ConnPool;
use super::health::{self, Health};
use super::stats::BackendStats;

/// One replica of a pool. Shared by every snapshot that lists it, keyed by its id.
#[derive(Debug)]
pub struct Backend {
    /// Stable identity from the config (`id`, else the address as written).
    pub id: Arc<str>,
    pub address: BackendAddr,
    /// Counters that survive reloads, even an address change; the in-flight count among
    /// them, so that requests still running on a former address stay counted.
    pub stats: Arc<BackendStats>,
    /// Idle keep-alive connections to this backend.
    pub pool: ConnPool,
    /// When draining began, in milliseconds of [`clock_ms`], or `NOT_DRAINING`.
    drain_started_ms: AtomicU64,
    /// The idle-connection reaper, stopped when the backend goes away.
    reaper: OnceLock<tokio::task::AbortHandle>,
    /// Active and passive health; survives reloads with the backend.
    pub health: Health,
    /// The pool's active check settings, as of the latest snapshot.
    health_cfg: ArcSwapOption<HealthConfig>,
    /// The active checker, started with the first health settings.
    checker: OnceLock<tokio::task::AbortHandle>,
    /// Told when the settings change, so that the checker starts over with them rather
    /// than wait out an interval of the old ones.
    health_changed: Arc<tokio::sync::Notify>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        for task in [self.reaper.get(), self.checker.get()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

const NOT_DRAINING: u64 = u64::MAX;

/// Milliseconds since this process first asked: a monotonic clock cheap to store in an
/// atomic.
pub fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl Backend {
    /// Creates a backend; inside a Tokio runtime it also starts the task that closes its
    /// expired idle connections, which ends when the backend is dropped.
    /// `stats` carries the counters of a previous incarnation (same id, other address).
    /// `limits` are the client connections' (see `ConnPool::new`).
    pub fn new(
        cfg: &BackendConfig,
        pool: &PoolConfig,
        limits: &Limits,
        stats: Option<Arc<BackendStats>>,
    ) -> Arc<Self> {
        let stats = stats.unwrap_or_else(|| Arc::new(BackendStats::new(&pool.name, &cfg.id)));
        let backend = Arc::new(Backend {
            id: Arc::from(cfg.id.as_str()),
            address: cfg.address.clone(),
            pool: ConnPool::new(cfg.address.clone(), pool, limits, stats.clone()),
            stats,
            drain_started_ms: AtomicU64::new(NOT_DRAINING),
            reaper: OnceLock::new(),
            health: Health::default(),
            health_cfg: ArcSwapOption::empty(),
            checker: OnceLock::new(),
            health_changed: Arc::default(),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            let task = tokio::spawn(reap_idle(Arc::downgrade(&backend)));
            let _ = backend.reaper.set(task.abort_handle());
        }
        backend
    }

    /// Requests sent and not yet finished (the response body included), on this address
    /// or a former one of the same id; read by least-request selection.
    pub fn in_flight(&self) -> usize {
        self.stats.in_flight.load(Ordering::Relaxed)
    }

    /// Responses counted for this backend (its own and the proxy's error responses).
    pub fn requests(&self) -> u64 {
        self.stats.total_responses()
    }

    /// Told each time the active check settings change.
    pub fn health_changed(&self) -> Arc<tokio::sync::Notify> {
        self.health_changed.clone()
    }

    /// The active check settings in force, if any.
    pub fn health_config(&self) -> Option<Arc<HealthConfig>> {
        self.health_cfg.load_full()
    }

    /// Applies a snapshot's active check settings; starts the checker on first use.
    pub fn set_health_config(self: &Arc<Self>, cfg: Option<&HealthConfig>) {
        if self.health_cfg.load().as_deref() != cfg {
            self.health_cfg.store(cfg.map(|c| Arc::new(c.clone())));
            if cfg.is_none() {
                // Checks switched off: their last verdict no longer applies.
                self.health.reset_active();
            }
            self.health_changed.notify_one();
        }
        if cfg.is_some()
            && self.checker.get().is_none()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            let task = tokio::spawn(health::check_loop(Arc::downgrade(self)));
            let _ = self.checker.set(task.abort_handle());
        }
    }

    /// Starts draining now unless it already is; or stops draining.
    pub fn set_draining(&self, draining: bool) {
        if draining {
            let _ = self.drain_started_ms.compare_exchange(
                NOT_DRAINING,
                clock_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        } else {
            self.drain_started_ms.store(NOT_DRAINING, Ordering::Relaxed);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.drain_started_ms.load(Ordering::Relaxed) != NOT_DRAINING
    }

    /// True once a draining backend has drained for longer than `timeout`: its sessions
    /// are then sent elsewhere.
    pub fn drain_expired(&self, timeout: Duration) -> bool {
        match self.drain_started_ms.load(Ordering::Relaxed) {
            NOT_DRAINING => false,
            since => clock_ms().saturating_sub(since) >= timeout.as_millis() as u64,
        }
    }

    /// Marks a request as in flight until the returned guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

async fn reap_idle(backend: Weak<Backend>) {
    loop {
        // Read each time: a reload may change the idle timeout.
        let period = match backend.upgrade() {
            Some(b) => (b.pool.idle_timeout() / 2).max(Duration::from_millis(100)),
            None => return,
        };
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
        self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
