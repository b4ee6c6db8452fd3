//! Forwarding one request: load the snapshot, route, walk the pool's candidates until a
//! connection is had, send, and stream the response back.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use http::header::SET_COOKIE;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tokio_util::sync::CancellationToken;

use crate::access_log::{AccessLogSink, AccessRecord};
use crate::affinity::{strip_cookie, Plan};
use crate::pool::{Affinity, Outcome, Pool, PoolState};
use crate::runtime::Runtime;
use crate::server::idle::ActiveRequest;
use crate::upstream::client::{Sender, UpstreamBody};
use crate::upstream::stats::ByClass;
use crate::upstream::upload::{self, Late, Upload};
use crate::upstream::{Backend, InFlight, PooledConn, UpstreamError};

use super::body::ProxyBody;
use super::error::ProxyError;
use super::headers::{self, ClientAddr, X_REQUEST_ID};
use super::upgrade::Tunnels;

/// What the proxy knows of the client connection a request came on.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub addr: ClientAddr,
    /// Whether the client connection is TLS (sets `X-Forwarded-Proto`).
    pub tls: bool,
}

impl ClientInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        ClientInfo {
            addr: ClientAddr::new(peer.ip()),
            tls,
        }
    }
}

/// The request handler shared by every listener; cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Proxy {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    runtime: Arc<ArcSwap<Runtime>>,
    tunnels: Tunnels,
    access_log: AccessLogSink,
    /// Responses that belong to no pool: to requests that matched no route, or that
    /// were refused before they could be routed.
    unrouted: Arc<ByClass>,
}

impl Proxy {
    /// A handler serving `runtime`'s snapshots, writing access log lines (when the
    /// configuration asks for them) to `access_log`; its tunnels end when `close` is
    /// cancelled.
    pub fn new(
        runtime: Arc<ArcSwap<Runtime>>,
        close: CancellationToken,
        access_log: AccessLogSink,
    ) -> Self {
        Proxy {
            shared: Arc::new(Shared {
                runtime,
                tunnels: Tunnels::new(close),
                access_log,
                unrouted: Arc::default(),
            }),
        }
    }

    /// Responses that belong to no pool, by status class.
    pub fn unrouted(&self) -> Arc<ByClass> {
        self.shared.unrouted.clone()
    }

    /// Accounts for a request that hyper's parser refused (answering `status` itself),
    /// which never came to [`Self::handle`]: counted outside any pool, and logged with
    /// no method, path or id, as none could be read.
    #[cold]
    pub fn refused_unparsed(&self, status: u16, client: IpAddr) {
        let rt = self.shared.runtime.load();
        if rt.config.server.metrics {
            self.shared.unrouted.count(status);
        }
        let record = AccessRecord::new(
            rt.config.server.access_log,
            &self.shared.access_log,
            Instant::now(),
            client,
            "-",
            "-",
            None,
        );
        if let Some(mut r) = record {
            r.status = status;
            r.emit();
        }
    }

    /// The live snapshot handle.
    pub fn runtime(&self) -> &Arc<ArcSwap<Runtime>> {
        &self.shared.runtime
    }

    /// The open upgraded connections.
    pub fn tunnels(&self) -> &Tunnels {
        &self.shared.tunnels
    }

    /// Answers one request. Never fails: errors become error responses. The `Result`
    /// lets this future serve as hyper's service future as it is, without an async
    /// wrapper around it (every layer copies the whole future).
    ///
    /// A plain function returning an `async` block rather than an `async fn`: that would
    /// copy each argument into a local of its own and keep both in the future, which
    /// hyper moves twice per request; and what is only borrowed before the first
    /// `await` sits in blocks of its own, so that it takes no room in the future.
    ///
    /// The request, with its body as it goes upstream, is held in one place for the
    /// whole exchange (`pending`): it is rewritten there, and [`forward`] borrows it
    /// rather than take it, which would copy it into its future and through its steps.
    #[allow(clippy::manual_async_fn)]
    pub fn handle(
        self,
        client: ClientInfo,
        mut active: Option<ActiveRequest>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static {
        let mut pending = Some(req.map(|b| Either::Left(Upload::new(b))));
        async move {
            let start = Instant::now();
            let rt = self.shared.runtime.load_full();
            let Some(req) = pending.as_mut() else {
                unreachable!("the request is taken only to be sent")
            };
            let http1 = req.version() <= Version::HTTP_11;
            // A body that a refusal may leave unread: hyper then closes the connection
            // after the response, which the response must say.
            let body_left = http1 && !body_ended(req.body());
            let upgrade = headers::is_upgrade(req.headers(), req.version());
            let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *req));
            let proto = if client.tls { "https" } else { "http" };
            let (request_id, refusal, pool) = {
                let prepared = headers::prepare_request(req, &client.addr, proto, upgrade);
                // After the rewrite: routing reads the host the backend will read.
                let host = prepared.host.as_ref().and_then(|h| h.to_str().ok());
                let pool = rt.route(host, req.uri().path());
                (prepared.request_id, prepared.refusal, pool)
            };
            let mut unanswered = Unanswered(
                AccessRecord::new(
                    rt.config.server.access_log,
                    &self.shared.access_log,
                    start,
                    client.addr.ip(),
                    req.method().as_str(),
                    req.uri().path(),
                    Some(&request_id),
                ),
                None,
            );
            let Unanswered(log, counted) = &mut unanswered;

            let result = match (pool, refusal) {
                // A tunnel to wherever the client names is a forward proxy's job; and sent
                // on, the target (rewritten to a path) would mean something else to the
                // backend.
                (pool, _) if req.method() == Method::CONNECT => {
                    Err(self.refused_in(&rt, pool, ProxyError::MethodNotAllowed))
                }
                (pool, Some(e)) => Err(self.refused_in(&rt, pool, e)),
                (None, None) => Err(self.refused_in(&rt, None, ProxyError::NoRoute)),
                (Some(pool), None) => {
                    if let Some(l) = log {
                        l.pool = Some(pool.name.to_string());
                    }
                    if pool.metrics {
                        *counted = Some(&pool.state);
                    }
                    forward(pool, &mut pending, &client, upgrade, log, start).await
                }
            };
            // Forwarded, answered or not: no longer the client's to cut short. (Only
            // ever set for the request's forwarding.)
            *counted = None;
            let mut resp = match result {
                Ok((mut resp, conn, in_flight)) => {
                    // `forward` let a 101 through only for an upgrade request it agreed
                    // with.
                    let is_101 = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut()
                        .insert(X_REQUEST_ID.clone(), request_id.clone());
                    match client_upgrade.filter(|_| is_101) {
                        Some(client_upgrade) => self.tunnel(
                            resp,
                            client_upgrade,
                            in_flight,
                            active.take(),
                            rt.config.server.limits.idle_timeout,
                            log.take(),
                        ),
                        None => resp.map(|b| ProxyBody::upstream(b, conn, in_flight)),
                    }
                }
                Err(e) => refused(e, request_id, http1, body_left),
            };
            if let Some(l) = log {
                l.status = resp.status().as_u16();
            }
            resp.body_mut().set_log_and_active(log.take(), active);
            Ok(resp)
        }
    }

    /// Splices the client's and the backend's connections once the backend agreed to an
    /// upgrade; the client gets the 101 with an empty body.
    #[inline(never)]
    fn tunnel(
        &self,
        mut resp: Response<Incoming>,
        client_upgrade: OnUpgrade,
        in_flight: InFlight,
        active: Option<ActiveRequest>,
        idle_timeout: std::time::Duration,
        mut log: Option<Box<AccessRecord>>,
    ) -> Response<ProxyBody> {
        let backend_upgrade = hyper::upgrade::on(&mut resp);
        if let Some(l) = &mut log {
            l.status = resp.status().as_u16();
        }
        self.shared.tunnels.splice(
            client_upgrade,
            backend_upgrade,
            in_flight,
            active.map(|a| {
                a.answered();
                a.into_tunnel()
            }),
            idle_timeout,
            log,
        );
        resp.map(|_| ProxyBody::empty())
    }
}

/// A request's access log record until its response is handed over, and its pool's
/// counts while it is forwarded: should the request end before that (an HTTP/2 client
/// resets its stream, shutdown's grace period runs out), its line is written with
/// status 499, nginx's "client closed request", and it counts as such in the pool, with
/// no backend (it got no backend's answer).
struct Unanswered<'a>(Option<Box<AccessRecord>>, Option<&'a PoolState>);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if let Some(counts) = self.1 {
            counts.count_unattributed(CLIENT_CLOSED);
        }
        if let Some(mut l) = self.0.take() {
            l.status = CLIENT_CLOSED;
            (*l).emit();
        }
    }
}

/// nginx's status for a request whose client went away before its response began.
const CLIENT_CLOSED: u16 = 499;

/// The error response for a request that got no backend's answer.
#[cold]
#[inline(never)]
fn refused(
    e: ProxyError,
    request_id: HeaderValue,
    http1: bool,
    body_left: bool,
) -> Response<ProxyBody> {
    if e.status().is_server_error() && !e.is_clients_fault() {
        tracing::warn!(error = %e, "request failed");
    } else {
        tracing::debug!(error = %e, "request refused");
    }
    let mut r = e.to_response();
    r.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    if body_left || http1 && e.is_clients_fault() {
        // What else the connection carries is suspect, or (a body cut short, or one the
        // request's refusal left) unread: hyper closes the connection after this
        // response, and a client that pipelined another request must not wait for its
        // answer.
        r.headers_mut()
            .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// The response, the connection it came on if that may be used again, and the request
/// as counted in flight.
type Forwarded = (Response<Incoming>, Option<Sender>, InFlight);

/// Whether an upstream request's body holds no more bytes to send (see [`upload::ended`]).
fn body_ended(body: &UpstreamBody) -> bool {
    match body {
        Either::Left(upload) => upload.ended(),
        Either::Right(_) => true,
    }
}

/// Whether `req` could go to another backend after a reset: a bodyless request with an
/// idempotent method. Its head is then copied as it is written (see
/// [`Sender::copy_next_head`]), and read back by [`replayed`] for the next backend.
fn replayable(req: &Request<UpstreamBody>) -> bool {
    req.method().is_idempotent() && req.body().is_end_stream()
}

/// The request whose head hyper wrote as `head` (an HTTP/1.1 request head, ending with
/// its blank line, and nothing after it), read back with `httparse`. `None` if it does
/// not read back whole, which would be a bug: the caller then gives up the retry rather
/// than send something else.
fn replayed(head: &[u8]) -> Option<Request<UpstreamBody>> {
    // A field per line at most.
    let lines = head.windows(2).filter(|w| w == b"\r\n").count();
    let mut fields = vec![httparse::EMPTY_HEADER; lines];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return None,
    }
    let mut req = Request::new(Either::Right(Empty::new()));
    *req.method_mut() = Method::from_bytes(parsed.method?.as_bytes()).ok()?;
    *req.uri_mut() = parsed.path?.parse().ok()?;
    // HTTP/1.0 when hyper wrote for a backend that answered in HTTP/1.0; the request
    // goes on in HTTP/1.1, as any other, to whichever backend comes next.
    if parsed.version? > 1 {
        return None;
    }
    let headers = req.headers_mut();
    // The only `Connection` field left before sending is an upgrade's (`upgrade`); one
    // with `keep-alive` or `close` is hyper's own, added for the backend's HTTP version
    // or keep-alive state, and does not go on.
    let hypers = |f: &httparse::Header<'_>| {
        f.name.eq_ignore_ascii_case("connection")
            && (f.value.eq_ignore_ascii_case(b"keep-alive")
                || f.value.eq_ignore_ascii_case(b"close"))
    };
    for f in parsed.headers.iter().filter(|f| !hypers(f)) {
        headers.append(
            HeaderName::from_bytes(f.name.as_bytes()).ok()?,
            HeaderValue::from_bytes(f.value).ok()?,
        );
    }
    Some(req)
}

/// Sends the request in `pending` along the pool's plan: the client's affinity target
/// first, then others, trying at most `retries` further backends, each once. A request
/// moves on to the next backend when connecting fails (no request byte was sent), or,
/// for a bodyless request with an idempotent method, when the connection is reset
/// before a complete response head (unless the backend is the client's pinned one).
/// Sets or learns affinity cookies on the response. A response head that cannot be
/// passed on (a 101 switching to a protocol the request did not ask for, a status above
/// 599, framing fields that disagree) is a bad response (502).
///
/// `pending` holds the request until it is sent, and again whenever it is to be sent
/// once more (unsent, or rebuilt for a retry). It is the caller's, so that the request
/// is never moved into this future, which is moved whole wherever it goes; a plain
/// function returning an `async` block, as [`Proxy::handle`], for the same reason.
#[allow(clippy::manual_async_fn)]
fn forward<'a>(
    pool: &'a Pool,
    pending: &'a mut Option<Request<UpstreamBody>>,
    client: &'a ClientInfo,
    upgrade: bool,
    log: &'a mut Option<Box<AccessRecord>>,
    start: Instant,
) -> impl Future<Output = Result<Forwarded, ProxyError>> + 'a {
    async move {
        let Some(req) = pending.as_mut() else {
            unreachable!("a request is forwarded once")
        };
        // What the client asked to switch to, which the backend's 101 must agree with.
        let asked_upgrade = if upgrade {
            headers::upgrade_offer(req.headers())
        } else {
            None
        };
        let mut plan = pool.plan(&*req, client.addr.ip());
        if let Affinity::Cookie { cfg, .. } = &pool.affinity {
            strip_cookie(req.headers_mut(), &cfg.cookie);
        }
        let http1 = req.version() <= http::Version::HTTP_11;
        let watch = match req.body_mut() {
            Either::Left(upload) => upload.watch(),
            Either::Right(_) => None,
        };
        let budget = pool.retries as usize + 1;
        // Whether the request may be sent again after the backend closed the connection
        // on it: once more to the same backend when a keep-alive connection closed as
        // the request arrived, and, where it could go somewhere, to the next backend.
        let again = !plan.reject_now && replayable(req);
        let replay = again && budget > 1 && pool.members.len() > 1;
        if plan.reject_now {
            pool.count_outcome(Outcome::Rejected);
            let e = ProxyError::Rejected {
                pool: pool.name.to_string(),
            };
            return Err(failed(pool, None, e));
        }
        pool.state.earn_retry(pool.retry_budget);
        let mut attempts = 0;
        // Whether the last attempt sent the request: only then does another attempt
        // spend the retry budget. After a failed connect the request still goes out
        // once, and retrying cannot multiply the load on any backend.
        let mut was_sent = false;
        // The last backend that could not be reached, and the last that reset the
        // connection after the request was sent.
        let mut unreachable: Option<(UpstreamError, &Arc<Backend>)> = None;
        let mut reset: Option<(hyper::Error, &Arc<Backend>)> = None;
        // The first candidate passed over because it had its connections busy, and
        // whether it is now tried, waiting for one, as nothing else served the request.
        let mut full = None;
        let mut waiting = false;
        let result = 'candidates: loop {
            let i = match plan.next(pool) {
                Some(i) => i,
                None => match full.take() {
                    Some(i) => {
                        waiting = true;
                        i
                    }
                    None => break None,
                },
            };
            // Retries ran out, or the pool's retry budget is spent, while the pool still
            // had candidates.
            if attempts == budget || (was_sent && !pool.state.take_retry()) {
                break Some(Err(()));
            }
            was_sent = false;
            // The request's start stands for the clock until an attempt has failed.
            let now = if attempts == 0 { start } else { Instant::now() };
            attempts += 1;
            let backend = &pool.members[i].backend;
            // The backend tried last, reached or not.
            if let Some(l) = log.as_mut() {
                l.backend = Some(backend.id.to_string());
            }
            let in_flight = backend.start_request();
            // A labelled block, not a `match` around it all: the checkout's result
            // would be held (and take room in this future) for the whole attempt.
            'attempt: {
                let PooledConn {
                    mut tx,
                    mut reused,
                    at_once,
                } = match backend
                    .pool
                    .checkout(now, waiting || plan.is_pinned(i))
                    .await
                {
                    Ok(conn) => conn,
                    Err(UpstreamError::Full { .. }) if !waiting && !plan.is_pinned(i) => {
                        // Not a failure of the backend, nor an attempt: another
                        // candidate may have room, else this one is waited for.
                        full.get_or_insert(i);
                        attempts -= 1;
                        continue 'candidates;
                    }
                    Err(e @ UpstreamError::Full { .. }) => {
                        return Err(busy(pool, &plan, backend, e, reset));
                    }
                    Err(e) => {
                        unreachable = Some((count_unreachable(pool, backend, e), backend));
                        break 'attempt;
                    }
                };
                // When the wait for the response starts: unless getting the connection
                // took a wait, `now` still holds.
                let mut sending_at = if at_once { now } else { Instant::now() };
                // Whether the request, sent on a pooled connection that the backend
                // closed, is being sent once more to the same backend, and whether that
                // failed before it was written again.
                let mut resent = false;
                let mut resend_failed = false;
                // Inline rather than a function of its own: a nested future would
                // grow this one, and every move of it.
                let sent = loop {
                    // Always here: a request leaves `pending` only to be sent, and is
                    // back (unsent, or rebuilt for a retry) whenever an attempt ends
                    // without ending the loop.
                    let Some(req) = pending.take() else {
                        break None;
                    };
                    let timeout = pool.response_timeout;
                    if let Some(w) = &watch {
                        w.sending();
                        tx.sending_body(w);
                    }
                    if again {
                        tx.copy_next_head();
                    }
                    let send = tx.tx.try_send_request(req);
                    let wait = tx.wait_parts();
                    // In a block of its own: what it borrows would otherwise take
                    // room in this future across the reconnect below.
                    let e = {
                        let sent =
                            upload::within(send, wait, watch.as_deref(), timeout, sending_at).await;
                        let mut e = match sent {
                            // Given up on: the connection goes, with whatever of the
                            // upload it was still busy with.
                            Err(Late::Backend) => {
                                // Bodyless, the connection closes as hyper lets go
                                // of it.
                                if watch.is_some() {
                                    tx.abort();
                                }
                                break Some(Err(SendError::Timeout(timeout)));
                            }
                            Err(Late::Client) => {
                                tx.abort();
                                break Some(Err(SendError::ClientStalled(timeout)));
                            }
                            Ok(Ok(resp)) => break Some(Ok(resp)),
                            Ok(Err(e)) => e,
                        };
                        let unsent = e.take_message();
                        let e = e.into_error();
                        if let Some(unsent) = unsent {
                            // Never written: nothing was sent, and the request is kept
                            // for whichever connection comes next.
                            *pending = Some(unsent);
                        } else if reused
                            && again
                            && !tx.read_since_head()
                            && is_reset(&e)
                            && !e.is_user()
                        {
                            // Written on a keep-alive connection that the backend
                            // closed, without a byte of an answer, as the request
                            // arrived (its idle timeout racing the request): a request
                            // safe to send twice goes once more to the same backend, as
                            // its head reads back, as nginx does.
                            *pending = tx.take_head().as_deref().and_then(replayed);
                            if pending.is_none() {
                                break Some(Err(SendError::of(e)));
                            }
                            resent = true;
                            backend.stats.count_reset();
                        } else {
                            break Some(Err(SendError::of(e)));
                        }
                        e
                    };
                    if resent && !reused {
                        // The fresh connection for the request sent once already
                        // closed first: that backend's failure to answer it. The
                        // request, unsent this time, is in `pending`.
                        resend_failed = true;
                        break Some(Err(SendError::Reset(e)));
                    }
                    if !reused {
                        // A fresh connection closed first.
                        let e = UpstreamError::Closed {
                            addr: backend.address.to_string(),
                            source: e,
                        };
                        break Some(Err(SendError::Connect(e)));
                    }
                    // A reused keep-alive connection found closed: once more on a
                    // fresh connection.
                    stale(backend, &e);
                    reused = false;
                    // Boxed for the same reason as in `ConnPool::checkout`.
                    match Box::pin(backend.pool.connect()).await {
                        Ok(t) => {
                            tx = t;
                            sending_at = Instant::now();
                        }
                        // The request was sent once already: that is what failed.
                        Err(_) if resent => {
                            resend_failed = true;
                            break Some(Err(SendError::Reset(e)));
                        }
                        Err(e @ UpstreamError::Full { .. }) => {
                            return Err(busy(pool, &plan, backend, e, reset));
                        }
                        Err(e) => break Some(Err(SendError::Connect(e))),
                    }
                };
                let Some(sent) = sent else {
                    break 'candidates Some(Err(()));
                };
                if let Err(SendError::Reset(e)) = &sent {
                    // Not for a resend that failed before it was written: the reset
                    // that led to it was counted then.
                    if !resend_failed {
                        count_reset(pool, backend, e);
                    }
                    // Sent, so no longer here (unless rebuilt for a resend that failed
                    // before it was written): it goes on to another backend only if its
                    // head, as written, reads back.
                    if !replay || plan.is_pinned(i) {
                        *pending = None;
                    } else if pending.is_none() {
                        *pending = tx.take_head().as_deref().and_then(replayed);
                    }
                }
                match sent {
                    Ok(resp) => break 'candidates Some(Ok((i, resp, tx, in_flight))),
                    // Nothing was sent: the request, back in `pending`, can go
                    // elsewhere.
                    Err(SendError::Connect(e)) => {
                        unreachable = Some((count_unreachable(pool, backend, e), backend));
                    }
                    // Rebuilt above, so it goes on. Not for the backend the client's
                    // affinity points at: that one is up, and a reset is its failure
                    // to answer, not a reason to move the client elsewhere.
                    Err(SendError::Reset(e)) if pending.is_some() => {
                        reset = Some((e, backend));
                        was_sent = true;
                    }
                    // The client's failure, not the backend's.
                    Err(e @ (SendError::Request(_) | SendError::ClientStalled(_))) => {
                        if let Some(o) = plan.outcome {
                            pool.count_outcome(o);
                        }
                        return Err(failed(pool, Some(backend), e.into()));
                    }
                    Err(e) => {
                        // Reset or silent after accepting the request: a failure for
                        // outlier detection too.
                        passive(pool, backend, false);
                        if let Some(o) = plan.outcome {
                            pool.count_outcome(o);
                        }
                        return Err(failed(pool, Some(backend), e.into()));
                    }
                }
            }
            passive(pool, backend, false);
            if plan.failed(i).is_err() {
                pool.count_outcome(Outcome::Rejected);
                let e = ProxyError::Rejected {
                    pool: pool.name.to_string(),
                };
                return Err(failed(pool, Some(backend), e));
            }
        };
        if let Some(o) = plan.outcome {
            pool.count_outcome(o);
        }
        let (i, mut resp, tx, in_flight) = match (result, reset, unreachable) {
            (Some(Ok(r)), _, _) => r,
            // A backend was reached and failed to answer (502).
            (_, Some((e, backend)), _) => {
                return Err(failed(pool, Some(backend), ProxyError::Upstream(e)))
            }
            // Every candidate of the pool was unreachable: the pool is unavailable (503).
            (None, None, Some((last, backend))) => {
                let e = ProxyError::AllUnreachable {
                    pool: pool.name.to_string(),
                    last,
                };
                return Err(failed(pool, Some(backend), e));
            }
            // Only some were tried, as the retry budget allowed: the backend failed (502).
            (_, None, Some((e, backend))) => {
                return Err(failed(pool, Some(backend), ProxyError::Connect(e)))
            }
            (_, None, None) => {
                let e = ProxyError::NoBackend {
                    pool: pool.name.to_string(),
                };
                return Err(failed(pool, None, e));
            }
        };
        let backend = in_flight.backend();
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        if switching {
            let agreed = asked_upgrade
                .as_ref()
                .is_some_and(|asked| headers::upgrade_agreed(asked, resp.headers()));
            if !agreed {
                return Err(bad_response(
                    pool,
                    backend,
                    "a 101 to a protocol not asked for",
                ));
            }
        }
        let reusable = match headers::prepare_response(resp.status(), resp.headers_mut(), switching)
        {
            Ok(reusable) => reusable,
            Err(why) => return Err(bad_response(pool, backend, why)),
        };
        // The proxy answers in its own HTTP version (RFC 9110 §6.2), whatever the
        // backend's; hyper writes `HTTP/1.0` to a client that spoke it.
        *resp.version_mut() = http::Version::HTTP_11;
        if !switching && watch.as_ref().is_some_and(|w| !w.finished()) {
            // An answer before the whole upload was read (a 413 or 401 on the head
            // alone): what is left of the body may never be read, so the connection
            // cannot be trusted to carry another request, even should the rest of the
            // upload be taken by the end of the response (hyper may hold its tail).
            tx.retire();
            // The response says that the client's connection closes too, lest a
            // pipelined request wait for an answer that never comes.
            if http1 {
                resp.headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
        }
        // Until the response head: the affinity work below is not the backend's.
        if log.is_some() || pool.metrics {
            let elapsed = start.elapsed();
            if let Some(l) = log.as_mut() {
                l.set_upstream(elapsed);
            }
            if pool.metrics {
                backend.stats.count_response(resp.status().as_u16());
                backend.stats.duration.observe(elapsed.as_secs_f64());
            }
        }
        answered(pool, &plan, i, &mut resp, backend, client.tls);
        Ok((resp, reusable.then_some(tx), in_flight))
    }
}

/// A request that waited for a free connection to `backend` in vain (`503`): not the
/// backend's failure, so neither outlier detection nor affinity hears of it. A reset by
/// a backend tried before is the answer instead (`502`).
#[cold]
#[inline(never)]
fn busy(
    pool: &Pool,
    plan: &Plan,
    backend: &Arc<Backend>,
    e: UpstreamError,
    reset: Option<(hyper::Error, &Arc<Backend>)>,
) -> ProxyError {
    if let Some(o) = plan.outcome {
        pool.count_outcome(o);
    }
    match reset {
        Some((e, backend)) => failed(pool, Some(backend), ProxyError::Upstream(e)),
        None => failed(pool, Some(backend), ProxyError::Connect(e)),
    }
}

/// What follows a backend's answer: it feeds outlier detection and affinity (a cookie
/// issued, or a session learned).
fn answered(
    pool: &Pool,
    plan: &Plan,
    i: usize,
    resp: &mut Response<Incoming>,
    backend: &Arc<Backend>,
    tls: bool,
) {
    passive(pool, backend, !resp.status().is_server_error());
    if plan.outcome.is_some() {
        if plan.issue_cookie() {
            if let Some(v) = pool.sticky_cookie(i, tls) {
                resp.headers_mut().append(SET_COOKIE, v);
            }
        }
        pool.learn_from(i, resp.status(), resp.headers(), plan);
    }
}

/// Feeds a request's result to the backend's outlier detection.
fn passive(pool: &Pool, backend: &Arc<Backend>, ok: bool) {
    if pool.outlier.consecutive_failures == 0 {
        return;
    }
    if ok {
        backend.health.record_success();
    } else if backend
        .health
        .record_failure(&pool.outlier, &pool.state.ejecting, || pool.may_eject())
    {
        ejected(pool, backend);
    }
}

#[cold]
fn ejected(pool: &Pool, backend: &Backend) {
    tracing::warn!(pool = %pool.name, backend = %backend.id, "backend ejected after consecutive failures");
}

/// A response head that cannot be passed on: a 101 to a protocol the client did not
/// ask for, a status no client should get, framing that would be read two ways.
#[cold]
fn bad_response(pool: &Pool, backend: &Arc<Backend>, why: &'static str) -> ProxyError {
    tracing::warn!(pool = %pool.name, backend = %backend.id, why, "bad response from backend");
    passive(pool, backend, false);
    failed(pool, Some(backend), ProxyError::BadResponse(why))
}

#[cold]
fn count_reset(pool: &Pool, backend: &Backend, e: &hyper::Error) {
    tracing::warn!(pool = %pool.name, backend = %backend.id, error = %e,
        "backend closed the connection before answering");
    backend.stats.count_reset();
}

impl Proxy {
    /// A request refused before it was sent anywhere, counted for the pool it was
    /// routed to, or outside any pool if none.
    #[cold]
    fn refused_in(&self, rt: &Runtime, pool: Option<&Pool>, e: ProxyError) -> ProxyError {
        match pool {
            Some(pool) => failed(pool, None, e),
            None => {
                if rt.config.server.metrics {
                    self.shared.unrouted.count(e.status().as_u16());
                }
                e
            }
        }
    }
}

/// Counts the error response a failure turns into, on the backend it concerns or, when no
/// backend was involved, on the pool.
#[cold]
fn failed(pool: &Pool, backend: Option<&Arc<Backend>>, e: ProxyError) -> ProxyError {
    if !pool.metrics {
        return e;
    }
    match backend {
        Some(b) => b.stats.count_response(e.status().as_u16()),
        None => pool.state.count_unattributed(e.status().as_u16()),
    }
    e
}

/// Why sending on a connection failed.
enum SendError {
    /// The request was not sent: a stale connection's replacement could not be opened,
    /// or a fresh connection closed first.
    Connect(UpstreamError),
    /// The connection closed or was reset before a response head arrived.
    Reset(hyper::Error),
    /// Anything else the backend did wrong, such as an invalid response.
    Upstream(hyper::Error),
    Timeout(std::time::Duration),
    /// The request could not be sent as the client gave it: its body failed.
    Request(hyper::Error),
    /// The client sent none of the rest of its body for this long.
    ClientStalled(std::time::Duration),
}

impl SendError {
    fn of(e: hyper::Error) -> Self {
        // The request's own failure, its body above all (malformed, or the client gone
        // mid-upload): checked first, since the client's error may carry an I/O error
        // that would read as the backend's reset.
        if e.is_user() {
            SendError::Request(e)
        } else if is_reset(&e) {
            SendError::Reset(e)
        } else {
            SendError::Upstream(e)
        }
    }
}

impl From<SendError> for ProxyError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Connect(e) => ProxyError::Connect(e),
            SendError::Reset(e) | SendError::Upstream(e) => ProxyError::Upstream(e),
            SendError::Timeout(after) => ProxyError::Timeout(after),
            SendError::Request(e) => ProxyError::RequestBody(e),
            SendError::ClientStalled(after) => ProxyError::ClientTimeout(after),
        }
    }
}

/// Logs and counts a backend that could not be connected to.
#[cold]
fn count_unreachable(pool: &Pool, backend: &Backend, e: UpstreamError) -> UpstreamError {
    tracing::warn!(pool = %pool.name, backend = %backend.id, error = %e, "backend unreachable");
    backend.stats.count_connect_error();
    e
}

#[cold]
fn stale(backend: &Backend, e: &hyper::Error) {
    tracing::debug!(backend = %backend.id, error = %e, "stale keep-alive connection, reconnecting");
}

/// Whether `e` means the backend closed or reset the connection before its response
/// head was complete, rather than answering with something that is not HTTP.
fn is_reset(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_head_reads_back_as_the_request() {
        let head = b"DELETE /items/7?force=yes HTTP/1.1\r\nhost: example.test\r\n\
            accept: text/html\r\nx-empty: \r\naccept: */*\r\n\
            x-latin: caf\xe9\tok\r\n\r\n";
        let req = replayed(head).unwrap();
        assert_eq!(req.method(), Method::DELETE);
        assert_eq!(req.uri(), "/items/7?force=yes");
        assert_eq!(req.version(), Version::HTTP_11);
        assert!(req.body().is_end_stream());
        let fields: Vec<_> = req
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            fields,
            [
                ("host", &b"example.test"[..]),
                ("accept", b"text/html"),
                ("accept", b"*/*"),
                ("x-empty", b""),
                ("x-latin", b"caf\xe9\tok"),
            ]
        );
    }

    #[test]
    fn a_head_that_does_not_read_back_whole_is_no_request() {
        let head = b"GET / HTTP/1.1\r\nhost: a\r\nx-request-id: abc\r\n\r\n";
        assert!(replayed(head).is_some());
        for cut in 0..head.len() {
            assert!(replayed(&head[..cut]).is_none(), "cut at {cut}");
        }
        // Anything after the head: not what a bodyless request's first write holds.
        let mut more = head.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert!(replayed(&more).is_none());
        // Written for an HTTP/1.0 backend: hyper's `Connection` field does not go on.
        let old =
            replayed(b"GET /x HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n").unwrap();
        assert_eq!((old.version(), old.uri().path()), (Version::HTTP_11, "/x"));
        let names: Vec<_> = old.headers().keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["host"]);
        // An upgrade's `Connection` field does, without what hyper added to it.
        let ws = replayed(
            b"GET /ws HTTP/1.1\r\nhost: a\r\nconnection: upgrade\r\nconnection: keep-alive\r\n\
              upgrade: websocket\r\n\r\n",
        )
        .unwrap();
        let values: Vec<_> = ws.headers().get_all("connection").iter().collect();
        assert_eq!(values, ["upgrade"]);
        assert_eq!(ws.headers()["upgrade"], "websocket");
        let closing = replayed(b"GET / HTTP/1.1\r\nhost: a\r\nConnection: Close\r\n\r\n").unwrap();
        assert!(!closing.headers().contains_key("connection"));
        for bad in [
            &b"GET / HTTP/1.1\r\nbad name: a\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\nx: a\rb\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\n",
            b"",
        ] {
            assert!(replayed(bad).is_none(), "{}", String::from_utf8_lossy(bad));
        }
    }
}
