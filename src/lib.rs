//! Switchyard: a layer-7 HTTP load balancer and session-affinity proxy.
//!
//! # Layout
//!
//! - [`config`]: the TOML file → `RawConfig` (serde) → validated [`config::Config`].
//! - [`runtime`]: the immutable snapshot a request routes with (routes, pools,
//!   selectors), built from a `Config` and published through one `ArcSwap`.
//! - [`pool`]: a pool in one snapshot, and the per-pool state that outlives snapshots.
//! - [`affinity`]: per-request plans: which backends to try, cookies to set or learn.
//! - [`balance`]: selection algorithms and affinity building blocks, one per file.
//! - [`upstream`]: backends, their lasting state and pooled keep-alive connections.
//! - [`proxy`]: the request path: headers, forwarding, upgrades, error responses.
//! - [`server`]: client listeners, limits, graceful shutdown.
//! - [`reload`]: file watching, `SIGHUP` and `POST /reload` → validated → one swap.
//! - [`admin`]: the admin listener.
//! - [`metrics`]: the Prometheus exposition, read from the snapshot at scrape time.
//! - [`demo`]: the built-in backend and the self-contained demo.
//!
//! [`Server::bind`] then [`Server::run`] (or [`run`]) drive everything; tests use them
//! in-process with listeners on port 0.

#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod affinity;
pub mod balance;
pub mod config;
pub mod demo;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;

use config::Config;
use runtime::Runtime;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A proxy whose listeners are bound but not yet serving.
#[derive(Debug)]
pub struct Server {
    listeners: Vec<server::Listener>,
    admin: Option<TcpListener>,
    runtime: Arc<ArcSwap<Runtime>>,
    config: Arc<Config>,
    reloader: Arc<reload::Reloader>,
    /// Watches the configuration file from bind on; dropping it stops the watching.
    watcher: Option<reload::ConfigWatch>,
    access_log: access_log::AccessLogSink,
}

impl Server {
    /// Binds every listener of `config`. Nothing is served until [`run`](Self::run).
    pub async fn bind(config: Config) -> Result<Server, RunError> {
        let mut listeners = Vec::new();
        for &addr in &config.server.listen {
            let l = server::Listener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })?;
            listeners.push(l);
        }
        let admin = match &config.admin {
            Some(a) => {
                Some(
                    TcpListener::bind(a.listen)
                        .await
                        .map_err(|source| RunError::Bind {
                            addr: a.listen,
                            source,
                        })?,
                )
            }
            None => None,
        };
        let runtime = Runtime::build(config, 1, None);
        let config = runtime.config.clone();
        let runtime = Arc::new(ArcSwap::from_pointee(runtime));
        let reloader = Arc::new(reload::Reloader::new(
            config.source.clone(),
            runtime.clone(),
        ));
        let watcher = reload::watch(reloader.clone(), reload::DEBOUNCE);
        let access_log = access_log::AccessLogSink::stdout();
        Ok(Server {
            listeners,
            admin,
            runtime,
            config,
            reloader,
            watcher,
            access_log,
        })
    }

    /// Sends access log lines to `out` instead of standard output.
    pub fn set_access_log_output(&mut self, out: impl std::io::Write + Send + 'static) {
        self.access_log = access_log::AccessLogSink::to_writer(out, access_log::QUEUE_LINES);
    }

    /// Addresses the client listeners are bound to, in config order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.local_addr).collect()
    }

    /// Address of the admin listener, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The live snapshot handle.
    pub fn runtime(&self) -> Arc<ArcSwap<Runtime>> {
        self.runtime.clone()
    }

    /// Applies configuration changes: reload the file, follow generations.
    pub fn reloader(&self) -> Arc<reload::Reloader> {
        self.reloader.clone()
    }

    /// Serves until `shutdown` resolves, then drains within `server.shutdown_grace`.
    /// The configuration file, if any, is watched and reloaded on change and on SIGHUP.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.run_until(shutdown, std::future::pending()).await;
    }

    /// As [`Self::run`], but the drain ends as soon as `hurry` resolves (it is polled
    /// only once the drain has begun): what is still open is then closed at once, as
    /// when the grace period is over.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()>,
        hurry: impl Future<Output = ()>,
    ) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let limits = self.config.server.limits.clone();
        let conn_limit = Arc::new(Semaphore::new(limits.max_connections));
        // Cancelled when the grace period is over: closes what is still open.
        let close = CancellationToken::new();
        let proxy = proxy::Proxy::new(self.runtime.clone(), close.clone(), self.access_log.clone());
        let admin_state = Arc::new(admin::AdminState {
            runtime: self.runtime.clone(),
            reloader: self.reloader.clone(),
            access_log: self.access_log.clone(),
            ready: AtomicBool::new(false),
            unrouted: proxy.unrouted(),
            listeners: self
                .listeners
                .iter()
                .map(|l| metrics::ListenerGauge {
                    name: l.local_addr.to_string(),
                    active: l.active.clone(),
                })
                .collect(),
        });
        // Kept alive until shutdown: dropping it stops the watching.
        let _watcher = self.watcher;
        let background = [
            tokio::spawn(reload_on_sighup(self.reloader.clone())),
            tokio::spawn(compact_periodically(self.reloader.clone())),
        ];
        let mut tasks = Vec::new();
        for l in self.listeners {
            tracing::info!(listen = %l.local_addr, "serving");
            tasks.push(tokio::spawn(server::serve(
                l,
                proxy.clone(),
                limits.clone(),
                conn_limit.clone(),
                stop_rx.clone(),
                close.clone(),
            )));
        }
        // The admin listener stays open until the end of the drain: `/readyz` answers
        // 503 through it, and `/metrics` shows the drain.
        let (admin_stop_tx, admin_stop_rx) = watch::channel(false);
        let admin_task = self.admin.map(|l| {
            if let Ok(a) = l.local_addr() {
                tracing::info!(listen = %a, "admin listener");
            }
            tokio::spawn(admin::serve(l, admin_state.clone(), admin_stop_rx))
        });
        admin_state.ready.store(true, Ordering::Relaxed);
        shutdown.await;
        tracing::info!("shutting down: no new connections, letting requests finish");
        admin_state.ready.store(false, Ordering::Relaxed);
        let _ = stop_tx.send(true);
        for t in background {
            t.abort();
        }
        // Read now: the grace period may have been changed by a reload.
        let grace = self.runtime.load().config.server.shutdown_grace;
        let drained = async {
            futures_util::future::join_all(tasks).await;
            proxy.tunnels().closed().await;
        };
        tokio::pin!(drained);
        let cut_short = tokio::select! {
            r = tokio::time::timeout(grace, &mut drained) => {
                if r.is_err() {
                    tracing::warn!(
                        ?grace,
                        tunnels = proxy.tunnels().len(),
                        "shutdown grace period over; closing remaining connections"
                    );
                }
                r.is_err()
            }
            () = hurry => {
                tracing::warn!(
                    tunnels = proxy.tunnels().len(),
                    "asked again to stop: closing remaining connections now"
                );
                true
            }
        };
        if cut_short {
            close.cancel();
            drained.await;
        }
        let _ = admin_stop_tx.send(true);
        if let Some(t) = admin_task {
            let _ = t.await;
        }
        // The last requests' lines out before the process exits.
        let access_log = self.access_log.clone();
        let _ = tokio::task::spawn_blocking(move || access_log.flush()).await;
        tracing::info!("stopped");
    }
}

/// Reloads the configuration on each SIGHUP.
async fn reload_on_sighup(reloader: Arc<reload::Reloader>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the configuration");
            let _ = reloader.reload_async().await;
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
}

/// Drops backends that left the config once they have drained.
async fn compact_periodically(reloader: Arc<reload::Reloader>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let r = reloader.clone();
        let _ = tokio::task::spawn_blocking(move || r.compact()).await;
    }
}

/// Binds the listeners of `config` and serves until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    Server::bind(config).await?.run(shutdown).await;
    Ok(())
}

/// Binds the listeners of `config` and serves until the first SIGTERM or SIGINT; a
/// second one during the drain closes what is still open at once.
pub async fn run_until_signalled(config: Config) -> Result<(), RunError> {
    let signals = ShutdownSignals::listen();
    // Until the server listens for SIGHUP itself, one is ignored rather than left to
    // its default action, which ends the process.
    #[cfg(unix)]
    let _hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    Server::bind(config)
        .await?
        .run_until(signals.nth(1), signals.nth(2))
        .await;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    ShutdownSignals::listen().nth(1).await;
}

/// Counts SIGTERM and SIGINT (Ctrl-C) as they arrive.
#[derive(Debug, Clone)]
pub struct ShutdownSignals(watch::Receiver<u32>);

impl ShutdownSignals {
    /// Counts the signals that arrive from now on. Must be called within a Tokio
    /// runtime.
    pub fn listen() -> Self {
        let (tx, rx) = watch::channel(0);
        // Registered now, not when the task first runs: a signal in between is counted.
        let mut signals = Signals::new();
        tokio::spawn(async move {
            while signals.next().await.is_some() {
                tx.send_modify(|n| *n += 1);
            }
        });
        ShutdownSignals(rx)
    }

    /// Resolves once `n` signals have arrived; never, if none can be received.
    pub fn nth(&self, n: u32) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            if rx.wait_for(|count| *count >= n).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The listeners behind [`ShutdownSignals`].
#[cfg(unix)]
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT; `None` once neither can be received.
    async fn next(&mut self) -> Option<()> {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
            match s {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        }
        if self.term.is_none() && self.int.is_none() {
            return None;
        }
        tokio::select! {
            r = recv(&mut self.term) => r,
            r = recv(&mut self.int) => r,
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> Self {
        Signals
    }

    async fn next(&mut self) -> Option<()> {
        tokio::signal::ctrl_c().await.ok()
    }
}
