//! Backend health: active checks (an HTTP GET every `interval`, flipping only after
//! `healthy_threshold` successes or `unhealthy_threshold` failures in a row) and passive
//! outlier ejection (consecutive connect failures or 5xx answers eject a backend for a
//! time that grows with each ejection).
//!
//! The state lives in the backend, so it survives reloads. Checks use a connection of
//! their own each time: they neither reuse the request path's connections nor count as
//! requests in flight.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;

use crate::config::{BackendAddr, HealthConfig, OutlierConfig};

use super::backend::{clock_ms, Backend};
use super::client::connect_tcp;

/// Health of one backend.
#[derive(Debug)]
pub struct Health {
    /// Result of active checks; true until checks say otherwise.
    active_up: AtomicBool,
    successes: AtomicU32,
    failures: AtomicU32,
    /// Consecutive request failures seen by the proxy.
    passive_failures: AtomicU32,
    /// `clock_ms` until which the backend is ejected (0: not ejected).
    ejected_until_ms: AtomicU64,
    /// How many times it was ejected: each ejection lasts longer.
    ejections: AtomicU32,
    /// `clock_ms` when it last came (back) into rotation: recovered from failed checks,
    /// or added by a reload. Slow start ramps from here (or from the end of an ejection).
    returned_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            active_up: AtomicBool::new(true),
            successes: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            passive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            returned_ms: AtomicU64::new(0),
        }
    }
}

impl Health {
    /// Healthy by active checks and not ejected.
    pub fn is_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed) && !self.is_ejected()
    }

    pub fn is_ejected(&self) -> bool {
        // Never ejected (the usual case): no need to read the clock.
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > clock_ms()
    }

    fn is_ejected_at(&self, now_ms: u64) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && until > now_ms
    }

    pub fn active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    /// Records one active check; returns true when the state flipped.
    pub fn record_check(&self, ok: bool, cfg: &HealthConfig) -> bool {
        if ok {
            self.failures.store(0, Ordering::Relaxed);
            let n = self.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.active_up() && n >= cfg.healthy_threshold {
                self.active_up.store(true, Ordering::Relaxed);
                self.mark_returned();
                return true;
            }
        } else {
            self.successes.store(0, Ordering::Relaxed);
            let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.active_up() && n >= cfg.unhealthy_threshold {
                self.active_up.store(false, Ordering::Relaxed);
                return true;
            }
        }
        false
    }

    /// Forgets the active checks' verdict (checks were switched off).
    pub fn reset_active(&self) {
        self.successes.store(0, Ordering::Relaxed);
        self.failures.store(0, Ordering::Relaxed);
        self.active_up.store(true, Ordering::Relaxed);
    }

    /// Marks the backend as just (re)joined: slow start ramps from now.
    pub fn mark_returned(&self) {
        // 0 means "never"; the clock may read 0 in the process's first millisecond.
        self.returned_ms.store(clock_ms().max(1), Ordering::Relaxed);
    }

    /// Share of its normal traffic the backend should take now, with `slow_start`:
    /// rises linearly from 0 to 1 over `slow_start` after it (re)joined.
    pub fn ramp(&self, slow_start: Duration) -> f64 {
        self.ramp_at(slow_start, clock_ms())
    }

    fn ramp_at(&self, slow_start: Duration, now_ms: u64) -> f64 {
        let since = self
            .returned_ms
            .load(Ordering::Relaxed)
            .max(self.ejected_until_ms.load(Ordering::Relaxed));
        if since == 0 {
            return 1.0;
        }
        let elapsed = now_ms.saturating_sub(since) as f64;
        (elapsed / slow_start.as_millis().max(1) as f64).min(1.0)
    }

    /// A request succeeded (any answer below 500).
    pub fn record_success(&self) {
        if self.passive_failures.load(Ordering::Relaxed) != 0 {
            self.passive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed (connect failure or 5xx). Ejects the backend when the failures in
    /// a row reach the limit and `may_eject` (the pool's ejection cap) allows; returns
    /// true when it ejected.
    ///
    /// The decision to eject is taken under `decisions`, the pool's: two backends that
    /// reach their limit at once cannot both pass `max_ejected_percent`, nor can one
    /// backend be ejected twice over (which would lengthen its next ejection).
    ///
    /// Ejections grow longer while they come close together: a backend that has been
    /// back for longer than the longest ejection starts again from `base_ejection`.
    pub fn record_failure(
        &self,
        cfg: &OutlierConfig,
        decisions: &Mutex<()>,
        may_eject: impl FnOnce() -> bool,
    ) -> bool {
        self.record_failure_at(cfg, decisions, may_eject, clock_ms())
    }

    fn record_failure_at(
        &self,
        cfg: &OutlierConfig,
        decisions: &Mutex<()>,
        may_eject: impl FnOnce() -> bool,
        now_ms: u64,
    ) -> bool {
        // Failures while ejected (of requests it still takes, as a pinned client's
        // backend or when the pool fails open) do not count towards the next ejection.
        if self.is_ejected_at(now_ms) {
            return false;
        }
        let n = self.passive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < cfg.consecutive_failures {
            return false;
        }
        // A lock that guards no data cannot be left inconsistent by a panic.
        let _decision = decisions.lock().unwrap_or_else(|e| e.into_inner());
        let n = self.passive_failures.load(Ordering::Relaxed);
        if n < cfg.consecutive_failures || self.is_ejected_at(now_ms) || !may_eject() {
            return false;
        }
        self.passive_failures.store(0, Ordering::Relaxed);
        let longest = cfg.max_ejection.max(cfg.base_ejection);
        let last_end = self.ejected_until_ms.load(Ordering::Relaxed);
        if last_end != 0 && now_ms.saturating_sub(last_end) > longest.as_millis() as u64 {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let k = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = cfg.base_ejection.saturating_mul(k).min(longest);
        self.ejected_until_ms
            .store(now_ms + time.as_millis() as u64, Ordering::Relaxed);
        true
    }
}

/// Runs active checks for `backend` while it exists, with the pool's current settings.
/// A reload that changes the settings starts the wait over with the new ones (a shorter
/// interval applies at once), and the result of a check made with settings no longer in
/// force is dropped: after checks were switched off, a late failure must not take the
/// backend out with nothing left to bring it back.
pub async fn check_loop(backend: Weak<Backend>) {
    let changed = match backend.upgrade() {
        None => return,
        Some(b) => b.health_changed(),
    };
    loop {
        let (cfg, addr) = match backend.upgrade() {
            None => return,
            Some(b) => (b.health_config(), b.address.clone()),
        };
        let Some(cfg) = cfg else {
            // Checks switched off by a reload, until one switches them on again.
            changed.notified().await;
            continue;
        };
        // Up to 10% jitter so the checks of many backends do not align.
        let jitter = cfg.interval.mul_f64(fastrand::f64() * 0.1);
        tokio::select! {
            () = tokio::time::sleep(cfg.interval + jitter) => {}
            () = changed.notified() => continue,
        }
        let ok = probe(&addr, &cfg).await;
        let Some(b) = backend.upgrade() else { return };
        if !b
            .health_config()
            .is_some_and(|now| std::sync::Arc::ptr_eq(&now, &cfg))
        {
            continue;
        }
        if b.health.record_check(ok, &cfg) {
            if ok {
                tracing::info!(backend = %b.id, "backend is healthy again");
            } else {
                tracing::warn!(backend = %b.id, "backend failed its health checks; taken out of rotation");
            }
        }
    }
}

/// One check: a GET of `cfg.path` on a new connection, within `cfg.timeout`.
pub async fn probe(addr: &BackendAddr, cfg: &HealthConfig) -> bool {
    let attempt = async {
        let stream = connect_tcp(addr).await.ok()?;
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get(cfg.path.as_str())
            .header(http::header::HOST, addr.to_string())
            .header(http::header::USER_AGENT, "switchyard-health-check")
            .body(Empty::new())
            .ok()?;
        let resp = tx.send_request(req).await.ok()?;
        Some(cfg.expect_status.contains(&resp.status().as_u16()))
    };
    matches!(
        tokio::time::timeout(cfg.timeout, attempt).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 3,
            expect_status: 200..=399,
        }
    }

    #[test]
    fn slow_start_ramps_linearly() {
        let h = Health::default();
        let d = Duration::from_secs(100);
        assert_eq!(
            h.ramp(d),
            1.0,
            "a backend present from the start is not ramping"
        );
        h.mark_returned();
        assert!(h.ramp(d) < 0.01);
        h.returned_ms.store(1_000, Ordering::Relaxed);
        assert_eq!(h.ramp_at(d, 51_000), 0.5);
        assert_eq!(h.ramp_at(d, 26_000), 0.25);
        assert_eq!(h.ramp_at(d, 250_000), 1.0);
        // The end of an ejection restarts the ramp.
        h.ejected_until_ms.store(200_000, Ordering::Relaxed);
        assert_eq!(h.ramp_at(d, 210_000), 0.1);
    }

    #[test]
    fn flips_only_after_thresholds() {
        let h = Health::default();
        let c = cfg();
        assert!(!h.record_check(false, &c));
        assert!(!h.record_check(false, &c));
        assert!(h.is_up());
        assert!(h.record_check(false, &c));
        assert!(!h.is_up());
        assert!(!h.record_check(true, &c));
        assert!(
            !h.record_check(false, &c),
            "a failure resets the run of successes"
        );
        assert!(!h.record_check(true, &c));
        assert!(h.record_check(true, &c));
        assert!(h.is_up());
    }

    fn outlier() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(25),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejection_needs_consecutive_failures_and_grows() {
        let h = Health::default();
        let o = outlier();
        assert!(!h.record_failure(&o, &Mutex::new(()), || true));
        h.record_success();
        assert!(!h.record_failure(&o, &Mutex::new(()), || true));
        assert!(!h.record_failure(&o, &Mutex::new(()), || true));
        assert!(h.record_failure(&o, &Mutex::new(()), || true));
        assert!(h.is_ejected() && !h.is_up());
        let until = h.ejected_until_ms.load(Ordering::Relaxed);
        assert!(until >= clock_ms() + 9_000 && until <= clock_ms() + 10_000);
        // The cap refuses: not ejected.
        let h2 = Health::default();
        for _ in 0..5 {
            assert!(!h2.record_failure(&o, &Mutex::new(()), || false));
        }
        assert!(h2.is_up());
        // Second and third ejections last longer, up to the maximum.
        h.ejected_until_ms.store(0, Ordering::Relaxed);
        for _ in 0..3 {
            h.record_failure(&o, &Mutex::new(()), || true);
        }
        let second = h.ejected_until_ms.load(Ordering::Relaxed) - clock_ms();
        assert!(second > 19_000 && second <= 20_000, "{second}");
        h.ejected_until_ms.store(0, Ordering::Relaxed);
        for _ in 0..3 {
            h.record_failure(&o, &Mutex::new(()), || true);
        }
        let third = h.ejected_until_ms.load(Ordering::Relaxed) - clock_ms();
        assert!(third > 24_000 && third <= 25_000, "{third}");
    }

    #[test]
    fn failures_while_ejected_do_not_count_towards_the_next_ejection() {
        let o = outlier();
        let h = Health::default();
        let lock = Mutex::new(());
        for _ in 0..3 {
            h.record_failure(&o, &lock, || true);
        }
        assert!(h.is_ejected());
        for _ in 0..5 {
            assert!(!h.record_failure(&o, &lock, || true));
        }
        // Back: it takes `consecutive_failures` new failures to go again.
        h.ejected_until_ms.store(0, Ordering::Relaxed);
        assert!(!h.record_failure(&o, &lock, || true));
        assert!(!h.record_failure(&o, &lock, || true));
        assert!(h.record_failure(&o, &lock, || true));
    }

    #[test]
    fn ejections_long_apart_start_again_from_the_base() {
        let o = outlier();
        let h = Health::default();
        let lock = Mutex::new(());
        let eject_at = |now: u64| {
            for _ in 0..3 {
                h.record_failure_at(&o, &lock, || true, now);
            }
            h.ejected_until_ms.load(Ordering::Relaxed) - now
        };
        // 10 s, then 20 s when the next comes soon after the first ended.
        assert_eq!(eject_at(1_000_000), 10_000);
        assert_eq!(eject_at(1_011_000), 20_000);
        // Back for longer than the longest ejection (25 s): the base again.
        assert_eq!(eject_at(1_031_000 + 25_001), 10_000);
    }

    #[test]
    fn the_pool_s_cap_is_asked_under_its_lock() {
        let o = outlier();
        let h = Health::default();
        let lock = Mutex::new(());
        for _ in 0..3 {
            h.record_failure(&o, &lock, || {
                // Held by this decision: another backend's must wait for it.
                assert!(lock.try_lock().is_err());
                true
            });
        }
        assert!(h.is_ejected());
    }
}
