//! One access log line per request, written when its response is over, as JSON or text
//! on standard output.
//!
//! Lines are written by a thread of their own ([`AccessLogSink`]), so a slow reader of
//! the output (a full pipe, a stalled terminal) never holds up a thread that serves
//! requests, and lines that arrive together are written together.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde::Serialize;

use crate::config::AccessLog;

/// Lines waiting to be written before further lines are dropped.
pub const QUEUE_LINES: usize = 16 * 1024;

/// Where access log lines go: a queue of [`QUEUE_LINES`] lines, written out by a thread
/// of its own. A line that finds the queue full is dropped and counted (see
/// [`AccessLogSink::dropped`]) rather than waited for. Cheap to clone; the thread ends
/// once every clone is gone and the queue is written.
#[derive(Debug, Clone)]
pub struct AccessLogSink {
    inner: Arc<SinkInner>,
}

#[derive(Debug)]
struct SinkInner {
    tx: SyncSender<Message>,
    dropped: AtomicU64,
}

#[derive(Debug)]
enum Message {
    Line(String),
    /// Write and flush everything before, then answer.
    Flush(mpsc::Sender<()>),
}

impl AccessLogSink {
    /// Lines to standard output.
    pub fn stdout() -> std::io::Result<Self> {
        Self::to_writer(std::io::stdout(), QUEUE_LINES)
    }

    /// Lines to `out`, with room for `queue` lines waiting.
    pub fn to_writer(out: impl Write + Send + 'static, queue: usize) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(queue);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(out, rx))?;
        Ok(AccessLogSink {
            inner: Arc::new(SinkInner {
                tx,
                dropped: AtomicU64::new(0),
            }),
        })
    }

    /// Queues one line (without its newline); never waits.
    pub fn send(&self, line: String) {
        match self.inner.tx.try_send(Message::Line(line)) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(_)) => {
                let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        dropped = n,
                        "access log output is not keeping up: lines dropped"
                    );
                }
            }
        }
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Blocks until every line queued so far is written and flushed.
    pub fn flush(&self) {
        let (done, wait) = mpsc::channel();
        if self.inner.tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// The writing thread: whatever is queued goes out in one flush.
fn write_lines(out: impl Write, rx: Receiver<Message>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                Message::Line(line) => {
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                }
                Message::Flush(done) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

/// What is known of a request by the time its response ends.
#[derive(Debug, Serialize)]
pub struct AccessRecord {
    #[serde(skip)]
    pub format: AccessLog,
    #[serde(skip)]
    sink: AccessLogSink,
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
        sink: &AccessLogSink,
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
            sink: sink.clone(),
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

    /// Queues the line for writing.
    pub fn emit(mut self) {
        self.total_seconds = self.start.elapsed().as_secs_f64();
        if let Some(line) = self.line() {
            self.sink.send(line);
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
        let sink = AccessLogSink::to_writer(std::io::sink(), 1).unwrap();
        let mut r = AccessRecord::new(
            format,
            &sink,
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

    /// A writer that stops in its first write until released, telling when it got there.
    struct Stalled {
        entered: Option<mpsc::Sender<()>>,
        release: Receiver<()>,
        out: mpsc::Sender<Vec<u8>>,
    }

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(entered) = self.entered.take() {
                let _ = entered.send(());
                let _ = self.release.recv();
            }
            let _ = self.out.send(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let (out_tx, out) = mpsc::channel();
        let writer = Stalled {
            entered: Some(entered_tx),
            release: release_rx,
            out: out_tx,
        };
        let sink = AccessLogSink::to_writer(writer, 1).unwrap();
        sink.send("one".into());
        // The thread has "one" and is stuck writing it out.
        entered.recv().unwrap();
        sink.send("two".into());
        // The queue of one is full: dropped, not waited for.
        sink.send("three".into());
        assert_eq!(sink.dropped(), 1);
        release.send(()).unwrap();
        sink.flush();
        // Room again.
        sink.send("four".into());
        sink.flush();
        let written: Vec<u8> = out.try_iter().flatten().collect();
        assert_eq!(String::from_utf8(written).unwrap(), "one\ntwo\nfour\n");
        assert_eq!(sink.dropped(), 1);
    }
}
