//! The least a hyper reverse proxy can do, as a yardstick for `benches/compare.sh`.
//!
//! HTTP/1.1 in (hyper's server, flattened writes), round robin over the backends, HTTP/1.1
//! out over idle `SendRequest`s kept per backend, the same allocator and single-threaded
//! runtime as Switchyard with one worker. Nothing else: no routing, limits, timeouts,
//! retries, health, metrics or logs. With `BARE_PROXY_HEADERS=1` it also applies
//! Switchyard's own header rules (`proxy::headers`), which every proxied request needs.
//!
//! It reads `listen` and `backends` from a Switchyard configuration file, so the
//! comparison script can run it in Switchyard's place:
//!
//! ```text
//! cargo build --release --example bare_proxy
//! SWITCHYARD_BIN=target/release/examples/bare_proxy PROXIES=switchyard benches/compare.sh callgrind
//! ```

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use switchyard::config::{self, BackendAddr};
use switchyard::proxy::headers;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Shared {
    backends: Vec<(SocketAddr, Mutex<Vec<SendRequest<Incoming>>>)>,
    next: AtomicUsize,
    rewrite_headers: bool,
}

/// A response body that puts its connection back on the idle list once read to the end.
struct Pooled {
    body: Option<Incoming>,
    conn: Option<(SendRequest<Incoming>, Arc<Shared>, usize)>,
}

impl Pooled {
    fn release(&mut self) {
        if let Some((tx, shared, i)) = self.conn.take() {
            if let Ok(mut idle) = shared.backends[i].1.lock() {
                idle.push(tx);
            }
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = Pin::new(&mut *body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Ok(_))) if body.is_end_stream() => this.release(),
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.is_end_stream() {
            self.release();
        }
    }
}

async fn checkout(shared: &Shared, i: usize) -> anyhow::Result<SendRequest<Incoming>> {
    let (addr, idle) = &shared.backends[i];
    loop {
        let tx = idle.lock().ok().and_then(|mut idle| idle.pop());
        let Some(mut tx) = tx else { break };
        if tx.ready().await.is_ok() {
            return Ok(tx);
        }
    }
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (tx, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(tx)
}

async fn handle(
    shared: Arc<Shared>,
    client: IpAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Pooled>, Infallible> {
    let request_id = shared.rewrite_headers.then(|| {
        headers::prepare_request(&mut req, &headers::ClientAddr::new(client), "http", false)
            .request_id
    });
    let i = shared.next.fetch_add(1, Ordering::Relaxed) % shared.backends.len();
    let sent = match checkout(&shared, i).await {
        Ok(mut tx) => tx.send_request(req).await.map(|resp| (resp, tx)).ok(),
        Err(_) => None,
    };
    let Some((resp, tx)) = sent else {
        let mut resp = Response::new(Pooled {
            body: None,
            conn: None,
        });
        *resp.status_mut() = StatusCode::BAD_GATEWAY;
        return Ok(resp);
    };
    let (mut parts, body) = resp.into_parts();
    if let Some(id) = request_id {
        if headers::prepare_response(parts.status, &mut parts.headers, false).is_err() {
            parts.status = StatusCode::BAD_GATEWAY;
        }
        parts.headers.insert(headers::X_REQUEST_ID.clone(), id);
    }
    let mut body = Pooled {
        body: Some(body),
        conn: Some((tx, shared, i)),
    };
    if body.is_end_stream() {
        body.release();
    }
    Ok(Response::from_parts(parts, body))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--version") {
        println!("bare_proxy (switchyard {})", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    let path = args
        .iter()
        .position(|a| a == "--config")
        .and_then(|i| args.get(i + 1))
        .context("usage: bare_proxy --config PATH")?;
    let config = config::load(std::path::Path::new(path))?;
    let listen = *config.server.listen.first().context("no listen address")?;
    let pool = config.pools.first().context("no pool")?;
    let shared = Arc::new(Shared {
        backends: pool
            .backends
            .iter()
            .map(|b| match &b.address {
                BackendAddr::Ip(addr) => Ok((*addr, Mutex::new(Vec::new()))),
                BackendAddr::Name { .. } => anyhow::bail!("backends must be IP:PORT"),
            })
            .collect::<anyhow::Result<_>>()?,
        next: AtomicUsize::new(0),
        rewrite_headers: std::env::var_os("BARE_PROXY_HEADERS").is_some_and(|v| v == "1"),
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let accept = async {
            loop {
                // Out of descriptors or similar: stop rather than spin.
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), peer.ip(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .writev(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })?;
    // Open connections are dropped with the runtime.
    Ok(())
}
