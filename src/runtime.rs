//! The runtime snapshot: everything a request needs, built from a [`Config`] off the hot
//! path and published with one `ArcSwap` store. A request loads it once and keeps it to
//! the end, so it never sees half of one configuration and half of another.
//!
//! Backends are carried from the previous snapshot by (pool, id) when their address is
//! unchanged, so in-flight counts and idle connections survive a rebuild.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::config::{AffinityConfig, Config, HostMatch};
use crate::pool::Pool;
use crate::upstream::Backend;

/// One immutable generation of routing state.
#[derive(Debug)]
pub struct Runtime {
    /// Increases by one with every applied configuration.
    pub generation: u64,
    pub config: Arc<Config>,
    /// Sorted by specificity; the first match wins.
    routes: Vec<Route>,
    pub pools: Vec<Pool>,
}

#[derive(Debug)]
struct Route {
    host: HostMatch,
    prefix: String,
    pool: usize,
}

impl Runtime {
    /// Builds a snapshot, reusing the backends of `previous` where the id and address match.
    pub fn build(config: Config, generation: u64, previous: Option<&Runtime>) -> Runtime {
        let mut carried: HashMap<(&str, &str), &Arc<Backend>> = HashMap::new();
        if let Some(prev) = previous {
            for p in &prev.pools {
                for m in &p.members {
                    carried.insert((&p.name, &m.backend.id), &m.backend);
                }
            }
        }
        // Restart-only, so the same for every backend a reload carries over.
        let limits = &config.server.limits;
        let pools: Vec<Pool> = config
            .pools
            .iter()
            .map(|pc| {
                let backends = pc
                    .backends
                    .iter()
                    .map(
                        |bc| match carried.get(&(pc.name.as_str(), bc.id.as_str())) {
                            Some(b) if b.address == bc.address => {
                                b.pool.configure(pc);
                                Arc::clone(b)
                            }
                            // Same id, new address: a fresh connection pool, same counters.
                            Some(b) => Backend::new(bc, pc, limits, Some(b.stats.clone())),
                            None => {
                                let b = Backend::new(bc, pc, limits, None);
                                // Added by a reload: it joins a pool already serving.
                                if previous.is_some() {
                                    b.health.mark_returned();
                                }
                                b
                            }
                        },
                    )
                    .collect();
                let prev = previous.and_then(|p| p.pool(&pc.name));
                let state = prev.map_or_else(Default::default, |p| p.state.clone());
                // Backends that left the config keep draining until their time is up.
                let removed = prev.map_or_else(Vec::new, |p| {
                    p.members
                        .iter()
                        .filter(|m| !pc.backends.iter().any(|b| *b.id == *m.backend.id))
                        .filter(|m| {
                            let pins = !matches!(pc.affinity, AffinityConfig::None);
                            !drained(&m.backend, pc.drain_timeout, pins)
                        })
                        .cloned()
                        .collect()
                });
                // The rotation goes on where it was.
                let turn = prev.map_or(0, |p| p.selector_turn());
                Pool::build(pc, backends, removed, state, config.server.metrics, turn)
            })
            .collect();
        let mut routes: Vec<(usize, Route)> = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let pool = pools.iter().position(|p| *p.name == *r.pool).unwrap_or(0);
                (
                    i,
                    Route {
                        host: r.host.clone(),
                        prefix: r.path_prefix.clone(),
                        pool,
                    },
                )
            })
            .collect();
        routes.sort_by_key(|(i, r)| {
            (
                std::cmp::Reverse(host_rank(&r.host)),
                std::cmp::Reverse(r.prefix.len()),
                *i,
            )
        });
        LIVE_SNAPSHOTS.fetch_add(1, Ordering::Relaxed);
        Runtime {
            generation,
            config: Arc::new(config),
            routes: routes.into_iter().map(|(_, r)| r).collect(),
            pools,
        }
    }

    /// The pool for a request: exact host beats wildcard (longer suffix first) beats
    /// any host; then the longest matching path prefix; then file order.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Pool> {
        // `OPTIONS *` asks about the server as a whole: the pool that serves its root.
        let path = if path == "*" { "/" } else { path };
        // The host without its port, found once a route asks for it.
        let mut bare: Option<Option<&str>> = None;
        self.routes
            .iter()
            .find(|r| {
                prefix_matches(&r.prefix, path)
                    && match &r.host {
                        HostMatch::Any => true,
                        m => host_matches(m, *bare.get_or_insert_with(|| host.map(strip_port))),
                    }
            })
            .map(|r| &self.pools[r.pool])
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| &*p.name == name)
    }

    /// True when a backend removed from the config has finished draining and a rebuild
    /// would drop it.
    pub fn has_drained_removals(&self) -> bool {
        self.pools.iter().any(|p| {
            p.members
                .iter()
                .any(|m| m.removed && drained(&m.backend, p.drain_timeout, p.pins_clients()))
        })
    }
}

/// Whether a backend that left the configuration is done draining: its drain time is
/// up, or, in a pool that pins no clients to backends, nothing runs on it any more.
fn drained(backend: &Backend, drain_timeout: std::time::Duration, pins_clients: bool) -> bool {
    backend.drain_expired(drain_timeout) || (!pins_clients && backend.in_flight() == 0)
}

/// Snapshots alive in this process: old ones must be freed once no request holds them.
static LIVE_SNAPSHOTS: AtomicUsize = AtomicUsize::new(0);

/// How many snapshots exist right now (current, plus any still held by requests).
pub fn live_snapshots() -> usize {
    LIVE_SNAPSHOTS.load(Ordering::Relaxed)
}

impl Drop for Runtime {
    fn drop(&mut self) {
        LIVE_SNAPSHOTS.fetch_sub(1, Ordering::Relaxed);
    }
}

fn host_rank(h: &HostMatch) -> (u8, usize) {
    match h {
        HostMatch::Exact(_) => (2, 0),
        HostMatch::Suffix(s) => (1, s.len()),
        HostMatch::Any => (0, 0),
    }
}

fn host_matches(m: &HostMatch, host: Option<&str>) -> bool {
    match (m, host) {
        (HostMatch::Any, _) => true,
        (_, None) => false,
        (HostMatch::Exact(e), Some(h)) => e.eq_ignore_ascii_case(h),
        (HostMatch::Suffix(s), Some(h)) => {
            h.len() > s.len()
                && h.is_char_boundary(h.len() - s.len())
                && h[h.len() - s.len()..].eq_ignore_ascii_case(s)
        }
    }
}

/// `/cart` matches `/cart` and `/cart/x` but not `/cartoon`; `/cart/` matches by prefix.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`. Also drops a trailing dot.
fn strip_port(host: &str) -> &str {
    // Bytes, not `str` searches: a host is short, and `:` and `]` are ASCII, so the
    // cut is on a character boundary.
    let b = host.as_bytes();
    let end = if b.first() == Some(&b'[') {
        b.iter().position(|&c| c == b']').map_or(b.len(), |i| i + 1)
    } else {
        b.iter().rposition(|&c| c == b':').unwrap_or(b.len())
    };
    let h = &host[..end];
    h.strip_suffix('.').unwrap_or(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_ignored() {
        assert_eq!(strip_port("a.example.com:8080"), "a.example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("example.com."), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("example.com.:80"), "example.com");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("127.0.0.1:18005"), "127.0.0.1");
        assert_eq!(strip_port(""), "");
        assert_eq!(strip_port("ünï.example:1"), "ünï.example");
    }

    #[test]
    fn prefixes_respect_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/cart", "/cart"));
        assert!(prefix_matches("/cart", "/cart/1"));
        assert!(!prefix_matches("/cart", "/cartoon"));
        assert!(prefix_matches("/cart/", "/cart/1"));
        assert!(!prefix_matches("/cart/", "/cart"));
    }

    #[test]
    fn wildcard_needs_a_label() {
        let m = HostMatch::Suffix(".example.com".into());
        assert!(host_matches(&m, Some("a.example.com")));
        assert!(host_matches(&m, Some("A.Example.COM")));
        assert!(!host_matches(&m, Some("example.com")));
        assert!(!host_matches(&m, Some("badexample.com")));
        assert!(!host_matches(&m, None));
    }
}
