//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`,
//! `/pools/NAME/owner` and `POST /reload`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::balance::key::{self, client_ip_key};
use crate::config::Limits;
use crate::pool::{Affinity, Outcome};
use crate::reload::Reloader;
use crate::runtime::Runtime;
use crate::server::idle::{Activity, TrackedIo};
use crate::server::{sniff, stopped, Http};

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    pub runtime: Arc<ArcSwap<Runtime>>,
    pub reloader: Arc<Reloader>,
    /// For `/metrics`: access log lines dropped.
    pub access_log: crate::access_log::AccessLogSink,
    /// True once every listener is bound and serving; false again during shutdown.
    pub ready: AtomicBool,
    /// Open client connections per listener, for `/metrics`.
    pub listeners: Vec<crate::metrics::ListenerGauge>,
    /// Responses that belong to no pool, for `/metrics`.
    pub unrouted: Arc<crate::upstream::stats::ByClass>,
}

/// Admin connections open at once; further ones wait to be accepted until one closes.
/// Scrapers, probes and `curl` need a few; the cap keeps a flood of connections to the
/// admin port from taking the file descriptors that client traffic needs.
pub const MAX_CONNECTIONS: usize = 64;

/// The longest an admin connection may idle (less if the client connections'
/// `idle_timeout` is shorter): an idle connection holds one of the few slots.
const MAX_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the admin endpoints until `shutdown` turns true. Each connection keeps to the
/// client connections' `header_read_timeout` and `idle_timeout` (as configured when it
/// was accepted; the idle timeout at most [`MAX_IDLE`]), so that none can be held open
/// by sending nothing, or half a request.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stopped(&mut shutdown) => return,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    // Out of descriptors or similar: back off rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        let limits = state.runtime.load().config.server.limits.clone();
        let activity = Activity::new();
        let io = TrackedIo::new(stream, activity.clone(), permit);
        tokio::spawn(serve_connection(state.clone(), io, activity, limits));
    }
}

/// Serves one admin connection until it closes or one of its limits cuts it.
async fn serve_connection(
    state: Arc<AdminState>,
    mut io: TrackedIo<TcpStream, OwnedSemaphorePermit>,
    activity: Arc<Activity>,
    limits: Limits,
) {
    let svc_activity = activity.clone();
    let svc = service_fn(move |req| {
        let state = state.clone();
        let active = svc_activity.begin();
        async move {
            let resp = handle(&state, req).await;
            active.answered();
            drop(active);
            Ok::<_, Infallible>(resp)
        }
    });
    let served = async {
        match sniff(&mut io).await {
            Ok(Some(Http::One)) => {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            }
            Ok(Some(Http::Two)) => {
                activity.speaks_http2();
                let _ = http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(io), svc)
                    .await;
            }
            Ok(None) | Err(_) => {}
        }
    };
    tokio::select! {
        () = served => {}
        why = activity.expired(limits.idle_timeout.min(MAX_IDLE), limits.header_read_timeout) => {
            tracing::debug!(?why, "closing admin connection");
        }
    }
}

async fn handle(state: &Arc<AdminState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    // HEAD is answered as GET; hyper leaves the body out.
    let method = if req.method() == Method::HEAD {
        &Method::GET
    } else {
        req.method()
    };
    match (method, req.uri().path()) {
        (&Method::POST, _) if cross_origin(&req) => {
            text(StatusCode::FORBIDDEN, "cross-origin requests are refused\n")
        }
        (&Method::POST, "/reload") => match state.reloader.reload_async().await {
            Ok(applied) => json_response(&json!({
                "generation": applied.generation(),
                "changed": matches!(applied, crate::reload::Applied::Swapped { .. }),
            })),
            Err(e) => {
                let mut r = Response::new(Full::new(Bytes::from(format!("{e}\n"))));
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                r
            }
        },
        (_, "/reload") => not_allowed("POST"),
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/metrics") => {
            // Rendering takes milliseconds with many backends: off the threads that
            // serve traffic (with one worker there is only one).
            let s = state.clone();
            let rendered = tokio::task::spawn_blocking(move || {
                crate::metrics::render(
                    &s.runtime.load(),
                    &s.reloader,
                    &s.listeners,
                    &s.unrouted,
                    s.access_log.dropped(),
                )
            })
            .await
            .unwrap_or_else(|e| Err(prometheus::Error::Msg(format!("rendering stopped: {e}"))));
            match rendered {
                Ok(body) => {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                    );
                    r
                }
                Err(e) => {
                    tracing::error!(error = %e, "rendering metrics failed");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n")
                }
            }
        }
        (&Method::GET, "/readyz") => {
            if state.ready.load(Ordering::Relaxed) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/status") => json_response(&status(&state.runtime.load(), &state.reloader)),
        (&Method::GET, path) if owner_pool(path).is_some() => owner(
            &state.runtime.load(),
            owner_pool(path).unwrap_or_default(),
            req.uri().query(),
        ),
        (_, "/healthz" | "/readyz" | "/status" | "/metrics") => not_allowed("GET, HEAD"),
        (_, path) if owner_pool(path).is_some() => not_allowed("GET, HEAD"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether a browser sent the request from a page of another origin. Browsers name the
/// page's origin in `Origin` on every `POST`, and a web page anywhere may make a
/// visitor's browser send a form to a loopback or internal address; scripts and
/// `curl` send no `Origin`. The origin must name the host and port the request went to.
fn cross_origin<B>(req: &Request<B>) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return false;
    };
    // HTTP/2 carries the host in `:authority`, which hyper puts in the URI.
    let host = req
        .headers()
        .get(header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()));
    let origin = origin.as_bytes();
    let authority = origin
        .strip_prefix(b"http://")
        .or_else(|| origin.strip_prefix(b"https://"));
    match (authority, host) {
        (Some(a), Some(h)) => !a.eq_ignore_ascii_case(h),
        _ => true,
    }
}

/// The NAME of `/pools/NAME/owner`.
fn owner_pool(path: &str) -> Option<&str> {
    path.strip_prefix("/pools/")?.strip_suffix("/owner")
}

/// `GET /pools/NAME/owner?key=K`: which backend owns hash key `K` now, which one a
/// request with the key would go to now, and the order the key would fall back in. `?client_ip=ADDR` asks the same for the key of a client
/// address (`client_ip` keys are the address's octets, not its text).
fn owner(rt: &Runtime, name: &str, query: Option<&str>) -> Response<Full<Bytes>> {
    let Some(pool) = rt.pool(name) else {
        return text(StatusCode::NOT_FOUND, "no such pool\n");
    };
    // Decoded to bytes as requests' `query:` keys are.
    let param = |name: &str| query.and_then(|q| key::query_value(q, name));
    let (key, hashed) = match (param("key"), param("client_ip")) {
        (Some(key), None) => (String::from_utf8_lossy(&key).into_owned(), key),
        (None, Some(addr)) => {
            match std::str::from_utf8(&addr).map(str::parse::<std::net::IpAddr>) {
                Ok(Ok(ip)) => (
                    String::from_utf8_lossy(&addr).into_owned(),
                    client_ip_key(ip),
                ),
                _ => return text(StatusCode::BAD_REQUEST, "client_ip is not an IP address\n"),
            }
        }
        (Some(_), Some(_)) => {
            return text(
                StatusCode::BAD_REQUEST,
                "give ?key= or ?client_ip=, not both\n",
            )
        }
        (None, None) => return text(StatusCode::BAD_REQUEST, "missing ?key= or ?client_ip=\n"),
    };
    match (pool.hash_candidates(&hashed), pool.hash_serving(&hashed)) {
        (Some(order), Some(serving)) => {
            let id = |i: usize| &*pool.members[i].backend.id;
            let ids: Vec<&str> = order.iter().map(|&i| id(i)).collect();
            json_response(&json!({
                "pool": name,
                "key": key,
                "owner": ids.first(),
                "serving": serving.map(id),
                "candidates": ids,
            }))
        }
        _ => text(
            StatusCode::BAD_REQUEST,
            "this pool does not use consistent_hash\n",
        ),
    }
}

fn json_response(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// `405`, with the methods the path takes.
fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    r.headers_mut()
        .insert(header::ALLOW, http::HeaderValue::from_static(allow));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The `/status` document.
pub fn status(rt: &Runtime, reloader: &Reloader) -> serde_json::Value {
    let pools: Vec<_> = rt
        .pools
        .iter()
        .map(|p| {
            let backends: Vec<_> = p
                .members
                .iter()
                .map(|m| {
                    let b = &m.backend;
                    json!({
                        "id": &*b.id,
                        "address": b.address.to_string(),
                        "weight": m.weight,
                        "healthy": b.health.is_up(),
                        "ejected": b.health.is_ejected(),
                        "draining": b.is_draining(),
                        "removed": m.removed,
                        "in_flight": b.in_flight(),
                        "requests": b.requests(),
                        "connections_opened": b.pool.connections_opened(),
                        "open_connections": b.pool.open_count(),
                        "idle_connections": b.pool.idle_count(),
                    })
                })
                .collect();
            let mut doc =
                json!({ "name": &*p.name, "policy": p.policy.as_str(), "backends": backends });
            if !matches!(p.affinity, Affinity::None) {
                let outcomes: serde_json::Map<String, serde_json::Value> = Outcome::ALL
                    .iter()
                    .map(|&o| (o.as_str().to_owned(), json!(p.state.stats.get(o))))
                    .collect();
                doc["affinity"] = json!(outcomes);
            }
            if let (Affinity::Learn { .. }, Some(l)) = (&p.affinity, p.state.learned()) {
                doc["sessions_learned"] = json!(l.len());
            }
            doc
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": rt.generation,
        "config_hash": format!("{:016x}", rt.config.content_hash),
        "config_path": rt.config.source.as_ref().map(|p| p.display().to_string()),
        "last_reload": match reloader.last() {
            None => json!({ "result": "none", "error": null }),
            Some(l) => json!({
                "result": if l.ok { "success" } else { "failure" },
                "error": l.error,
                "at_unix": l.at_unix,
            }),
        },
        "reloads": {
            "success": reloader.successes.load(std::sync::atomic::Ordering::Relaxed),
            "failure": reloader.failures.load(std::sync::atomic::Ordering::Relaxed),
        },
        "live_snapshots": crate::runtime::live_snapshots(),
        "pools": pools,
    })
}
