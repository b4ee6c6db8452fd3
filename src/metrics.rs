//! The Prometheus exposition on the admin listener's `/metrics`.
//!
//! The request path only bumps atomics and a per-backend histogram kept in lasting
//! state ([`crate::upstream::BackendStats`], [`crate::pool::PoolState`]); nothing there
//! looks up a label. A scrape walks the current snapshot and writes every family into a
//! registry made for that scrape. So the series are exactly the backends of the current
//! snapshot (draining ones included): a removed backend's series disappear once it has
//! drained, and label values come only from the configuration, never from requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::pool::{Affinity, Outcome};
use crate::reload::Reloader;
use crate::runtime::Runtime;
use crate::upstream::stats::ByClass;

/// Open client connections of one listener.
#[derive(Debug)]
pub struct ListenerGauge {
    pub name: String,
    pub active: Arc<AtomicUsize>,
}

const CLASSES: [&str; 6] = ["", "1xx", "2xx", "3xx", "4xx", "5xx"];

fn counter_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let v = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(v.clone()))?;
    Ok(v)
}

fn gauge_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntGaugeVec> {
    let v = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(v.clone()))?;
    Ok(v)
}

/// Renders every metric family in the Prometheus text format.
pub fn render(
    rt: &Runtime,
    reloader: &Reloader,
    listeners: &[ListenerGauge],
    unrouted: &ByClass,
    access_log_dropped: u64,
) -> prometheus::Result<String> {
    let r = Registry::new();
    let requests = counter_vec(
        &r,
        "switchyard_requests_total",
        "Responses sent, by pool, backend and status class; backend is empty when no backend was involved, pool when the request belonged to no pool.",
        &["pool", "backend", "code"],
    )?;
    let connect_errors = counter_vec(
        &r,
        "switchyard_upstream_connect_errors_total",
        "Failed attempts to connect to a backend.",
        &["pool", "backend"],
    )?;
    let resets = counter_vec(
        &r,
        "switchyard_upstream_resets_total",
        "Requests whose backend connection closed or was reset before a complete response head.",
        &["pool", "backend"],
    )?;
    let opened = counter_vec(
        &r,
        "switchyard_upstream_connections_opened_total",
        "Connections opened to a backend; compare with requests to see reuse.",
        &["pool", "backend"],
    )?;
    let open = gauge_vec(
        &r,
        "switchyard_upstream_connections_open",
        "Connections open to a backend: busy, idle, or finishing an upload.",
        &["pool", "backend"],
    )?;
    let up = gauge_vec(
        &r,
        "switchyard_backend_up",
        "1 when the backend is considered healthy, else 0.",
        &["pool", "backend"],
    )?;
    let in_flight = gauge_vec(
        &r,
        "switchyard_backend_in_flight",
        "Requests sent to the backend and not finished.",
        &["pool", "backend"],
    )?;
    let downstream = gauge_vec(
        &r,
        "switchyard_downstream_connections_active",
        "Open client connections, by listener.",
        &["listener"],
    )?;
    let affinity = counter_vec(
        &r,
        "switchyard_affinity_total",
        "Affinity decisions of stateful pools, by outcome.",
        &["pool", "outcome"],
    )?;
    let learned = gauge_vec(
        &r,
        "switchyard_learned_sessions",
        "Sessions in the learned-affinity table.",
        &["pool"],
    )?;
    let reloads = counter_vec(
        &r,
        "switchyard_config_reloads_total",
        "Configuration reloads, by result.",
        &["result"],
    )?;
    let generation = IntGauge::new(
        "switchyard_config_generation",
        "Generation of the serving configuration.",
    )?;
    r.register(Box::new(generation.clone()))?;
    let last_success = Gauge::new(
        "switchyard_config_last_reload_success_timestamp_seconds",
        "Unix time of the last successful configuration load.",
    )?;
    r.register(Box::new(last_success.clone()))?;
    let fail_open = counter_vec(
        &r,
        "switchyard_pool_fail_open_total",
        "Requests routed as if every backend were healthy because none was.",
        &["pool"],
    )?;
    let refused = counter_vec(
        &r,
        "switchyard_retries_refused_total",
        "Retries not made because the pool's retry budget was spent.",
        &["pool"],
    )?;
    let access_log = IntCounter::new(
        "switchyard_access_log_dropped_total",
        "Access log lines lost because their output did not keep up or failed.",
    )?;
    r.register(Box::new(access_log.clone()))?;
    let build = gauge_vec(
        &r,
        "switchyard_build_info",
        "Build information; always 1.",
        &["version"],
    )?;

    for p in &rt.pools {
        for m in &p.members {
            let b = &m.backend;
            let labels = [&*p.name, &*b.id];
            // Per-request series exist only while they are recorded (`server.metrics`).
            if p.metrics {
                for (class, code) in CLASSES.iter().enumerate().skip(1) {
                    let n = b.stats.responses(class);
                    // 2xx and 5xx always exist, so rate() sees the first errors.
                    if n > 0 || matches!(*code, "2xx" | "5xx") {
                        requests
                            .with_label_values(&[&*p.name, &*b.id, code])
                            .inc_by(n);
                    }
                }
                r.register(Box::new(b.stats.duration.clone()))?;
            }
            connect_errors
                .with_label_values(&labels)
                .inc_by(b.stats.connect_errors());
            resets.with_label_values(&labels).inc_by(b.stats.resets());
            opened
                .with_label_values(&labels)
                .inc_by(b.stats.connections_opened());
            open.with_label_values(&labels)
                .set(b.pool.open_count() as i64);
            up.with_label_values(&labels)
                .set(i64::from(b.health.is_up()));
            in_flight
                .with_label_values(&labels)
                .set(b.in_flight() as i64);
        }
        for (class, code) in CLASSES.iter().enumerate().skip(1) {
            let n = p.state.unattributed(class);
            if n > 0 && p.metrics {
                requests.with_label_values(&[&*p.name, "", code]).inc_by(n);
            }
        }
        fail_open
            .with_label_values(&[&*p.name])
            .inc_by(p.state.fail_open.load(Ordering::Relaxed));
        refused
            .with_label_values(&[&*p.name])
            .inc_by(p.state.retries_refused.load(Ordering::Relaxed));
        if p.metrics && !matches!(p.affinity, Affinity::None) {
            for o in Outcome::ALL {
                affinity
                    .with_label_values(&[&*p.name, o.as_str()])
                    .inc_by(p.state.stats.get(o));
            }
        }
        if let (Affinity::Learn { .. }, Some(l)) = (&p.affinity, p.state.learned()) {
            learned.with_label_values(&[&*p.name]).set(l.len() as i64);
        }
    }
    // Responses outside any pool: no route matched, or the head could not be read.
    if rt.config.server.metrics {
        for (class, code) in CLASSES.iter().enumerate().skip(1) {
            let n = unrouted.get(class);
            if n > 0 {
                requests.with_label_values(&["", "", code]).inc_by(n);
            }
        }
    }
    for l in listeners {
        downstream
            .with_label_values(&[&l.name])
            .set(l.active.load(Ordering::Relaxed) as i64);
    }
    reloads
        .with_label_values(&["success"])
        .inc_by(reloader.successes.load(Ordering::Relaxed));
    reloads
        .with_label_values(&["failure"])
        .inc_by(reloader.failures.load(Ordering::Relaxed));
    generation.set(rt.generation as i64);
    access_log.inc_by(access_log_dropped);
    last_success.set(reloader.last_success_unix.load(Ordering::Relaxed) as f64);
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    #[cfg(target_os = "linux")]
    r.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;

    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
