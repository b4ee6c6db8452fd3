//! One access log line per request, written when its response is over, as JSON or text
//! on standard output.

use std::io::Write;
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde::Serialize;

use crate::config::AccessLog;

/// What is known of a request by the time its response ends.
#[derive(Debug, Serialize)]
pub struct AccessRecord {
    #[serde(skip)]
    pub format: AccessLog,
    #[serde(skip)]
    pub start: Instant,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub pool: Option<String>,
    pub backend: Option<String>,
    /// Time until the backend's response headers, in seconds.
    pub upstream_seconds: Option<f64>,
    /// Time until the response ended, in seconds (filled in at emission).
    pub total_seconds: f64,
    /// Response body bytes sent.
    pub bytes: u64,
    pub request_id: String,
}

impl AccessRecord {
    pub fn new(
        format: AccessLog,
        start: Instant,
        method: &http::Method,
        path: &str,
        request_id: Option<&HeaderValue>,
    ) -> Option<Box<Self>> {
        if format == AccessLog::Off {
            return None;
        }
        Some(Box::new(AccessRecord {
            format,
            start,
            method: method.as_str().to_owned(),
            path: path.to_owned(),
            status: 0,
            pool: None,
            backend: None,
            upstream_seconds: None,
            total_seconds: 0.0,
            bytes: 0,
            request_id: request_id
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_owned(),
        }))
    }

    pub fn set_upstream(&mut self, elapsed: Duration) {
        self.upstream_seconds = Some(elapsed.as_secs_f64());
    }

    /// Writes the line.
    pub fn emit(mut self) {
        self.total_seconds = self.start.elapsed().as_secs_f64();
        let line = match self.format {
            AccessLog::Off => return,
            AccessLog::Json => serde_json::to_string(&self).unwrap_or_default(),
            AccessLog::Text => format!(
                "{} {} {} pool={} backend={} upstream={} total={:.6} bytes={} id={}",
                self.method,
                self.path,
                self.status,
                self.pool.as_deref().unwrap_or("-"),
                self.backend.as_deref().unwrap_or("-"),
                self.upstream_seconds
                    .map_or("-".to_owned(), |s| format!("{s:.6}")),
                self.total_seconds,
                self.bytes,
                self.request_id,
            ),
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
    }
}
