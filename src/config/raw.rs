//! The serde mirror of the TOML file: every key the file may hold, nothing validated.
//!
//! Values that validation must point back at are wrapped in [`Spanned`] so a rejection
//! can name the line and column. Unknown keys are refused here by `deny_unknown_fields`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub pools: BTreeMap<String, Spanned<RawPool>>,
}

/// `[server]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub workers: Option<Spanned<i64>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub access_log: Option<Spanned<String>>,
    pub metrics: Option<bool>,
    #[serde(default)]
    pub limits: RawLimits,
    /// Accepted by the schema so the error can say TLS is not available yet, rather
    /// than calling a documented key unknown.
    pub tls: Option<Spanned<toml::Value>>,
}

/// `[server.limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub max_header_bytes: Option<Spanned<i64>>,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Spanned<String>,
}

/// One `[[routes]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub host: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub pool: Spanned<String>,
}

/// One `[pools.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub policy: Option<Spanned<String>>,
    pub backends: Spanned<Vec<Spanned<RawBackend>>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub response_timeout: Option<Spanned<String>>,
    pub retries: Option<Spanned<i64>>,
    pub upstream_idle_timeout: Option<Spanned<String>>,
    pub max_idle_per_backend: Option<Spanned<i64>>,
    pub max_connections_per_backend: Option<Spanned<i64>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub sticky: Option<Spanned<RawSticky>>,
    pub learn: Option<Spanned<RawLearn>>,
    pub hash_key: Option<Spanned<Vec<Spanned<String>>>>,
    /// A number; integers are accepted too, so it is read as a TOML value.
    pub bounded_load: Option<Spanned<toml::Value>>,
    pub health: Option<Spanned<RawHealth>>,
    pub outlier: Option<Spanned<RawOutlier>>,
    pub all_down: Option<Spanned<String>>,
    /// A number: integers are accepted too.
    pub retry_budget: Option<Spanned<toml::Value>>,
    pub slow_start: Option<Spanned<String>>,
}

/// `[pools.NAME.health]`: active checks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub healthy_threshold: Option<Spanned<i64>>,
    pub unhealthy_threshold: Option<Spanned<i64>>,
    /// `"200-399"` or `"200"`.
    pub expect_status: Option<Spanned<String>>,
}

/// `[pools.NAME.outlier]`: passive ejection.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOutlier {
    pub consecutive_failures: Option<Spanned<i64>>,
    pub base_ejection: Option<Spanned<String>>,
    pub max_ejection: Option<Spanned<String>>,
    pub max_ejected_percent: Option<Spanned<i64>>,
}

/// `[pools.NAME.sticky]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: Option<Spanned<String>>,
    pub ttl: Option<Spanned<String>>,
    /// One environment variable name, or a list (the first signs, all verify).
    pub secret_env: Option<Spanned<toml::Value>>,
    /// One file, or a list; each non-empty line of a file is a secret.
    pub secret_file: Option<Spanned<toml::Value>>,
    pub on_unavailable: Option<Spanned<String>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub sliding: Option<bool>,
    pub http_only: Option<bool>,
    /// `"auto"`, `true` or `false`.
    pub secure: Option<Spanned<toml::Value>>,
    pub same_site: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub domain: Option<Spanned<String>>,
}

/// `[pools.NAME.learn]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLearn {
    pub cookie: Option<Spanned<String>>,
    pub ttl: Option<Spanned<String>>,
    pub max_entries: Option<Spanned<i64>>,
}

/// A backend: either `"host:port"` or `{ address = "...", weight = N, id = "..." }`.
#[derive(Debug)]
pub struct RawBackend {
    pub address: String,
    /// Where the address is written when the backend is a table; for the string form
    /// the entry's own span (of the `Spanned<RawBackend>`) is the address's.
    pub address_span: Option<Range<usize>>,
    pub weight: Option<Spanned<i64>>,
    pub id: Option<Spanned<String>>,
    pub drain: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendTable {
    address: Spanned<String>,
    weight: Option<Spanned<i64>>,
    id: Option<Spanned<String>>,
    drain: Option<bool>,
}

impl<'de> Deserialize<'de> for RawBackend {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;
        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = RawBackend;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "an address string \"host:port\" or a table { address, weight, id, drain }",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawBackend, E> {
                Ok(RawBackend {
                    address: v.to_owned(),
                    address_span: None,
                    weight: None,
                    id: None,
                    drain: None,
                })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawBackend, A::Error> {
                let t = RawBackendTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(RawBackend {
                    address_span: Some(t.address.span()),
                    address: t.address.into_inner(),
                    weight: t.weight,
                    id: t.id,
                    drain: t.drain,
                })
            }
        }
        deserializer.deserialize_any(BackendVisitor)
    }
}
