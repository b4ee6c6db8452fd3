//! `RawConfig` → `Config`: every semantic rule of the schema, each failure a
//! [`ConfigError`] that points at the offending key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawConfig, RawHealth, RawLearn, RawOutlier, RawPool, RawSticky};
use super::{AllDown, HealthConfig, OutlierConfig};
use crate::balance::key::{is_cookie_name, KeySource};
use crate::balance::{consistent_hash, round_robin};

use super::{
    line_col, AccessLog, AdminConfig, AffinityConfig, BackendAddr, BackendConfig, Config,
    ConfigError, HashConfig, HostMatch, LearnConfig, Limits, OnUnavailable, Policy, PoolConfig,
    RouteConfig, SameSite, Secret, SecureMode, ServerConfig, StickyConfig,
};

/// Largest accepted backend weight: keeps the round-robin schedule table small.
pub const MAX_WEIGHT: i64 = 1000;
/// Most backends in one pool.
pub const MAX_BACKENDS: usize = 10_000;
/// Most steps building a pool's round-robin cycle may take (about a tenth of a second):
/// ten thousand backends of equal weight, or fewer with uneven weights.
const MAX_SCHEDULE_WORK: u64 = 100_000_000;
/// hyper refuses read buffers below this size.
const MIN_HEADER_BYTES: i64 = 8192;

/// The shortest health-check interval.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(10);

/// The longest duration any key accepts.
/// Ten years as duration strings count them (`"10y"`: a year is 365.25 days).
const MAX_DURATION: Duration = Duration::from_secs(315_576_000);

struct Ctx<'a> {
    text: &'a str,
    file: &'a str,
}

impl Ctx<'_> {
    fn err(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        msg: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = span.map_or((1, 1), |s| line_col(self.text, s.start));
        ConfigError {
            file: self.file.to_owned(),
            line,
            column,
            key: key.into(),
            message: msg.into(),
        }
    }

    fn duration(
        &self,
        v: &Option<Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let d = humantime::parse_duration(v.get_ref().trim()).map_err(|e| {
            self.err(
                Some(v.span()),
                key,
                format!(
                    "invalid duration {:?} ({e}); write e.g. \"250ms\", \"2s\", \"1m\", \"1h\"",
                    v.get_ref()
                ),
            )
        })?;
        if d.is_zero() {
            return Err(self.err(Some(v.span()), key, "must be greater than zero"));
        }
        // The timers count whole milliseconds.
        if d < Duration::from_millis(1) {
            return Err(self.err(Some(v.span()), key, "must be at least 1ms"));
        }
        // Far enough for any timeout or lifetime, near enough that a deadline of now
        // plus it is always a time the clock can hold.
        if d > MAX_DURATION {
            return Err(self.err(Some(v.span()), key, "must be at most 10 years"));
        }
        Ok(d)
    }

    fn int(
        &self,
        v: &Option<Spanned<i64>>,
        key: &str,
        range: Range<i64>,
        default: i64,
    ) -> Result<i64, ConfigError> {
        let Some(v) = v else { return Ok(default) };
        let n = *v.get_ref();
        if !range.contains(&n) {
            return Err(self.err(
                Some(v.span()),
                key,
                format!(
                    "{n} is out of range; expected {} to {}",
                    range.start,
                    range.end - 1
                ),
            ));
        }
        Ok(n)
    }

    fn socket_addr(&self, v: &Spanned<String>, key: &str) -> Result<SocketAddr, ConfigError> {
        v.get_ref().trim().parse().map_err(|_| {
            self.err(
                Some(v.span()),
                key,
                format!("invalid listen address {:?}; expected IP:PORT, e.g. \"127.0.0.1:8080\" or \"[::1]:8080\"", v.get_ref()),
            )
        })
    }
}

/// Whether listening on both `a` and `b` would fail: the same port (not 0, which picks
/// a free one) on the same address, or on an unspecified address that covers the other
/// (`0.0.0.0` every IPv4 address; `[::]` every address, as a dual-stack socket).
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    use std::net::IpAddr;
    let covers = |x: IpAddr, y: IpAddr| match x {
        IpAddr::V6(x) => x.is_unspecified(),
        IpAddr::V4(x) => x.is_unspecified() && y.is_ipv4(),
    };
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || covers(a.ip(), b.ip()) || covers(b.ip(), a.ip()))
}

/// Validates a parsed file. `text` and `file` are used only to locate errors.
pub fn validate(raw: &RawConfig, text: &str, file: &str) -> Result<Config, ConfigError> {
    let cx = Ctx { text, file };
    let server = server(&cx, raw)?;
    let admin = match &raw.admin {
        None => None,
        Some(a) => {
            let listen = cx.socket_addr(&a.listen, "admin.listen")?;
            if let Some(other) = server.listen.iter().find(|&&l| overlaps(l, listen)) {
                return Err(cx.err(
                    Some(a.listen.span()),
                    "admin.listen",
                    format!("must differ from every server.listen address: {listen} takes the port of {other}"),
                ));
            }
            Some(AdminConfig { listen })
        }
    };
    let mut pools = Vec::with_capacity(raw.pools.len());
    for (name, pool) in &raw.pools {
        pools.push(self::pool(&cx, name, pool)?);
    }
    if pools.is_empty() {
        return Err(cx.err(
            None,
            "pools",
            "at least one pool is required, e.g. [pools.web] with backends = [\"127.0.0.1:9001\"]",
        ));
    }
    shared_sticky_cookies(&cx, raw, &pools)?;
    let routes = routes(&cx, raw, &pools)?;
    Ok(Config {
        source: None,
        content_hash: 0,
        secrets_hash: 0,
        server,
        admin,
        routes,
        pools,
    })
}

/// Refuses two `sticky_cookie` pools whose cookies a browser would keep as one: the
/// same name, path and domain. Each pool would take the other's cookie for an invalid
/// one and issue its own over it, and clients would move between backends on every
/// visit from one pool to the other.
fn shared_sticky_cookies(
    cx: &Ctx,
    raw: &RawConfig,
    pools: &[PoolConfig],
) -> Result<(), ConfigError> {
    let mut seen: Vec<(&str, &StickyConfig)> = Vec::new();
    for p in pools {
        let AffinityConfig::Cookie(s) = &p.affinity else {
            continue;
        };
        let same = |o: &StickyConfig| {
            o.cookie == s.cookie
                && o.path == s.path
                && match (&o.domain, &s.domain) {
                    (None, None) => true,
                    (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
                    _ => false,
                }
        };
        if let Some((other, _)) = seen.iter().find(|(_, o)| same(o)) {
            let pool = raw.pools.get(&p.name);
            let sticky = pool.and_then(|r| r.get_ref().sticky.as_ref());
            let span = match sticky {
                Some(st) => Some(st.get_ref().cookie.as_ref().map_or(st.span(), |c| c.span())),
                None => pool.map(|r| r.span()),
            };
            return Err(cx.err(
                span,
                format!("pools.{}.sticky.cookie", p.name),
                format!(
                    "pools {other:?} and {:?} would share the cookie {:?} (same path and domain): \
                     a browser keeps one, and each pool would replace the other's; give one \
                     a cookie of its own, e.g. cookie = \"{}_{}\"",
                    p.name,
                    s.cookie,
                    s.cookie,
                    p.name.to_ascii_uppercase()
                ),
            ));
        }
        seen.push((&p.name, s));
    }
    Ok(())
}

fn server(cx: &Ctx, raw: &RawConfig) -> Result<ServerConfig, ConfigError> {
    let s = &raw.server;
    let mut listen = Vec::new();
    match &s.listen {
        None => listen.push(SocketAddr::from(([127, 0, 0, 1], 8080))),
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(cx.err(
                    Some(list.span()),
                    "server.listen",
                    "at least one listen address is required",
                ));
            }
            for (i, a) in list.get_ref().iter().enumerate() {
                let key = format!("server.listen[{i}]");
                let addr = cx.socket_addr(a, &key)?;
                if let Some(other) = listen.iter().find(|&&l| overlaps(l, addr)) {
                    let why = if *other == addr {
                        format!("{addr} is listed twice")
                    } else {
                        format!("{addr} overlaps {other}: both take the same port")
                    };
                    return Err(cx.err(Some(a.span()), key, why));
                }
                listen.push(addr);
            }
        }
    }
    if let Some(tls) = &s.tls {
        return Err(cx.err(
            Some(tls.span()),
            "server.tls",
            "TLS listeners are not available in this version; terminate TLS in front of Switchyard or remove [[server.tls]]",
        ));
    }
    let access_log = match &s.access_log {
        None => AccessLog::Off,
        Some(v) => match v.get_ref().as_str() {
            "off" => AccessLog::Off,
            "json" => AccessLog::Json,
            "text" => AccessLog::Text,
            other => {
                return Err(cx.err(
                    Some(v.span()),
                    "server.access_log",
                    format!("unknown value {other:?}; expected \"off\", \"json\" or \"text\""),
                ))
            }
        },
    };
    let l = &s.limits;
    let limits = Limits {
        max_connections: cx.int(
            &l.max_connections,
            "server.limits.max_connections",
            1..10_000_001,
            10_000,
        )? as usize,
        header_read_timeout: cx.duration(
            &l.header_read_timeout,
            "server.limits.header_read_timeout",
            Duration::from_secs(10),
        )?,
        idle_timeout: cx.duration(
            &l.idle_timeout,
            "server.limits.idle_timeout",
            Duration::from_secs(60),
        )?,
        max_header_bytes: cx.int(
            &l.max_header_bytes,
            "server.limits.max_header_bytes",
            MIN_HEADER_BYTES..16 * 1024 * 1024 + 1,
            65536,
        )? as usize,
    };
    Ok(ServerConfig {
        listen,
        workers: cx.int(&s.workers, "server.workers", 0..1025, 0)? as usize,
        shutdown_grace: cx.duration(
            &s.shutdown_grace,
            "server.shutdown_grace",
            Duration::from_secs(30),
        )?,
        access_log,
        metrics: s.metrics.unwrap_or(true),
        limits,
    })
}

fn pool(cx: &Ctx, n: &str, raw: &Spanned<RawPool>) -> Result<PoolConfig, ConfigError> {
    let key = |k: &str| format!("pools.{n}.{k}");
    if n.is_empty()
        || !n
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(cx.err(
            Some(raw.span()),
            format!("pools.{n}"),
            "pool names use only letters, digits, '_' and '-'",
        ));
    }
    let p = raw.get_ref();
    let policy = match &p.policy {
        None => Policy::RoundRobin,
        Some(v) => match v.get_ref().as_str() {
            "round_robin" => Policy::RoundRobin,
            "least_request" => Policy::LeastRequest,
            "sticky_cookie" => Policy::StickyCookie,
            "sticky_learn" => Policy::StickyLearn,
            "consistent_hash" => Policy::ConsistentHash,
            other => {
                return Err(cx.err(
                    Some(v.span()),
                    key("policy"),
                    format!("unknown policy {other:?}; expected one of round_robin, least_request, sticky_cookie, sticky_learn, consistent_hash"),
                ))
            }
        },
    };
    // A sub-table for another policy is a mistake worth pointing at.
    let misplaced = [
        (
            "sticky",
            p.sticky.as_ref().map(|v| v.span()),
            Policy::StickyCookie,
        ),
        (
            "learn",
            p.learn.as_ref().map(|v| v.span()),
            Policy::StickyLearn,
        ),
        (
            "hash_key",
            p.hash_key.as_ref().map(|v| v.span()),
            Policy::ConsistentHash,
        ),
        (
            "bounded_load",
            p.bounded_load.as_ref().map(|v| v.span()),
            Policy::ConsistentHash,
        ),
    ];
    for (k, span, wants) in misplaced {
        if span.is_some() && policy != wants {
            return Err(cx.err(
                span,
                key(k),
                format!(
                    "only used with policy = \"{}\", but this pool's policy is \"{}\"",
                    wants.as_str(),
                    policy.as_str()
                ),
            ));
        }
    }
    let sticky_drain = p
        .sticky
        .as_ref()
        .and_then(|s| s.get_ref().drain_timeout.as_ref());
    if let (Some(a), Some(_)) = (&p.drain_timeout, sticky_drain) {
        return Err(cx.err(
            Some(a.span()),
            key("drain_timeout"),
            "drain_timeout is set both here and in [sticky]; keep one",
        ));
    }
    let drain_timeout = match sticky_drain {
        Some(d) => cx.duration(
            &Some(d.clone()),
            &key("sticky.drain_timeout"),
            Duration::ZERO,
        )?,
        None => cx.duration(
            &p.drain_timeout,
            &key("drain_timeout"),
            Duration::from_secs(300),
        )?,
    };
    let affinity = match policy {
        Policy::RoundRobin | Policy::LeastRequest => AffinityConfig::None,
        Policy::StickyCookie => AffinityConfig::Cookie(sticky(cx, n, p.sticky.as_ref())?),
        Policy::StickyLearn => AffinityConfig::Learn(learn(cx, n, raw.span(), p.learn.as_ref())?),
        Policy::ConsistentHash => AffinityConfig::Hash(hash(cx, n, p)?),
    };
    let list = &p.backends;
    if list.get_ref().is_empty() {
        return Err(cx.err(
            Some(list.span()),
            key("backends"),
            "a pool needs at least one backend",
        ));
    }
    let most = match policy {
        Policy::ConsistentHash => consistent_hash::MAX_BACKENDS,
        _ => MAX_BACKENDS,
    };
    if list.get_ref().len() > most {
        return Err(cx.err(
            Some(list.span()),
            key("backends"),
            format!(
                "{} backends; a {} pool takes at most {most}",
                list.get_ref().len(),
                policy.as_str()
            ),
        ));
    }
    let mut backends: Vec<BackendConfig> = Vec::with_capacity(list.get_ref().len());
    let mut ids = HashSet::new();
    for (i, b) in list.get_ref().iter().enumerate() {
        let bkey = format!("pools.{n}.backends[{i}]");
        let rb = b.get_ref();
        let address_span = Some(rb.address_span.clone().unwrap_or_else(|| b.span()));
        let address = backend_addr(&rb.address)
            .map_err(|m| cx.err(address_span.clone(), format!("{bkey}.address"), m))?;
        let weight = match &rb.weight {
            None => 1,
            Some(w) => match *w.get_ref() {
                n @ 1..=MAX_WEIGHT => n as u32,
                0 => return Err(cx.err(
                    Some(w.span()),
                    format!("{bkey}.weight"),
                    "weight 0 is not allowed: weights are 1 to 1000; to take a backend out, remove it",
                )),
                n => {
                    return Err(cx.err(
                        Some(w.span()),
                        format!("{bkey}.weight"),
                        format!("weight {n} is out of range; expected 1 to {MAX_WEIGHT}"),
                    ))
                }
            },
        };
        let (id, id_span) = match &rb.id {
            Some(id) if id.get_ref().trim().is_empty() => {
                return Err(cx.err(
                    Some(id.span()),
                    format!("{bkey}.id"),
                    "a backend id must not be empty",
                ))
            }
            // Ids go into log lines, labels and `/status`: one word, nothing that could
            // end a line or a field.
            Some(id)
                if id
                    .get_ref()
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()) =>
            {
                return Err(cx.err(
                    Some(id.span()),
                    format!("{bkey}.id"),
                    format!(
                        "backend id {:?} has a space or control character; ids are one word",
                        id.get_ref()
                    ),
                ))
            }
            Some(id) => (id.get_ref().clone(), Some(id.span())),
            None => (rb.address.trim().to_owned(), address_span),
        };
        if !ids.insert(id.clone()) {
            return Err(cx.err(id_span, format!("{bkey}.id"), format!("duplicate backend id {id:?} in pool {n:?}; give each backend a distinct address or id")));
        }
        backends.push(BackendConfig {
            id,
            address,
            weight,
            drain: rb.drain.unwrap_or(false),
        });
    }
    let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
    if round_robin::schedule_work(&weights) > MAX_SCHEDULE_WORK {
        return Err(cx.err(
            Some(list.span()),
            key("backends"),
            "these weights make a round-robin cycle too long to build; use fewer distinct \
             weights, or weights with a common divisor",
        ));
    }
    Ok(PoolConfig {
        name: n.to_owned(),
        policy,
        backends,
        connect_timeout: cx.duration(
            &p.connect_timeout,
            &key("connect_timeout"),
            Duration::from_secs(2),
        )?,
        response_timeout: cx.duration(
            &p.response_timeout,
            &key("response_timeout"),
            Duration::from_secs(30),
        )?,
        retries: cx.int(&p.retries, &key("retries"), 0..11, 2)? as u32,
        upstream_idle_timeout: cx.duration(
            &p.upstream_idle_timeout,
            &key("upstream_idle_timeout"),
            Duration::from_secs(60),
        )?,
        max_idle_per_backend: cx.int(
            &p.max_idle_per_backend,
            &key("max_idle_per_backend"),
            0..100_001,
            256,
        )? as usize,
        max_connections_per_backend: match &p.max_connections_per_backend {
            None => None,
            Some(_) => Some(cx.int(
                &p.max_connections_per_backend,
                &key("max_connections_per_backend"),
                1..1_000_001,
                0,
            )? as usize),
        },
        drain_timeout,
        affinity,
        health: match &p.health {
            None => None,
            Some(h) => Some(health(cx, n, h.get_ref())?),
        },
        outlier: outlier(cx, n, p.outlier.as_ref().map(|o| o.get_ref()))?,
        slow_start: match &p.slow_start {
            None => None,
            Some(_) => Some(cx.duration(&p.slow_start, &key("slow_start"), Duration::ZERO)?),
        },
        retry_budget: match &p.retry_budget {
            None => 0.2,
            Some(v) => match v.get_ref() {
                toml::Value::Float(f) if (0.0..=1.0).contains(f) => *f,
                toml::Value::Integer(i @ 0..=1) => *i as f64,
                _ => {
                    return Err(cx.err(
                        Some(v.span()),
                        key("retry_budget"),
                        "expected a share of requests from 0.0 to 1.0, e.g. 0.2",
                    ))
                }
            },
        },
        all_down: match &p.all_down {
            None => AllDown::FailOpen,
            Some(v) => match v.get_ref().as_str() {
                "fail_open" => AllDown::FailOpen,
                "reject" => AllDown::Reject,
                other => {
                    return Err(cx.err(
                        Some(v.span()),
                        key("all_down"),
                        format!("unknown value {other:?}; expected \"fail_open\" or \"reject\""),
                    ))
                }
            },
        },
    })
}

fn health(cx: &Ctx, pool: &str, h: &RawHealth) -> Result<HealthConfig, ConfigError> {
    let key = |k: &str| format!("pools.{pool}.health.{k}");
    let path = match &h.path {
        None => "/healthz".to_owned(),
        Some(p) if p.get_ref().starts_with('/') && p.get_ref().parse::<http::Uri>().is_ok() => {
            p.get_ref().clone()
        }
        Some(p) => {
            return Err(cx.err(
                Some(p.span()),
                key("path"),
                format!("invalid path {:?}; it must start with '/'", p.get_ref()),
            ))
        }
    };
    let expect_status = match &h.expect_status {
        None => 200..=399,
        Some(v) => {
            let text = v.get_ref().trim();
            let (lo, hi) = text.split_once('-').unwrap_or((text, text));
            match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
                (Ok(lo), Ok(hi)) if (100..=599).contains(&lo) && (lo..=599).contains(&hi) => {
                    lo..=hi
                }
                _ => {
                    return Err(cx.err(
                        Some(v.span()),
                        key("expect_status"),
                        format!("invalid status range {text:?}; write e.g. \"200-399\" or \"204\""),
                    ))
                }
            }
        }
    };
    let interval = cx.duration(&h.interval, &key("interval"), Duration::from_secs(2))?;
    if interval < MIN_HEALTH_INTERVAL {
        return Err(cx.err(
            h.interval.as_ref().map(|i| i.span()),
            key("interval"),
            format!("must be at least {MIN_HEALTH_INTERVAL:?}: a check per backend that often is load enough"),
        ));
    }
    let timeout = cx.duration(&h.timeout, &key("timeout"), Duration::from_secs(1))?;
    if timeout > interval {
        // Points at what was written: the timeout, or an interval shorter than the
        // default timeout.
        return Err(match &h.timeout {
            Some(t) => cx.err(Some(t.span()), key("timeout"), "must not exceed interval"),
            None => cx.err(
                h.interval.as_ref().map(|i| i.span()),
                key("interval"),
                format!("must not be shorter than timeout ({timeout:?} by default)"),
            ),
        });
    }
    Ok(HealthConfig {
        path,
        interval,
        timeout,
        healthy_threshold: cx.int(&h.healthy_threshold, &key("healthy_threshold"), 1..101, 2)?
            as u32,
        unhealthy_threshold: cx.int(
            &h.unhealthy_threshold,
            &key("unhealthy_threshold"),
            1..101,
            3,
        )? as u32,
        expect_status,
    })
}

fn outlier(cx: &Ctx, pool: &str, o: Option<&RawOutlier>) -> Result<OutlierConfig, ConfigError> {
    let key = |k: &str| format!("pools.{pool}.outlier.{k}");
    let default = RawOutlier::default();
    let o = o.unwrap_or(&default);
    let base_ejection = cx.duration(
        &o.base_ejection,
        &key("base_ejection"),
        Duration::from_secs(30),
    )?;
    // Unset, the maximum is five minutes, or the base if that is longer.
    let max_ejection = cx.duration(
        &o.max_ejection,
        &key("max_ejection"),
        base_ejection.max(Duration::from_secs(300)),
    )?;
    if max_ejection < base_ejection {
        return Err(cx.err(
            o.max_ejection.as_ref().map(|t| t.span()),
            key("max_ejection"),
            "must be at least base_ejection",
        ));
    }
    Ok(OutlierConfig {
        consecutive_failures: cx.int(
            &o.consecutive_failures,
            &key("consecutive_failures"),
            0..10_001,
            5,
        )? as u32,
        base_ejection,
        max_ejection,
        max_ejected_percent: cx.int(
            &o.max_ejected_percent,
            &key("max_ejected_percent"),
            0..101,
            50,
        )? as u32,
    })
}

fn sticky(
    cx: &Ctx,
    pool: &str,
    raw: Option<&Spanned<RawSticky>>,
) -> Result<StickyConfig, ConfigError> {
    let default = RawSticky::default();
    let s = raw.map_or(&default, |r| r.get_ref());
    let key = |k: &str| format!("pools.{pool}.sticky.{k}");
    let cookie = match &s.cookie {
        None => "SWITCHYARD".to_owned(),
        Some(c) if is_cookie_name(c.get_ref()) => c.get_ref().clone(),
        Some(c) => {
            return Err(cx.err(
                Some(c.span()),
                key("cookie"),
                format!(
                    "invalid cookie name {:?}; use letters, digits and !#$%&'*+-.^_`|~",
                    c.get_ref()
                ),
            ))
        }
    };
    let mut secrets = Vec::new();
    if let Some(v) = &s.secret_env {
        for name in string_list(cx, v, &key("secret_env"))? {
            match std::env::var_os(&name) {
                Some(val) if !val.is_empty() => secrets.push(check_secret(
                    cx,
                    v,
                    &key("secret_env"),
                    val.into_encoded_bytes().trim_ascii().to_vec(),
                    &format!("environment variable {name}"),
                )?),
                _ => {
                    return Err(cx.err(
                        Some(v.span()),
                        key("secret_env"),
                        format!("environment variable {name} is not set or empty"),
                    ))
                }
            }
        }
    }
    if let Some(v) = &s.secret_file {
        for path in string_list(cx, v, &key("secret_file"))? {
            let full = relative_to(cx.file, &path);
            let text = std::fs::read(&full).map_err(|e| {
                cx.err(
                    Some(v.span()),
                    key("secret_file"),
                    format!("cannot read {}: {e}", full.display()),
                )
            })?;
            let mut any = false;
            for line in text.split(|&b| b == b'\n') {
                let line = line.trim_ascii();
                if !line.is_empty() {
                    secrets.push(check_secret(
                        cx,
                        v,
                        &key("secret_file"),
                        line.to_vec(),
                        &full.display().to_string(),
                    )?);
                    any = true;
                }
            }
            if !any {
                return Err(cx.err(
                    Some(v.span()),
                    key("secret_file"),
                    format!("{} holds no secret", full.display()),
                ));
            }
        }
    }
    let on_unavailable = match &s.on_unavailable {
        None => OnUnavailable::Redispatch,
        Some(v) => match v.get_ref().as_str() {
            "redispatch" => OnUnavailable::Redispatch,
            "reject" => OnUnavailable::Reject,
            other => {
                return Err(cx.err(
                    Some(v.span()),
                    key("on_unavailable"),
                    format!("unknown value {other:?}; expected \"redispatch\" or \"reject\""),
                ))
            }
        },
    };
    let secure = match &s.secure {
        None => SecureMode::Auto,
        Some(v) => match v.get_ref() {
            toml::Value::Boolean(true) => SecureMode::Always,
            toml::Value::Boolean(false) => SecureMode::Never,
            toml::Value::String(a) if a == "auto" => SecureMode::Auto,
            _ => {
                return Err(cx.err(
                    Some(v.span()),
                    key("secure"),
                    "expected \"auto\", true or false",
                ))
            }
        },
    };
    let same_site = match &s.same_site {
        None => SameSite::Lax,
        Some(v) => match v.get_ref().to_ascii_lowercase().as_str() {
            "lax" => SameSite::Lax,
            "strict" => SameSite::Strict,
            "none" => SameSite::None,
            _ => {
                return Err(cx.err(
                    Some(v.span()),
                    key("same_site"),
                    format!(
                        "unknown value {:?}; expected \"lax\", \"strict\" or \"none\"",
                        v.get_ref()
                    ),
                ))
            }
        },
    };
    if same_site == SameSite::None && secure == SecureMode::Never {
        return Err(cx.err(
            s.secure.as_ref().map(|v| v.span()),
            key("secure"),
            "same_site = \"none\" requires Secure (browsers drop such cookies otherwise); remove secure = false",
        ));
    }
    let path = match &s.path {
        None => "/".to_owned(),
        Some(p)
            if p.get_ref().starts_with('/')
                && !p.get_ref().chars().any(|c| c == ';' || c.is_control()) =>
        {
            p.get_ref().clone()
        }
        Some(p) => {
            return Err(cx.err(
                Some(p.span()),
                key("path"),
                "a cookie path starts with '/' and holds no ';'",
            ))
        }
    };
    let domain = match &s.domain {
        None => None,
        Some(d) => {
            let v = d.get_ref().trim_start_matches('.').to_ascii_lowercase();
            if v.is_empty()
                || !v.split('.').all(|l| {
                    !l.is_empty()
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                        && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
            {
                return Err(cx.err(
                    Some(d.span()),
                    key("domain"),
                    format!("invalid cookie domain {:?}", d.get_ref()),
                ));
            }
            Some(v)
        }
    };
    let ttl = cx.duration(&s.ttl, &key("ttl"), Duration::from_secs(3600))?;
    if ttl < Duration::from_secs(1) {
        return Err(cx.err(
            s.ttl.as_ref().map(|t| t.span()),
            key("ttl"),
            "at least 1s (cookie lifetimes are whole seconds)",
        ));
    }
    if ttl > Duration::from_secs(400 * 24 * 3600) {
        return Err(cx.err(
            s.ttl.as_ref().map(|t| t.span()),
            key("ttl"),
            "at most 400 days (browsers cap cookie lifetimes there)",
        ));
    }
    Ok(StickyConfig {
        cookie,
        ttl,
        secrets,
        on_unavailable,
        sliding: s.sliding.unwrap_or(false),
        http_only: s.http_only.unwrap_or(true),
        secure,
        same_site,
        path,
        domain,
    })
}

/// Shortest accepted signing secret.
const MIN_SECRET: usize = 16;

fn check_secret(
    cx: &Ctx,
    v: &Spanned<toml::Value>,
    key: &str,
    secret: Vec<u8>,
    from: &str,
) -> Result<Secret, ConfigError> {
    if secret.len() < MIN_SECRET {
        return Err(cx.err(
            Some(v.span()),
            key,
            format!(
                "the secret in {from} is {} bytes; at least {MIN_SECRET} are required",
                secret.len()
            ),
        ));
    }
    Ok(Secret(secret))
}

fn string_list(cx: &Ctx, v: &Spanned<toml::Value>, key: &str) -> Result<Vec<String>, ConfigError> {
    let bad = || {
        cx.err(
            Some(v.span()),
            key,
            "expected a string or a list of strings",
        )
    };
    match v.get_ref() {
        toml::Value::String(s) if !s.is_empty() => Ok(vec![s.clone()]),
        toml::Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| {
                x.as_str()
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .ok_or_else(bad)
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// `path` as written if absolute, else relative to the configuration file's folder.
fn relative_to(config_file: &str, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    Path::new(config_file)
        .parent()
        .map_or_else(|| p.to_path_buf(), |dir| dir.join(p))
}

fn learn(
    cx: &Ctx,
    pool: &str,
    pool_span: Range<usize>,
    raw: Option<&Spanned<RawLearn>>,
) -> Result<LearnConfig, ConfigError> {
    let key = |k: &str| format!("pools.{pool}.learn.{k}");
    let Some(raw) = raw else {
        return Err(cx.err(Some(pool_span), format!("pools.{pool}.learn"), "policy sticky_learn needs [pools.NAME.learn] with cookie = \"NAME\", the application's session cookie"));
    };
    let l = raw.get_ref();
    let cookie = match &l.cookie {
        Some(c) if is_cookie_name(c.get_ref()) => c.get_ref().clone(),
        Some(c) => return Err(cx.err(Some(c.span()), key("cookie"), format!("invalid cookie name {:?}", c.get_ref()))),
        None => return Err(cx.err(Some(raw.span()), key("cookie"), "the name of the application's session cookie is required, e.g. cookie = \"JSESSIONID\"")),
    };
    Ok(LearnConfig {
        cookie,
        ttl: {
            let ttl = cx.duration(&l.ttl, &key("ttl"), Duration::from_secs(1800))?;
            if ttl < Duration::from_secs(1) {
                return Err(cx.err(
                    l.ttl.as_ref().map(|t| t.span()),
                    key("ttl"),
                    "at least 1s (sessions are timed in whole seconds)",
                ));
            }
            ttl
        },
        max_entries: cx.int(
            &l.max_entries,
            &key("max_entries"),
            1..100_000_001,
            1_000_000,
        )? as usize,
    })
}

fn hash(cx: &Ctx, pool: &str, p: &RawPool) -> Result<HashConfig, ConfigError> {
    let key = match &p.hash_key {
        None => vec![KeySource::ClientIp],
        Some(list) => {
            if list.get_ref().is_empty() {
                return Err(cx.err(
                    Some(list.span()),
                    format!("pools.{pool}.hash_key"),
                    "at least one key source is required",
                ));
            }
            let sources = list
                .get_ref()
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    KeySource::parse(s.get_ref()).map_err(|m| {
                        cx.err(Some(s.span()), format!("pools.{pool}.hash_key[{i}]"), m)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            // client_ip and path are always present: anything after them is dead.
            let list = list.get_ref();
            if let Some(i) = sources
                .iter()
                .position(|k| matches!(k, KeySource::ClientIp | KeySource::Path))
            {
                if i + 1 < sources.len() {
                    return Err(cx.err(
                        Some(list[i + 1].span()),
                        format!("pools.{pool}.hash_key[{}]", i + 1),
                        format!(
                            "never used: {:?} before it is always present; put it last",
                            list[i].get_ref()
                        ),
                    ));
                }
            }
            sources
        }
    };
    let bounded_load = match &p.bounded_load {
        None => None,
        Some(v) => {
            let c = match v.get_ref() {
                toml::Value::Float(f) => *f,
                toml::Value::Integer(i) => *i as f64,
                _ => f64::NAN,
            };
            if !(c > 1.0 && c <= 100.0) {
                return Err(cx.err(
                    Some(v.span()),
                    format!("pools.{pool}.bounded_load"),
                    "expected a number above 1.0 (e.g. 1.25) and at most 100",
                ));
            }
            Some(c)
        }
    };
    Ok(HashConfig { key, bounded_load })
}

/// Parses `IP:PORT`, `[IPv6]:PORT` or `hostname:PORT`.
fn backend_addr(s: &str) -> Result<BackendAddr, String> {
    let s = s.trim();
    if let Ok(a) = s.parse::<SocketAddr>() {
        if a.port() == 0 {
            return Err(format!("invalid backend address {s:?}: port 0"));
        }
        return Ok(BackendAddr::Ip(a));
    }
    let bad = || {
        format!("invalid backend address {s:?}; expected HOST:PORT, e.g. \"127.0.0.1:9001\" or \"app-1:8080\"")
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                // `_` as well: container runtimes' DNS serves names such as `web_api`.
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        && !host.chars().all(|c| c.is_ascii_digit() || c == '.');
    if !valid_host || port == 0 {
        return Err(bad());
    }
    Ok(BackendAddr::Name {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn routes(
    cx: &Ctx,
    raw: &RawConfig,
    pools: &[PoolConfig],
) -> Result<Vec<RouteConfig>, ConfigError> {
    if raw.routes.is_empty() {
        if pools.len() == 1 {
            return Ok(vec![RouteConfig {
                host: HostMatch::Any,
                path_prefix: "/".to_owned(),
                pool: pools[0].name.clone(),
            }]);
        }
        return Err(cx.err(
            None,
            "routes",
            "with more than one pool, [[routes]] must say which requests go to which pool",
        ));
    }
    let mut out = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.iter().enumerate() {
        let key = |k: &str| format!("routes[{i}].{k}");
        let r = r.get_ref();
        let pool = r.pool.get_ref();
        if !pools.iter().any(|p| &p.name == pool) {
            let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
            return Err(cx.err(
                Some(r.pool.span()),
                key("pool"),
                format!(
                    "no pool named {pool:?}; defined pools: {}",
                    known.join(", ")
                ),
            ));
        }
        let host = match &r.host {
            None => HostMatch::Any,
            Some(h) => {
                host_match(h.get_ref()).map_err(|m| cx.err(Some(h.span()), key("host"), m))?
            }
        };
        let path_prefix = match &r.path_prefix {
            None => "/".to_owned(),
            // What a request's path can be: visible ASCII (anything else arrives
            // percent-encoded, and would never match).
            Some(p) if p.get_ref().starts_with('/') && p.get_ref().bytes().all(|b| b.is_ascii_graphic() && b != b'?' && b != b'#') => p.get_ref().clone(),
            Some(p) => return Err(cx.err(Some(p.span()), key("path_prefix"), format!("invalid path prefix {:?}; it must start with '/' and be visible ASCII without '?' or '#' (percent-encode other characters, e.g. \"/caf%C3%A9\")", p.get_ref()))),
        };
        out.push(RouteConfig {
            host,
            path_prefix,
            pool: pool.clone(),
        });
    }
    Ok(out)
}

fn host_match(h: &str) -> Result<HostMatch, String> {
    let h = h.trim().to_ascii_lowercase();
    if h.is_empty() || h == "*" {
        return Ok(HostMatch::Any);
    }
    let (name, wildcard) = match h.strip_prefix("*.") {
        Some(rest) => (rest, true),
        None => (h.as_str(), false),
    };
    let valid = !name.is_empty()
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    if !valid {
        return Err(format!(
            "invalid host {h:?}; expected a host name (no port), \"*.example.com\" or \"*\""
        ));
    }
    Ok(if wildcard {
        HostMatch::Suffix(format!(".{name}"))
    } else {
        HostMatch::Exact(name.to_owned())
    })
}
