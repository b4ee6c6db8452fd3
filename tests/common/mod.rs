//! Shared test scaffolding: the real proxy in-process on 127.0.0.1:0, real backends on
//! 127.0.0.1:0, and a plain HTTP/1.1 client.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub type Resp = Response<Full<Bytes>>;

/// Passes on each complete line written to it.
pub struct LineSender {
    partial: Vec<u8>,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
}

impl std::io::Write for LineSender {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            let _ = self.tx.send(line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The proxy running in-process.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub runtime: Arc<arc_swap::ArcSwap<switchyard::runtime::Runtime>>,
    stop: Option<oneshot::Sender<()>>,
    pub task: Option<JoinHandle<()>>,
}

impl TestProxy {
    /// Starts the proxy from TOML text; `listen` and `admin.listen` should be port 0.
    pub async fn start(toml: &str) -> TestProxy {
        let config = switchyard::config::parse(toml, "test.toml").expect("valid test config");
        Self::serve(config).await.0
    }

    /// Starts the proxy from a configuration file, which is then watched for changes.
    pub async fn start_file(
        path: &std::path::Path,
    ) -> (TestProxy, Arc<switchyard::reload::Reloader>) {
        let config = switchyard::config::load(path).expect("valid test config file");
        Self::serve(config).await
    }

    /// Starts the proxy from TOML text, its access log lines going one by one to the
    /// returned receiver.
    pub async fn start_logging(
        toml: &str,
    ) -> (TestProxy, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let config = switchyard::config::parse(toml, "test.toml").expect("valid test config");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let out = LineSender {
            partial: Vec::new(),
            tx,
        };
        (Self::serve_with(config, Some(out)).await.0, rx)
    }

    async fn serve(
        config: switchyard::config::Config,
    ) -> (TestProxy, Arc<switchyard::reload::Reloader>) {
        Self::serve_with(config, None).await
    }

    async fn serve_with(
        config: switchyard::config::Config,
        access_log: Option<LineSender>,
    ) -> (TestProxy, Arc<switchyard::reload::Reloader>) {
        let mut server = switchyard::Server::bind(config).await.expect("bind");
        if let Some(out) = access_log {
            server.set_access_log_output(out);
        }
        let reloader = server.reloader();
        let addr = server.local_addrs()[0];
        let admin = server.admin_addr();
        let runtime = server.runtime();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async move {
            let _ = rx.await;
        }));
        let proxy = TestProxy {
            addr,
            admin,
            runtime,
            stop: Some(tx),
            task: Some(task),
        };
        (proxy, reloader)
    }

    /// Asks for a graceful shutdown; the returned handle ends when the proxy stopped.
    pub fn shutdown(&mut self) -> JoinHandle<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("running")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A backend serving `handler` on 127.0.0.1:0 until the test's runtime ends.
pub async fn backend<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Resp> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(handler);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let handler = handler.clone();
            let svc = service_fn(move |req| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(req).await) }
            });
            tokio::spawn(async move {
                let mut builder = auto::Builder::new(TokioExecutor::new());
                // Room for the fields the proxy adds to a request of as many as it takes.
                builder.http1().max_headers(200);
                let _ = builder
                    .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A backend answering "ok" that counts the requests reaching it.
pub async fn counting_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    let addr = backend(move |_| {
        h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { text("ok") }
    })
    .await;
    (addr, hits)
}

/// A backend that reads each request head, counts it, and closes the connection without
/// answering.
pub async fn resetting_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
        }
    });
    (a, hits)
}

/// Reads from a raw connection until a whole HTTP/1.1 head (through its blank line) has
/// come; the bytes read, or `None` if the connection ended first.
pub async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::io::AsyncReadExt::read(s, &mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// A backend that holds the first request it gets until `release` is notified, telling
/// `arrived` when it has it; it answers that one, and any other at once, with `name`.
pub async fn holding_first_backend(
    name: &'static str,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Receiver<()>,
    Arc<tokio::sync::Notify>,
) {
    let (arrived_tx, arrived) = tokio::sync::oneshot::channel::<()>();
    let arrived_tx = Arc::new(std::sync::Mutex::new(Some(arrived_tx)));
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let addr = backend(move |_req| {
        let first = arrived_tx.lock().unwrap().take();
        let gate = gate.clone();
        async move {
            if let Some(tx) = first {
                let held = gate.notified();
                let _ = tx.send(());
                held.await;
            }
            text(name)
        }
    })
    .await;
    (addr, arrived, release)
}

/// Sends `bytes` on a new connection to `addr` and reads until the proxy closes it
/// (within 10 s); what came back, as text.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The proxy may answer and close before reading everything (431): a failed write
    // is part of the exchange.
    let _ = s.write_all(bytes).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("the proxy kept the connection open");
    String::from_utf8_lossy(&buf).into_owned()
}

/// The built-in demo backend, named `name`.
pub async fn named_backend(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(switchyard::demo::backend(
        listener,
        name.to_owned(),
        std::future::pending(),
    ));
    addr
}

/// An address where nothing listens (connection refused).
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

pub fn text(body: impl Into<Bytes>) -> Resp {
    Response::new(Full::new(body.into()))
}

/// A response with its body collected.
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// The `backend` field of the demo backend's answer.
    pub fn backend(&self) -> String {
        self.json()["backend"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

/// An HTTP/1.1 keep-alive client connection.
pub struct Client {
    tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn.with_upgrades());
        Client { tx }
    }

    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> Got {
        self.tx.ready().await.unwrap();
        let resp = self.tx.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        Got {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str) -> Got {
        self.send(get(path)).await
    }
}

pub fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "test.local")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// The admin listener's `/metrics` text.
pub async fn metrics_text(proxy: &TestProxy) -> String {
    let got = fetch(proxy.admin.expect("admin listener"), get("/metrics")).await;
    assert_eq!(got.status, 200);
    String::from_utf8(got.body.to_vec()).unwrap()
}

/// One GET on a new connection.
pub async fn fetch(addr: SocketAddr, req: Request<Full<Bytes>>) -> Got {
    Client::connect(addr).await.send(req).await
}

/// Proxy config: one listener and an admin listener on port 0, plus `rest`.
pub fn config(rest: &str) -> String {
    format!("[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"5s\"\n[admin]\nlisten = \"127.0.0.1:0\"\n{rest}")
}

/// `"a", "b"` for a backend list.
pub fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A backend that can be killed (listener and every open connection closed) and started
/// again on the same address.
pub struct Killable {
    pub addr: SocketAddr,
    name: String,
    task: Option<JoinHandle<()>>,
}

impl Killable {
    pub async fn start(name: &str) -> Killable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut k = Killable {
            addr: listener.local_addr().unwrap(),
            name: name.to_owned(),
            task: None,
        };
        k.serve(listener);
        k
    }

    fn serve(&mut self, listener: TcpListener) {
        let name = self.name.clone();
        self.task = Some(tokio::spawn(async move {
            // Connections live in this set, so aborting the task closes them all.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let name = name.clone();
                    async move { Ok::<_, Infallible>(session_answer(&name, &req)) }
                });
                conns.spawn(async move {
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }));
    }

    /// Closes the listener and all connections; connecting is refused afterwards.
    pub async fn kill(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Serves again on the same address.
    pub async fn revive(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

impl Drop for Killable {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Answers with the backend's name; issues a `JSESSIONID` when the request has none,
/// as an application server would.
pub fn session_answer(name: &str, req: &Request<Incoming>) -> Resp {
    let mut r = text(name.to_owned());
    let has_session = req
        .headers()
        .get_all(http::header::COOKIE)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.contains("JSESSIONID=")));
    if !has_session && req.uri().path() != "/no-session" {
        let id = format!("{name}-{:016x}", fastrand::u64(..));
        r.headers_mut().insert(
            http::header::SET_COOKIE,
            format!("JSESSIONID={id}; Path=/; HttpOnly")
                .parse()
                .unwrap(),
        );
    }
    r
}

/// GETs `/status` from the admin listener.
pub async fn status(proxy: &TestProxy) -> serde_json::Value {
    fetch(proxy.admin.expect("admin listener"), get("/status"))
        .await
        .json()
}

/// Backend `id` of the first pool in a `/status` document, if listed.
pub fn find_backend_status(status: &serde_json::Value, id: &str) -> Option<serde_json::Value> {
    status["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .cloned()
}

/// Backend `id` of the first pool in a `/status` document.
pub fn backend_status(status: &serde_json::Value, id: &str) -> serde_json::Value {
    find_backend_status(status, id).unwrap_or_else(|| panic!("no backend {id} in {status}"))
}

/// A request with a `Cookie` header.
pub fn get_with_cookie(path: &str, cookie: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "test.local")
        .header("cookie", cookie)
        .body(Full::new(Bytes::new()))
        .unwrap()
}
