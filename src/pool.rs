//! A pool as one snapshot sees it, and the per-pool state that outlives snapshots.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::Notify;

use crate::balance::consistent_hash::{self, HashTable};
use crate::balance::learned::Learned;
use crate::balance::sticky_cookie::{self, Codec, Tag};
use crate::balance::Selector;
use crate::config::{
    AffinityConfig, AllDown, HashConfig, LearnConfig, OutlierConfig, Policy, PoolConfig,
    StickyConfig,
};
use crate::upstream::Backend;

/// What a pool keeps across configuration snapshots, found again by pool name.
#[derive(Debug)]
pub struct PoolState {
    pub stats: AffinityStats,
    /// The learned session table (sticky_learn pools).
    learned: OnceLock<Learned>,
    /// The secret used when none is configured: random, made once per process.
    generated_secret: OnceLock<Vec<u8>>,
    /// The task tending the learned-session table, stopped when the pool goes away.
    sweeper: OnceLock<tokio::task::AbortHandle>,
    /// Error responses of requests that reached no backend, by status class.
    unattributed: crate::upstream::stats::ByClass,
    /// Requests routed as if all backends were healthy because none was.
    pub fail_open: AtomicU64,
    /// Retry tokens in thousandths; see [`PoolState::take_retry`].
    retry_tokens: AtomicU64,
    /// Retries refused because the budget was spent.
    pub retries_refused: AtomicU64,
    /// Held while deciding whether to eject a backend (see `Health::record_failure`).
    pub ejecting: std::sync::Mutex<()>,
    /// Whether the pool's current policy learns sessions: a response to a request of
    /// an older snapshot, when the pool has turned to another policy since, learns
    /// nothing.
    pub learning: std::sync::atomic::AtomicBool,
}

/// Retry tokens a pool can save up, in thousandths.
const RETRY_RESERVE: u64 = 10_000;

impl Drop for PoolState {
    fn drop(&mut self) {
        if let Some(s) = self.sweeper.get() {
            s.abort();
        }
    }
}

impl Default for PoolState {
    fn default() -> Self {
        PoolState {
            stats: AffinityStats::default(),
            learned: OnceLock::new(),
            generated_secret: OnceLock::new(),
            sweeper: OnceLock::new(),
            unattributed: Default::default(),
            fail_open: AtomicU64::new(0),
            ejecting: std::sync::Mutex::new(()),
            learning: std::sync::atomic::AtomicBool::new(false),
            retry_tokens: AtomicU64::new(RETRY_RESERVE),
            retries_refused: AtomicU64::new(0),
        }
    }
}

impl PoolState {
    pub fn learned(&self) -> Option<&Learned> {
        self.learned.get()
    }

    /// Earns `budget` of a retry for one request. The bucket starts full.
    pub fn earn_retry(&self, budget: f64) {
        let add = (budget * 1000.0) as u64;
        let _ = self
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < RETRY_RESERVE).then(|| (t + add).min(RETRY_RESERVE))
            });
    }

    /// Spends one retry if the budget allows: retries cannot multiply an outage.
    pub fn take_retry(&self) -> bool {
        let ok = self
            .retry_tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                t.checked_sub(1000)
            })
            .is_ok();
        if !ok {
            self.retries_refused.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    pub fn count_unattributed(&self, status: u16) {
        self.unattributed.count(status);
    }

    /// Responses of class `class` (1 to 5) that no backend is accountable for.
    pub fn unattributed(&self, class: usize) -> u64 {
        self.unattributed.get(class)
    }
}

/// How affinity decisions turned out, for `/status` (and, later, metrics).
#[derive(Debug, Default)]
pub struct AffinityStats {
    counts: [AtomicU64; 6],
}

/// The outcome of one affinity decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client went to the backend its cookie, session or key points at.
    Hit,
    /// No affinity yet: a backend was chosen by balancing.
    New,
    /// The cookie or learned session had expired: treated as new.
    Expired,
    /// The cookie was forged, truncated, from another pool or garbage: treated as new.
    Invalid,
    /// The backend it points at is gone, drained or down: another one was chosen.
    Redispatched,
    /// The backend it points at is down and the pool says to answer 503.
    Rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 6] = [
        Outcome::Hit,
        Outcome::New,
        Outcome::Expired,
        Outcome::Invalid,
        Outcome::Redispatched,
        Outcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::New => "new",
            Outcome::Expired => "expired",
            Outcome::Invalid => "invalid",
            Outcome::Redispatched => "redispatched",
            Outcome::Rejected => "rejected",
        }
    }
}

impl AffinityStats {
    pub fn count(&self, o: Outcome) {
        self.counts[o as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, o: Outcome) -> u64 {
        self.counts[o as usize].load(Ordering::Relaxed)
    }
}

/// Looks after a pool's learned-session table away from the threads that serve traffic
/// (a large table takes tens of milliseconds to scan): makes room when the table asks
/// for it, and drops expired sessions now and then, so sessions that are never asked for
/// again do not wait for eviction. Ends when the pool's state is dropped.
async fn tend_learned(state: Weak<PoolState>, room_wanted: Arc<Notify>) {
    const SWEEP_EVERY: Duration = Duration::from_secs(30);
    let mut next_sweep = tokio::time::Instant::now() + SWEEP_EVERY;
    loop {
        let make_room = tokio::select! {
            _ = room_wanted.notified() => true,
            _ = tokio::time::sleep_until(next_sweep) => false,
        };
        if !make_room {
            next_sweep = tokio::time::Instant::now() + SWEEP_EVERY;
        }
        let Some(state) = state.upgrade() else { return };
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(l) = state.learned() {
                if make_room {
                    l.make_room();
                } else {
                    l.sweep(crate::affinity::unix_now());
                }
            }
        })
        .await;
    }
}

/// A backend with what this snapshot says about it.
#[derive(Debug, Clone)]
pub struct Member {
    pub backend: Arc<Backend>,
    pub weight: u32,
    /// Takes no new sessions (`drain = true`, or removed from the config).
    pub draining: bool,
    /// No longer in the config: kept only while its clients drain.
    pub removed: bool,
}

/// The affinity machinery of one pool in one snapshot.
#[derive(Debug)]
pub enum Affinity {
    None,
    Cookie {
        cfg: StickyConfig,
        codec: Codec,
        /// Per signing key: backend tag → member index.
        tags: Vec<HashMap<Tag, usize>>,
    },
    Learn {
        cfg: LearnConfig,
    },
    Hash {
        cfg: HashConfig,
        /// Over all members, draining ones included.
        table: HashTable,
    },
}

/// A pool as this snapshot sees it.
#[derive(Debug)]
pub struct Pool {
    pub name: Arc<str>,
    pub policy: Policy,
    pub members: Vec<Member>,
    /// Indices of members that take new sessions.
    pub eligible: Vec<usize>,
    /// Balances over `eligible`.
    selector: Selector,
    /// Backend id → member index.
    pub by_id: HashMap<Arc<str>, usize>,
    pub affinity: Affinity,
    pub state: Arc<PoolState>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub retries: u32,
    pub drain_timeout: Duration,
    pub outlier: OutlierConfig,
    pub all_down: AllDown,
    pub retry_budget: f64,
    pub slow_start: Option<Duration>,
    /// Whether requests are counted and timed (`server.metrics`).
    pub metrics: bool,
}

impl Pool {
    /// Whether the pool keeps clients on a backend (cookie, learned session or hash
    /// key), so that a backend leaving it has clients to keep for a while.
    pub fn pins_clients(&self) -> bool {
        !matches!(self.affinity, Affinity::None)
    }

    /// Builds the snapshot view of a pool from its config, its backends (carried or new)
    /// and its lasting state.
    /// `removed` are members of the previous snapshot that left the config and still
    /// drain; they serve their existing clients and take no new ones.
    pub fn build(
        pc: &PoolConfig,
        backends: Vec<Arc<Backend>>,
        removed: Vec<Member>,
        state: Arc<PoolState>,
        metrics: bool,
        turn: usize,
    ) -> Pool {
        let mut members: Vec<Member> = pc
            .backends
            .iter()
            .zip(backends)
            .map(|(bc, backend)| {
                backend.set_draining(bc.drain);
                Member {
                    backend,
                    weight: bc.weight,
                    draining: bc.drain,
                    removed: false,
                }
            })
            .collect();
        for m in &members {
            m.backend.set_health_config(pc.health.as_ref());
        }
        for m in removed {
            m.backend.set_draining(true);
            members.push(Member {
                draining: true,
                removed: true,
                ..m
            });
        }
        if matches!(pc.affinity, AffinityConfig::Hash(_))
            && members.len() > consistent_hash::MAX_MEMBERS
        {
            // Backends that left beyond the table's bound stop draining early, those
            // that left first before the others (the configured ones, listed first, are
            // within it).
            tracing::warn!(
                pool = %pc.name,
                dropped = members.len() - consistent_hash::MAX_MEMBERS,
                "too many removed backends draining: the earliest removed stop now"
            );
            members.truncate(consistent_hash::MAX_MEMBERS);
        }
        let eligible: Vec<usize> = (0..members.len())
            .filter(|&i| !members[i].draining)
            .collect();
        let weights: Vec<u32> = eligible.iter().map(|&i| members[i].weight).collect();
        let by_id = members
            .iter()
            .enumerate()
            .map(|(i, m)| (m.backend.id.clone(), i))
            .collect();
        let ids = || members.iter().map(|m| &*m.backend.id);
        let affinity = match &pc.affinity {
            AffinityConfig::None => Affinity::None,
            AffinityConfig::Cookie(cfg) => {
                let secrets: Vec<Vec<u8>> = if cfg.secrets.is_empty() {
                    let s = state.generated_secret.get_or_init(|| {
                        tracing::warn!(
                            pool = %pc.name,
                            "no sticky cookie secret configured: using a random one; affinity will not survive a restart or span several proxies"
                        );
                        sticky_cookie::random_secret()
                    });
                    vec![s.clone()]
                } else {
                    cfg.secrets.iter().map(|s| s.0.clone()).collect()
                };
                let codec = Codec::new(&pc.name, &secrets);
                let tags = codec.tag_tables(ids());
                Affinity::Cookie {
                    cfg: cfg.clone(),
                    codec,
                    tags,
                }
            }
            AffinityConfig::Learn(cfg) => {
                let ttl = cfg.ttl.as_secs().max(1);
                match state.learned.get() {
                    Some(l) => l.set_limits(ttl, cfg.max_entries),
                    None => {
                        let learned = Learned::new(ttl, cfg.max_entries);
                        let room_wanted = learned.room_wanted();
                        let _ = state.learned.set(learned);
                        if tokio::runtime::Handle::try_current().is_ok() {
                            let task =
                                tokio::spawn(tend_learned(Arc::downgrade(&state), room_wanted));
                            let _ = state.sweeper.set(task.abort_handle());
                        }
                    }
                }
                Affinity::Learn { cfg: cfg.clone() }
            }
            AffinityConfig::Hash(cfg) => {
                let ids: Vec<&str> = ids().collect();
                let w: Vec<u32> = members.iter().map(|m| m.weight).collect();
                Affinity::Hash {
                    cfg: cfg.clone(),
                    table: HashTable::new(&ids, &w),
                }
            }
        };
        let learning = matches!(affinity, Affinity::Learn { .. });
        state.learning.store(learning, Ordering::Relaxed);
        if !learning {
            // Learned sessions of a policy no longer in force: neither kept, nor shown.
            if let Some(l) = state.learned() {
                l.clear();
            }
        }
        Pool {
            name: Arc::from(pc.name.as_str()),
            policy: pc.policy,
            selector: Selector::build(pc.policy, &weights, turn),
            members,
            eligible,
            by_id,
            affinity,
            state,
            connect_timeout: pc.connect_timeout,
            response_timeout: pc.response_timeout,
            retries: pc.retries,
            drain_timeout: pc.drain_timeout,
            outlier: pc.outlier.clone(),
            all_down: pc.all_down,
            retry_budget: pc.retry_budget,
            slow_start: pc.slow_start,
            metrics,
        }
    }

    /// Counts an affinity outcome, when metrics are recorded.
    pub fn count_outcome(&self, o: Outcome) {
        if self.metrics {
            self.state.stats.count(o);
        }
    }

    /// Where the balancing rotation stands.
    pub(crate) fn selector_turn(&self) -> usize {
        self.selector.turn()
    }

    /// Positions in `eligible`, in balancing order; drawn `again` for a request whose
    /// first pick was passed over.
    pub(crate) fn selector_candidates(
        &self,
        again: bool,
        ignore_health: bool,
    ) -> crate::balance::Candidates {
        // A backend that is out counts as fully loaded (unless the pool fails open):
        // ejected or failing its checks, it has nothing in flight, and would otherwise
        // win most comparisons it is drawn into, sending its share on to whichever
        // backend comes next.
        let load = |i: usize| {
            let k = self.eligible[i];
            let m = &self.members[k];
            let in_flight = if ignore_health || self.healthy(k) {
                m.backend.in_flight()
            } else {
                usize::MAX / 2
            };
            (in_flight, m.weight)
        };
        if again {
            self.selector.candidates_again(load)
        } else {
            self.selector.candidates(load)
        }
    }

    /// Whether member `i` may serve a client whose affinity points at it.
    pub fn usable(&self, i: usize) -> bool {
        !self.members[i].backend.drain_expired(self.drain_timeout)
    }

    /// Usable, passing its active checks, and not ejected.
    pub fn healthy(&self, i: usize) -> bool {
        self.usable(i) && self.members[i].backend.health.is_up()
    }

    /// Whether member `i`, in slow start, is passed over this time (a coin weighted by
    /// how far its ramp has come).
    pub fn ramping_skip(&self, i: usize) -> bool {
        match self.slow_start {
            None => false,
            Some(d) => fastrand::f64() >= self.members[i].backend.health.ramp(d),
        }
    }

    /// Whether one more backend may be ejected without exceeding the pool's cap.
    pub fn may_eject(&self) -> bool {
        let configured = self.members.iter().filter(|m| !m.removed);
        let (n, ejected) = configured.fold((0, 0), |(n, e), m| {
            (n + 1, e + usize::from(m.backend.health.is_ejected()))
        });
        (ejected + 1) * 100 <= n * self.outlier.max_ejected_percent as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn learned_sessions_are_evicted_off_the_request_path() {
        let state = Arc::new(PoolState::default());
        let learned = Learned::new(3600, 128);
        let room_wanted = learned.room_wanted();
        let _ = state.learned.set(learned);
        let task = tokio::spawn(tend_learned(Arc::downgrade(&state), room_wanted.clone()));
        let table = state.learned().expect("set above");
        let backend: Arc<str> = Arc::from("a");
        for i in 0..126 {
            table.learn(&format!("s{i}"), &backend, 1);
        }
        // The table asked for room at 126 entries, without evicting on this thread.
        assert_eq!(table.len(), 126);
        let made = tokio::time::timeout(Duration::from_secs(10), async {
            while table.len() != 124 {
                tokio::task::yield_now().await;
            }
        });
        made.await.expect("the tending task made room");
        // Once the pool's state is gone, the task ends when it next wakes.
        drop(state);
        room_wanted.notify_one();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the task ended")
            .expect("the task did not fail");
    }
}
