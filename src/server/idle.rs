//! Client connection timers: `server.limits.idle_timeout` and `header_read_timeout`.
//!
//! The socket is wrapped so reads and writes stamp the time, and each request holds an
//! [`ActiveRequest`] until its response is over. With no request in progress:
//!
//! - bytes arriving start a request head: the connection must deliver the whole head
//!   (hyper calls the service) within `header_read_timeout`, or it is closed. This is
//!   the slowloris defence, and it starts at the first byte of each request, so it does
//!   not also cut keep-alive connections that are merely waiting;
//! - no bytes at all for `idle_timeout` closes the connection (gracefully: an HTTP/2
//!   client gets GOAWAY).
//!
//! While a request is in progress, one rule applies: a client that takes none of its
//! response for `idle_timeout` (the socket accepts no byte of it) is cut off, so that a
//! reader that stops reading cannot hold the connection, and the backend's behind it,
//! for as long as it likes. A write that finds the socket full stamps the time, once;
//! any byte written clears the stamp, so the request path pays a load per write.
//!
//! hyper's own header timer is not used because it also runs while a keep-alive
//! connection waits for its next request, which would cap keep-alive idling at the
//! header timeout. HTTP/2 connections exchange control frames between requests, and
//! clients open them ahead of need, so for them only the idle rule applies, from the
//! preface on; and as those frames (PING above all) are no requests, an HTTP/2
//! connection is idle from the end of its last stream, whatever passes after it, as in
//! nginx. The same holds for a connection upgraded to a tunnel (WebSocket), which
//! the tunnel's task watches.
//!
//! Nothing wakes the watchdog: it sleeps until the nearest deadline, but never longer
//! than the shorter of the two timeouts. Any deadline that an event could set from now
//! on (a request head starting, a response ending, bytes moving) lies at least that far
//! ahead, so waking up that often never misses one, and the request path pays no task
//! wake-ups for it. While a request is in progress the stamps are not needed (nothing
//! can expire, and the end of the response stamps the time), so the socket wrapper only
//! reads the clock on a connection with no request in progress.
//!
//! The watchdog also carries graceful shutdown to the connection: it sets a flag and
//! wakes the connection's task, which looks at the flag each time it runs. That costs
//! the request path a load and a waker comparison, where a channel receiver polled with
//! the connection would take a lock on every wake-up.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const NONE: u64 = u64::MAX;

/// Shared between a connection's socket wrapper, its requests and its watchdog.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` of the last byte read or written.
    last_io_ms: AtomicU64,
    /// Milliseconds after `opened` of the first byte of a request head not yet complete,
    /// or `NONE`.
    head_started_ms: AtomicU64,
    /// Requests whose response is not over yet.
    active: AtomicUsize,
    /// HTTP/2: responses whose body has a part handed to hyper that the client has not
    /// taken yet (hyper polls a body again once its last part is on its way).
    held: AtomicUsize,
    /// HTTP/2: milliseconds after `opened` when a response body last had a part handed
    /// on or taken.
    progress_ms: AtomicU64,
    /// Requests begun on the connection, and those answered (their response began),
    /// counted on HTTP/2 only: a client that opens streams only to reset them is sent
    /// away (see [`ActiveRequest`]'s `Drop`).
    begun: AtomicU64,
    answered: AtomicU64,
    /// Milliseconds after `opened` since when a write has found the socket full and no
    /// byte has been written, or `NONE`.
    write_blocked_ms: AtomicU64,
    /// Only the idle rule applies: the connection speaks HTTP/2, or was upgraded to a
    /// tunnel.
    idle_rule_only: AtomicBool,
    /// The connection speaks HTTP/2: it is idle from the end of its last stream (or from
    /// its preface), whatever control frames (PING, SETTINGS) pass after that.
    http2: AtomicBool,
    /// The server is shutting down: finish the request in progress, then close.
    stop: AtomicBool,
    /// Woken when `stop` is set: the task serving the connection.
    stop_waker: Mutex<Option<Waker>>,
}

/// Which limit closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Idle,
    HeaderRead,
    /// The client took none of its response for the idle timeout.
    Unread,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            opened: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(NONE),
            active: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            progress_ms: AtomicU64::new(0),
            begun: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            write_blocked_ms: AtomicU64::new(NONE),
            idle_rule_only: AtomicBool::new(false),
            http2: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            stop_waker: Mutex::new(None),
        })
    }

    /// Asks the connection to shut down gracefully.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let waker = self.lock_waker().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Whether the connection should shut down. If not yet, `cx`'s task is woken when it
    /// should; `registered` is the waker last stored by this caller, so that a task
    /// polled again with the same waker (the usual case) stores nothing. There is one
    /// waker slot: only the task serving the connection may wait.
    #[inline]
    pub(crate) fn poll_stop(&self, cx: &Context<'_>, registered: &mut Option<Waker>) -> bool {
        if self.stop.load(Ordering::Acquire) {
            return true;
        }
        if registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return false;
        }
        self.register_stop_waker(cx, registered)
    }

    #[cold]
    fn register_stop_waker(&self, cx: &Context<'_>, registered: &mut Option<Waker>) -> bool {
        *self.lock_waker() = Some(cx.waker().clone());
        *registered = Some(cx.waker().clone());
        // A stop requested before the waker was stored found none to wake.
        self.stop.load(Ordering::Acquire)
    }

    /// Resolves once the connection should shut down (for the task serving it only).
    pub(crate) async fn stopped(&self) {
        let mut registered = None;
        std::future::poll_fn(|cx| {
            if self.poll_stop(cx, &mut registered) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Forgets the stored waker (its task no longer serves the connection).
    pub(crate) fn clear_stop_waker(&self) {
        self.lock_waker().take();
    }

    fn lock_waker(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        // A waker slot cannot be left inconsistent by a panic.
        self.stop_waker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn idle(&self) -> bool {
        self.active.load(Ordering::Relaxed) == 0
    }

    /// Whether a request is in progress.
    pub(crate) fn busy(&self) -> bool {
        !self.idle()
    }

    /// Whether bytes moving now count as traffic for the idle rule: not while a request
    /// is in progress (its own rules apply), nor on an HTTP/2 connection, whose client
    /// (or hyper, answering it) may trade PINGs for as long as it likes.
    fn io_counts(&self) -> bool {
        self.idle() && !self.http2.load(Ordering::Relaxed)
    }

    fn on_read(&self) {
        if !self.io_counts() {
            return;
        }
        let now = self.now_ms();
        self.last_io_ms.store(now, Ordering::Relaxed);
        if self.head_started_ms.load(Ordering::Relaxed) == NONE {
            self.head_started_ms.store(now, Ordering::Relaxed);
        }
    }

    fn on_write(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) != NONE {
            self.write_blocked_ms.store(NONE, Ordering::Relaxed);
        }
        if self.io_counts() {
            self.last_io_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A write found the socket full: the client is not taking what it is sent.
    #[cold]
    fn on_write_blocked(&self) {
        if self.write_blocked_ms.load(Ordering::Relaxed) == NONE {
            self.write_blocked_ms
                .store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// Notes what a write to the socket came to.
    #[inline]
    fn wrote(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => self.on_write(),
            Poll::Pending => self.on_write_blocked(),
            _ => {}
        }
    }

    /// The connection speaks HTTP/2: only the idle rule applies to it from now on, also
    /// before its first request. Its preface is no request head to be timed, and clients
    /// open HTTP/2 connections ahead of need.
    pub(crate) fn speaks_http2(&self) {
        self.idle_rule_only.store(true, Ordering::Relaxed);
        self.http2.store(true, Ordering::Relaxed);
    }

    /// Marks a request as started (its head is complete); it ends when the guard drops.
    pub fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::Relaxed);
        if self.http2.load(Ordering::Relaxed) {
            self.begun.fetch_add(1, Ordering::Relaxed);
        }
        self.head_started_ms.store(NONE, Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// Resolves when the connection has been idle for `idle`, a request head has been
    /// arriving for longer than `header`, or a response has found the client taking
    /// none of it for `idle`.
    pub async fn expired(&self, idle: Duration, header: Duration) -> Expiry {
        let (idle_ms, header_ms) = (idle.as_millis() as u64, header.as_millis() as u64);
        // Deadlines set from now on lie at least this far ahead (see the module docs).
        let recheck_ms = idle_ms.min(header_ms).max(1);
        let opened = tokio::time::Instant::from_std(self.opened);
        let sleep = tokio::time::sleep_until(opened);
        tokio::pin!(sleep);
        loop {
            let now = self.now_ms();
            let mut wake = now.saturating_add(recheck_ms);
            if let Some((deadline, kind)) = self.deadline(idle_ms, header_ms) {
                if now >= deadline {
                    return kind;
                }
                wake = wake.min(deadline);
            }
            sleep.as_mut().reset(opened + Duration::from_millis(wake));
            sleep.as_mut().await;
        }
    }

    /// The current deadline in milliseconds after `opened`, if any, and what it enforces.
    fn deadline(&self, idle_ms: u64, header_ms: u64) -> Option<(u64, Expiry)> {
        if !self.idle() {
            let blocked = self.write_blocked_ms.load(Ordering::Relaxed);
            let blocked = (blocked != NONE).then(|| blocked.saturating_add(idle_ms));
            // HTTP/2: a client that grants no flow-control window takes nothing, and
            // fills no socket either; the response parts it takes are what shows.
            // (Acquire: a part just handed on has stamped the time before.)
            let stalled = (self.http2.load(Ordering::Relaxed)
                && self.held.load(Ordering::Acquire) > 0)
                .then(|| {
                    self.progress_ms
                        .load(Ordering::Relaxed)
                        .saturating_add(idle_ms)
                });
            let deadline = match (blocked, stalled) {
                (Some(b), Some(s)) => Some(b.min(s)),
                (b, s) => b.or(s),
            };
            return deadline.map(|d| (d, Expiry::Unread));
        }
        let head = self.head_started_ms.load(Ordering::Relaxed);
        Some(
            if head != NONE && !self.idle_rule_only.load(Ordering::Relaxed) {
                (head.saturating_add(header_ms), Expiry::HeaderRead)
            } else {
                (
                    self.last_io_ms
                        .load(Ordering::Relaxed)
                        .saturating_add(idle_ms),
                    Expiry::Idle,
                )
            },
        )
    }
}

/// Requests of one connection that may end before their response began, and the
/// share of its requests they may be, before the connection is asked to close: a client
/// that opens HTTP/2 streams only to reset them once the proxy has taken them up (and
/// sent each to a backend) would otherwise cost that work without end ("rapid reset",
/// CVE-2023-44487; hyper bounds only resets of streams not yet taken up). Clients that
/// cancel requests now and then stay far below.
pub const MAX_UNANSWERED: u64 = 200;

/// Holds a connection busy while a request is in progress, until its response is over.
#[derive(Debug)]
pub struct ActiveRequest(Arc<Activity>);

impl ActiveRequest {
    /// The response begins: its head is handed over, its body is to follow. (Counted
    /// for HTTP/2 only, where clients can end requests before their response.)
    pub fn answered(&self) {
        let a = &self.0;
        if a.http2.load(Ordering::Relaxed) {
            a.answered.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Ends the request whose connection becomes a tunnel: from now on only the idle rule
    /// applies to it, watched through the returned activity.
    pub fn into_tunnel(self) -> Arc<Activity> {
        self.0.idle_rule_only.store(true, Ordering::Relaxed);
        self.0.clone()
    }

    /// The body is polled: the part handed on last (`held`), if any, is on its way.
    #[inline]
    pub fn polled(&self, held: &mut bool) {
        if self.progress() {
            self.release(held);
        }
    }

    /// A part of the body is handed on: on HTTP/2, hyper polls the body again only once
    /// the client has granted room for it. `held` is the body's own note of it.
    #[inline]
    pub fn handed(&self, held: &mut bool) {
        if self.progress() && !*held {
            *held = true;
            // Release: a watchdog that counts this part sees the progress stamp.
            self.0.held.fetch_add(1, Ordering::Release);
        }
    }

    /// On an HTTP/2 connection, stamps the time a response body moved; false on others,
    /// where the socket shows whether the client takes what it is sent.
    #[inline]
    fn progress(&self) -> bool {
        let a = &self.0;
        if !a.http2.load(Ordering::Relaxed) {
            return false;
        }
        a.progress_ms.store(a.now_ms(), Ordering::Relaxed);
        true
    }

    /// Forgets the body's part held, if any: the body is done.
    #[inline]
    pub fn release(&self, held: &mut bool) {
        if std::mem::take(held) {
            self.0.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let a = &self.0;
        a.last_io_ms.store(a.now_ms(), Ordering::Relaxed);
        a.head_started_ms.store(NONE, Ordering::Relaxed);
        if a.http2.load(Ordering::Relaxed) {
            // Requests over, less those answered: those that ended unanswered. Read in
            // this order (`begun` before the count of those still in progress drops,
            // `answered` after), a request that begins or is answered meanwhile on
            // another thread can make the figure smaller, never larger.
            let begun = a.begun.load(Ordering::Relaxed);
            let active = a.active.fetch_sub(1, Ordering::AcqRel) - 1;
            let over = begun.saturating_sub(active as u64);
            let unanswered = over.saturating_sub(a.answered.load(Ordering::Relaxed));
            if unanswered >= MAX_UNANSWERED {
                too_many_unanswered(a, unanswered, begun);
            }
        } else {
            a.active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Asks the connection to close once most of its requests ended before their response
/// began (see [`MAX_UNANSWERED`]).
#[cold]
fn too_many_unanswered(a: &Activity, unanswered: u64, begun: u64) {
    if unanswered * 2 > begun && !a.stop.load(Ordering::Relaxed) {
        tracing::warn!(
            unanswered,
            "closing a client connection: most of its requests ended before their response"
        );
        a.request_stop();
    }
}

/// A socket that reports its traffic to an [`Activity`], and holds `G` (the
/// connection's slot and gauge) for as long as the socket lives, an upgraded tunnel's
/// life included. Bytes handed back with [`TrackedIo::unread`] are read again first.
#[derive(Debug)]
pub struct TrackedIo<T, G> {
    inner: T,
    activity: Arc<Activity>,
    unread: Bytes,
    _guard: G,
}

impl<T, G> TrackedIo<T, G> {
    pub fn new(inner: T, activity: Arc<Activity>, guard: G) -> Self {
        TrackedIo {
            inner,
            activity,
            unread: Bytes::new(),
            _guard: guard,
        }
    }

    /// Puts `bytes`, already read, back in front of what the socket has yet to deliver.
    pub fn unread(&mut self, bytes: Bytes) {
        debug_assert!(self.unread.is_empty());
        self.unread = bytes;
    }
}

impl<T: AsyncRead + Unpin, G: Unpin> AsyncRead for TrackedIo<T, G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.unread.is_empty() {
            // Counted as activity when they were first read.
            let n = self.unread.len().min(buf.remaining());
            buf.put_slice(&self.unread[..n]);
            self.unread.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.on_read();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin, G: Unpin> AsyncWrite for TrackedIo<T, G> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.wrote(&r);
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.wrote(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);

    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn only_requests_ended_unanswered_send_an_http2_connection_away() {
        let activity = Activity::new();
        activity.speaks_http2();
        // Answered requests, however many.
        for _ in 0..1000 {
            let r = activity.begin();
            r.answered();
        }
        // Unanswered ones, as many as the limit: not more than half of all.
        for _ in 0..MAX_UNANSWERED {
            drop(activity.begin());
        }
        assert!(!activity.stop.load(Ordering::Acquire));
        // A connection whose requests are mostly unanswered.
        let fresh = Activity::new();
        fresh.speaks_http2();
        for i in 0..MAX_UNANSWERED {
            assert!(!fresh.stop.load(Ordering::Acquire), "sent away after {i}");
            drop(fresh.begin());
        }
        assert!(fresh.stop.load(Ordering::Acquire));
        assert_eq!(fresh.active.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_stop_wakes_the_stored_waker_once_and_is_seen_from_then_on() {
        let activity = Activity::new();
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        let cx = Context::from_waker(&waker);
        let mut registered = None;
        assert!(!activity.poll_stop(&cx, &mut registered));
        // Polled again with the same waker: nothing new is stored, nothing is woken.
        assert!(!activity.poll_stop(&cx, &mut registered));
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
        activity.request_stop();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(activity.poll_stop(&cx, &mut registered));
        activity.request_stop();
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "no waker is left to wake"
        );
    }

    #[test]
    fn a_stop_before_any_waker_is_stored_is_seen_at_once() {
        let activity = Activity::new();
        activity.request_stop();
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        assert!(activity.poll_stop(&Context::from_waker(&waker), &mut None));
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_new_waker_replaces_the_stored_one() {
        let activity = Activity::new();
        let (first, second) = (Arc::new(Counter::default()), Arc::new(Counter::default()));
        let mut registered = None;
        let w1 = Waker::from(first.clone());
        assert!(!activity.poll_stop(&Context::from_waker(&w1), &mut registered));
        let w2 = Waker::from(second.clone());
        assert!(!activity.poll_stop(&Context::from_waker(&w2), &mut registered));
        activity.request_stop();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
