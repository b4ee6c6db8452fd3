//! Configuration reload: from the file watcher, `SIGHUP`, or `POST /reload`.
//!
//! ```text
//! read file ─▶ parse ─▶ validate ─▶ check restart-only keys ─▶ build snapshot ─▶ one ArcSwap store
//! ```
//!
//! Everything before the store happens off the hot path; a request sees the old snapshot
//! or the new one, never a mix. Any failure leaves the running snapshot untouched and is
//! recorded for `/status`. Reloads are serialised, and a file whose content hash equals
//! the running one is a no-op.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::affinity::unix_now;
use crate::config::{self, Config, LoadError};
use crate::runtime::Runtime;

/// How long the file must stay quiet before a change is applied.
pub const DEBOUNCE: Duration = Duration::from_millis(40);

/// Why a reload was refused. The running configuration stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration file to reload (started without --config)")]
    NoFile,
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{file}: {key} changed: applying it needs a restart; revert it to reload the rest")]
    NeedsRestart { file: String, key: &'static str },
    #[error("the reload did not run: the process is shutting down")]
    ShuttingDown,
}

/// What a successful reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The file's content is what is running already.
    Unchanged { generation: u64 },
    /// A new snapshot is serving.
    Swapped { generation: u64 },
}

impl Applied {
    pub fn generation(self) -> u64 {
        match self {
            Applied::Unchanged { generation } | Applied::Swapped { generation } => generation,
        }
    }
}

/// The outcome of the last reload attempt, for `/status`.
#[derive(Debug, Clone, Default)]
pub struct LastReload {
    pub at_unix: u64,
    pub ok: bool,
    pub error: Option<String>,
}

/// Applies configuration changes to the live snapshot.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    runtime: Arc<ArcSwap<Runtime>>,
    /// Held for the whole of a reload, so reloads never interleave.
    serial: Mutex<()>,
    /// Held only to read or write it: `/status` reads it, and must not wait for a
    /// reload that is building hash tables.
    last: Mutex<Option<LastReload>>,
    pub successes: AtomicU64,
    pub failures: AtomicU64,
    /// Every reload attempt, no-ops included.
    pub attempts: AtomicU64,
    /// Unix time of the last successful reload (or of the start).
    pub last_success_unix: AtomicU64,
    /// Announces each new generation (tests and the watcher's callers wait on it).
    generation_tx: watch::Sender<u64>,
}

impl Reloader {
    pub fn new(path: Option<PathBuf>, runtime: Arc<ArcSwap<Runtime>>) -> Self {
        let generation = runtime.load().generation;
        Reloader {
            path,
            runtime,
            serial: Mutex::new(()),
            last: Mutex::new(None),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            last_success_unix: AtomicU64::new(unix_now()),
            generation_tx: watch::channel(generation).0,
        }
    }

    pub fn path(&self) -> Option<&PathBuf> {
        self.path.as_ref()
    }

    /// Follows the serving generation.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation_tx.subscribe()
    }

    pub fn last(&self) -> Option<LastReload> {
        lock(&self.last).clone()
    }

    fn set_last(&self, ok: bool, error: Option<String>) {
        *lock(&self.last) = Some(LastReload {
            at_unix: unix_now(),
            ok,
            error,
        });
    }

    /// Reloads the file now. Blocking (file I/O, building hash tables): call it from a
    /// blocking context, e.g. [`reload_async`](Self::reload_async).
    pub fn reload(&self) -> Result<Applied, ReloadError> {
        let _serial = lock(&self.serial);
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let result = self.try_reload();
        match &result {
            // Not a reload (the counts stay), but the file is valid and is what serves:
            // a failure recorded before, from an edit since undone, no longer stands.
            Ok(Applied::Unchanged { .. }) => {
                self.last_success_unix.store(unix_now(), Ordering::Relaxed);
                self.set_last(true, None);
            }
            Ok(Applied::Swapped { .. }) => {
                self.successes.fetch_add(1, Ordering::Relaxed);
                self.last_success_unix.store(unix_now(), Ordering::Relaxed);
                self.set_last(true, None);
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "configuration reload failed; the running configuration stays");
                self.set_last(false, Some(e.to_string()));
            }
        }
        result
    }

    /// [`reload`](Self::reload) on the blocking pool.
    pub async fn reload_async(self: &Arc<Self>) -> Result<Applied, ReloadError> {
        let me = self.clone();
        match tokio::task::spawn_blocking(move || me.reload()).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Cancelled before it ran: the runtime is shutting down.
            Err(_) => Err(ReloadError::ShuttingDown),
        }
    }

    fn try_reload(&self) -> Result<Applied, ReloadError> {
        let path = self.path.as_ref().ok_or(ReloadError::NoFile)?;
        let new = config::load(path)?;
        let old = self.runtime.load_full();
        if new.content_hash == old.config.content_hash
            && new.secrets_hash == old.config.secrets_hash
        {
            return Ok(Applied::Unchanged {
                generation: old.generation,
            });
        }
        restart_only(&old.config, &new)?;
        let summary = diff(&old.config, &new);
        let generation = old.generation + 1;
        let next = Runtime::build(new, generation, Some(&old));
        self.runtime.store(Arc::new(next));
        tracing::info!(generation, changes = %summary, "configuration reloaded");
        self.generation_tx.send_replace(generation);
        Ok(Applied::Swapped { generation })
    }

    /// Rebuilds the snapshot from the running configuration, to drop backends that
    /// finished draining after they left the config.
    pub fn compact(&self) {
        let _serial = lock(&self.serial);
        let old = self.runtime.load_full();
        if old.has_drained_removals() {
            let next = Runtime::build((*old.config).clone(), old.generation, Some(&old));
            self.runtime.store(Arc::new(next));
            tracing::debug!("dropped backends that finished draining");
        }
    }
}

/// A panic while holding one of this module's locks cannot leave its value inconsistent.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keys that cannot change without a restart: the sockets and runtime they shape exist
/// once per process.
fn restart_only(old: &Config, new: &Config) -> Result<(), ReloadError> {
    let (o, n) = (&old.server, &new.server);
    let (ol, nl) = (&o.limits, &n.limits);
    let key = if o.listen != n.listen {
        "server.listen"
    } else if o.workers != n.workers {
        "server.workers"
    } else if ol.max_connections != nl.max_connections {
        "server.limits.max_connections"
    } else if ol.header_read_timeout != nl.header_read_timeout {
        "server.limits.header_read_timeout"
    } else if ol.idle_timeout != nl.idle_timeout {
        "server.limits.idle_timeout"
    } else if ol.max_header_bytes != nl.max_header_bytes {
        "server.limits.max_header_bytes"
    } else if ol != nl {
        "server.limits"
    } else if old.admin != new.admin {
        "admin.listen"
    } else {
        return Ok(());
    };
    let file = new
        .source
        .as_ref()
        .map_or_else(|| "(config)".to_owned(), |p| p.display().to_string());
    Err(ReloadError::NeedsRestart { file, key })
}

/// A one-line summary of what changed: pools and backends added, removed, changed.
pub fn diff(old: &Config, new: &Config) -> String {
    let mut parts = Vec::new();
    for p in &new.pools {
        match old.pools.iter().find(|o| o.name == p.name) {
            None => parts.push(format!("+pool {}", p.name)),
            Some(o) => {
                if o.policy != p.policy {
                    parts.push(format!(
                        "pool {} policy {} -> {}",
                        p.name,
                        o.policy.as_str(),
                        p.policy.as_str()
                    ));
                }
                for b in &p.backends {
                    match o.backends.iter().find(|x| x.id == b.id) {
                        None => parts.push(format!("+backend {}/{}", p.name, b.id)),
                        Some(x) if x != b => parts.push(format!("~backend {}/{}", p.name, b.id)),
                        Some(_) => {}
                    }
                }
                for x in &o.backends {
                    if !p.backends.iter().any(|b| b.id == x.id) {
                        parts.push(format!("-backend {}/{}", p.name, x.id));
                    }
                }
                let (mut a, mut b) = (o.clone(), p.clone());
                a.backends.clear();
                b.backends.clear();
                a.policy = b.policy;
                if a != b {
                    parts.push(format!("~pool {} settings", p.name));
                }
            }
        }
    }
    for o in &old.pools {
        if !new.pools.iter().any(|p| p.name == o.name) {
            parts.push(format!("-pool {}", o.name));
        }
    }
    if old.routes != new.routes {
        parts.push("routes changed".to_owned());
    }
    if parts.is_empty() {
        "no routing change".to_owned()
    } else {
        parts.join(", ")
    }
}

/// Watches the configuration file and reloads after changes settle.
///
/// The folders on the way to the file are watched, not the file: editors replace files
/// by renaming a temporary one over them, and Kubernetes swaps a `..data` symlink in the
/// file's folder, both of which a watch on the file itself would miss. Only events on
/// the names that lead to the file count ([`chain`]: the path, each symlink met while
/// resolving it, the file it resolves to, and the folders holding them), and events
/// that say changes may have been missed: other files in those folders (a log written
/// beside the configuration) neither delay a reload nor cause one. The chain is resolved
/// again before each reload, so that a symlink pointed elsewhere has its new folder
/// watched. Events are debounced; identical content is a no-op.
///
/// The watching stops when the returned guard is dropped.
pub fn watch(reloader: Arc<Reloader>, debounce: Duration) -> Option<ConfigWatch> {
    let path = reloader.path()?.clone();
    let names: Arc<Mutex<Vec<OsString>>> = Arc::default();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let relevant = names.clone();
    let watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Only changes count. Reading the file is an event too (an open, a close),
        // and every reload reads it: counting those would make each reload cause the
        // next.
        let Ok(e) = event else { return };
        if matches!(e.kind, notify::EventKind::Access(_)) {
            return;
        }
        // Events were lost (the queue overflowed), or it is not known what changed:
        // look at the file again.
        let unknown = e.need_rescan() || e.paths.is_empty();
        let names = lock(&relevant);
        if unknown
            || e.paths
                .iter()
                .any(|p| p.file_name().is_some_and(|n| names.iter().any(|m| m == n)))
        {
            let _ = tx.send(());
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration file; reload with SIGHUP or POST /reload");
            return None;
        }
    };
    let watcher = Arc::new(Mutex::new(watcher));
    follow(&path, &names, &watcher);
    let weak = Arc::downgrade(&watcher);
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until events stop for `debounce`.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            // The links first, then the file: an edit made in a folder that a link now
            // leads to, after the file was read, is then still seen.
            let Some(watcher) = weak.upgrade() else {
                return;
            };
            let (p, n) = (path.clone(), names.clone());
            let _ = tokio::task::spawn_blocking(move || follow(&p, &n, &watcher)).await;
            let _ = reloader.reload_async().await;
        }
    });
    Some(ConfigWatch { _watcher: watcher })
}

/// Keeps the configuration file watched; see [`watch`].
pub struct ConfigWatch {
    _watcher: Arc<Mutex<notify::RecommendedWatcher>>,
}

impl std::fmt::Debug for ConfigWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigWatch")
    }
}

/// Resolves `path`'s chain anew: the names that count become those of the chain and of
/// the folders holding it, and each of those folders is watched (again: a folder
/// replaced since is a new one), by its real path, so that a folder reached through a
/// symlink stays watched when the link's old target is deleted.
fn follow(path: &Path, names: &Mutex<Vec<OsString>>, watcher: &Mutex<notify::RecommendedWatcher>) {
    use notify::{RecursiveMode, Watcher};
    let links = chain(path);
    let mut dirs: Vec<PathBuf> = Vec::new();
    for dir in links.iter().filter_map(|p| p.parent()) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let real = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if !dirs.contains(&real) {
            dirs.push(real);
        }
    }
    *lock(names) = links
        .iter()
        .chain(&dirs)
        .filter_map(|p| p.file_name().map(OsString::from))
        .collect();
    let mut watcher = lock(watcher);
    for dir in &dirs {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch folder");
        }
    }
}

/// The paths whose change can change what `path` reads: `path` itself, each symlink met
/// while resolving it, component by component as the kernel does (a Kubernetes
/// ConfigMap's `switchyard.toml` and `..data`, a release folder's `current`), and the
/// file it resolves to.
fn chain(path: &Path) -> Vec<PathBuf> {
    use std::collections::VecDeque;
    use std::path::Component;
    let mut out = vec![path.to_path_buf()];
    let mut pending: VecDeque<PathBuf> = path
        .components()
        .map(|c| PathBuf::from(c.as_os_str()))
        .collect();
    let mut at = PathBuf::new();
    // A loop of symlinks ends somewhere; so does this.
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        match part.components().next() {
            Some(Component::CurDir) => continue,
            Some(Component::ParentDir) if at.file_name().is_some() => {
                at.pop();
                continue;
            }
            _ => at.push(&part),
        }
        if hops >= 40 || !at.is_symlink() {
            continue;
        }
        let Ok(target) = std::fs::read_link(&at) else {
            continue;
        };
        hops += 1;
        out.push(at.clone());
        at.pop();
        for c in target.components().rev() {
            pending.push_front(PathBuf::from(c.as_os_str()));
        }
    }
    out.push(at);
    out
}
