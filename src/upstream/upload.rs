//! The client's request body on its way to a backend, watched so that the response
//! timeout runs from the end of the upload rather than from its start, and an upload
//! that stalls is blamed on the side that stalled.
//!
//! A large upload over a slow link may take far longer than `response_timeout`; it is
//! not late as long as bytes keep moving. While the body is being sent the timeout
//! bounds each wait: for the client's next bytes (408 if they never come: the client's
//! failure, not the backend's) or for the backend to take the bytes already read (504).
//! Once the body has ended, the backend has `response_timeout` for its response head.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::backend::clock_ms;

/// The request body sent upstream.
#[derive(Debug)]
pub struct Upload {
    body: Incoming,
    /// `None` for a body that is already over (most requests): nothing to watch.
    watch: Option<Arc<UploadWatch>>,
}

impl Upload {
    /// Wraps `body`, unwatched until [`Self::watch`] is called.
    pub fn new(body: Incoming) -> Self {
        Upload { body, watch: None }
    }

    /// Starts watching the upload, if there is a body to upload; returns the watch.
    pub fn watch(&mut self) -> Option<Arc<UploadWatch>> {
        if self.watch.is_none() && !self.ended() {
            self.watch = Some(Arc::new(UploadWatch::new()));
        }
        self.watch.clone()
    }

    /// See [`ended`].
    pub fn ended(&self) -> bool {
        ended(&self.body)
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if let Some(watch) = &this.watch {
            let phase = match &frame {
                Poll::Pending => Phase::Client,
                // Trailers end the body, whatever the body says: hyper's HTTP/1 client
                // polls no further once it has them.
                Poll::Ready(Some(Ok(f))) if !f.is_trailers() && !ended(&this.body) => {
                    Phase::Backend
                }
                Poll::Ready(_) => Phase::Done,
            };
            watch.enter(phase);
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Whether `body` holds no more bytes to send: it ended, or its declared length has
/// arrived. An HTTP/2 client may mark the end of its stream in a frame of its own after
/// the last bytes; hyper's HTTP/1 client, which stops reading a body at its length,
/// never waits for that frame, and neither should the upload's phase.
pub fn ended(body: &Incoming) -> bool {
    body.is_end_stream() || body.size_hint().exact() == Some(0)
}

/// Whom an upload in progress waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub enum Phase {
    /// The client, for more of the body.
    Client = 0,
    /// The backend, to take what was read (its connection is not being written to).
    Backend = 1,
    /// Nobody: the body has ended (or failed, which the send reports).
    Done = 2,
}

/// How an upload goes: the phase it is in and when that phase began, shared between the
/// body (polled by the upstream connection) and the request waiting for the response.
#[derive(Debug)]
pub struct UploadWatch {
    /// `clock_ms()` when the phase began, shifted left by two, and the phase.
    state: AtomicU64,
}

impl UploadWatch {
    fn new() -> Self {
        // Until the connection first asks for the body, it is the backend's turn.
        let watch = UploadWatch {
            state: AtomicU64::new(0),
        };
        watch.set(Phase::Backend);
        watch
    }

    fn set(&self, phase: Phase) {
        self.state
            .store((clock_ms() << 2) | phase as u64, Ordering::Relaxed);
    }

    /// Dates the wait for the backend from now: called as the request is sent, so that
    /// connecting (which has its own timeout) does not count.
    pub fn sending(&self) {
        self.set(Phase::Backend);
    }

    /// Notes that the upload is now in `phase`. Each chunk read counts as progress; a
    /// wait for the client is dated from when it began, however often it is polled.
    fn enter(&self, phase: Phase) {
        if phase == Phase::Client && self.phase_and_start().0 == Phase::Client {
            return;
        }
        self.set(phase);
    }

    /// Whether the whole body was read from the client and handed to the connection.
    pub fn finished(&self) -> bool {
        self.phase_and_start().0 == Phase::Done
    }

    /// The current phase and `clock_ms()` when it began.
    pub fn phase_and_start(&self) -> (Phase, u64) {
        let s = self.state.load(Ordering::Relaxed);
        let phase = match s & 3 {
            0 => Phase::Client,
            1 => Phase::Backend,
            _ => Phase::Done,
        };
        (phase, s >> 2)
    }
}

/// Writes that an upstream connection's socket took bytes from, counted by the socket,
/// and what the wait for the response (one at a time per connection) last saw of them:
/// kept with the connection, so that the wait's future stays small.
#[derive(Debug, Default)]
pub struct WriteProgress {
    writes: AtomicU64,
    seen: AtomicU64,
    moved_at: AtomicU64,
}

impl WriteProgress {
    /// Counts a write (from the connection's task, the only writer).
    #[inline]
    pub fn wrote(&self) {
        let w = &self.writes;
        w.store(w.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    /// The writes counted so far.
    pub fn count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// A new wait starts: writes before it do not count.
    fn start(&self) {
        self.seen
            .store(self.writes.load(Ordering::Relaxed), Ordering::Relaxed);
        self.moved_at.store(0, Ordering::Relaxed);
    }

    /// `clock_ms()` when the writes were last seen to move (`now` if since the last
    /// look), or 0.
    fn moved_at(&self, now: u64) -> u64 {
        let writes = self.writes.load(Ordering::Relaxed);
        if writes != self.seen.load(Ordering::Relaxed) {
            self.seen.store(writes, Ordering::Relaxed);
            self.moved_at.store(now, Ordering::Relaxed);
            return now;
        }
        self.moved_at.load(Ordering::Relaxed)
    }
}

/// Who let `timeout` pass without progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Late {
    /// The client stopped sending its body.
    Client,
    /// The backend stopped taking the body, or sent no response head after it.
    Backend,
}

pin_project_lite::pin_project! {
    /// Waits for `fut` (the response head) for `timeout`; with an upload's `watch`, for
    /// as long as the upload moves: fails once one phase of the upload, or the wait
    /// after it, lasts `timeout`. While the backend has bytes to take, each write that
    /// its socket takes bytes from (`progress` counts them) is progress too: a backend
    /// that reads slowly but steadily is not late. Without a watch, it is
    /// `tokio::time::timeout` on a timer of the caller's.
    pub struct Within<'a, F> {
        #[pin]
        fut: F,
        sleep: Pin<&'a mut Sleep>,
        watch: Option<&'a UploadWatch>,
        progress: &'a WriteProgress,
        timeout: Duration,
    }
}

/// Waits for `fut` on `timer`, which it sets to go off `timeout` after `from` (a
/// recent reading of the clock, passed in so that a request reads it once for several
/// uses): a timer that lives on (with the connection) and is set again for each wait.
pub fn within<'a, F: Future>(
    fut: F,
    (mut timer, progress): (Pin<&'a mut Sleep>, &'a WriteProgress),
    watch: Option<&'a UploadWatch>,
    timeout: Duration,
    from: std::time::Instant,
) -> Within<'a, F> {
    timer
        .as_mut()
        .reset(tokio::time::Instant::from_std(from) + timeout);
    if watch.is_some() {
        progress.start();
    }
    Within {
        fut,
        sleep: timer,
        watch,
        progress,
        timeout,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, Late>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        loop {
            std::task::ready!(this.sleep.as_mut().poll(cx));
            let Some(watch) = this.watch else {
                return Poll::Ready(Err(Late::Backend));
            };
            // The upload may have moved since the timer was set: wait on from there.
            let (phase, mut since) = watch.phase_and_start();
            let now = clock_ms();
            if phase == Phase::Backend {
                // The backend took bytes since the last look: the wait is dated from
                // then. (Kept apart from the watch, which the upload's side writes.)
                since = since.max(this.progress.moved_at(now));
            }
            let waited = Duration::from_millis(now.saturating_sub(since));
            match this.timeout.checked_sub(waited).filter(|d| !d.is_zero()) {
                Some(left) => this
                    .sleep
                    .as_mut()
                    .reset(tokio::time::Instant::now() + left),
                None if phase == Phase::Client => return Poll::Ready(Err(Late::Client)),
                None => return Poll::Ready(Err(Late::Backend)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_for_the_client_is_dated_from_its_start() {
        let w = UploadWatch::new();
        assert_eq!(w.phase_and_start().0, Phase::Backend);
        w.enter(Phase::Client);
        let (phase, since) = w.phase_and_start();
        assert_eq!(phase, Phase::Client);
        // Polled again while still waiting: the start stays.
        w.state
            .store((since.saturating_sub(5)) << 2, Ordering::Relaxed);
        w.enter(Phase::Client);
        assert_eq!(
            w.phase_and_start(),
            (Phase::Client, since.saturating_sub(5))
        );
        w.enter(Phase::Done);
        assert_eq!(w.phase_and_start().0, Phase::Done);
    }

    /// Waits on `timer` for what never comes, watching `w`: who was late.
    async fn never(
        timer: Pin<&mut Sleep>,
        progress: &WriteProgress,
        w: Option<&UploadWatch>,
        timeout: Duration,
    ) -> Result<(), Late> {
        let now = std::time::Instant::now();
        within(std::future::pending(), (timer, progress), w, timeout, now).await
    }

    // Real time, as below; the passing of time is what is under test.
    #[tokio::test]
    async fn a_backend_that_takes_bytes_is_not_late() {
        let w = UploadWatch::new();
        let writes = Arc::new(WriteProgress::default());
        let timeout = Duration::from_millis(200);
        // The backend's socket takes bytes every 20 ms for 600 ms, then nothing.
        let writer = writes.clone();
        let moving = tokio::spawn(async move {
            for _ in 0..30 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                writer.wrote();
            }
        });
        let began = std::time::Instant::now();
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        let got = never(timer.as_mut(), &writes, Some(&w), timeout).await;
        assert_eq!(got, Err(Late::Backend));
        assert!(
            began.elapsed() >= Duration::from_millis(600),
            "late while moving"
        );
        moving.await.unwrap();
        // Waiting for the client, the backend's writes are no excuse for it.
        w.enter(Phase::Client);
        writes.wrote();
        let got = never(timer.as_mut(), &writes, Some(&w), timeout).await;
        assert_eq!(got, Err(Late::Client));
    }

    // Real time: the watch reads the system's monotonic clock, not Tokio's.
    #[tokio::test]
    async fn within_blames_the_side_that_stalled() {
        let writes = WriteProgress::default();
        for (phase, late) in [
            (Phase::Client, Late::Client),
            (Phase::Backend, Late::Backend),
            (Phase::Done, Late::Backend),
        ] {
            let w = UploadWatch::new();
            w.set(phase);
            let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
            let got = never(timer.as_mut(), &writes, Some(&w), Duration::from_millis(50)).await;
            assert_eq!(got, Err(late), "{phase:?}");
        }
        let mut timer = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        // Twice on the same timer: set again, it is not left elapsed from the last wait.
        for _ in 0..2 {
            let wait = never(timer.as_mut(), &writes, None, Duration::from_millis(50));
            assert_eq!(wait.await, Err(Late::Backend));
        }
        let w = UploadWatch::new();
        let got = within(
            async { 7 },
            (timer.as_mut(), &writes),
            Some(&w),
            Duration::from_millis(50),
            std::time::Instant::now(),
        )
        .await;
        assert_eq!(got, Ok(7));
    }
}
