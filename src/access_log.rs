//! One access log line per request, written when its response is over, as JSON or text
//! on standard output.
//!
//! Lines are written by a thread of their own ([`AccessLogSink`]), so a slow reader of
//! the output (a full pipe, a stalled terminal) never holds up a thread that serves
//! requests. The thread is not woken for each line: it writes what has queued up every
//! [`WRITE_EVERY`], in as few system calls as the buffer allows.

use std::io::Write;
use std::net::IpAddr;
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
/// [`AccessLogSink::dropped`]) rather than waited for. Cheap to clone; when the last
/// clone goes, what is queued is written before the drop returns (for at most
/// [`FINAL_WRITE_LIMIT`]).
#[derive(Debug, Clone)]
pub struct AccessLogSink {
    inner: Arc<SinkInner>,
}

/// How long the final write of queued lines, or [`AccessLogSink::flush`], may wait for
/// an output that does not take them.
pub const FINAL_WRITE_LIMIT: Duration = Duration::from_secs(2);

struct SinkInner {
    /// The queue and the writer's end signal, once the writer is started; `None` if it
    /// could not be.
    writer: OnceLock<Option<Writer>>,
    /// The output, until the writer takes it.
    out: Mutex<Option<Box<dyn Write + Send>>>,
    queue: usize,
    /// Lines lost: the queue was full, the writer is not running, or the output failed.
    dropped: Arc<AtomicU64>,
    /// Set when a flush found the output taking nothing for [`FINAL_WRITE_LIMIT`]: the
    /// final write then waits no longer, so that a process stops within that limit.
    stuck: std::sync::atomic::AtomicBool,
}

struct Writer {
    tx: SyncSender<Message>,
    /// Disconnected when the writing thread ends.
    ended: Mutex<Receiver<()>>,
}

impl std::fmt::Debug for SinkInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkInner")
            .field("running", &matches!(self.writer.get(), Some(Some(_))))
            .field("queue", &self.queue)
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl Drop for SinkInner {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has written what is queued.
        if let Some(Some(Writer { tx, ended })) = self.writer.take() {
            drop(tx);
            if self.stuck.load(Ordering::Relaxed) {
                return;
            }
            if let Ok(ended) = ended.lock() {
                let _ = ended.recv_timeout(FINAL_WRITE_LIMIT);
            }
        }
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
                writer: OnceLock::new(),
                out: Mutex::new(Some(Box::new(out))),
                queue,
                dropped: Arc::new(AtomicU64::new(0)),
                stuck: Default::default(),
            }),
        }
    }

    /// The queue, starting the writer on first use.
    fn queue(&self) -> Option<&SyncSender<Message>> {
        let start = || {
            let out = self.inner.out.lock().ok()?.take()?;
            let (tx, rx) = mpsc::sync_channel(self.inner.queue);
            let (alive, ended) = mpsc::channel::<()>();
            let dropped = self.inner.dropped.clone();
            let started = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || {
                    write_lines(out, rx, &dropped);
                    drop(alive);
                });
            match started {
                Ok(_) => Some(Writer {
                    tx,
                    ended: Mutex::new(ended),
                }),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the access log writer: access log lines are dropped");
                    None
                }
            }
        };
        self.inner.writer.get_or_init(start).as_ref().map(|w| &w.tx)
    }

    /// Queues one line (without its newline); never waits.
    pub fn send(&self, line: String) {
        let sent = self
            .queue()
            .is_some_and(|tx| tx.try_send(Message::Line(line)).is_ok());
        if !sent {
            count_dropped(&self.inner.dropped, 1);
        }
    }

    /// Lines lost: the queue was full, the writer is not running, or the output failed.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Waits until every line queued so far is written and flushed, or for at most
    /// [`FINAL_WRITE_LIMIT`] if the output does not take them.
    pub fn flush(&self) {
        let Some(Some(writer)) = self.inner.writer.get() else {
            return;
        };
        let deadline = Instant::now() + FINAL_WRITE_LIMIT;
        let (done, wait) = mpsc::channel();
        let mut message = Message::Flush(done);
        loop {
            match writer.tx.try_send(message) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    message = m;
                    std::thread::sleep(WRITE_EVERY / 5);
                }
                Err(TrySendError::Full(_)) => {
                    self.inner.stuck.store(true, Ordering::Relaxed);
                    return;
                }
                Err(_) => return,
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(mpsc::RecvTimeoutError::Timeout) = wait.recv_timeout(left) {
            self.inner.stuck.store(true, Ordering::Relaxed);
        }
    }
}

fn count_dropped(dropped: &AtomicU64, lines: u64) {
    let before = dropped.fetch_add(lines, Ordering::Relaxed);
    // Warn at 1, 2, 4, 8, ... lines lost.
    if (before + lines).ilog2() != before.checked_ilog2().unwrap_or(u32::MAX) {
        tracing::warn!(
            dropped = before + lines,
            "access log output is not keeping up: lines dropped"
        );
    }
}

/// The writing thread. It waits for a line, lets more gather for [`WRITE_EVERY`], and
/// writes them all at once; so under load it is woken at most once per interval, and
/// queueing a line does not cost the serving threads a wake-up each.
fn write_lines(mut out: impl Write, rx: Receiver<Message>, dropped: &AtomicU64) {
    let mut batch = Batch::default();
    while let Ok(first) = rx.recv() {
        std::thread::sleep(WRITE_EVERY);
        let mut next = Ok(first);
        loop {
            match next {
                Ok(Message::Line(line)) => {
                    batch.bytes.extend_from_slice(line.as_bytes());
                    batch.bytes.push(b'\n');
                    batch.lines += 1;
                    if batch.bytes.len() >= BATCH_BYTES {
                        batch.write(&mut out, dropped);
                    }
                }
                Ok(Message::Flush(done)) => {
                    batch.write(&mut out, dropped);
                    let _ = done.send(());
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    batch.write(&mut out, dropped);
                    return;
                }
            }
            next = rx.try_recv();
        }
        batch.write(&mut out, dropped);
    }
    batch.write(&mut out, dropped);
}

/// Bytes of lines written out in one go.
const BATCH_BYTES: usize = 64 * 1024;

/// Lines waiting in the writing thread.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

impl Batch {
    /// Writes and flushes the lines; if the output fails, they count as dropped.
    fn write(&mut self, out: &mut impl Write, dropped: &AtomicU64) {
        if self.lines == 0 {
            return;
        }
        if out
            .write_all(&self.bytes)
            .and_then(|()| out.flush())
            .is_err()
        {
            count_dropped(dropped, self.lines);
        }
        self.bytes.clear();
        self.lines = 0;
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
    /// When the request began (its head was read), UTC, RFC 3339 with milliseconds
    /// (filled in at emission).
    pub time: String,
    /// The address of the client's end of the connection the request came on.
    pub client: IpAddr,
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
    #[inline]
    pub fn new(
        format: AccessLog,
        sink: &AccessLogSink,
        start: Instant,
        client: IpAddr,
        method: &str,
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
            time: String::new(),
            // In the form the proxy writes into `X-Forwarded-For`: an IPv4 client of a
            // dual-stack listener in its IPv4 form.
            client: client.to_canonical(),
            method: method.to_owned(),
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
        self.finish();
        if let Some(line) = self.line() {
            self.sink.send(line);
        }
    }

    /// Fills in the fields known when the request ends: its total time, and when it
    /// began.
    fn finish(&mut self) {
        let total = self.start.elapsed();
        self.total_seconds = total.as_secs_f64();
        let now = std::time::SystemTime::now();
        let began = now.checked_sub(total).unwrap_or(now);
        self.time = humantime::format_rfc3339_millis(began).to_string();
    }

    /// The line in the configured format.
    pub fn line(&self) -> Option<String> {
        Some(match self.format {
            AccessLog::Off => return None,
            AccessLog::Json => serde_json::to_string(&self).unwrap_or_default(),
            AccessLog::Text => format!(
                "{} {} {} {} pool={} backend={} upstream={} total={:.6} bytes={} id={} client={}",
                self.time,
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
                self.client,
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
            "2001:db8::7".parse().unwrap(),
            "POST",
            "/cart/1",
            Some(&id),
        )?;
        r.status = 201;
        r.pool = Some("carts".into());
        r.backend = Some("cart-2".into());
        r.set_upstream(Duration::from_millis(1500));
        r.bytes = 42;
        r.finish();
        Some(r)
    }

    /// The time at the start of a line, checked to be recent, and the rest of the line.
    fn stamped(line: &str) -> &str {
        let (time, rest) = line.split_once(' ').unwrap();
        check_time(time);
        rest
    }

    /// Checks that `time` is an RFC 3339 UTC time with milliseconds, within a minute
    /// of now.
    fn check_time(time: &str) {
        assert_eq!(time.len(), "2026-01-01T00:00:00.000Z".len(), "{time}");
        let t = humantime::parse_rfc3339(time).unwrap();
        let ago = std::time::SystemTime::now().duration_since(t).unwrap();
        assert!(ago < Duration::from_secs(60), "{time}");
    }

    #[test]
    fn off_records_nothing() {
        assert!(record(AccessLog::Off).is_none());
    }

    #[test]
    fn text_line_has_every_field() {
        let line = record(AccessLog::Text).unwrap().line().unwrap();
        assert!(
            stamped(&line)
                .starts_with("POST /cart/1 201 pool=carts backend=cart-2 upstream=1.500000 total="),
            "{line}"
        );
        assert!(
            line.ends_with(" bytes=42 id=rid-1 client=2001:db8::7"),
            "{line}"
        );
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_listener_is_logged_in_its_ipv4_form() {
        let sink = AccessLogSink::to_writer(std::io::sink(), 1);
        let client = "::ffff:10.1.2.3".parse().unwrap();
        let r = AccessRecord::new(
            AccessLog::Json,
            &sink,
            Instant::now(),
            client,
            "GET",
            "/",
            None,
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&r.line().unwrap()).unwrap();
        assert_eq!(v["client"], "10.1.2.3");
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
        assert_eq!(v["client"], "2001:db8::7");
        assert!(v["total_seconds"].is_number());
        check_time(v["time"].as_str().unwrap());
        assert!(line.starts_with("{\"time\":"), "{line}");
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
        assert!(sink.inner.writer.get().is_none(), "started without a line");
        sink.send("one".into());
        assert!(matches!(sink.inner.writer.get(), Some(Some(_))));
        sink.flush();
        assert_eq!(sink.dropped(), 0);
    }

    // Real time: how long stopping takes is what is under test.
    #[test]
    fn a_stuck_output_holds_up_the_stop_once_not_twice() {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let (out_tx, _out) = mpsc::channel();
        let writer = Stalled {
            entered: Some(entered_tx),
            release: release_rx,
            out: out_tx,
        };
        let sink = AccessLogSink::to_writer(writer, 4);
        sink.send("one".into());
        entered.recv().unwrap();
        let began = Instant::now();
        // The flush gives up after the limit; the final write then does not wait again.
        sink.flush();
        drop(sink);
        let took = began.elapsed();
        assert!(took >= FINAL_WRITE_LIMIT, "{took:?}");
        assert!(took < FINAL_WRITE_LIMIT * 3 / 2, "{took:?}");
        let _ = release.send(());
    }

    struct Failing;

    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_the_output_refuses_count_as_dropped() {
        let sink = AccessLogSink::to_writer(Failing, 8);
        for line in ["one", "two", "three"] {
            sink.send(line.into());
        }
        sink.flush();
        assert_eq!(sink.dropped(), 3);
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // On a thread of its own, so that a send that waits fails the test rather than
        // hanging it.
        let (finished, done) = mpsc::channel();
        let test = std::thread::spawn(move || {
            full_queue_case();
            let _ = finished.send(());
        });
        if let Err(mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(Duration::from_secs(10)) {
            panic!("a send waited for the stalled writer");
        }
        test.join().expect("the case passed");
    }

    fn full_queue_case() {
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
