//! One access log line per request, written when its response is over, as JSON or text
//! on standard output.
//!
//! Lines are written by a thread of their own ([`AccessLogSink`]), so a slow reader of
//! the output (a full pipe, a stalled terminal) never holds up a thread that serves
//! requests. The thread is not woken for each line: it writes what has queued up every
//! [`WRITE_EVERY`], in as few system calls as the buffer allows.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http::HeaderValue;
use serde::Serialize;

use crate::config::AccessLog;

/// Lines waiting to be written before further lines are dropped: at one batch per
/// [`WRITE_EVERY`], room for over a million lines a second.
pub const QUEUE_LINES: usize = 32 * 1024;

/// How often queued lines are written out (and how late a line may appear).
pub const WRITE_EVERY: Duration = Duration::from_millis(25);

/// Where access log lines go: a queue of [`QUEUE_LINES`] lines, written out by a thread
/// of its own, started with the first line (a proxy that logs nothing has no such
/// thread). A line that finds the queue full is dropped and counted (see
/// [`AccessLogSink::dropped`]) rather than waited for. Cheap to clone; the thread ends
/// once every clone is gone and the queue is written.
#[derive(Debug, Clone)]
pub struct AccessLogSink {
    inner: Arc<SinkInner>,
}

struct SinkInner {
    /// The queue, once the writer is started; `None` if it could not be.
    tx: OnceLock<Option<SyncSender<Message>>>,
    /// The output, until the writer takes it.
    out: Mutex<Option<Box<dyn Write + Send>>>,
    queue: usize,
    dropped: AtomicU64,
}

impl std::fmt::Debug for SinkInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkInner")
            .field("started", &self.tx.get().is_some())
            .field("queue", &self.queue)
            .field("dropped", &self.dropped)
            .finish()
    }
}

enum Message {
    Line(String),
    /// Write and flush everything before, then answer.
    Flush(mpsc::Sender<()>),
}

impl AccessLogSink {
    /// Lines to standard output.
    pub fn stdout() -> Self {
        Self::to_writer(std::io::stdout(), QUEUE_LINES)
    }

    /// Lines to `out`, with room for `queue` lines waiting.
    pub fn to_writer(out: impl Write + Send + 'static, queue: usize) -> Self {
        AccessLogSink {
            inner: Arc::new(SinkInner {
                tx: OnceLock::new(),
                out: Mutex::new(Some(Box::new(out))),
                queue,
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// The queue, starting the writer on first use.
    fn queue(&self) -> Option<&SyncSender<Message>> {
        let start = || {
            let out = self.inner.out.lock().ok()?.take()?;
            let (tx, rx) = mpsc::sync_channel(self.inner.queue);
            let started = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(out, rx));
            match started {
                Ok(_) => Some(tx),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the access log writer: access log lines are dropped");
                    None
                }
            }
        };
        self.inner.tx.get_or_init(start).as_ref()
    }

    /// Queues one line (without its newline); never waits.
    pub fn send(&self, line: String) {
        let full = match self.queue() {
            Some(tx) => match tx.try_send(Message::Line(line)) {
                Ok(()) | Err(TrySendError::Disconnected(_)) => false,
                Err(TrySendError::Full(_)) => true,
            },
            None => true,
        };
        if full {
            let n = self.inner.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(
                    dropped = n,
                    "access log output is not keeping up: lines dropped"
                );
            }
        }
    }

    /// Lines dropped because the queue was full (or the writer could not be started).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Blocks until every line queued so far is written and flushed.
    pub fn flush(&self) {
        let Some(Some(tx)) = self.inner.tx.get() else {
            return;
        };
        let (done, wait) = mpsc::channel();
        if tx.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv();
        }
    }
}

/// The writing thread: every [`WRITE_EVERY`], whatever has queued goes out in one flush.
/// It sleeps rather than waiting on the queue, so that queueing a line never has to wake
/// it: a wake-up per line would cost the serving threads more than the line itself.
fn write_lines(out: impl Write, rx: Receiver<Message>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    loop {
        std::thread::sleep(WRITE_EVERY);
        let mut ended = false;
        loop {
            match rx.try_recv() {
                Ok(Message::Line(line)) => {
                    let _ = out.write_all(line.as_bytes());
                    let _ = out.write_all(b"\n");
                }
                Ok(Message::Flush(done)) => {
                    let _ = out.flush();
                    let _ = done.send(());
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    ended = true;
                    break;
                }
            }
        }
        let _ = out.flush();
        if ended {
            return;
        }
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
        let sink = AccessLogSink::to_writer(std::io::sink(), 1);
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
    fn the_writer_starts_with_the_first_line() {
        let sink = AccessLogSink::to_writer(std::io::sink(), 4);
        sink.flush();
        assert!(sink.inner.tx.get().is_none(), "started without a line");
        sink.send("one".into());
        assert!(matches!(sink.inner.tx.get(), Some(Some(_))));
        sink.flush();
        assert_eq!(sink.dropped(), 0);
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
        let sink = AccessLogSink::to_writer(writer, 1);
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
