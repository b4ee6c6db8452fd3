//! Configuration: the TOML file read into [`raw::RawConfig`], then validated into [`Config`].
//!
//! ```text
//! file ──toml + serde──▶ RawConfig ──validate──▶ Config
//! ```
//!
//! `Config` can only be built by validation, so code that holds one never re-checks it.
//! Every rejection is a [`ConfigError`] naming the file, line, column and key path.

pub mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use validate::validate;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from, for messages and for reloading.
    pub source: Option<PathBuf>,
    /// A hash of the file's bytes, shown in `/status`, so ops can tell which edit is live.
    pub content_hash: u64,
    /// A hash of the sticky-cookie secrets the file reads from other files and the
    /// environment; never shown. A reload that finds both hashes unchanged does nothing.
    pub secrets_hash: u64,
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    /// Routes in file order; the runtime sorts them by specificity.
    pub routes: Vec<RouteConfig>,
    /// Pools sorted by name.
    pub pools: Vec<PoolConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// Runtime worker threads; 0 means one per core.
    pub workers: usize,
    pub shutdown_grace: Duration,
    pub access_log: AccessLog,
    /// Record per-request metrics (request counters, duration histograms, affinity
    /// outcomes).
    pub metrics: bool,
    pub limits: Limits,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lower-cased exact host name.
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub host: HostMatch,
    pub path_prefix: String,
    pub pool: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    RoundRobin,
    LeastRequest,
    StickyCookie,
    StickyLearn,
    ConsistentHash,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastRequest => "least_request",
            Policy::StickyCookie => "sticky_cookie",
            Policy::StickyLearn => "sticky_learn",
            Policy::ConsistentHash => "consistent_hash",
        }
    }
}

/// How a pool keeps a client on the backend that holds its state.
#[derive(Debug, Clone, PartialEq)]
pub enum AffinityConfig {
    /// Stateless pool.
    None,
    Cookie(StickyConfig),
    Learn(LearnConfig),
    Hash(HashConfig),
}

/// `[pools.NAME.sticky]`: a signed cookie issued by the proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct StickyConfig {
    pub cookie: String,
    pub ttl: Duration,
    /// The first signs, all verify. Empty: a random secret is generated at start.
    pub secrets: Vec<Secret>,
    pub on_unavailable: OnUnavailable,
    /// Re-issue the cookie with a fresh expiry once half its ttl has passed.
    pub sliding: bool,
    pub http_only: bool,
    pub secure: SecureMode,
    pub same_site: SameSite,
    pub path: String,
    pub domain: Option<String>,
}

/// Secret bytes; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Pick another backend and re-issue the cookie.
    Redispatch,
    /// Answer 503 and keep the cookie.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecureMode {
    /// When the client connection is TLS.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    /// Implies `Secure`.
    None,
}

/// `[pools.NAME.learn]`: affinity learned from the application's session cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnConfig {
    pub cookie: String,
    pub ttl: Duration,
    pub max_entries: usize,
}

/// Consistent hashing of a request key.
#[derive(Debug, Clone, PartialEq)]
pub struct HashConfig {
    /// The first present source is the key.
    pub key: Vec<crate::balance::key::KeySource>,
    /// `c` of consistent hashing with bounded loads; `None` = unbounded.
    pub bounded_load: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub policy: Policy,
    pub backends: Vec<BackendConfig>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    /// Further backends tried when connecting fails before any request byte was sent.
    pub retries: u32,
    /// Idle upstream keep-alive connections are closed after this long.
    pub upstream_idle_timeout: Duration,
    /// At most this many idle upstream connections are kept per backend.
    pub max_idle_per_backend: usize,
    /// At most this many connections (busy, idle, or finishing an upload) are open to
    /// each backend; `None` = no limit.
    pub max_connections_per_backend: Option<usize>,
    /// How long a draining backend keeps serving its existing affinity.
    pub drain_timeout: Duration,
    pub affinity: AffinityConfig,
    /// Active checks, if configured.
    pub health: Option<HealthConfig>,
    /// Passive ejection; on for every pool.
    pub outlier: OutlierConfig,
    /// What to do when no backend of the pool is healthy.
    pub all_down: AllDown,
    /// Retries allowed per request, on average (a token bucket): 0.2 = one retry per
    /// five requests, plus a reserve of ten.
    pub retry_budget: f64,
    /// A recovered or added backend's share ramps up linearly over this time.
    pub slow_start: Option<Duration>,
}

/// `[pools.NAME.health]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    pub expect_status: std::ops::RangeInclusive<u16>,
}

/// `[pools.NAME.outlier]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Connect failures or 5xx answers in a row that eject a backend; 0 disables.
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times as long.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share of a pool is ejected at once.
    pub max_ejected_percent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllDown {
    /// Route as if every backend were healthy (and count it).
    FailOpen,
    /// Answer 503.
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Stable identity: the `id` key, else the address as written.
    pub id: String,
    pub address: BackendAddr,
    pub weight: u32,
    /// Takes no new sessions; keeps its existing ones for the pool's `drain_timeout`.
    pub drain: bool,
}

/// Where a backend listens. Names are resolved when a connection is opened, so a
/// container's address change is picked up by the next connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddr {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddr::Ip(a) => write!(f, "{a}"),
            BackendAddr::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// A rejected configuration: where, which key, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {key}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// Dotted key path, e.g. `pools.carts.backends[1].weight`.
    pub key: String,
    pub message: String,
}

/// A failure to produce a configuration from a file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let mut config = parse(&text, &path.display().to_string())?;
    config.source = Some(path.to_path_buf());
    Ok(config)
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let raw = parse_raw(text, file)?;
    let mut config = validate(&raw, text, file)?;
    config.content_hash = content_hash(text.as_bytes());
    config.secrets_hash = config
        .secrets()
        .fold(content_hash(&[]), |h, s| fnv(h, &Sha256::digest(&s.0)));
    Ok(config)
}

impl Config {
    /// Every sticky-cookie secret, pool by pool, in order.
    fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.pools.iter().flat_map(|p| match &p.affinity {
            AffinityConfig::Cookie(s) => s.secrets.as_slice(),
            _ => &[],
        })
    }
}

fn parse_raw(text: &str, file: &str) -> Result<raw::RawConfig, ConfigError> {
    let de = match toml::Deserializer::parse(text) {
        Ok(de) => de,
        Err(e) => return Err(toml_error(&e, String::new(), text, file)),
    };
    serde_path_to_error::deserialize(de)
        .map_err(|e| toml_error(e.inner(), key_path(e.path()), text, file))
}

/// serde_spanned's private field around every `Spanned` value: not a key of the file.
const SPANNED_VALUE: &str = "$__serde_spanned_private_value";

/// The dotted key path of a serde error, e.g. `pools.web.backends[1].weight`.
fn key_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path {
        let name = match segment {
            Segment::Map { key } if key == SPANNED_VALUE => continue,
            Segment::Seq { index } => {
                out.push_str(&format!("[{index}]"));
                continue;
            }
            Segment::Map { key } => key.as_str(),
            Segment::Enum { variant } => variant.as_str(),
            Segment::Unknown => "?",
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(name);
    }
    out
}

fn toml_error(e: &toml::de::Error, key: String, text: &str, file: &str) -> ConfigError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    let message = e.message().trim().to_owned();
    let key = match key.is_empty() {
        false => key,
        // A syntax-level error (a duplicate key or table) comes without a path: name the
        // key or table it points at, as written.
        true => e
            .span()
            .and_then(|s| key_at(text, s.start))
            .unwrap_or_else(|| "(file)".to_owned()),
    };
    ConfigError {
        file: file.to_owned(),
        line,
        column,
        key,
        message,
    }
}

/// The key path of the `key = ...` line or `[table]` header starting at byte `at`:
/// the header's name, or the key under the last header before it (`pools.web.retries`;
/// `routes.pool` under `[[routes]]`).
fn key_at(text: &str, at: usize) -> Option<String> {
    let name = |header: &str| {
        header
            .trim_start_matches('[')
            .split(']')
            .next()
            .map(|n| n.trim().to_owned())
    };
    let line_start = text.get(..at)?.rfind('\n').map_or(0, |i| i + 1);
    let whole_line = text.get(line_start..)?.lines().next()?.trim();
    if whole_line.starts_with('[') {
        return name(whole_line);
    }
    let key = text.get(at..)?.split(['=', '\n']).next()?.trim();
    if key.is_empty() {
        return None;
    }
    let table = text
        .get(..line_start)?
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('['))
        .and_then(name);
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_owned(),
    })
}

/// 1-based line and column (in characters) of a byte offset.
pub(crate) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

/// FNV-1a: a stable content hash, identical across builds and machines.
pub fn content_hash(bytes: &[u8]) -> u64 {
    fnv(0xcbf2_9ce4_8422_2325, bytes)
}

/// FNV-1a from `h` on.
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
