//! `max_connections_per_backend`: a backend never has more connections open than its
//! limit; a request finding them all busy goes to another backend that has room, or
//! waits for one to come free (a client pinned to the backend always waits), for at most
//! the connect timeout, then gets `503`.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

/// Upper bound for waits that should end much sooner; a failure, never a sync point.
const LIMIT: Duration = Duration::from_secs(10);

/// A backend answering with its name, which counts the connections it accepts and, while
/// `hold` is set, holds each request until a permit of `release` is added for it.
struct Gated {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    hold: Arc<AtomicBool>,
    release: Arc<Semaphore>,
    /// One message per request that arrived.
    arrived: mpsc::UnboundedReceiver<()>,
}

impl Gated {
    async fn start(name: &'static str) -> Gated {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let hold = Arc::new(AtomicBool::new(true));
        let release = Arc::new(Semaphore::new(0));
        let (tx, arrived) = mpsc::unbounded_channel();
        let (count, held, gate) = (accepted.clone(), hold.clone(), release.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (tx, held, gate) = (tx.clone(), held.clone(), gate.clone());
                let svc = service_fn(move |_req| {
                    let (tx, held, gate) = (tx.clone(), held.clone(), gate.clone());
                    async move {
                        let _ = tx.send(());
                        if held.load(Ordering::SeqCst) {
                            gate.acquire().await.unwrap().forget();
                        }
                        Ok::<_, Infallible>(text(name))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc),
                );
            }
        });
        Gated {
            addr,
            accepted,
            hold,
            release,
            arrived,
        }
    }

    /// Waits until `n` more requests have arrived.
    async fn wait_arrivals(&mut self, n: usize) {
        for _ in 0..n {
            tokio::time::timeout(LIMIT, self.arrived.recv())
                .await
                .expect("a request should reach the backend")
                .unwrap();
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A proxy config: pool `p` of backend `a` at `addr` under `limit`, and `rest`.
fn limited(addr: SocketAddr, limit: usize, rest: &str) -> String {
    config(&format!(
        "[pools.p]\nbackends = [{{ address = \"{addr}\", id = \"a\" }}]\nmax_connections_per_backend = {limit}\n{rest}"
    ))
}

/// A configuration file of one limited pool, which a test reloads with other limits.
struct LimitedFile {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    addr: SocketAddr,
    rest: &'static str,
}

impl LimitedFile {
    /// Writes the file with `limit` and starts the proxy from it.
    async fn start(
        addr: SocketAddr,
        limit: usize,
        rest: &'static str,
    ) -> (LimitedFile, TestProxy, Arc<switchyard::reload::Reloader>) {
        let dir = tempfile::tempdir().unwrap();
        let file = LimitedFile {
            path: dir.path().join("switchyard.toml"),
            _dir: dir,
            addr,
            rest,
        };
        std::fs::write(&file.path, limited(addr, limit, rest)).unwrap();
        let (proxy, reloader) = TestProxy::start_file(&file.path).await;
        (file, proxy, reloader)
    }

    /// Writes the file with `limit` and reloads it.
    async fn reload(&self, reloader: &Arc<switchyard::reload::Reloader>, limit: usize) {
        std::fs::write(&self.path, limited(self.addr, limit, self.rest)).unwrap();
        reloader.reload_async().await.expect("the reload applies");
    }
}

/// A GET on a connection of its own, run in the background.
fn spawn_get(
    proxy: SocketAddr,
    req: http::Request<http_body_util::Full<bytes::Bytes>>,
) -> tokio::task::JoinHandle<Got> {
    tokio::spawn(async move { fetch(proxy, req).await })
}

async fn joined(h: tokio::task::JoinHandle<Got>) -> Got {
    tokio::time::timeout(LIMIT, h)
        .await
        .expect("the request should end")
        .unwrap()
}

/// Polls `/status` until the backend `id` has `n` requests in flight.
async fn wait_in_flight(proxy: &TestProxy, id: &str, n: u64) {
    wait_status(proxy, id, "in_flight", n).await;
}

/// Polls `/status` until the backend `id`'s `field` reads `n`.
async fn wait_status(proxy: &TestProxy, id: &str, field: &str, n: u64) {
    let start = Instant::now();
    loop {
        let b = backend_status(&status(proxy).await, id);
        if b[field] == n {
            return;
        }
        assert!(start.elapsed() < LIMIT, "{field} never reached {n}: {b}");
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_request_waits_for_a_busy_backends_connection_and_gets_503_if_none_comes_free() {
    let mut b = Gated::start("a").await;
    let proxy = TestProxy::start(&limited(b.addr, 2, "connect_timeout = \"300ms\"\n")).await;

    // Two requests take both connections.
    let first = spawn_get(proxy.addr, get("/1"));
    let second = spawn_get(proxy.addr, get("/2"));
    b.wait_arrivals(2).await;

    // A third finds no room and waits out the connect timeout: 503. (A wait that is
    // timed: the timeout's passing is what is under test.)
    let started = Instant::now();
    let third = fetch(proxy.addr, get("/3")).await;
    assert_eq!(third.status, 503, "{:?}", third.body);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(b.accepted(), 2);

    // A fourth waits, and is served on the first connection that comes free.
    let fourth = spawn_get(proxy.addr, get("/4"));
    wait_in_flight(&proxy, "a", 3).await;
    b.release.add_permits(1);
    b.wait_arrivals(1).await;
    b.release.add_permits(2);
    for h in [first, second, fourth] {
        let got = joined(h).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, "a");
    }
    // Never a third connection.
    assert_eq!(b.accepted(), 2);
    let s = status(&proxy).await;
    let a = &s["pools"][0]["backends"][0];
    assert_eq!(a["open_connections"], 2, "{a}");
    assert_eq!(a["connections_opened"], 2, "{a}");
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains("switchyard_upstream_connections_open{backend=\"a\",pool=\"p\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("switchyard_requests_total{backend=\"a\",code=\"5xx\",pool=\"p\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_backend_with_its_connections_busy_is_passed_over_for_one_with_room() {
    let mut a = Gated::start("a").await;
    let b = named_backend("b").await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nbackends = [{{ address = \"{}\", id = \"a\" }}, {{ address = \"{b}\", id = \"b\" }}]\nmax_connections_per_backend = 1\nretries = 0\n",
        a.addr
    )))
    .await;
    // Until round robin sends one to `a`, which holds it.
    let mut held = None;
    for _ in 0..2 {
        let mut h = spawn_get(proxy.addr, get("/"));
        tokio::select! {
            r = a.arrived.recv() => {
                r.unwrap();
                held = Some(h);
                break;
            }
            got = &mut h => assert_eq!(got.unwrap().backend(), "b"),
        }
    }
    let held = held.expect("round robin reaches a within two requests");
    // Every request now goes to `b`, even with no retry allowed: passing over a
    // backend that has no room is not a retry.
    for _ in 0..4 {
        let got = tokio::time::timeout(LIMIT, fetch(proxy.addr, get("/")))
            .await
            .expect("b should answer at once");
        assert_eq!(got.status, 200);
        assert_eq!(got.backend(), "b");
    }
    a.release.add_permits(1);
    assert_eq!(joined(held).await.body, "a");
    assert_eq!(a.accepted(), 1);
}

#[tokio::test]
async fn a_client_pinned_to_a_busy_backend_waits_for_it_rather_than_moving() {
    let mut a = Gated::start("a").await;
    let mut b = Gated::start("b").await;
    for g in [&a, &b] {
        g.hold.store(false, Ordering::SeqCst);
    }
    let env = "SWITCHYARD_TEST_SECRET_CONNECTION_LIMIT";
    std::env::set_var(env, "a test secret of more than sixteen bytes");
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\npolicy = \"sticky_cookie\"\nbackends = [{{ address = \"{}\", id = \"a\" }}, {{ address = \"{}\", id = \"b\" }}]\nmax_connections_per_backend = 1\nconnect_timeout = \"5s\"\n[pools.p.sticky]\ncookie = \"SY\"\nsecret_env = \"{env}\"\n",
        a.addr, b.addr
    )))
    .await;
    let first = fetch(proxy.addr, get("/")).await;
    let pinned = String::from_utf8(first.body.to_vec()).unwrap();
    let cookie = first.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let g = if pinned == "a" { &mut a } else { &mut b };
    g.wait_arrivals(1).await;
    g.hold.store(true, Ordering::SeqCst);

    let holding = spawn_get(proxy.addr, get_with_cookie("/", &cookie));
    g.wait_arrivals(1).await;
    let waiting = spawn_get(proxy.addr, get_with_cookie("/", &cookie));
    wait_in_flight(&proxy, &pinned, 2).await;
    g.release.add_permits(2);
    for h in [holding, waiting] {
        let got = joined(h).await;
        assert_eq!(got.status, 200);
        assert_eq!(String::from_utf8(got.body.to_vec()).unwrap(), pinned);
    }
    assert_eq!(g.accepted(), 1);
    let s = status(&proxy).await;
    let affinity = &s["pools"][0]["affinity"];
    assert_eq!(affinity["redispatched"], 0, "{s}");
    assert_eq!(affinity["hit"], 2, "{s}");
}

#[tokio::test]
async fn a_raised_limit_lets_a_waiting_request_through() {
    let mut b = Gated::start("a").await;
    let (file, proxy, reloader) = LimitedFile::start(b.addr, 1, "connect_timeout = \"1h\"\n").await;
    let first = spawn_get(proxy.addr, get("/1"));
    b.wait_arrivals(1).await;
    let second = spawn_get(proxy.addr, get("/2"));
    wait_in_flight(&proxy, "a", 2).await;

    file.reload(&reloader, 2).await;
    // The waiting request gets the room made for it.
    b.wait_arrivals(1).await;
    b.release.add_permits(2);
    for h in [first, second] {
        assert_eq!(joined(h).await.status, 200);
    }
    assert_eq!(b.accepted(), 2);
}

#[tokio::test]
async fn a_lowered_limit_closes_connections_as_they_come_back() {
    let mut b = Gated::start("a").await;
    let (file, proxy, reloader) = LimitedFile::start(b.addr, 3, "").await;
    let held: Vec<_> = (0..3)
        .map(|i| spawn_get(proxy.addr, get(&format!("/{i}"))))
        .collect();
    b.wait_arrivals(3).await;

    file.reload(&reloader, 1).await;
    b.release.add_permits(3);
    for h in held {
        assert_eq!(joined(h).await.status, 200);
    }
    // Two of the three are closed as they come back; one stays for reuse.
    let start = Instant::now();
    loop {
        let s = status(&proxy).await;
        let a = &s["pools"][0]["backends"][0];
        if a["open_connections"] == 1 && a["idle_connections"] == 1 {
            break;
        }
        assert!(start.elapsed() < LIMIT, "still over the lowered limit: {a}");
        tokio::task::yield_now().await;
    }
    b.hold.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        assert_eq!(fetch(proxy.addr, get("/")).await.status, 200);
    }
    assert_eq!(b.accepted(), 3, "the one kept is reused");
}

/// A backend whose connections the test holds: it reads and answers their requests by
/// hand, and closes a connection by dropping it. It accepts a connection only when
/// asked to, and its listener queues at most one connection not yet accepted: with one
/// waiting there, a further connection attempt goes unanswered (its SYN is dropped)
/// until the queue has room, as with a backend too busy to accept.
struct Manual {
    addr: SocketAddr,
    /// One permit per connection to accept.
    accept: Arc<Semaphore>,
    conns: mpsc::UnboundedReceiver<TcpStream>,
}

impl Manual {
    async fn start() -> Manual {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = Arc::new(Semaphore::new(0));
        let (tx, conns) = mpsc::unbounded_channel();
        let gate = accept.clone();
        tokio::spawn(async move {
            loop {
                gate.acquire().await.unwrap().forget();
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                if tx.send(s).is_err() {
                    return;
                }
            }
        });
        Manual {
            addr,
            accept,
            conns,
        }
    }

    /// Accepts the next connection and reads its first request head.
    async fn next_request(&mut self) -> TcpStream {
        self.accept.add_permits(1);
        let mut s = tokio::time::timeout(LIMIT, self.conns.recv())
            .await
            .expect("a connection should reach the backend")
            .unwrap();
        request_on(&mut s).await;
        s
    }
}

/// Reads a request head on a backend connection.
async fn request_on(s: &mut TcpStream) {
    tokio::time::timeout(LIMIT, read_head(s))
        .await
        .expect("a request should come")
        .expect("the connection should stay open");
}

/// Answers a request on a backend connection with `body`.
async fn answer(s: &mut TcpStream, body: &str) {
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(response.as_bytes()).await.unwrap();
}

/// Reads one response on a client connection: its status and body.
async fn response_on(s: &mut TcpStream) -> (u16, String) {
    let read = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed mid-response");
            got.extend_from_slice(&buf[..n]);
            let mut fields = [httparse::EMPTY_HEADER; 32];
            let mut r = httparse::Response::new(&mut fields);
            if let httparse::Status::Complete(head) = r.parse(&got).unwrap() {
                let length: usize = r
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| std::str::from_utf8(h.value).unwrap().parse().unwrap())
                    .expect("a content-length");
                if got.len() >= head + length {
                    let body = String::from_utf8_lossy(&got[head..head + length]);
                    return (r.code.unwrap(), body.into_owned());
                }
            }
        }
    };
    tokio::time::timeout(LIMIT, read)
        .await
        .expect("a response should come")
}

/// Sends a GET on a client connection, returning once it is written.
async fn send_on(s: &mut TcpStream, path: &str) {
    let request = format!("GET {path} HTTP/1.1\r\nhost: test.local\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
}

#[tokio::test]
async fn a_stale_connection_replaced_while_the_backend_is_at_its_limit_gets_503_not_a_failure() {
    let mut b = Manual::start().await;
    let proxy = TestProxy::start(&limited(b.addr, 2, "connect_timeout = \"300ms\"\n")).await;
    // One connection busy with a request held.
    let held = spawn_get(proxy.addr, get("/held"));
    let _busy = b.next_request().await;
    // The other idle in the pool, after serving a request from each of two client
    // connections.
    let mut x = TcpStream::connect(proxy.addr).await.unwrap();
    let mut y = TcpStream::connect(proxy.addr).await.unwrap();
    send_on(&mut x, "/x").await;
    let mut idle = b.next_request().await;
    answer(&mut idle, "x").await;
    assert_eq!(response_on(&mut x).await, (200, "x".to_owned()));
    wait_status(&proxy, "a", "idle_connections", 1).await;
    send_on(&mut y, "/y").await;
    request_on(&mut idle).await;
    answer(&mut idle, "y").await;
    assert_eq!(response_on(&mut y).await, (200, "y".to_owned()));
    wait_status(&proxy, "a", "idle_connections", 1).await;

    // A request on `x`, then one on `y`, then the backend closes the idle connection,
    // all before the proxy runs again: the test runtime has one thread (this test must
    // keep to it), and these writes do not wait. The proxy learns of all three at once
    // and handles them in the order they came: the request on `x` takes the idle
    // connection, which still looks ready; the one on `y` finds none and waits in line;
    // the connection's task then reads its end before writing, and hands the request
    // on `x` back unsent.
    send_on(&mut x, "/stale").await;
    send_on(&mut y, "/waiting").await;
    drop(idle);
    // The closed connection's room goes to the request that waited first; the
    // replacement for the stale one waits behind it, in vain while its request is held:
    // 503, after the connect timeout.
    let mut waiting = b.next_request().await;
    let (status_code, body) = response_on(&mut x).await;
    assert_eq!(status_code, 503, "{body}");
    // A backend with its connections busy has not failed to be reached: no connect
    // error is counted, and the request opened no connection of its own.
    let a = backend_status(&status(&proxy).await, "a");
    assert_eq!(a["connections_opened"], 3, "{a}");
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains("switchyard_upstream_connect_errors_total{backend=\"a\",pool=\"p\"} 0"),
        "{text}"
    );
    answer(&mut waiting, "waiting").await;
    assert_eq!(response_on(&mut y).await, (200, "waiting".to_owned()));
    drop(held);
}

#[tokio::test]
async fn a_request_first_in_line_that_is_slow_to_connect_lets_the_next_take_a_freed_connection() {
    let mut b = Manual::start().await;
    let addr = b.addr;
    let (file, proxy, reloader) = LimitedFile::start(addr, 2, "connect_timeout = \"30s\"\n").await;
    // Both connections busy, and two requests waiting in line for one.
    let first = spawn_get(proxy.addr, get("/1"));
    let _one = b.next_request().await;
    let second = spawn_get(proxy.addr, get("/2"));
    let mut two = b.next_request().await;
    let ahead = spawn_get(proxy.addr, get("/ahead"));
    wait_in_flight(&proxy, "a", 3).await;
    let behind = spawn_get(proxy.addr, get("/behind"));
    wait_in_flight(&proxy, "a", 4).await;

    // A connection left in the backend's accept queue fills it: the next connection
    // attempt goes unanswered.
    let _queued = TcpStream::connect(addr).await.unwrap();
    // A raised limit makes room for one more connection: the request first in line
    // takes it, and connects, slowly.
    file.reload(&reloader, 3).await;
    wait_status(&proxy, "a", "open_connections", 3).await;

    // A connection comes back idle meanwhile: the request next in line takes it rather
    // than wait for the one connecting.
    answer(&mut two, "2").await;
    assert_eq!(joined(second).await.body, "2");
    request_on(&mut two).await;
    answer(&mut two, "behind").await;
    let got = joined(behind).await;
    assert_eq!((got.status, &got.body[..]), (200, &b"behind"[..]));
    assert!(
        !ahead.is_finished(),
        "the slow connection should still be connecting"
    );
    let a = backend_status(&status(&proxy).await, "a");
    assert_eq!(a["connections_opened"], 2, "{a}");
    drop((first, ahead));
}
