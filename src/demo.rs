//! The built-in backend (`switchyard backend`) and the self-contained demo
//! (`switchyard demo`).
//!
//! The backend answers every path with its name and the request it saw, as JSON, and
//! counts visits per session: it issues a `sid` cookie and remembers it in memory, so
//! whether a client keeps reaching the same replica is visible in the `visits` field.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;

/// Sessions remembered by one backend; cleared when it grows past this.
const MAX_SESSIONS: usize = 100_000;

#[derive(Debug, Default)]
struct BackendState {
    name: String,
    visits: Mutex<HashMap<String, u64>>,
}

/// Serves the built-in backend on `listener` until `shutdown` resolves.
pub async fn backend(listener: TcpListener, name: String, shutdown: impl Future<Output = ()>) {
    let state = Arc::new(BackendState {
        name,
        visits: Mutex::default(),
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
            _ = shutdown.as_mut() => return,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let svc = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(answer(&state, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn answer(state: &BackendState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        return Response::new(Full::new(Bytes::from_static(b"ok\n")));
    }
    let (parts, body) = req.into_parts();
    let body_bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes().len())
        .unwrap_or(0);
    let sid = parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix("sid="))
        .next()
        .map(str::to_owned);
    let (sid, visits, issued) = {
        let mut visits = state.visits.lock().unwrap_or_else(|e| e.into_inner());
        if visits.len() >= MAX_SESSIONS {
            visits.clear();
        }
        match sid.filter(|s| visits.contains_key(s)) {
            Some(s) => {
                let n = visits.get_mut(&s).map(|n| {
                    *n += 1;
                    *n
                });
                (s, n.unwrap_or(1), false)
            }
            None => {
                let s = format!("{}-{:016x}", state.name, fastrand::u64(..));
                visits.insert(s.clone(), 1);
                (s, 1, true)
            }
        }
    };
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                json!(String::from_utf8_lossy(v.as_bytes())),
            )
        })
        .collect();
    let doc = json!({
        "backend": state.name,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "headers": headers,
        "body_bytes": body_bytes,
        "session": sid,
        "visits": visits,
    });
    let mut text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    text.push('\n');
    let mut resp = Response::new(Full::new(Bytes::from(text)));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        "x-backend",
        HeaderValue::from_str(&state.name).unwrap_or(HeaderValue::from_static("backend")),
    );
    if issued {
        if let Ok(v) = HeaderValue::from_str(&format!("sid={sid}; Path=/; HttpOnly")) {
            h.insert(header::SET_COOKIE, v);
        }
    }
    resp
}

/// Binds `preferred`, or any free port on the same address if it is taken.
async fn bind_or_any(preferred: SocketAddr) -> std::io::Result<TcpListener> {
    match TcpListener::bind(preferred).await {
        Ok(l) => Ok(l),
        Err(_) => TcpListener::bind(SocketAddr::new(preferred.ip(), 0)).await,
    }
}

/// The demo's configuration, for backends at `web` and `carts`.
pub fn demo_config(
    listen: SocketAddr,
    admin: SocketAddr,
    web: &[SocketAddr],
    carts: &[SocketAddr],
) -> String {
    let list = |prefix: &str, a: &[SocketAddr]| {
        a.iter()
            .enumerate()
            .map(|(i, a)| format!("{{ address = \"{a}\", id = \"{prefix}-{}\" }}", i + 1))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        r#"# Generated by `switchyard demo`.
[server]
listen = ["{listen}"]
access_log = "text"
shutdown_grace = "2s"

[admin]
listen = "{admin}"

[[routes]]
path_prefix = "/cart"
pool = "carts"

[[routes]]
pool = "web"

[pools.web]
policy = "round_robin"
backends = [{web}]

[pools.carts]
policy = "round_robin"
backends = [{carts}]
"#,
        web = list("web", web),
        carts = list("cart", carts),
    )
}

/// Runs three stateless and two stateful built-in backends and the proxy in front of
/// them until `shutdown` resolves.
pub async fn demo(shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut addrs = Vec::new();
    for name in ["web-1", "web-2", "web-3", "cart-1", "cart-2"] {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(l.local_addr()?);
        let mut rx = stop_rx.clone();
        tokio::spawn(backend(l, name.to_owned(), async move {
            crate::server::stopped(&mut rx).await;
        }));
    }
    // Prefer the well-known ports, but never fail because they are taken.
    let listen = bind_or_any("127.0.0.1:8080".parse()?).await?.local_addr()?;
    let admin = bind_or_any("127.0.0.1:9090".parse()?).await?.local_addr()?;
    let text = demo_config(listen, admin, &addrs[..3], &addrs[3..]);
    let config = crate::config::parse(&text, "<demo>")?;
    let server = crate::Server::bind(config).await?;
    let p = server.local_addrs()[0];
    let a = server.admin_addr().unwrap_or(admin);
    println!(
        "Switchyard demo: proxy on http://{p}, admin on http://{a}\n\
         \n  stateless pool \"web\" (round robin over web-1, web-2, web-3):\n\
         \x20   for i in 1 2 3 4 5 6; do curl -s http://{p}/ | grep '\"backend\"'; done\n\
         \n  stateful pool \"carts\" (per-session visit counter, cookie jar kept by curl):\n\
         \x20   for i in 1 2 3 4; do curl -s -b /tmp/sy.jar -c /tmp/sy.jar http://{p}/cart | grep -E '\"(backend|visits)\"'; done\n\
         \n  status:    curl -s http://{a}/status\n\
         \x20 h2c:       curl -s --http2-prior-knowledge http://{p}/\n\
         \nCtrl-C to stop."
    );
    server.run(shutdown).await;
    let _ = stop_tx.send(true);
    Ok(())
}
