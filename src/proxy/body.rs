//! The response body sent to clients: either a small fixed body (errors, upgrades) or a
//! backend's body streamed frame by frame.
//!
//! A streamed body owns the upstream connection while it is read. When the backend's
//! body reaches its end the connection goes back to the pool, and the in-flight count
//! drops. A body dropped before its end (client gone) takes the connection with it, since
//! an HTTP/1.1 connection with unread response bytes cannot carry another request.
//! Whatever else must happen once the response is over (access log line, connection
//! idle tracking) rides on the body and runs when it is dropped.
//!
//! A backend that sends nothing more of a body it has begun for `idle_timeout` (the
//! client connection's) ends it with an error: the client sees the connection closed
//! (HTTP/1.1) or the stream reset (HTTP/2) rather than a complete response. So does a
//! body whose backend connection was closed because the client took none of it for as
//! long (see `upstream::client`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::headers;
use crate::access_log::AccessRecord;
use crate::server::idle::ActiveRequest;
use crate::upstream::client::Sender;
use crate::upstream::InFlight;

#[derive(Debug)]
pub struct ProxyBody {
    inner: Inner,
    /// Emitted when the body is dropped, with the bytes sent by then.
    log: Option<Box<AccessRecord>>,
    /// Keeps the client connection counted as busy until the response is over.
    active: Option<ActiveRequest>,
}

#[derive(Debug)]
enum Inner {
    Full {
        data: Option<Bytes>,
        /// See [`ActiveRequest::handed`].
        held: bool,
    },
    Upstream {
        body: Incoming,
        /// Returned to the pool when `body` ends.
        conn: Option<Sender>,
        /// Released when `body` ends.
        in_flight: Option<InFlight>,
        /// Whether the connection's timer is set for the current wait.
        waiting: bool,
        /// See [`ActiveRequest::handed`].
        held: bool,
        /// What is left of a data frame larger than [`PART`]; boxed, as it is rare and
        /// the body is moved whole several times per request.
        rest: Option<Box<Bytes>>,
    },
}

impl Inner {
    /// The body's note that a part it handed on is yet to be taken.
    fn held(&mut self) -> &mut bool {
        match self {
            Inner::Full { held, .. } | Inner::Upstream { held, .. } => held,
        }
    }
}

/// The most of a backend's body handed on at once. One read from the backend can be
/// larger; parts no larger than this let the connection's watchdog see a client that
/// takes the body slowly (an HTTP/2 stream takes its next part only when the last has
/// gone out) as one that takes it, down to `PART` bytes per `idle_timeout`. The split
/// copies nothing.
const PART: usize = 16 * 1024;

/// Why a streamed body ended before its end.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("the backend sent nothing more of the response body for {0:?}")]
struct Stalled(Duration);

impl ProxyBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        let data: Bytes = data.into();
        ProxyBody {
            inner: Inner::Full {
                data: (!data.is_empty()).then_some(data),
                held: false,
            },
            log: None,
            active: None,
        }
    }

    pub fn empty() -> Self {
        ProxyBody::full(Bytes::new())
    }

    /// Streams `body`; `conn` is returned to the backend's pool once it has ended. The
    /// body fails if the backend sends nothing of it for the connection's stall limit
    /// (the client connections' idle timeout).
    pub fn upstream(body: Incoming, conn: Option<Sender>, in_flight: InFlight) -> Self {
        let mut b = ProxyBody {
            inner: Inner::Upstream {
                body,
                conn,
                in_flight: Some(in_flight),
                waiting: false,
                held: false,
                rest: None,
            },
            log: None,
            active: None,
        };
        if let Inner::Upstream { body, conn, .. } = &b.inner {
            if body.is_end_stream() {
                b.finish_upstream();
            } else if let Some(tx) = conn {
                tx.body_started();
            }
        }
        b
    }

    /// Hands the body what must happen once the response is over: the access log line
    /// to write, and the client connection's request to end. In place, as the body sits
    /// in a response that is moved whole.
    pub fn set_log_and_active(
        &mut self,
        log: Option<Box<AccessRecord>>,
        active: Option<ActiveRequest>,
    ) {
        self.log = log;
        if let Some(a) = &active {
            a.answered();
        }
        self.active = active;
    }

    fn finish_upstream(&mut self) {
        if let Inner::Upstream {
            conn, in_flight, ..
        } = &mut self.inner
        {
            if let (Some(tx), Some(f)) = (conn.take(), in_flight.as_ref()) {
                if tx.body_ended() {
                    f.backend().pool.checkin(tx);
                }
            }
            in_flight.take();
        }
    }

    /// Notes a part of the body handed on.
    fn count(&mut self, n: usize) {
        if let Some(log) = &mut self.log {
            log.bytes += n as u64;
        }
        if let Some(a) = &self.active {
            a.handed(self.inner.held());
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(a) = &this.active {
            a.polled(this.inner.held());
        }
        match &mut this.inner {
            Inner::Full { data, .. } => {
                let frame = data.take().map(|d| Ok(Frame::data(d)));
                if let Some(Ok(f)) = &frame {
                    let n = f.data_ref().map_or(0, Bytes::len);
                    this.count(n);
                }
                Poll::Ready(frame)
            }
            Inner::Upstream {
                body,
                conn,
                in_flight,
                waiting,
                rest,
                ..
            } => {
                if let Some(left) = rest.as_deref_mut() {
                    let part = left.split_to(left.len().min(PART));
                    if left.is_empty() {
                        *rest = None;
                    }
                    // The backend's body is not polled while parts are left, so if it
                    // is over, it was over when they were split off, and the connection
                    // went back then.
                    if let Some(tx) = conn.as_ref() {
                        tx.body_taken();
                    }
                    this.count(part.len());
                    return Poll::Ready(Some(Ok(Frame::data(part))));
                }
                let polled = Pin::new(&mut *body).poll_frame(cx);
                match polled {
                    Poll::Pending => {
                        // The connection's timer, free again once the response head came.
                        let Some(tx) = conn.as_mut() else {
                            return Poll::Pending;
                        };
                        let stall = tx.body_stall();
                        if !*waiting {
                            *waiting = true;
                            tx.body_waiting(true);
                            let deadline = tokio::time::Instant::now() + stall;
                            tx.timer.as_mut().reset(deadline);
                        }
                        if tx.timer.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        conn.take();
                        stalled(in_flight.as_ref(), stall);
                        Poll::Ready(Some(Err(Box::new(Stalled(stall)))))
                    }
                    Poll::Ready(None) => {
                        this.finish_upstream();
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        conn.take();
                        Poll::Ready(Some(Err(Box::new(e))))
                    }
                    Poll::Ready(Some(Ok(mut frame))) => {
                        if let Some(tx) = conn.as_ref() {
                            if std::mem::take(waiting) {
                                tx.body_waiting(false);
                            }
                            tx.body_taken();
                        }
                        if let Some(trailers) = frame.trailers_mut() {
                            headers::settle_trailers(trailers);
                        }
                        if let Some(data) = frame.data_mut() {
                            if data.len() > PART {
                                *rest = Some(Box::new(data.split_off(PART)));
                            }
                        }
                        let n = frame.data_ref().map_or(0, Bytes::len);
                        // Trailers end a body: the client need not poll for its end,
                        // and the connection goes back to the pool now. So does the
                        // backend's end, though parts of its last frame are still to go.
                        let ended = frame.is_trailers() || body.is_end_stream();
                        this.count(n);
                        if ended {
                            this.finish_upstream();
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full { data, .. } => data.is_none(),
            Inner::Upstream { body, rest, .. } => rest.is_none() && body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full { data: None, .. } => SizeHint::with_exact(0),
            Inner::Full { data: Some(d), .. } => SizeHint::with_exact(d.len() as u64),
            Inner::Upstream { body, rest, .. } => {
                let (body, rest) = (
                    body.size_hint(),
                    rest.as_ref().map_or(0, |r| r.len()) as u64,
                );
                let mut hint = SizeHint::new();
                // Upper first: a lower bound above the upper one panics.
                if let Some(upper) = body.upper() {
                    hint.set_upper(upper.saturating_add(rest));
                }
                hint.set_lower(body.lower().saturating_add(rest));
                hint
            }
        }
    }
}

#[cold]
fn stalled(in_flight: Option<&InFlight>, after: Duration) {
    let backend = in_flight.map(|f| f.backend().id.to_string());
    tracing::warn!(
        ?backend,
        ?after,
        "backend stalled in the middle of a response body"
    );
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(a) = self.active.take() {
            a.release(self.inner.held());
        }
        if let Some(log) = self.log.take() {
            (*log).emit();
        }
    }
}
