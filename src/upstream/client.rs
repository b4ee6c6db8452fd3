//! A small per-backend pool of HTTP/1.1 keep-alive connections.
//!
//! Each idle connection is a hyper `SendRequest` whose connection task runs on its own.
//! A connection goes back to the pool only after its response body was read to the end
//! (see `proxy::body`), and is checked with `ready()` before reuse. Idle connections
//! expire after `upstream_idle_timeout`; at most `max_idle_per_backend` are kept.
//! The lock is per backend and held only to push or pop a vector entry; the pool's
//! settings sit under the same lock, so that a reload can change them for a backend it
//! carries over. Each connection also has a watchdog task, which closes it when the
//! client takes none of the response body read on it (see [`watch`]). Its socket can
//! keep a copy of a request's head as hyper writes it (see [`HeadCopy`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;
use tokio::time::Sleep;

use crate::config::{BackendAddr, Limits, PoolConfig};

use super::stats::BackendStats;
use super::upload::{Upload, UploadWatch, WriteProgress};

/// A request body sent upstream: the client's, or nothing when a bodyless request is
/// sent again.
pub type UpstreamBody = Either<Upload, Empty<Bytes>>;

/// The sending half of an upstream HTTP/1.1 connection, with the timer that bounds each
/// wait for a response on it, and each wait for more of a response body. The timer is
/// armed once per connection and pushed later for each wait, which is an atomic update
/// when the new deadline lies beyond the last one (the usual case); a timer per request
/// would be registered and deregistered under the timer driver's lock every time (about
/// 0.4k instructions). While the connection idles in the pool, the timer may still be
/// set; it goes off once, waking nothing that is still waiting. The body read on the
/// connection tells its watchdog how it goes.
#[derive(Debug)]
pub struct Sender {
    pub tx: http1::SendRequest<UpstreamBody>,
    pub timer: Pin<Box<Sleep>>,
    state: Arc<ConnState>,
    /// The body of the request last sent on this connection, if it had one.
    upload: Option<Arc<UploadWatch>>,
}

impl Drop for Sender {
    fn drop(&mut self) {
        if !self.tx.is_closed() {
            // Nobody will send on the connection again. An idle one closes at once; one
            // still busy with an upload (after an early answer, or a response cut short)
            // stays busy for as long as that takes, for good if the backend never reads
            // it. The watchdog closes it once it stops moving.
            self.state.orphaned.store(true, Ordering::Release);
        }
    }
}

impl Sender {
    /// Closes the connection at once, whatever it was busy with: for a request that
    /// was given up on (`504`, `408`), whose upload may otherwise hold it for good.
    pub fn abort(&self) {
        self.state.abort();
    }

    /// Marks the connection as carrying no further request: it is closed rather than
    /// pooled when its response is over.
    pub fn retire(&self) {
        self.state.retired.store(true, Ordering::Relaxed);
    }

    /// Notes that the request sent next has a body, uploaded as `watch` tells.
    pub fn sending_body(&mut self, watch: &Arc<UploadWatch>) {
        self.upload = Some(watch.clone());
    }

    /// The response timer, and the progress of writes on the socket, for
    /// [`super::upload::within`].
    pub fn wait_parts(&mut self) -> (Pin<&mut Sleep>, &WriteProgress) {
        (self.timer.as_mut(), &self.state.writes)
    }

    /// Whether bytes were read on this connection since the head that
    /// [`Self::copy_next_head`] asked for was written (or, if none was, ever).
    pub fn read_since_head(&self) -> bool {
        let st = &self.state;
        st.reads.load(Ordering::Relaxed) != st.reads_at_head.load(Ordering::Relaxed)
    }

    /// Asks the socket to copy the head of the request sent next, as hyper writes it.
    pub fn copy_next_head(&self) {
        self.state.copy_head.store(true, Ordering::Relaxed);
    }

    /// The head that [`Self::copy_next_head`] asked for; `None` if it was not written.
    pub fn take_head(&self) -> Option<Vec<u8>> {
        self.state.take_head()
    }

    /// A response body is being read on this connection from now until [`Self::body_ended`]:
    /// should the client stop taking it, the connection is closed (see [`watch`]).
    pub fn body_started(&self) {
        let st = &self.state;
        st.waiting.store(false, Ordering::Relaxed);
        // A new body: the watchdog starts counting afresh.
        st.took();
        // Release: a watchdog that sees `READING` sees the new count.
        st.phase.store(READING, Ordering::Release);
    }

    /// The body reached its end (or had none). False if the watchdog closed the
    /// connection first: it must not go back to the pool.
    pub fn body_ended(&self) -> bool {
        match self
            .state
            .phase
            .compare_exchange(READING, IDLE, Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => true,
            Err(phase) => phase != CUT,
        }
    }

    /// The client took a part of the body.
    pub fn body_taken(&self) {
        self.state.took();
    }

    /// How long the backend may send nothing more of a body it has begun.
    pub fn body_stall(&self) -> Duration {
        self.state.stall
    }

    /// Whether the body's reader waits for the backend (rather than the backend for it).
    pub fn body_waiting(&self, waiting: bool) {
        self.state.waiting.store(waiting, Ordering::Relaxed);
    }
}

/// [`ConnState::phase`] values.
const SOCKET_OPEN: u8 = 0;
const SOCKET_CLOSING: u8 = 1;
const SOCKET_GONE: u8 = 2;

const IDLE: u8 = 0;
const READING: u8 = 1;
const CUT: u8 = 2;

/// What a connection's watchdog learns from the body read on it.
#[derive(Debug, Default)]
struct ConnState {
    /// `READING` while a response body is read; `CUT` once the watchdog closed the
    /// connection under one.
    phase: AtomicU8,
    /// Counts the parts of bodies that the client took, and the bodies begun.
    taken: AtomicU64,
    /// The body's last poll found nothing from the backend.
    waiting: AtomicBool,
    /// The client connections' idle timeout: how long a body may go untaken (by the
    /// client) or unsent (by the backend).
    stall: Duration,
    /// Set for a request whose head the socket should copy when hyper writes it;
    /// cleared once copied.
    copy_head: AtomicBool,
    /// The last head copied.
    head: Mutex<Vec<u8>>,
    /// The writes that the socket took bytes from: an upload's progress while the
    /// backend reads it more slowly than the client sends.
    writes: WriteProgress,
    /// Counts the reads that brought bytes, and the count when the last head was
    /// copied: whether a backend that closed the connection had begun to answer.
    reads: AtomicU64,
    reads_at_head: AtomicU64,
    /// Set when the `Sender` was let go while the connection was open.
    orphaned: AtomicBool,
    /// Set when the connection may carry no further request.
    retired: AtomicBool,
    /// `SOCKET_CLOSING` when the connection is closed for being over a lowered
    /// `max_connections_per_backend` (counted as closing until its socket goes),
    /// `SOCKET_GONE` once its socket went.
    over_limit: AtomicU8,
    /// Set when the connection is given up on: its socket is reset when dropped.
    reset: AtomicBool,
    /// The connection's task (kept here rather than in the `Sender`, which requests
    /// move around several times over).
    task: std::sync::OnceLock<AbortHandle>,
}

impl ConnState {
    fn take_head(&self) -> Option<Vec<u8>> {
        if self.copy_head.load(Ordering::Acquire) {
            return None;
        }
        Some(std::mem::take(&mut *lock(&self.head)))
    }

    /// Ends the connection's task, resetting the socket: closed plainly, it would keep
    /// what is left to send (an upload the backend stopped reading) and send its FIN
    /// after that, which would leave the backend's end open until the kernel gave up.
    fn abort(&self) {
        self.reset.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.get() {
            task.abort();
        }
    }

    /// Counts the reads and writes that moved bytes.
    fn moved(&self) -> u64 {
        self.writes
            .count()
            .wrapping_add(self.reads.load(Ordering::Relaxed))
    }

    fn took(&self) {
        // One writer (the body's reader): no read-modify-write needed.
        let n = self.taken.load(Ordering::Relaxed);
        self.taken.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// A response body is under way and its reader is not waiting for the backend: the
    /// next part is the client's to take.
    fn held_up(&self) -> bool {
        self.phase.load(Ordering::Acquire) == READING && !self.waiting.load(Ordering::Relaxed)
    }
}

/// Adds one to a count that only the connection's task changes: no read-modify-write
/// needed.
#[inline]
fn bump(count: &AtomicU64) {
    count.store(
        count.load(Ordering::Relaxed).wrapping_add(1),
        Ordering::Relaxed,
    );
}

fn lock(head: &Mutex<Vec<u8>>) -> std::sync::MutexGuard<'_, Vec<u8>> {
    // A buffer of bytes cannot be left inconsistent by a panic.
    head.lock().unwrap_or_else(|e| e.into_inner())
}

/// An upstream socket that copies the head of a request when asked to (see
/// [`Sender::copy_next_head`]): so that a bodyless request whose connection fails
/// before the response can go to another backend as it was, without a copy of every
/// request made field by field in case it fails (which costs more than this copy of
/// the bytes hyper writes anyway). A request is written on an idle connection, and
/// hyper's first write for it starts with the whole head, encoded in one buffer.
#[derive(Debug)]
struct HeadCopy<T: Reset> {
    inner: T,
    state: Arc<ConnState>,
    /// Counts the socket among the backend's open connections for as long as it lives:
    /// through an upgrade too, when hyper hands it on to a tunnel.
    counted: Counted,
}

/// A socket that can be told to reset, rather than close, when it is dropped.
trait Reset {
    fn reset_when_dropped(&self);
}

impl Reset for TcpStream {
    fn reset_when_dropped(&self) {
        let _ = self.set_zero_linger();
    }
}

impl<T: Reset> Drop for HeadCopy<T> {
    fn drop(&mut self) {
        if self.state.reset.load(Ordering::Relaxed) {
            self.inner.reset_when_dropped();
        }
        if self.state.over_limit.swap(SOCKET_GONE, Ordering::AcqRel) == SOCKET_CLOSING {
            // Uncounted as closing when uncounted as open, just after this.
            self.counted.closing = true;
        }
    }
}

impl<T: Reset> HeadCopy<T> {
    /// Counts a write that the socket took bytes from.
    #[inline]
    fn wrote(&self, n: &io::Result<usize>) {
        if matches!(n, Ok(n) if *n > 0) {
            self.state.writes.wrote();
        }
    }

    /// Copies `first`, the start of what is about to be written, if a head is asked for.
    #[inline]
    fn copy(&self, first: &[u8]) {
        if self.state.copy_head.load(Ordering::Relaxed) {
            self.copy_head(first);
        }
    }

    fn copy_head(&self, first: &[u8]) {
        {
            let mut head = lock(&self.state.head);
            head.clear();
            // Not kept at the size of the largest head ever sent on the connection.
            if head.capacity() > first.len().max(1024) * 2 {
                head.shrink_to(first.len());
            }
            head.extend_from_slice(first);
        }
        let reads = self.state.reads.load(Ordering::Relaxed);
        self.state.reads_at_head.store(reads, Ordering::Relaxed);
        self.state.copy_head.store(false, Ordering::Release);
    }
}

impl<T: AsyncRead + Reset + Unpin> AsyncRead for HeadCopy<T> {
    #[inline]
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = std::task::ready!(Pin::new(&mut self.inner).poll_read(cx, buf));
        if buf.filled().len() > before {
            bump(&self.state.reads);
        }
        Poll::Ready(r)
    }
}

impl<T: AsyncWrite + Reset + Unpin> AsyncWrite for HeadCopy<T> {
    #[inline]
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.copy(buf);
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, buf));
        self.wrote(&n);
        Poll::Ready(n)
    }

    #[inline]
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            self.copy(first);
        }
        let n = std::task::ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, bufs));
        self.wrote(&n);
        Poll::Ready(n)
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    #[inline]
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Closes the connection driven by `conn` once a response body has been under way for
/// `limit` (the state's `stall`) with the client taking no part of it, its reader not
/// waiting for the backend: an HTTP/2 stream that gets no flow-control window, which
/// nothing else notices, would otherwise hold the backend for as long as the client
/// likes. (A backend that sends nothing is the body's own stall limit's to catch.) The
/// body hands on parts of at most 16 KiB, so a client that reads slowly but steadily is
/// not taken for one that reads nothing.
///
/// Also closes a connection whose `Sender` was let go while it was open (see
/// [`Sender`]'s `Drop`) once its socket has moved no bytes either way for `limit`: one
/// busy with an upload that a backend which answered early reads no further would
/// otherwise stay open for good.
/// (Reads count too: the response to a request whose connection cannot be reused may
/// still be coming.)
///
/// Looks every `limit / 2`, so it acts within 1.5 × `limit`; ends when `done` does
/// (the connection's task ended). The body's reader then gets an error, not an early
/// end: hyper fails a response body whose connection is dropped under it.
async fn watch(state: Arc<ConnState>, conn: AbortHandle, mut done: oneshot::Receiver<()>) {
    let limit = state.stall;
    let period = (limit / 2).max(Duration::from_millis(10));
    let mut last = state.taken.load(Ordering::Relaxed);
    let mut quiet = Duration::ZERO;
    let mut last_moved = state.moved();
    let mut still = Duration::ZERO;
    loop {
        tokio::select! {
            _ = &mut done => return,
            () = tokio::time::sleep(period) => {}
        }
        if state.orphaned.load(Ordering::Acquire) {
            let moved = state.moved();
            if moved != last_moved {
                last_moved = moved;
                still = Duration::ZERO;
            } else {
                still += period;
                if still >= limit {
                    state.abort();
                    tracing::debug!(
                        after = ?limit,
                        "closed a backend connection: the rest of its upload stopped moving"
                    );
                    return;
                }
            }
            continue;
        }
        last_moved = state.moved();
        // The phase first: its acquire orders the count after it.
        let held_up = state.held_up();
        let taken = state.taken.load(Ordering::Relaxed);
        if taken != last || !held_up {
            last = taken;
            quiet = Duration::ZERO;
            continue;
        }
        quiet += period;
        if quiet < limit {
            continue;
        }
        // Unless the body ended meanwhile: then the connection may be in the pool.
        if state
            .phase
            .compare_exchange(READING, CUT, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            conn.abort();
            tracing::warn!(
                after = ?limit,
                "closed a backend connection: the client took none of its response"
            );
            return;
        }
    }
}

/// Why no connection to a backend could be had.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connect to {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("HTTP/1.1 handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: hyper::Error },
    #[error("connection to {addr} closed before the request was sent: {source}")]
    Closed { addr: String, source: hyper::Error },
    /// The backend has `max_connections_per_backend` connections open, none of them
    /// free (and, when waiting was allowed, none came free within the connect timeout).
    #[error("{addr} has its {limit} connections busy")]
    Full { addr: String, limit: usize },
}

#[derive(Debug)]
struct Idle {
    tx: Sender,
    since: Instant,
}

/// The pool's settings from the configuration.
#[derive(Debug, Clone, Copy)]
struct Settings {
    max_idle: usize,
    /// `max_connections_per_backend`; 0 = no limit.
    max_open: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

impl Settings {
    fn of(pool: &PoolConfig) -> Self {
        Settings {
            max_idle: pool.max_idle_per_backend,
            max_open: pool.max_connections_per_backend.unwrap_or(0),
            idle_timeout: pool.upstream_idle_timeout,
            connect_timeout: pool.connect_timeout,
        }
    }
}

#[derive(Debug)]
struct Slots {
    /// Oldest first.
    conns: Vec<Idle>,
    settings: Settings,
}

/// Idle connections to one backend.
#[derive(Debug)]
pub struct ConnPool {
    addr: BackendAddr,
    idle: Mutex<Slots>,
    /// How long a response body may go untaken before its connection is closed.
    body_stall: Duration,
    /// The largest response head taken (`max_header_bytes`, as for requests).
    max_head: usize,
    /// Counts connections opened: against the request count it shows reuse.
    stats: Arc<BackendStats>,
    /// The connections open, and word of one freed.
    open: Arc<Open>,
}

/// Counts a backend's open connections (busy, idle, or finishing an upload), and wakes
/// the request first in line for one: when an idle one comes back, one closes, or the
/// request before it leaves the line.
#[derive(Debug, Default)]
struct Open {
    count: AtomicUsize,
    /// Of those, the ones closed for being over a lowered limit whose sockets are not
    /// yet let go of.
    closing: AtomicUsize,
    /// Requests waiting for a connection, by ticket, first come first, each with the
    /// signal that wakes it: only the first may take what comes free, and only the
    /// first is woken, so that an event costs the same however long the line.
    queue: Mutex<std::collections::VecDeque<(u64, Arc<Notify>)>>,
    /// The queue's length, read without its lock.
    waiting: AtomicUsize,
    next_ticket: AtomicU64,
}

impl Open {
    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(u64, Arc<Notify>)>> {
        // Tickets only: a panic while holding the lock cannot leave them inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the request holding `ticket` (if it has one; else a request that comes
    /// now) is first in line.
    fn first(&self, ticket: Option<&Ticket<'_>>) -> bool {
        let queue = self.queue();
        match (ticket, queue.front()) {
            (Some(t), Some((first, _))) => *first == t.number,
            (Some(_), None) => false,
            (None, front) => front.is_none(),
        }
    }

    /// Tells the request first in line to look again; the signal keeps a wake-up given
    /// while its request is not yet waiting. A request that joins the line looks once
    /// more after joining, and the queue's lock orders the two: either the join comes
    /// first and this finds it, or this comes first and the look after the join sees
    /// what came free before it.
    fn wake_first(&self) {
        if let Some((_, signal)) = self.queue().front() {
            signal.notify_one();
        }
    }

    /// The connections open and not on their way out.
    fn staying(&self) -> usize {
        let closing = self.closing.load(Ordering::Acquire);
        self.count.load(Ordering::Acquire).saturating_sub(closing)
    }

    /// Closes `tx` for being over a lowered limit. Counted as closing until its socket
    /// goes, unless it went already (the backend may have closed it meanwhile).
    fn close_over_limit(&self, tx: Sender) {
        self.closing.fetch_add(1, Ordering::AcqRel);
        let marked = tx.state.over_limit.compare_exchange(
            SOCKET_OPEN,
            SOCKET_CLOSING,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        if marked.is_err() {
            self.closing.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One of a backend's open connections, counted for as long as its socket lives;
/// `closing` when it was closed for being over a lowered limit.
#[derive(Debug)]
struct Counted {
    open: Arc<Open>,
    closing: bool,
}

impl Counted {
    fn new(open: &Arc<Open>) -> Self {
        Counted {
            open: open.clone(),
            closing: false,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        // The count first: read between the two, the connections staying are too few
        // for a moment, never too many (which would close a connection for nothing).
        self.open.count.fetch_sub(1, Ordering::AcqRel);
        if self.closing {
            self.open.closing.fetch_sub(1, Ordering::AcqRel);
        }
        self.open.wake_first();
    }
}

/// What a wait for room to connect ended with.
enum Room {
    /// Room for one more connection, taken.
    Taken(Counted),
    /// An idle connection, taken from the idle list.
    Idle(Idle),
}

/// A request's place in line for a connection of a backend at its limit: a request
/// that comes later waits behind it. When it leaves the line (served, or out of time),
/// the next in line is woken to look again.
struct Ticket<'a> {
    open: &'a Open,
    number: u64,
    /// Told when this request may be first in line and something came free.
    signal: Arc<Notify>,
}

impl<'a> Ticket<'a> {
    fn join(open: &'a Open) -> Self {
        let number = open.next_ticket.fetch_add(1, Ordering::Relaxed);
        let signal = Arc::new(Notify::new());
        open.queue().push_back((number, signal.clone()));
        open.waiting.fetch_add(1, Ordering::AcqRel);
        Ticket {
            open,
            number,
            signal,
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        {
            let mut queue = self.open.queue();
            if let Some(i) = queue.iter().position(|(n, _)| *n == self.number) {
                queue.remove(i);
            }
        }
        self.open.waiting.fetch_sub(1, Ordering::AcqRel);
        // A wake-up this request was given and did not use goes on to the next.
        self.open.wake_first();
    }
}

/// A connection checked out of the pool (or freshly opened).
#[derive(Debug)]
pub struct PooledConn {
    pub tx: Sender,
    /// True when it came from the idle list: a failure to send on it may only mean the
    /// backend closed it meanwhile, so the request is worth one more try on a new one.
    pub reused: bool,
    /// True when it was ready at once: no wait came between the checkout and the clock
    /// reading it was given, which still holds.
    pub at_once: bool,
}

impl ConnPool {
    /// `limits`, the client connections': a response body untaken for their idle
    /// timeout is let go (see [`watch`]), and a response head is held to the size of a
    /// request head.
    pub fn new(
        addr: BackendAddr,
        pool: &PoolConfig,
        limits: &Limits,
        stats: Arc<BackendStats>,
    ) -> Self {
        ConnPool {
            addr,
            body_stall: limits.idle_timeout,
            max_head: limits.max_header_bytes,
            idle: Mutex::new(Slots {
                conns: Vec::new(),
                settings: Settings::of(pool),
            }),
            stats,
            open: Arc::default(),
        }
    }

    pub fn connections_opened(&self) -> u64 {
        self.stats.connections_opened()
    }

    pub fn idle_count(&self) -> usize {
        self.lock().conns.len()
    }

    /// Connections open to the backend: busy, idle, or finishing an upload.
    pub fn open_count(&self) -> usize {
        self.open.count.load(Ordering::Acquire)
    }

    pub fn idle_timeout(&self) -> Duration {
        self.lock().settings.idle_timeout
    }

    /// Applies a reloaded pool's settings; idle connections beyond a lowered
    /// `max_idle_per_backend` (the oldest first) or a shortened idle timeout are closed.
    pub fn configure(&self, pool: &PoolConfig) {
        self.lock().settings = Settings::of(pool);
        // Now, rather than when the reaper next looks, which the old timeout timed.
        self.prune();
        // A raised limit may make room for requests waiting: the first takes it, and,
        // leaving the line, wakes the next.
        self.open.wake_first();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        // A panic while holding this lock cannot leave the vector inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle connection that is ready for a request, or a new one. `now` is a recent
    /// reading of the clock (the request's start), which idle connections are checked
    /// against for expiry. When the backend has `max_connections_per_backend`
    /// connections open and none idle, or requests wait for one already, the request
    /// waits for one to come free (first come, first served), within the connect
    /// timeout, if `wait`; else it is refused at once (`Full`).
    pub async fn checkout(
        &self,
        mut now: Instant,
        wait: bool,
    ) -> Result<PooledConn, UpstreamError> {
        let mut waited = false;
        // Waits for connections that are not ready at once end together by this time, so
        // that several such connections cost one connect timeout at most, not one each.
        let mut wait_until = None;
        loop {
            let (idle, settings) = {
                let mut slots = self.lock();
                // Requests waiting for a connection go first: a new one does not take
                // an idle connection from under them.
                let queue = slots.settings.max_open != 0 && self.open.waiting() > 0;
                (if queue { None } else { slots.conns.pop() }, slots.settings)
            };
            let Some(Idle { mut tx, since }) = idle else {
                // Boxed: connecting is the cold path, and its future is large; inline,
                // it would grow every request's future (and each move of it).
                let until = wait.then(|| {
                    *wait_until.get_or_insert_with(|| {
                        tokio::time::Instant::from_std(now) + settings.connect_timeout
                    })
                });
                let (tx, reused) = Box::pin(self.open(until)).await?;
                return Ok(PooledConn {
                    tx,
                    reused,
                    at_once: false,
                });
            };
            if tx.tx.is_closed() || now.saturating_duration_since(since) >= settings.idle_timeout {
                continue;
            }
            // Usually ready at once: then no timer is armed. Otherwise its task may not
            // have run since the last response ended, or it may still be writing the end
            // of the last request's body to a backend that answered early: a wait, but a
            // bounded one.
            if tx.tx.is_ready() {
                return Ok(PooledConn {
                    tx,
                    reused: true,
                    at_once: !waited,
                });
            }
            let until = *wait_until.get_or_insert_with(|| {
                tokio::time::Instant::from_std(now) + settings.connect_timeout
            });
            let ready = tokio::time::timeout_at(until, tx.tx.ready()).await;
            // Time has passed: `now` no longer holds.
            waited = true;
            now = Instant::now();
            if let Ok(Ok(())) = ready {
                return Ok(PooledConn {
                    tx,
                    reused: true,
                    at_once: false,
                });
            }
        }
    }

    /// A connection when none could be taken idle at once: a new one when there is
    /// room for it; else, by `until` if given, an idle one that came back (`true`:
    /// reused) or room for a new one, whichever comes first.
    async fn open(
        &self,
        until: Option<tokio::time::Instant>,
    ) -> Result<(Sender, bool), UpstreamError> {
        // Its place in line, kept while it looks at the idle connections it is handed.
        let mut ticket = None;
        loop {
            let Idle { mut tx, since } = match self.room(until, true, &mut ticket).await? {
                Room::Taken(c) => {
                    // Out of the line before the connect, which may take a while.
                    drop(ticket.take());
                    return self.dial(c).await.map(|tx| (tx, false));
                }
                Room::Idle(idle) => idle,
            };
            let settings = self.lock().settings;
            let now = Instant::now();
            if tx.tx.is_closed() || now.saturating_duration_since(since) >= settings.idle_timeout {
                continue;
            }
            if tx.tx.is_ready() {
                return Ok((tx, true));
            }
            // Out of the line while this one gets ready, lest the line wait on it.
            drop(ticket.take());
            let deadline = until
                .unwrap_or_else(|| tokio::time::Instant::from_std(now) + settings.connect_timeout);
            if let Ok(Ok(())) = tokio::time::timeout_at(deadline, tx.tx.ready()).await {
                return Ok((tx, true));
            }
        }
    }

    /// Room for one more connection to the backend under its limit or, with
    /// `take_idle`, an idle connection; waiting for either until `until` (if given),
    /// in line behind the requests waiting already (`ticket` holds its place).
    async fn room<'a>(
        &'a self,
        until: Option<tokio::time::Instant>,
        take_idle: bool,
        ticket: &mut Option<Ticket<'a>>,
    ) -> Result<Room, UpstreamError> {
        loop {
            let limit = self.lock().settings.max_open;
            if limit == 0 || self.open.first(ticket.as_ref()) {
                if take_idle {
                    if let Some(idle) = self.lock().conns.pop() {
                        return Ok(Room::Idle(idle));
                    }
                }
                let taken =
                    self.open
                        .count
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                            (limit == 0 || n < limit).then_some(n + 1)
                        });
                if taken.is_ok() {
                    return Ok(Room::Taken(Counted::new(&self.open)));
                }
                if !take_idle && self.open.staying() <= limit {
                    // A new connection is wanted, not an idle one (one found closed is
                    // being replaced): it takes the place of the oldest idle one, which
                    // closes. Over the limit by one only until that one's socket is let
                    // go of.
                    let oldest = {
                        let mut slots = self.lock();
                        (!slots.conns.is_empty()).then(|| slots.conns.remove(0))
                    };
                    if let Some(oldest) = oldest {
                        // Closing first: the connections staying never read too many.
                        self.open.close_over_limit(oldest.tx);
                        self.open.count.fetch_add(1, Ordering::AcqRel);
                        return Ok(Room::Taken(Counted::new(&self.open)));
                    }
                }
            }
            let full = || UpstreamError::Full {
                addr: self.addr.to_string(),
                limit,
            };
            let Some(until) = until else {
                return Err(full());
            };
            match ticket {
                // In line now: it looks again before it waits, so that what came free
                // since the look above (when no one was in line to be woken) is seen.
                None => *ticket = Some(Ticket::join(&self.open)),
                Some(t) => {
                    if tokio::time::timeout_at(until, t.signal.notified())
                        .await
                        .is_err()
                    {
                        return Err(full());
                    }
                }
            }
        }
    }

    /// Opens a new connection within the connect timeout, after waiting (as long again
    /// at most) for room under the backend's connection limit.
    pub async fn connect(&self) -> Result<Sender, UpstreamError> {
        let until = tokio::time::Instant::now() + self.lock().settings.connect_timeout;
        let mut ticket = None;
        let room = self.room(Some(until), false, &mut ticket).await?;
        // Out of the line before the connect, which may take a while.
        drop(ticket);
        match room {
            Room::Taken(counted) => self.dial(counted).await,
            // Not asked for.
            Room::Idle(Idle { tx, .. }) => Ok(tx),
        }
    }

    /// Opens a new connection, counted by `counted` for as long as its socket lives,
    /// within the connect timeout.
    async fn dial(&self, counted: Counted) -> Result<Sender, UpstreamError> {
        let addr = || self.addr.to_string();
        let connect_timeout = self.lock().settings.connect_timeout;
        let stream = match tokio::time::timeout(connect_timeout, connect_tcp(&self.addr)).await {
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    addr: addr(),
                    after: connect_timeout,
                })
            }
            Ok(Err(source)) => {
                return Err(UpstreamError::Connect {
                    addr: addr(),
                    source,
                })
            }
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::new(ConnState {
            stall: self.body_stall,
            ..ConnState::default()
        });

        // Vectored writes (hyper's choice for this socket anyway, but said outright), not
        // `writev(false)`. Flattening would save about 250 instructions per request, but
        // copy every uploaded body chunk into one buffer per connection, which keeps its
        // largest size while the connection idles in the pool. And `HeadCopy` relies on
        // them: hyper then puts a request head in a buffer of its own, never after bytes
        // of an earlier body still to be written.
        // A larger head is a bad response (`502`): without the cap, hyper would buffer
        // some 400 KiB of it, and pass on a head that most clients refuse. The cap is
        // hyper's buffer size, so it also bounds each read of a response body (the
        // body is handed on in parts of 16 KiB anyway) and the upload bytes hyper
        // queues for writing.
        let (tx, conn) = http1::Builder::new()
            .writev(true)
            .max_buf_size(self.max_head)
            .handshake(TokioIo::new(HeadCopy {
                inner: stream,
                state: state.clone(),
                counted,
            }))
            .await
            .map_err(|source| UpstreamError::Handshake {
                addr: addr(),
                source,
            })?;
        // Dropped when the task ends, aborted or not: the watchdog then ends too.
        let (done_tx, done) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _done = done_tx;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        let _ = state.task.set(task.abort_handle());
        tokio::spawn(watch(state.clone(), task.abort_handle(), done));
        self.stats.count_connection_opened();
        // Set for each request before it is polled.
        let timer = Box::pin(tokio::time::sleep(Duration::ZERO));
        Ok(Sender {
            tx,
            timer,
            state,
            upload: None,
        })
    }

    /// Returns a connection whose last response was read to the end. It is closed
    /// instead if the request's body was not uploaded whole: a backend may answer before
    /// it read the body (an early 401 or 413), and the connection then stays busy with
    /// the rest of the upload, perhaps for good, as the backend may never read it (so
    /// nginx, too, keeps a connection only once the request was sent whole). The upload
    /// goes on while the client sends it and the backend takes it: the client, told that
    /// its connection closes after the response, may still be sending, and a connection
    /// closed on unread bytes is reset, which can lose the response it has yet to read.
    /// Once the upload stops moving, the watchdog closes the connection (see [`watch`]).
    pub fn checkin(&self, mut tx: Sender) {
        if tx.tx.is_closed()
            || tx.state.retired.load(Ordering::Relaxed)
            || tx.upload.as_ref().is_some_and(|w| !w.finished())
        {
            return;
        }
        tx.upload = None;
        let now = Instant::now();
        let mut slots = self.lock();
        let Settings {
            max_idle,
            idle_timeout,
            ..
        } = slots.settings;
        // The oldest entry sits at the front; drop it if it expired, so a busy pool
        // sheds stale connections without waiting for the reaper.
        if slots
            .conns
            .first()
            .is_some_and(|c| now.duration_since(c.since) >= idle_timeout)
        {
            slots.conns.remove(0);
        }
        if slots.conns.len() < max_idle {
            let max_open = slots.settings.max_open;
            // Over a lowered `max_connections_per_backend`: closed as it comes back,
            // rather than kept busy above the limit.
            if max_open != 0 && self.open.staying() > max_open {
                self.open.close_over_limit(tx);
                return;
            }
            slots.conns.push(Idle { tx, since: now });
            // A request that joins the line after this reads it empty looks at the
            // idle list after joining, under the lock held here: it finds this one.
            if max_open != 0 && self.open.waiting() > 0 {
                drop(slots);
                self.open.wake_first();
            }
        }
    }

    /// Closes idle connections that expired or that the backend closed.
    pub fn prune(&self) {
        let now = Instant::now();
        let expired: Vec<Idle> = {
            let mut slots = self.lock();
            let Settings {
                max_idle,
                idle_timeout,
                ..
            } = slots.settings;
            let (mut keep, mut gone): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut slots.conns)
                .into_iter()
                .partition(|c| !c.tx.tx.is_closed() && now.duration_since(c.since) < idle_timeout);
            // Over a lowered limit: the oldest go.
            let over = keep.len().saturating_sub(max_idle);
            gone.extend(keep.drain(..over));
            // Over a lowered `max_connections_per_backend` too (counting as open
            // those that go already, and those closed for it before).
            let max_open = slots.settings.max_open;
            if max_open != 0 {
                let going = gone.iter().filter(|c| !c.tx.tx.is_closed()).count();
                let staying = self.open.staying().saturating_sub(going);
                let over = staying.saturating_sub(max_open).min(keep.len());
                for c in keep.drain(..over) {
                    self.open.close_over_limit(c.tx);
                }
            }
            slots.conns = keep;
            gone
        };
        drop(expired);
    }

    /// Closes every idle connection.
    pub fn clear(&self) {
        let all = std::mem::take(&mut self.lock().conns);
        drop(all);
    }
}

pub(crate) async fn connect_tcp(addr: &BackendAddr) -> io::Result<TcpStream> {
    match addr {
        BackendAddr::Ip(a) => TcpStream::connect(a).await,
        BackendAddr::Name { host, port } => TcpStream::connect((host.as_str(), *port)).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::IoSlice;
    use tokio::io::AsyncWriteExt;

    impl Reset for tokio::io::DuplexStream {
        fn reset_when_dropped(&self) {}
    }

    fn socket(capacity: usize) -> (HeadCopy<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (near, far) = tokio::io::duplex(capacity);
        let state = Arc::new(ConnState::default());
        let open = Arc::new(Open::default());
        open.count.store(1, Ordering::Relaxed);
        let copy = HeadCopy {
            inner: near,
            state,
            counted: Counted::new(&open),
        };
        (copy, far)
    }

    #[tokio::test]
    async fn the_head_is_copied_whole_from_the_first_write_only_when_asked() {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        // Room for 8 bytes: the first write is partial, the rest waits for the reader.
        let (mut io, mut far) = socket(8);
        let state = io.state.clone();
        // Not asked: nothing copied.
        io.write_all(b"x").await.unwrap();
        assert!(lock(&state.head).is_empty());
        let mut sink = [0u8; 64];
        tokio::io::AsyncReadExt::read(&mut far, &mut sink)
            .await
            .unwrap();

        state.copy_head.store(true, Ordering::Relaxed);
        // Asked for, not yet written.
        assert_eq!(state.take_head(), None);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut far, &mut got)
                .await
                .unwrap();
            got
        });
        let bufs = [IoSlice::new(b""), IoSlice::new(head), IoSlice::new(b"body")];
        let n = io.write_vectored(&bufs).await.unwrap();
        assert!(n <= 8, "{n}");
        assert!(!state.copy_head.load(Ordering::Acquire));
        assert_eq!(&lock(&state.head)[..], head);
        // Later writes, the rest of the head among them, copy nothing.
        io.write_all(&head[n..]).await.unwrap();
        io.write_all(b"next").await.unwrap();
        assert_eq!(&lock(&state.head)[..], head);
        io.shutdown().await.unwrap();
        drop(io);
        let got = reader.await.unwrap();
        assert_eq!(got, [&head[..], b"next"].concat());
        assert_eq!(state.take_head().as_deref(), Some(&head[..]));
    }

    /// A pool of one backend that accepts connections and never answers, with
    /// `max_connections_per_backend = 1`.
    async fn pool_of_one(connect_timeout: &str) -> Arc<ConnPool> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = l.local_addr().unwrap();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let text = format!(
            "[pools.p]\nbackends = [\"{a}\"]\nmax_connections_per_backend = 1\nconnect_timeout = \"{connect_timeout}\"\n"
        );
        let cfg = crate::config::parse(&text, "test.toml").unwrap();
        Arc::new(ConnPool::new(
            BackendAddr::Ip(a),
            &cfg.pools[0],
            &cfg.server.limits,
            Arc::new(BackendStats::new("p", "a")),
        ))
    }

    /// The connection a spawned checkout got, within 5 s.
    async fn served(
        checkout: tokio::task::JoinHandle<Result<PooledConn, UpstreamError>>,
    ) -> PooledConn {
        tokio::time::timeout(Duration::from_secs(5), checkout)
            .await
            .expect("the waiting request is served")
            .unwrap()
            .unwrap()
    }

    /// Lets the tasks spawned so far run until they wait (the test runtime has one
    /// thread, and a wait for room does no I/O before it parks).
    async fn let_run() {
        tokio::task::yield_now().await;
    }

    #[tokio::test]
    async fn a_connection_returned_idle_serves_whichever_waiter_it_wakes() {
        let pool = pool_of_one("200ms").await;
        let first = pool.checkout(Instant::now(), false).await.unwrap();
        assert_eq!(pool.open_count(), 1);
        // Full: refused at once when waiting is not allowed.
        assert!(matches!(
            pool.checkout(Instant::now(), false).await,
            Err(UpstreamError::Full { limit: 1, .. })
        ));

        // A replacement for a connection found closed waits first, then a request.
        let p = pool.clone();
        let replacing = tokio::spawn(async move { p.connect().await });
        let_run().await;
        let p = pool.clone();
        let waiting = tokio::spawn(async move { p.checkout(Instant::now(), true).await });
        let_run().await;

        // The connection comes back idle and wakes the replacement, which cannot use
        // it: it closes it and takes its place, rather than wait on beside it.
        pool.checkin(first.tx);
        let _replaced = replacing
            .await
            .unwrap()
            .expect("the replacement gets its new connection");
        assert_eq!(pool.idle_count(), 0);
        // The request waits on for the one connection, busy, and runs out of time.
        assert!(matches!(
            waiting.await.unwrap(),
            Err(UpstreamError::Full { limit: 1, .. })
        ));
        assert_eq!(pool.open_count(), 1);
    }

    #[tokio::test]
    async fn a_waiting_request_takes_a_connection_returned_idle_before_a_newcomer() {
        let pool = pool_of_one("10s").await;
        let first = pool.checkout(Instant::now(), false).await.unwrap();
        let p = pool.clone();
        let waiting = tokio::spawn(async move { p.checkout(Instant::now(), true).await });
        let_run().await;
        // Back idle, and the waiting request woken for it, but not yet run: a request
        // that comes now does not take it.
        pool.checkin(first.tx);
        assert!(matches!(
            pool.checkout(Instant::now(), false).await,
            Err(UpstreamError::Full { .. })
        ));
        let got = served(waiting).await;
        assert!(got.reused);
        assert_eq!(pool.open_count(), 1);
        assert_eq!(pool.stats.connections_opened(), 1);
    }

    /// `n` checkouts that wait, spawned one after another, each waiting before the next.
    async fn line_up(
        pool: &Arc<ConnPool>,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<PooledConn, UpstreamError>>> {
        let mut waiting = Vec::new();
        for _ in 0..n {
            let p = pool.clone();
            waiting.push(tokio::spawn(async move {
                p.checkout(Instant::now(), true).await
            }));
            let_run().await;
        }
        waiting
    }

    #[tokio::test]
    async fn waiting_requests_are_served_in_the_order_they_came() {
        let pool = pool_of_one("10s").await;
        let first = pool.checkout(Instant::now(), false).await.unwrap();
        let waiting = line_up(&pool, 3).await;
        let mut tx = first.tx;
        let mut rest = waiting.into_iter();
        for _ in 0..2 {
            pool.checkin(tx);
            let next = rest.next().unwrap();
            let got = served(next).await;
            assert!(got.reused);
            tx = got.tx;
        }
        // The third waits on behind the second, which holds the connection.
        let third = rest.next().unwrap();
        let_run().await;
        assert!(!third.is_finished());
        pool.checkin(tx);
        let got = served(third).await;
        assert!(got.reused);
        assert_eq!(pool.stats.connections_opened(), 1);
    }

    #[tokio::test]
    async fn a_raised_limit_lets_every_waiting_request_through() {
        let pool = pool_of_one("10s").await;
        let _first = pool.checkout(Instant::now(), false).await.unwrap();
        let waiting = line_up(&pool, 3).await;
        // Only the first in line is woken; each, leaving the line, wakes the next.
        let text = format!(
            "[pools.p]\nbackends = [\"{}\"]\nmax_connections_per_backend = 4\n",
            pool.addr
        );
        let cfg = crate::config::parse(&text, "test.toml").unwrap();
        pool.configure(&cfg.pools[0]);
        for w in waiting {
            assert!(!served(w).await.reused);
        }
        assert_eq!(pool.open_count(), 4);
    }
}
