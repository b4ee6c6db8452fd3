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

    /// Writes the line to standard output.
    pub fn emit(mut self) {
        self.total_seconds = self.start.elapsed().as_secs_f64();
        if let Some(line) = self.line() {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
        }
    }

    /// The line in the configured format.
    pub fn line(&self) -> Option<String> {
        Some(match self.format {
            AccessLog::Off => return None,
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
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(format: AccessLog) -> Option<Box<AccessRecord>> {
        let id = HeaderValue::from_static("rid-1");
        let mut r = AccessRecord::new(
            format,
            Instant::now(),
            &http::Method::POST,
            "/cart/1",
            Some(&id),
        )?;
        r.status = 201;
        r.pool = Some("carts".into());
        r.backend = Some("cart-2".into());
        r.set_upstream(Duration::from_millis(1500));
        r.bytes = 42;
        Some(r)
    }

    #[test]
    fn off_records_nothing() {
        assert!(record(AccessLog::Off).is_none());
    }

    #[test]
    fn text_line_has_every_field() {
        let line = record(AccessLog::Text).unwrap().line().unwrap();
        assert!(
            line.starts_with("POST /cart/1 201 pool=carts backend=cart-2 upstream=1.500000 total="),
            "{line}"
        );
        assert!(line.ends_with(" bytes=42 id=rid-1"), "{line}");
    }

    #[test]
    fn json_line_parses() {
        let line = record(AccessLog::Json).unwrap().line().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/cart/1");
        assert_eq!(v["status"], 201);
        assert_eq!(v["pool"], "carts");
        assert_eq!(v["backend"], "cart-2");
        assert_eq!(v["upstream_seconds"], 1.5);
        assert_eq!(v["bytes"], 42);
        assert_eq!(v["request_id"], "rid-1");
        assert!(v["total_seconds"].is_number());
    }
}
