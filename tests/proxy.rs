//! The proxy end to end: real listeners and backends on 127.0.0.1:0, real HTTP.

mod common;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};

/// Upper bound for waits that should end much sooner; a failure, never a sync point.
const LIMIT: Duration = Duration::from_secs(10);

/// A proxy config with one pool `p` of the one backend `a`.
fn single_pool(a: std::net::SocketAddr) -> String {
    config(&format!("[pools.p]\nbackends = [\"{a}\"]\n"))
}

/// HTTP/2's asterisk target: scheme, authority and the path `*`.
fn asterisk_target() -> http::Uri {
    http::Uri::builder()
        .scheme("http")
        .authority("a.example")
        .path_and_query("*")
        .build()
        .unwrap()
}

#[tokio::test]
async fn round_robin_is_even_over_three_backends() {
    let b = [
        named_backend("a").await,
        named_backend("b").await,
        named_backend("c").await,
    ];
    let proxy = TestProxy::start(&config(&format!(
        "[pools.web]\nbackends = [{}]\n",
        list(&b)
    )))
    .await;
    let mut client = Client::connect(proxy.addr).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let got = client.get("/").await;
        assert_eq!(got.status, 200);
        *counts.entry(got.backend()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 100), "{counts:?}");
}

#[tokio::test]
async fn weighted_round_robin_interleaves() {
    let (a, b, c) = (
        named_backend("a").await,
        named_backend("b").await,
        named_backend("c").await,
    );
    let pools = format!(
        "[pools.web]\nbackends = [{{ address = \"{a}\", weight = 5 }}, \"{b}\", \"{c}\"]\n"
    );
    let proxy = TestProxy::start(&config(&pools)).await;
    let mut client = Client::connect(proxy.addr).await;
    let mut seq = String::new();
    for _ in 0..14 {
        seq.push_str(&client.get("/").await.backend());
    }
    assert_eq!(seq, "aabacaaaabacaa");
}

/// A backend that answers `/hold` only when released, and everything else at once,
/// reporting its name.
async fn holding_backend(
    name: &'static str,
    held: mpsc::UnboundedSender<&'static str>,
    release: Arc<Notify>,
) -> std::net::SocketAddr {
    backend(move |req| {
        let held = held.clone();
        let release = release.clone();
        async move {
            if req.uri().path() == "/hold" {
                let wait = release.notified();
                let _ = held.send(name);
                wait.await;
            }
            text(name)
        }
    })
    .await
}

#[tokio::test]
async fn least_request_prefers_the_idle_backend() {
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let a = holding_backend("a", held_tx.clone(), release.clone()).await;
    let b = holding_backend("b", held_tx, release.clone()).await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.web]\npolicy = \"least_request\"\nbackends = [\"{a}\", \"{b}\"]\n"
    )))
    .await;
    let addr = proxy.addr;
    let hold = tokio::spawn(async move { fetch(addr, get("/hold")).await });
    let busy = held_rx.recv().await.unwrap();
    let idle = if busy == "a" { "b" } else { "a" };
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..20 {
        let got = client.get("/").await;
        assert_eq!(got.body, idle.as_bytes());
    }
    release.notify_waiters();
    assert_eq!(hold.await.unwrap().status, 200);
}

#[tokio::test]
async fn routes_by_host_then_longest_prefix() {
    let exact = named_backend("exact").await;
    let wild = named_backend("wild").await;
    let stat = named_backend("static").await;
    let deep = named_backend("deep").await;
    let fallback = named_backend("fallback").await;
    let cfg = format!(
        r#"
[[routes]]
pool = "fallback"
[[routes]]
path_prefix = "/static"
pool = "static"
[[routes]]
path_prefix = "/static/deep"
pool = "deep"
[[routes]]
host = "*.example.com"
pool = "wild"
[[routes]]
host = "api.example.com"
pool = "exact"
[pools.exact]
backends = ["{exact}"]
[pools.wild]
backends = ["{wild}"]
[pools.static]
backends = ["{stat}"]
[pools.deep]
backends = ["{deep}"]
[pools.fallback]
backends = ["{fallback}"]
"#
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let cases = [
        ("api.example.com", "/", "exact"),
        ("API.Example.com:8443", "/static/x", "exact"),
        ("shop.example.com", "/static", "wild"),
        ("example.com", "/", "fallback"),
        ("other.test", "/static/x.css", "static"),
        ("other.test", "/static/deep/y", "deep"),
        ("other.test", "/staticky", "fallback"),
    ];
    let mut client = Client::connect(proxy.addr).await;
    for (host, path, want) in cases {
        let req = Request::get(path)
            .header("host", host)
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(client.send(req).await.backend(), want, "{host}{path}");
    }
}

#[tokio::test]
async fn no_route_is_404() {
    let a = named_backend("a").await;
    let cfg = format!(
        "[[routes]]\nhost = \"only.example.com\"\npool = \"p\"\n[pools.p]\nbackends = [\"{a}\"]\n"
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.status, 404);
    assert!(got.headers.contains_key("x-request-id"));
    // Nothing was left unread: the connection stays open.
    assert!(!got.headers.contains_key("connection"));
}

#[tokio::test]
async fn a_refusal_that_leaves_the_body_unread_says_the_connection_closes() {
    let dead = dead_addr().await;
    let cfg = format!(
        "[[routes]]\nhost = \"only.example.com\"\npool = \"p\"\n[pools.p]\nbackends = [\"{dead}\"]\n"
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    // No route (404), and no backend reachable (502 or 503); the second request, pipelined
    // behind a body the proxy will not read, would never be answered.
    for (host, status) in [("x", "404"), ("only.example.com", "50")] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000000\r\n\r\npart of it\
             GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"
        );
        let got = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(got.starts_with(&format!("HTTP/1.1 {status}")), "{got}");
        assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
        assert_eq!(got.matches("HTTP/1.1").count(), 1, "{got}");
    }
}

#[tokio::test]
async fn an_answer_before_the_upload_was_read_says_the_connection_closes() {
    // Refuses the upload on its head alone, as a backend checking size or credentials
    // does, and keeps its connection open without reading on.
    let (a, _closed) = unread_upload_backend(Some(TOO_LARGE)).await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    // The rest of the upload may never be read: the client can send nothing more on
    // this connection, so the answer must say that the connection closes.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\npart of it")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.ends_with(b"too large") {
        let n = tokio::time::timeout(LIMIT, s.read(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let got = String::from_utf8_lossy(&got);
    assert!(got.starts_with("HTTP/1.1 413"), "{got}");
    assert!(got.contains("\r\nconnection: close\r\n"), "{got}");
}

#[tokio::test]
async fn an_http2_client_gets_an_answer_before_its_upload_was_read() {
    // Refuses every upload on its head alone and reads on no further.
    let (a, _closed) = unread_upload_backend(Some(TOO_LARGE)).await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    for _ in 0..2 {
        // An upload that never ends: the sender stays open.
        let (tx, mut rx) = mpsc::channel::<Result<http_body::Frame<Bytes>, std::io::Error>>(1);
        tx.send(Ok(http_body::Frame::data(Bytes::from_static(
            b"part of it",
        ))))
        .await
        .unwrap();
        let req = Request::post("http://a.example/")
            .body(StreamBody::new(futures_util::stream::poll_fn(move |cx| {
                rx.poll_recv(cx)
            })))
            .unwrap();
        let resp = tokio::time::timeout(LIMIT, h2.send_request(req))
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(resp.status(), 413);
        let body = tokio::time::timeout(LIMIT, resp.into_body().collect())
            .await
            .expect("body did not end")
            .unwrap()
            .to_bytes();
        assert_eq!(body, "too large");
        // Only the stream ends: the connection serves the next request.
        drop(tx);
    }
}

/// A backend's answer to an upload it will not take.
const TOO_LARGE: &str = "HTTP/1.1 413 Payload Too Large\r\ncontent-length: 9\r\n\r\ntoo large";

/// A backend that reads request heads and never a byte of a body: it answers each
/// with `answer`, if any, and tells `closed` when the proxy has closed the connection.
async fn unread_upload_backend(
    answer: Option<&'static str>,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (closed_tx, closed) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let closed_tx = closed_tx.clone();
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                if let Some(answer) = answer {
                    s.write_all(answer.as_bytes()).await.unwrap();
                }
                // The end of the connection shows without reading the body before it:
                // the peer's FIN (or reset) marks the socket read-closed.
                loop {
                    let ready = s.ready(tokio::io::Interest::READABLE).await.unwrap();
                    if ready.is_read_closed() {
                        let _ = closed_tx.send(());
                        return;
                    }
                    // Readable with the unread body: no edge to wait for until the FIN.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            });
        }
    });
    (a, closed)
}

/// Sends the head of a 256 MiB upload, then its bytes for as long as the connection
/// takes them (bounded by the length); returns the reading half.
async fn upload_without_end(
    proxy: std::net::SocketAddr,
) -> (tokio::net::tcp::OwnedReadHalf, tokio::task::JoinHandle<()>) {
    let s = TcpStream::connect(proxy).await.unwrap();
    let (r, mut w) = s.into_split();
    let sending = tokio::spawn(async move {
        let head = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            256 << 20
        );
        if w.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let part = vec![b'u'; 64 << 10];
        for _ in 0..(256 << 20) / part.len() {
            if w.write_all(&part).await.is_err() {
                return;
            }
        }
    });
    (r, sending)
}

#[tokio::test]
async fn a_backend_that_stops_reading_an_upload_loses_its_connection() {
    for (answer, settings, status, why) in [
        // Given up on (504): at once, not when the backend gets round to it.
        (
            None,
            "[pools.p]\nresponse_timeout = \"200ms\"\nretries = 0\n",
            b"HTTP/1.1 504",
            "the backend connection outlived the 504",
        ),
        // Answered early: the rest of the upload goes on while it moves, then the
        // connection goes (within 1.5 times the idle timeout of it stopping).
        (
            Some(TOO_LARGE),
            "[server.limits]\nidle_timeout = \"300ms\"\n[pools.p]\n",
            b"HTTP/1.1 413",
            "the backend connection outlived an upload that stopped moving",
        ),
    ] {
        let (a, mut closed) = unread_upload_backend(answer).await;
        let proxy = TestProxy::start(&config(&format!("{settings}backends = [\"{a}\"]\n"))).await;
        let (mut r, sending) = upload_without_end(proxy.addr).await;
        let mut head = [0u8; 12];
        tokio::time::timeout(LIMIT, r.read_exact(&mut head))
            .await
            .expect("no answer")
            .unwrap();
        assert_eq!(&head, status);
        tokio::time::timeout(LIMIT, closed.recv()).await.expect(why);
        sending.abort();
    }
}

#[tokio::test]
async fn a_chunked_upload_with_trailers_keeps_both_connections() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..3 {
        s.write_all(
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
        )
        .await
        .unwrap();
        let got = tokio::time::timeout(LIMIT, read_head(&mut s))
            .await
            .expect("no answer")
            .expect("closed");
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .expect("a length")
            .trim()
            .parse()
            .unwrap();
        let mut body = vec![0u8; length - (got.len() - end)];
        s.read_exact(&mut body).await.unwrap();
    }
    let rt = proxy.runtime.load();
    assert_eq!(rt.pools[0].members[0].backend.pool.connections_opened(), 1);
}

#[tokio::test]
async fn request_headers_follow_the_rules() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let req = Request::get("/h?q=1")
        .header("host", "shop.example.com:8080")
        .header("connection", "keep-alive, x-drop-me")
        .header("x-drop-me", "secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-kept", "yes")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = fetch(proxy.addr, req).await;
    assert_eq!(got.status, 200);
    let seen = &got.json()["headers"];
    for gone in [
        "connection",
        "x-drop-me",
        "keep-alive",
        "proxy-connection",
        "te",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the backend: {seen}"
        );
    }
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(seen["host"], "shop.example.com:8080");
    assert_eq!(seen["x-forwarded-host"], "shop.example.com:8080");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(got.json()["query"], "q=1");
    let id = seen["x-request-id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(got.headers["x-request-id"], id);
}

#[tokio::test]
async fn request_id_is_propagated() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let req = Request::get("/")
        .header("host", "x")
        .header("x-request-id", "abc-123")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = fetch(proxy.addr, req).await;
    assert_eq!(got.json()["headers"]["x-request-id"], "abc-123");
    assert_eq!(got.headers["x-request-id"], "abc-123");
}

#[tokio::test]
async fn a_request_with_two_ids_reaches_the_backend_with_the_one_returned() {
    let a = backend(|req| async move {
        let ids: Vec<&str> = req
            .headers()
            .get_all("x-request-id")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        text(ids.join("|"))
    })
    .await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let req = Request::get("/")
        .header("host", "x")
        .header("x-request-id", "first-1")
        .header("x-request-id", "second-2")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = fetch(proxy.addr, req).await;
    assert_eq!(got.body, "first-1");
    assert_eq!(got.headers["x-request-id"], "first-1");
}

#[tokio::test]
async fn response_hop_by_hop_headers_are_removed() {
    let a = backend(|_| async {
        let mut r = text("ok");
        let h = r.headers_mut();
        h.insert("connection", "x-internal".parse().unwrap());
        h.insert("x-internal", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-public", "1".parse().unwrap());
        r
    })
    .await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.status, 200);
    assert!(got.headers.get("x-internal").is_none());
    assert!(got.headers.get("keep-alive").is_none());
    assert_eq!(got.headers["x-public"], "1");
}

#[tokio::test]
async fn unreachable_backend_is_502_and_dead_pool_is_503() {
    let (d1, d2, d3) = (dead_addr().await, dead_addr().await, dead_addr().await);
    let cfg = format!(
        "[[routes]]\npath_prefix = \"/one\"\npool = \"one\"\n[[routes]]\npool = \"all\"\n\
         [pools.one]\nretries = 0\nbackends = [\"{d1}\", \"{d2}\"]\n[pools.all]\nbackends = [\"{d1}\", \"{d2}\", \"{d3}\"]\n"
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let got = fetch(proxy.addr, get("/one")).await;
    assert_eq!(got.status, 502);
    let body = String::from_utf8_lossy(&got.body);
    assert!(body.starts_with("502"), "{body}");
    assert!(
        !body.contains("127.0.0.1"),
        "internal detail leaked: {body}"
    );
    assert_eq!(fetch(proxy.addr, get("/")).await.status, 503);
}

/// A backend that reads a request and answers `answer`, whatever was asked.
async fn canned_backend(answer: &'static [u8]) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(answer).await;
        }
    });
    a
}

#[tokio::test]
async fn an_http_1_0_backend_is_answered_for_in_http_1_1() {
    let a = canned_backend(b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nabcd").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    // Two requests on one connection: the proxy's version, and its keep-alive.
    let got = raw_exchange(
        proxy.addr,
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{got}");
    assert!(!got.contains("HTTP/1.0"), "{got}");
    // An HTTP/1.0 client is answered in HTTP/1.0.
    let got = raw_exchange(proxy.addr, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.0 200 OK\r\n"), "{got}");
    assert!(got.ends_with("abcd"), "{got}");
}

#[tokio::test]
async fn garbage_from_backend_is_502() {
    let a = canned_backend(b"this is not http\r\n\r\n").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    assert_eq!(fetch(proxy.addr, get("/")).await.status, 502);
}

#[tokio::test]
async fn a_response_with_both_framings_reaches_the_client_whole() {
    // Transfer-Encoding wins (RFC 9112 §6.3); its Content-Length must not reach the
    // client beside the re-framed body, where it would cut it short.
    let a = canned_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
    )
    .await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "hello world");
    assert!(
        got.headers.get("content-length").is_none_or(|v| v == "11"),
        "{:?}",
        got.headers
    );
}

#[tokio::test]
async fn slow_backend_is_504() {
    let a = backend(|_| async {
        std::future::pending::<()>().await;
        text("never")
    })
    .await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nresponse_timeout = \"200ms\"\nbackends = [\"{a}\"]\n"
    )))
    .await;
    let got = tokio::time::timeout(LIMIT, fetch(proxy.addr, get("/")))
        .await
        .expect("answered");
    assert_eq!(got.status, 504);
}

#[tokio::test]
async fn the_response_timeout_holds_on_a_reused_connection() {
    let a = backend(|req| async move {
        if req.uri().path() == "/slow" {
            std::future::pending::<()>().await;
        }
        text("ok")
    })
    .await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nresponse_timeout = \"1s\"\nbackends = [\"{a}\"]\n"
    )))
    .await;
    let mut client = Client::connect(proxy.addr).await;
    let opened = || {
        proxy.runtime.load().pools[0].members[0]
            .backend
            .pool
            .connections_opened()
    };
    // The connection's timer was set for each answered request, and was pushed on
    // rather than left to go off.
    for _ in 0..3 {
        assert_eq!(client.get("/").await.status, 200);
    }
    let got = tokio::time::timeout(LIMIT, client.get("/slow"))
        .await
        .expect("answered");
    assert_eq!(got.status, 504);
    // Once more, after the timer went off while the connection was idle in the pool:
    // set again, it bounds the next wait as before, and answered ones pass.
    assert_eq!(client.get("/").await.status, 200);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(client.get("/").await.status, 200);
    let got = tokio::time::timeout(LIMIT, client.get("/slow"))
        .await
        .expect("answered");
    assert_eq!(got.status, 504);
    // One connection until the first 504, which gave it up; one since.
    assert_eq!(opened(), 2);
}

#[tokio::test]
async fn dead_backend_costs_no_failed_request() {
    let dead = dead_addr().await;
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nbackends = [\"{dead}\", \"{a}\", \"{b}\"]\n"
    )))
    .await;
    let mut client = Client::connect(proxy.addr).await;
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..60 {
        let got = client.get("/").await;
        assert_eq!(got.status, 200);
        *seen.entry(got.backend()).or_default() += 1;
    }
    assert_eq!(seen.len(), 2);
}

#[tokio::test]
async fn keep_alive_connections_to_backends_are_reused() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..50 {
        assert_eq!(client.get("/").await.status, 200);
    }
    let rt = proxy.runtime.load();
    let backend = &rt.pools[0].members[0].backend;
    assert_eq!(backend.pool.connections_opened(), 1);
    assert_eq!(backend.requests(), 50);
}

const BIG: u64 = 80 * 1024 * 1024;
const CHUNK: usize = 64 * 1024;

fn chunks(
    total: u64,
) -> impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, std::io::Error>> {
    let chunk = Bytes::from(vec![7u8; CHUNK]);
    futures_util::stream::iter(
        (0..total / CHUNK as u64).map(move |_| Ok(http_body::Frame::data(chunk.clone()))),
    )
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let a = backend(|req| async move {
        if req.uri().path() == "/download" {
            let body = StreamBody::new(chunks(BIG));
            let body = http_body_util::BodyExt::boxed(body);
            let collected = body.collect().await.unwrap().to_bytes();
            return text(collected);
        }
        let mut body = req.into_body();
        let mut n = 0u64;
        while let Some(f) = body.frame().await {
            n += f.unwrap().data_ref().map_or(0, |d| d.len() as u64);
        }
        text(n.to_string())
    })
    .await;
    let proxy = TestProxy::start(&single_pool(a)).await;

    // Upload: streamed from the client without a length, counted by the backend.
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/upload")
        .header("host", "x")
        .body(StreamBody::new(chunks(BIG)))
        .unwrap();
    let resp = tx.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, BIG.to_string().as_bytes());

    // Download: counted frame by frame on the client.
    let mut client = Client::connect(proxy.addr).await;
    let got = client.get("/download").await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body.len() as u64, BIG);
}

#[tokio::test]
async fn a_body_reaches_the_client_byte_for_byte_over_both_protocols() {
    // Frames from the backend larger than the parts the proxy hands on, and one that
    // is not a multiple of them: each is split and must arrive whole and in order.
    let pattern: Bytes = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let body = pattern.clone();
    let a = backend(move |_| {
        let body = body.clone();
        async move { text(body) }
    })
    .await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.status, 200);
    assert!(got.body == pattern, "HTTP/1.1: {} bytes", got.body.len());
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let req = Request::get(format!("http://a.example:{}/", proxy.addr.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(body == pattern, "HTTP/2: {} bytes", body.len());
}

/// A WebSocket echo backend.
async fn ws_echo_backend() -> std::net::SocketAddr {
    use futures_util::{SinkExt, StreamExt};

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    a
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(addr: std::net::SocketAddr) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(format!("ws://{addr}/chat"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 101);
    ws
}

/// Sends `text` and expects it back.
async fn ws_echo(ws: &mut Ws, text: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    ws.send(Message::text(text)).await.unwrap();
    let m = tokio::time::timeout(LIMIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(m.into_text().unwrap().as_str(), text);
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    let a = ws_echo_backend().await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let mut ws = ws_connect(proxy.addr).await;
    for i in 0..10 {
        ws_echo(&mut ws, &format!("hello {i}")).await;
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_websocket_is_logged_when_its_tunnel_closes() {
    let a = ws_echo_backend().await;
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\naccess_log = \"json\"\n\
         [pools.ws]\nbackends = [{{ address = \"{a}\", id = \"ws-1\" }}]\n"
    );
    let (proxy, mut lines) = TestProxy::start_logging(&toml).await;
    let mut ws = ws_connect(proxy.addr).await;
    let upgraded = std::time::Instant::now();
    for i in 0..3 {
        ws_echo(&mut ws, &format!("hello {i}")).await;
    }
    ws.close(None).await.unwrap();
    drop(ws);
    let open_for = upgraded.elapsed().as_secs_f64();
    let line = tokio::time::timeout(LIMIT, lines.recv())
        .await
        .expect("an access log line")
        .expect("the proxy is running");
    let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(v["status"], 101, "{v}");
    assert_eq!(v["path"], "/chat", "{v}");
    assert_eq!(v["backend"], "ws-1", "{v}");
    // What went to the client through the tunnel: three echoed frames of 9 bytes (a
    // 2-byte header and 7 bytes of text), and the backend's close frame.
    assert!(v["bytes"].as_u64().unwrap() >= 27, "{v}");
    // The line came once the tunnel closed, not with the 101: its total runs on from
    // the 101 for at least as long as this client held the tunnel open after getting it.
    let after_101 = v["total_seconds"].as_f64().unwrap() - v["upstream_seconds"].as_f64().unwrap();
    assert!(
        after_101 >= open_for,
        "{after_101} s after the 101, open {open_for} s: {v}"
    );
}

#[tokio::test]
async fn an_upgrade_whose_client_left_before_its_101_is_logged_as_499() {
    // Answers 101 only once the client has gone.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let asked = Arc::new(Notify::new());
    let gone = Arc::new(Notify::new());
    {
        let (asked, gone) = (asked.clone(), gone.clone());
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let Some(mut head) = read_head(&mut s).await else {
                return;
            };
            asked.notify_one();
            gone.notified().await;
            let _ = s
                .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n")
                .await;
            let _ = s.read_to_end(&mut head).await;
        });
    }
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\naccess_log = \"json\"\n\
         [pools.ws]\nbackends = [{{ address = \"{a}\", id = \"ws-1\" }}]\n"
    );
    let (proxy, mut lines) = TestProxy::start_logging(&toml).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    tokio::time::timeout(LIMIT, asked.notified())
        .await
        .expect("the request reached the backend");
    // Closed with a reset, so that the 101 cannot be written to it.
    s.set_zero_linger().unwrap();
    drop(s);
    gone.notify_one();
    let line = tokio::time::timeout(LIMIT, lines.recv())
        .await
        .expect("an access log line")
        .expect("the proxy is running");
    let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(v["status"], 499, "{v}");
    assert_eq!(v["backend"], "ws-1", "{v}");
}

#[tokio::test]
async fn a_websocket_tunnel_keeps_its_connection_slot() {
    let (a, web) = (ws_echo_backend().await, named_backend("web").await);
    let proxy = TestProxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[server.limits]\nmax_connections = 1\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\npath_prefix = \"/chat\"\npool = \"ws\"\n[[routes]]\npool = \"web\"\n\
         [pools.ws]\nbackends = [\"{a}\"]\n[pools.web]\nbackends = [\"{web}\"]\n"
    ))
    .await;
    let mut ws = ws_connect(proxy.addr).await;
    ws_echo(&mut ws, "one").await;
    // The tunnel is the one connection allowed: another client waits for its slot.
    let addr = proxy.addr;
    let mut waiting = tokio::spawn(async move { fetch(addr, get("/")).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "a second connection was served while the tunnel held the only slot"
    );
    ws_echo(&mut ws, "two").await;
    ws.close(None).await.unwrap();
    drop(ws);
    let got = tokio::time::timeout(LIMIT, waiting)
        .await
        .expect("served once the tunnel closed")
        .unwrap();
    assert_eq!(got.status, 200);
}

#[tokio::test]
async fn a_websocket_tunnel_holds_its_backend_connection_under_the_limit() {
    let a = ws_echo_backend().await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nbackends = [{{ address = \"{a}\", id = \"a\" }}]\n\
         max_connections_per_backend = 1\nconnect_timeout = \"300ms\"\n"
    )))
    .await;
    let open = |s: serde_json::Value| s["pools"][0]["backends"][0]["open_connections"].clone();
    let mut ws = ws_connect(proxy.addr).await;
    ws_echo(&mut ws, "one").await;
    assert_eq!(open(status(&proxy).await), 1);
    // The tunnel is the backend's one connection: a second upgrade finds no room.
    match tokio_tungstenite::connect_async(format!("ws://{}/chat", proxy.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!("expected a 503, got {other:?}"),
    }
    ws_echo(&mut ws, "two").await;
    ws.close(None).await.unwrap();
    drop(ws);
    // Once the tunnel has closed, its connection is no longer counted.
    let start = std::time::Instant::now();
    while open(status(&proxy).await) != 0 {
        assert!(
            start.elapsed() < LIMIT,
            "the tunnel's connection stayed counted"
        );
        tokio::task::yield_now().await;
    }
    let mut ws = ws_connect(proxy.addr).await;
    ws_echo(&mut ws, "three").await;
}

#[tokio::test]
async fn shutdown_closes_tunnels_when_the_grace_period_is_over() {
    use futures_util::StreamExt;

    let a = ws_echo_backend().await;
    let mut proxy = TestProxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[pools.p]\nbackends = [\"{a}\"]\n"
    ))
    .await;
    let mut ws = ws_connect(proxy.addr).await;
    let started = std::time::Instant::now();
    let stopped = proxy.shutdown();
    // Within the grace period the tunnel goes on, and the admin listener takes new
    // connections: `/readyz` turns to 503.
    ws_echo(&mut ws, "still here").await;
    let admin = proxy.admin.unwrap();
    tokio::time::timeout(LIMIT, async {
        loop {
            let mut s = TcpStream::connect(admin)
                .await
                .expect("the admin listener closed during the grace period");
            s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            if got.starts_with(b"HTTP/1.1 503") {
                break;
            }
            assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
        }
    })
    .await
    .expect("/readyz never turned to 503");
    let status = fetch(admin, get("/metrics")).await.status;
    assert_eq!(status, 200);
    tokio::time::timeout(LIMIT, stopped)
        .await
        .expect("the proxy stopped once the grace period was over")
        .unwrap();
    // The open tunnel held the shutdown for the whole grace period.
    assert!(started.elapsed() >= Duration::from_millis(900));
    let end = tokio::time::timeout(LIMIT, ws.next())
        .await
        .expect("the tunnel was closed");
    assert!(!matches!(&end, Some(Ok(m)) if m.is_text()), "{end:?}");
}

#[tokio::test]
async fn shutdown_closes_connections_still_busy_when_the_grace_period_is_over() {
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let a = holding_backend("a", held_tx, Arc::new(Notify::new())).await;
    let mut proxy = TestProxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"200ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[pools.p]\nbackends = [\"{a}\"]\n"
    ))
    .await;
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client
        .write_all(b"GET /hold HTTP/1.1\r\nHost: test.local\r\n\r\n")
        .await
        .unwrap();
    held_rx.recv().await.unwrap();
    let stopped = proxy.shutdown();
    tokio::time::timeout(LIMIT, stopped)
        .await
        .expect("the proxy stopped once the grace period was over")
        .unwrap();
    // The held request's connection was closed without an answer.
    let mut buf = Vec::new();
    let n = tokio::time::timeout(LIMIT, client.read_to_end(&mut buf))
        .await
        .expect("the connection was closed");
    assert!(
        n.is_err() || buf.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, and the task driving it.
async fn h2_connect<B>(
    addr: std::net::SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<Result<(), hyper::Error>>,
)
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = TcpStream::connect(addr).await.unwrap();
    let (tx, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    (tx, tokio::spawn(conn))
}

#[tokio::test]
async fn shutdown_closes_idle_connections_without_waiting_out_the_grace_period() {
    let a = named_backend("a").await;
    // No timer of the proxy's own could close these connections within the test.
    let mut proxy = TestProxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1h\"\n\
         [server.limits]\nidle_timeout = \"1h\"\nheader_read_timeout = \"1h\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[pools.p]\nbackends = [\"{a}\"]\n"
    ))
    .await;
    // Connections that sent nothing yet, or part of the HTTP/2 preface. Connections are
    // accepted in order, so the requests below are answered only after these were taken.
    let silent = TcpStream::connect(proxy.addr).await.unwrap();
    let mut partial = TcpStream::connect(proxy.addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // An HTTP/1.1 keep-alive connection and an HTTP/2 one, each idle after a request.
    let (mut h1, h1_conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(
        TcpStream::connect(proxy.addr).await.unwrap(),
    ))
    .await
    .unwrap();
    let h1_conn = tokio::spawn(h1_conn);
    let (mut h2, h2_conn) = h2_connect(proxy.addr).await;
    for version in [http::Version::HTTP_11, http::Version::HTTP_2] {
        let authority = format!("x:{}", proxy.addr.port());
        let req = Request::get(format!("http://{authority}/"))
            .header("host", &authority)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = match version {
            http::Version::HTTP_11 => h1.send_request(req).await.unwrap(),
            _ => h2.send_request(req).await.unwrap(),
        };
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }

    tokio::time::timeout(LIMIT, proxy.shutdown())
        .await
        .expect("the proxy stopped without waiting out the grace period")
        .unwrap();
    for mut s in [silent, partial] {
        let mut rest = Vec::new();
        let end = tokio::time::timeout(LIMIT, s.read_to_end(&mut rest))
            .await
            .expect("the connection was closed");
        assert!(end.is_err() || rest.is_empty(), "{end:?} {rest:?}");
    }
    for (conn, what) in [(h1_conn, "HTTP/1.1"), (h2_conn, "HTTP/2")] {
        tokio::time::timeout(LIMIT, conn)
            .await
            .unwrap_or_else(|_| panic!("the {what} connection was closed"))
            .unwrap()
            .unwrap_or_else(|e| panic!("the {what} connection closed cleanly: {e}"));
    }
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let (mut tx, _conn) = h2_connect(proxy.addr).await;
    for _ in 0..3 {
        let req = Request::get(format!("http://h2.example.com:{}/two", proxy.addr.port()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tx.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let doc: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["path"], "/two");
        assert_eq!(
            doc["headers"]["host"],
            format!("h2.example.com:{}", proxy.addr.port())
        );
    }
}

#[tokio::test]
async fn slow_header_sender_is_cut_off() {
    let (a, hits) = counting_backend().await;
    let cfg = format!(
        "[server.limits]\nheader_read_timeout = \"300ms\"\n[pools.p]\nbackends = [\"{a}\"]\n"
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let got = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: x\r\nX-Half: ").await;
    assert!(!got.contains("200 OK"), "{got}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let a = named_backend("a").await;
    let cfg = format!("[server.limits]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"1h\"\n[pools.p]\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut rest))
        .await
        .expect("idle connection stayed open")
        .ok();
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let a = named_backend("a").await;
    let cfg =
        format!("[server.limits]\nmax_header_bytes = 8192\n[pools.p]\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let big = "a".repeat(16 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let got = raw_exchange(proxy.addr, request.as_bytes()).await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
}

#[tokio::test]
async fn requests_of_more_than_100_fields_get_431_over_either_protocol() {
    let (a, hits) = counting_backend().await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let fields = |n: usize| (0..n).map(|i| format!("x-f{i}: v\r\n")).collect::<String>();
    // HTTP/1.1: hyper's parser takes 100 fields, Host among them.
    let got = raw_exchange(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{}\r\n", fields(100)).as_bytes(),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 431"), "{got}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let got = raw_exchange(
        proxy.addr,
        format!(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{}\r\n",
            fields(98)
        )
        .as_bytes(),
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    hits.store(0, Ordering::SeqCst);
    // HTTP/2: the same count, once the cookie crumbs are joined into one field.
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let request = |fields: usize, crumbs: usize| {
        let mut req = Request::get("http://a.example/");
        for i in 0..fields {
            req = req.header(format!("x-f{i}"), "v");
        }
        for i in 0..crumbs {
            req = req.header("cookie", format!("c{i}=v"));
        }
        req.body(Full::new(Bytes::new())).unwrap()
    };
    // 100 fields and `host` from `:authority`.
    let status = h2.send_request(request(100, 0)).await.unwrap().status();
    assert_eq!(status, 431);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    // 100 pass (99 and `host`), and so do 300 crumbs of one cookie.
    let status = h2.send_request(request(99, 0)).await.unwrap().status();
    assert_eq!(status, 200);
    let status = h2.send_request(request(98, 300)).await.unwrap().status();
    assert_eq!(status, 200);
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn malformed_request_gets_400_and_never_reaches_a_backend() {
    let (a, hits) = counting_backend().await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"[..],
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
        b"NOT A REQUEST\r\n\r\n",
    ] {
        let got = raw_exchange(proxy.addr, bad).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn graceful_shutdown_lets_a_slow_request_finish() {
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let a = holding_backend("a", held_tx, release.clone()).await;
    let mut proxy = TestProxy::start(&single_pool(a)).await;
    let addr = proxy.addr;
    let slow = tokio::spawn(async move { fetch(addr, get("/hold")).await });
    held_rx.recv().await.unwrap();
    let stopped = proxy.shutdown();
    // New connections are refused once the listener is gone; in-flight work goes on.
    release.notify_waiters();
    let got = tokio::time::timeout(LIMIT, slow).await.unwrap().unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "a");
    tokio::time::timeout(LIMIT, stopped)
        .await
        .expect("proxy stopped")
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn keep_alive_wait_is_governed_by_idle_timeout_not_header_timeout() {
    let a = named_backend("a").await;
    let cfg = format!("[server.limits]\nidle_timeout = \"1h\"\nheader_read_timeout = \"200ms\"\n[pools.p]\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let mut client = Client::connect(proxy.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    // The connection waits between requests longer than the header timeout: what is
    // under test is the passing of time itself.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(client.get("/").await.status, 200);
}

#[tokio::test]
async fn slow_second_request_on_a_keep_alive_connection_is_cut_off() {
    let a = named_backend("a").await;
    let cfg = format!("[server.limits]\nidle_timeout = \"1h\"\nheader_read_timeout = \"300ms\"\n[pools.p]\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 65536];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    s.write_all(b"GET /second HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut rest))
        .await
        .expect("slow head was not cut off")
        .ok();
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn requests_without_one_valid_host_get_400_and_never_reach_a_backend() {
    let (a, hits) = counting_backend().await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    for bad in [
        // Two fields: the backend might read another one than routing did.
        &b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"[..],
        // HTTP/1.1 requires the field.
        b"GET / HTTP/1.1\r\n\r\n",
        // Not `host [":" port]`.
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: user@a.example\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example/admin\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.example:80x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
        b"GET http://user@a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
        // Authority form is CONNECT's; elsewhere it would name the host instead of Host.
        b"GET b.example:80 HTTP/1.1\r\nHost: a.example\r\n\r\n",
        // Asterisk form is OPTIONS's.
        b"GET * HTTP/1.1\r\nHost: a.example\r\n\r\n",
        // A target in absolute form does not stand in for the field.
        b"GET http://a.example/ HTTP/1.1\r\n\r\n",
        // Not a scheme served here.
        b"GET ftp://a.example/ HTTP/1.1\r\nHost: a.example\r\n\r\n",
    ] {
        let got = raw_exchange(proxy.addr, bad).await;
        assert!(
            got.starts_with("HTTP/1.1 400"),
            "{}: {got}",
            String::from_utf8_lossy(bad)
        );
    }
    // HTTP/2: a Host field that names another host than `:authority`.
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let req = Request::get("http://a.example/")
        .header("host", "b.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 400);
    // HTTP/2: a field value with whitespace around it, which a backend would trim.
    let req = Request::get("http://a.example/")
        .header("x-padded", " a ")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 400);
    // HTTP/2: a `:scheme` other than http or https.
    let req = Request::get("ftp://a.example/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 400);
    // HTTP/2: `:path` `*` with another method than OPTIONS.
    let uri = asterisk_target();
    let req = Request::get(uri).body(Full::new(Bytes::new())).unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 400);
    // HTTP/2 with neither `:authority` nor `Host` (hyper's client cannot send that):
    // HPACK's static :method GET, :scheme http, :path /. The answer's head begins with
    // the static table's `:status 400`.
    let mut s = raw_h2_connect(proxy.addr).await;
    raw_h2_request(&mut s, &[0x82, 0x86, 0x84]).await;
    let (_, head) = frames_until(&mut s, 1).await;
    assert_eq!(head.first(), Some(&(0x80 | 12)), "{head:?}");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn connect_is_405_and_never_reaches_a_backend() {
    let (a, hits) = counting_backend().await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let got = raw_exchange(
        proxy.addr,
        b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 405"), "{got}");
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let req = Request::connect("a.example:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 405);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_host_routing_reads_is_the_host_the_backend_reads() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let cfg = format!(
        "[[routes]]\nhost = \"b.example\"\npool = \"b\"\n[[routes]]\npool = \"a\"\n\
         [pools.a]\nbackends = [\"{a}\"]\n[pools.b]\nbackends = [\"{b}\"]\n"
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let seen = |got: &str| -> serde_json::Value {
        let body = &got[got.find("\r\n\r\n").expect("a head") + 4..];
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {got}"))
    };
    // An absolute-form target's authority overrides Host (RFC 9112 §3.2.2).
    let got = raw_exchange(
        proxy.addr,
        b"GET http://b.example/p?q HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    let json = seen(&got);
    assert_eq!(json["backend"], "b", "{got}");
    assert_eq!(json["path"], "/p");
    assert_eq!(json["headers"]["host"], "b.example");
    assert_eq!(json["headers"]["x-forwarded-host"], "b.example");
    // HTTP/1.0 may leave Host out; the backend, spoken to in HTTP/1.1, gets it empty.
    let got = raw_exchange(proxy.addr, b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(
        got.starts_with("HTTP/1.0 200") || got.starts_with("HTTP/1.1 200"),
        "{got}"
    );
    let json = seen(&got);
    assert_eq!(json["backend"], "a", "{got}");
    assert_eq!(json["headers"]["host"], "");
    assert!(json["headers"].get("x-forwarded-host").is_none(), "{got}");
    // Nor does a client's own X-Forwarded-Host pass for the proxy's, with Host left out
    // or empty.
    for req in [
        &b"GET / HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost:\r\nX-Forwarded-Host: evil.example\r\nConnection: close\r\n\r\n",
    ] {
        let got = raw_exchange(proxy.addr, req).await;
        let json = seen(&got);
        assert_eq!(json["headers"]["host"], "", "{got}");
        assert!(json["headers"].get("x-forwarded-host").is_none(), "{got}");
    }
    // Hosts of every valid shape pass, as written.
    for host in [
        "[::1]:8080",
        "127.0.0.1",
        "B.Example",
        "a_b.example:443",
        "xn--bcher-kva.example.",
    ] {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let got = raw_exchange(proxy.addr, req.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 200"), "{host}: {got}");
        assert_eq!(seen(&got)["headers"]["host"], host);
    }
}

/// A round-robin pool of the resetting backend and a good one, with no outlier ejection,
/// so that round robin alternates between them; `extra` adds pool keys.
fn reset_pool(reset: std::net::SocketAddr, good: std::net::SocketAddr, extra: &str) -> String {
    config(&format!(
        "[pools.p]\n{extra}backends = [\"{reset}\", \"{good}\"]\n[pools.p.outlier]\nconsecutive_failures = 0\n"
    ))
}

fn request(method: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/")
        .header("host", "test.local")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// A backend that answers "ok N" (N the body's length) and keeps each connection open
/// until told to close it: every message on `close` makes each open connection close
/// once it is idle, and each one that closed says so on `closed`. `conns` counts the
/// connections accepted.
struct ClosingBackend {
    addr: std::net::SocketAddr,
    close: tokio::sync::broadcast::Sender<()>,
    closed: mpsc::UnboundedReceiver<()>,
    conns: Arc<std::sync::atomic::AtomicUsize>,
}

async fn closing_backend() -> ClosingBackend {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (close, _) = tokio::sync::broadcast::channel(16);
    let (closed_tx, closed) = mpsc::unbounded_channel();
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (c, n) = (close.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            let mut close = c.subscribe();
            let closed = closed_tx.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async {
                    let body = req.into_body().collect().await?.to_bytes();
                    Ok::<_, hyper::Error>(text(format!("ok {}", body.len())))
                });
                {
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = close.recv() => {
                            // Idle: closed (FIN sent) before the future ends.
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.as_mut().await;
                        }
                    }
                }
                let _ = closed.send(());
            });
        }
    });
    ClosingBackend {
        addr,
        close,
        closed,
        conns,
    }
}

#[tokio::test]
async fn a_backend_closing_idle_keep_alive_connections_fails_no_request() {
    let mut backend = closing_backend().await;
    // No retries: a pooled connection that the backend closed is dropped when it is
    // checked out, so every request, body and all, goes on a new connection without
    // counting as a retry. (The narrower race, a close still in flight when the request
    // is handed to the connection, is the next test's.)
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nretries = 0\nbackends = [\"{}\"]\n",
        backend.addr
    )))
    .await;
    let mut client = Client::connect(proxy.addr).await;
    for i in 0..20 {
        let (method, body) = if i % 2 == 0 {
            ("GET", "")
        } else {
            ("POST", "a body")
        };
        let got = client.send(request(method, body)).await;
        assert_eq!(got.status, 200, "request {i}");
        assert_eq!(got.body, format!("ok {}", body.len()), "request {i}");
        // The backend closes the connection the proxy just put back in its pool.
        let rt = proxy.runtime.load();
        assert_eq!(
            rt.pools[0].members[0].backend.pool.idle_count(),
            1,
            "request {i}"
        );
        backend.close.send(()).unwrap();
        tokio::time::timeout(LIMIT, backend.closed.recv())
            .await
            .expect("the backend closed its connection")
            .unwrap();
    }
    assert_eq!(backend.conns.load(Ordering::SeqCst), 20);
    let rt = proxy.runtime.load();
    assert_eq!(rt.pools[0].members[0].backend.stats.resets(), 0);
}

/// A [`ClosingBackend`] on a thread and runtime of its own, so that it can close a
/// connection while the test's runtime, and the proxy on it, stands still. `closed`
/// reports on a channel the test can block on. The thread ends when this is dropped.
struct DetachedClosingBackend {
    addr: std::net::SocketAddr,
    close: tokio::sync::broadcast::Sender<()>,
    closed: std::sync::mpsc::Receiver<()>,
    conns: Arc<std::sync::atomic::AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn detached_closing_backend() -> DetachedClosingBackend {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut backend = closing_backend().await;
            let (closed_tx, closed) = std::sync::mpsc::channel();
            let _ = ready_tx.send((backend.addr, backend.close.clone(), closed, backend.conns));
            let relay = async {
                while backend.closed.recv().await.is_some() {
                    let _ = closed_tx.send(());
                }
            };
            tokio::select! {
                _ = relay => {}
                _ = stopped => {}
            }
        });
    });
    let (addr, close, closed, conns) = ready.recv_timeout(LIMIT).expect("the backend started");
    DetachedClosingBackend {
        addr,
        close,
        closed,
        conns,
        _stop: stop,
    }
}

/// Reads one response with a `Content-Length` body from `s`, leaving the connection
/// open.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .expect("a Content-Length");
            if buf.len() >= end + 4 + len {
                return String::from_utf8(buf).unwrap();
            }
        }
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(LIMIT, s.read(&mut chunk))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Everything logged through `tracing` on this thread while the guard lives, as text.
#[derive(Clone, Default)]
struct Logged(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logged {
    type Writer = Logged;

    fn make_writer(&'a self) -> Logged {
        self.clone()
    }
}

impl Logged {
    fn capture() -> (Logged, tracing::subscriber::DefaultGuard) {
        let logged = Logged::default();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(logged.clone())
            .finish();
        (logged, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// One IPv4 TCP socket as `/proc/net/tcp` shows it.
struct TcpRow {
    local: std::net::SocketAddr,
    remote: std::net::SocketAddr,
    /// The kernel's state number (`TCP_CLOSE_WAIT` is 8).
    state: u8,
    /// Bytes received and not yet read.
    rx_queue: u64,
}

/// The IPv4 TCP sockets of this network namespace. Addresses are printed as the
/// in-memory bytes of the network-order address, hence `to_ne_bytes`.
fn tcp_table() -> Vec<TcpRow> {
    fn addr(field: &str) -> Option<std::net::SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?.to_ne_bytes();
        Some((ip, u16::from_str_radix(port, 16).ok()?).into())
    }
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (_, rx) = f.get(4)?.split_once(':')?;
            Some(TcpRow {
                local: addr(f.get(1)?)?,
                remote: addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                rx_queue: u64::from_str_radix(rx, 16).ok()?,
            })
        })
        .collect()
}

/// Blocks this thread (and a current-thread runtime on it) until the kernel shows a
/// socket for which `want` holds; a failure, not a hang, after [`LIMIT`].
fn wait_for_socket(what: &str, want: impl Fn(&TcpRow) -> bool) {
    let deadline = std::time::Instant::now() + LIMIT;
    while !tcp_table().iter().any(&want) {
        assert!(std::time::Instant::now() < deadline, "never saw {what}");
        std::thread::yield_now();
    }
}

const TCP_CLOSE_WAIT: u8 = 8;

// The proxy runs on this test's one thread, so that holding the thread holds the proxy.
#[tokio::test(flavor = "current_thread")]
async fn a_request_handed_to_a_connection_closing_at_that_moment_goes_on_a_new_one() {
    let (logged, _logging) = Logged::capture();
    let backend = detached_closing_backend();
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nretries = 0\nbackends = [\"{}\"]\n",
        backend.addr
    )))
    .await;
    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: test.local\r\n\r\n";
    let mut client = TcpStream::connect(proxy.addr).await.unwrap();
    client.write_all(GET).await.unwrap();
    let first = read_response(&mut client).await;
    assert!(
        first.starts_with("HTTP/1.1 200") && first.ends_with("ok 0"),
        "{first}"
    );
    let rt = proxy.runtime.load();
    let backend_state = &rt.pools[0].members[0].backend;
    assert_eq!(backend_state.pool.idle_count(), 1);

    // Until the next await, nothing on this runtime runs, the proxy included. The next
    // request reaches the proxy's socket first, then the end of the pooled connection
    // reaches its socket (the kernel's socket table shows each has arrived before the
    // next step). When the runtime goes on, it wakes the two in that order: the request
    // is handed to the connection before the connection's task has seen its end, and
    // hyper hands the request back unsent. It goes on a new connection, although
    // `retries = 0`; had it been written first, it would have failed (502).
    let client_addr = client.local_addr().unwrap();
    assert_eq!(client.try_write(GET).unwrap(), GET.len());
    wait_for_socket("the request queued at the proxy", |s| {
        s.local == proxy.addr && s.remote == client_addr && s.rx_queue == GET.len() as u64
    });
    backend.close.send(()).unwrap();
    backend
        .closed
        .recv_timeout(LIMIT)
        .expect("the backend closed its connection");
    wait_for_socket("the proxy's end of the pooled connection closed", |s| {
        s.remote == backend.addr && s.state == TCP_CLOSE_WAIT
    });

    let second = read_response(&mut client).await;
    assert!(
        second.starts_with("HTTP/1.1 200") && second.ends_with("ok 0"),
        "{second}"
    );
    assert_eq!(backend.conns.load(Ordering::SeqCst), 2);
    assert_eq!(backend_state.pool.connections_opened(), 2);
    assert_eq!(backend_state.stats.resets(), 0);
    // Handed back unsent, rather than the closed connection left out at checkout.
    let logged = logged.text();
    assert!(
        logged.contains("stale keep-alive connection, reconnecting"),
        "{logged}"
    );
}

#[tokio::test]
async fn idempotent_bodyless_request_moves_on_after_a_reset() {
    let (reset, resets) = resetting_backend().await;
    let (good, served) = counting_backend().await;
    let proxy = TestProxy::start(&reset_pool(reset, good, "")).await;
    let mut client = Client::connect(proxy.addr).await;
    for method in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
        for _ in 0..4 {
            let got = client.send(request(method, "")).await;
            assert_eq!(got.status, 200, "{method}");
        }
    }
    assert_eq!(served.load(Ordering::SeqCst), 24);
    // Round robin offered the resetting backend first for every other request.
    let resets = resets.load(Ordering::SeqCst);
    assert!(resets >= 12, "{resets}");
    let rt = proxy.runtime.load();
    let stats = &rt.pools[0].members[0].backend.stats;
    assert_eq!(stats.resets(), resets as u64);
}

#[tokio::test]
async fn a_request_retried_after_a_reset_arrives_whole() {
    let (reset, resets) = resetting_backend().await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let good = backend(move |req| {
        let fields: Vec<(String, Vec<u8>)> = req
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        let _ = seen_tx.send((req.method().clone(), req.uri().to_string(), fields));
        async { text("ok") }
    })
    .await;
    let proxy = TestProxy::start(&reset_pool(reset, good, "")).await;
    let mut client = Client::connect(proxy.addr).await;
    let long = "v".repeat(300);
    // Round robin offers the resetting backend first to one of the two.
    for _ in 0..2 {
        let req = Request::builder()
            .method("DELETE")
            .uri("/items/7?force=yes")
            .header("host", "test.local")
            .header("x-repeated", "one")
            .header("x-repeated", "two")
            .header("x-latin", &b"caf\xe9"[..])
            .header("x-long", long.as_str())
            .header("x-request-id", "retry-me")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(client.send(req).await.status, 200);
    }
    assert_eq!(resets.load(Ordering::SeqCst), 1);
    let mut all_fields = Vec::new();
    for _ in 0..2 {
        let (method, uri, fields) = seen.recv().await.unwrap();
        all_fields.push(fields.clone());
        assert_eq!(
            (method.as_str(), uri.as_str()),
            ("DELETE", "/items/7?force=yes")
        );
        let values = |name: &str| {
            fields
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_slice())
                .collect::<Vec<_>>()
        };
        assert_eq!(values("x-repeated"), [b"one".as_slice(), b"two"]);
        assert_eq!(values("x-latin"), [b"caf\xe9".as_slice()]);
        assert_eq!(values("x-long"), [long.as_bytes()]);
        assert_eq!(values("x-request-id"), [b"retry-me".as_slice()]);
        assert_eq!(values("host"), [b"test.local".as_slice()]);
        assert_eq!(values("x-forwarded-for"), [b"127.0.0.1".as_slice()]);
    }
    // The retried request and the one sent straight: the same fields, in the same order.
    assert_eq!(all_fields[0], all_fields[1]);
}

/// A backend that answers the first request on each connection and, on reading the
/// second head, writes `partial` (perhaps nothing) and closes the connection; it sends
/// what it read of each head on `heads`. With `once`, it takes one connection only,
/// then stops listening.
async fn second_request_resetting_backend(
    heads: mpsc::UnboundedSender<String>,
    partial: &'static [u8],
    once: bool,
) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let heads = heads.clone();
            let conn = tokio::spawn(async move {
                for answer in [true, false] {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut byte).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => head.push(byte[0]),
                        }
                    }
                    let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
                    if !answer {
                        let _ = s.write_all(partial).await;
                        return;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
            if once {
                drop(l);
                let _ = conn.await;
                return;
            }
        }
    });
    a
}

#[tokio::test]
async fn a_websocket_upgrade_reset_by_one_backend_is_upgraded_by_the_next() {
    let (reset, resets) = resetting_backend().await;
    let good = ws_echo_backend().await;
    let proxy = TestProxy::start(&reset_pool(reset, good, "")).await;
    // Round robin offers the resetting backend first to one of the two.
    for i in 0..2 {
        let mut ws = ws_connect(proxy.addr).await;
        ws_echo(&mut ws, &format!("hello {i}")).await;
        ws.close(None).await.unwrap();
    }
    assert_eq!(resets.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_reset_on_a_reused_connection_resends_that_request_not_the_one_before() {
    let (heads_tx, mut heads) = mpsc::unbounded_channel();
    let flaky = second_request_resetting_backend(heads_tx, b"", false).await;
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let good = backend(move |req| {
        let n = req.headers().get("x-n").cloned();
        let _ = seen_tx.send((req.uri().to_string(), n));
        async { text("ok") }
    })
    .await;
    let proxy = TestProxy::start(&reset_pool(flaky, good, "")).await;
    let mut client = Client::connect(proxy.addr).await;
    // Round robin: 1 to the flaky backend (answered, its connection pooled), 2 to the
    // good one, 3 to the flaky one again on the same connection, which it closes; 3 is
    // then sent again to the flaky backend on a fresh connection, and answered there.
    for n in 1..=3 {
        let req = Request::builder()
            .uri(format!("/n/{n}"))
            .header("host", "test.local")
            .header("x-n", n.to_string())
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(client.send(req).await.status, 200, "request {n}");
    }
    let mut flaky_heads = Vec::new();
    for _ in 0..3 {
        flaky_heads.push(heads.recv().await.unwrap());
    }
    assert!(flaky_heads[0].starts_with("GET /n/1 "), "{flaky_heads:?}");
    assert!(flaky_heads[1].starts_with("GET /n/3 "), "{flaky_heads:?}");
    assert!(flaky_heads[2].starts_with("GET /n/3 "), "{flaky_heads:?}");
    assert!(flaky_heads[2].contains("x-n: 3\r\n"), "{flaky_heads:?}");
    let stats = &proxy.runtime.load().pools[0].members[0].backend.stats;
    assert_eq!(stats.resets(), 1);
    let (uri, n) = seen.recv().await.unwrap();
    assert_eq!(uri, "/n/2");
    assert_eq!(n.unwrap(), "2");
    assert!(seen.try_recv().is_err());
}

#[tokio::test]
async fn a_keep_alive_connection_closed_as_a_request_arrives_costs_no_safe_request() {
    // One backend, no retries: each of its connections takes one request and is closed
    // by the backend as the next arrives, as when its keep-alive timeout races a request.
    let (heads_tx, mut heads) = mpsc::unbounded_channel();
    let flaky = second_request_resetting_backend(heads_tx, b"", false).await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nretries = 0\nbackends = [\"{flaky}\"]\n"
    )))
    .await;
    let mut client = Client::connect(proxy.addr).await;
    for n in 1..=4 {
        let req = Request::get(format!("/n/{n}"))
            .header("host", "test.local")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(client.send(req).await.status, 200, "request {n}");
    }
    // 1 on the first connection; 2, 3 and 4 each on a pooled one, then again on a fresh one.
    let mut got = Vec::new();
    for _ in 0..7 {
        let head = heads.recv().await.unwrap();
        got.push(head.lines().next().unwrap_or_default().to_owned());
    }
    let want = [1, 2, 2, 3, 3, 4, 4].map(|n| format!("GET /n/{n} HTTP/1.1"));
    assert_eq!(got, want);
    // A request with a body could have been taken and acted on: it is not sent twice.
    let req = Request::post("/upload")
        .header("host", "test.local")
        .body(Full::new(Bytes::from_static(b"data")))
        .unwrap();
    assert_eq!(client.send(req).await.status, 502);
    assert!(heads.recv().await.unwrap().starts_with("POST /upload "));
    assert!(heads.try_recv().is_err());
}

#[tokio::test]
async fn a_backend_that_began_its_answer_does_not_get_the_request_again() {
    let (heads_tx, mut heads) = mpsc::unbounded_channel();
    let a =
        second_request_resetting_backend(heads_tx, b"HTTP/1.1 200 OK\r\ncontent-le", false).await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nretries = 0\nbackends = [\"{a}\"]\n"
    )))
    .await;
    let mut client = Client::connect(proxy.addr).await;
    assert_eq!(client.send(get("/n/1")).await.status, 200);
    // It had the request, and began to answer: it is not sent twice.
    assert_eq!(client.send(get("/n/2")).await.status, 502);
    for want in ["GET /n/1 ", "GET /n/2 "] {
        assert!(heads.recv().await.unwrap().starts_with(want));
    }
    assert!(heads.try_recv().is_err(), "sent twice");
}

#[tokio::test]
async fn a_resend_that_cannot_reconnect_goes_elsewhere_only_as_a_retry() {
    let (heads_tx, mut heads) = mpsc::unbounded_channel();
    // One connection, closed under the second request; then nothing listens.
    let flaky = second_request_resetting_backend(heads_tx, b"", true).await;
    let (good, served) = counting_backend().await;
    let proxy = TestProxy::start(&reset_pool(flaky, good, "retry_budget = 0.0\n")).await;
    let rt = proxy.runtime.load();
    let state = &rt.pools[0].state;
    while state.take_retry() {}
    let refused = state.retries_refused.load(Ordering::Relaxed);
    let mut client = Client::connect(proxy.addr).await;
    // 1 to the flaky backend, 2 to the good one, 3 to the flaky one on its pooled
    // connection, which closes; the new connection for it is refused, and with the
    // budget spent, it may not go to the good backend.
    for (n, want) in [(1, 200), (2, 200), (3, 502)] {
        assert_eq!(
            client.send(get(&format!("/n/{n}"))).await.status,
            want,
            "request {n}"
        );
    }
    for want in ["GET /n/1 ", "GET /n/3 "] {
        assert!(heads.recv().await.unwrap().starts_with(want));
    }
    assert_eq!(served.load(Ordering::SeqCst), 1);
    assert_eq!(state.retries_refused.load(Ordering::Relaxed), refused + 1);
}

#[tokio::test]
async fn reset_is_not_retried_for_bodies_unsafe_methods_or_without_retries() {
    let (reset, resets) = resetting_backend().await;
    let (good, served) = counting_backend().await;
    let proxy = TestProxy::start(&reset_pool(reset, good, "")).await;
    let mut failed = 0;
    for (method, body) in [
        ("POST", ""),
        ("POST", "data"),
        ("PUT", "data"),
        ("PATCH", ""),
    ] {
        for _ in 0..4 {
            let got = fetch(proxy.addr, request(method, body)).await;
            match got.status {
                200 => {}
                502 => failed += 1,
                s => panic!("{method} {body:?}: {s}"),
            }
        }
    }
    // Each request reached exactly one backend, and those reaching the resetting one
    // failed.
    assert_eq!(failed, resets.load(Ordering::SeqCst));
    assert_eq!(failed + served.load(Ordering::SeqCst), 16);
    assert!(failed >= 8, "{failed}");

    let proxy = TestProxy::start(&reset_pool(reset, good, "retries = 0\n")).await;
    let before = resets.load(Ordering::SeqCst);
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(fetch(proxy.addr, get("/")).await.status);
    }
    assert_eq!(
        codes.iter().filter(|&&c| c == 502).count(),
        resets.load(Ordering::SeqCst) - before
    );
    assert!(codes.contains(&502), "{codes:?}");
}

#[tokio::test]
async fn unrequested_101_is_502_and_counted_as_a_failure() {
    let a = canned_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: other\r\nConnection: upgrade\r\n\r\n",
    )
    .await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.status, 502);
    let rt = proxy.runtime.load();
    let stats = &rt.pools[0].members[0].backend.stats;
    assert_eq!((stats.responses(1), stats.responses(5)), (0, 1));
}

const WEBSOCKET_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test]
async fn response_heads_that_cannot_be_passed_on_are_502() {
    for (answer, request) in [
        // A switch to another protocol than the one asked for, or to none named.
        (
            &b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"[..],
            WEBSOCKET_REQUEST,
        ),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n",
            WEBSOCKET_REQUEST,
        ),
        // A coding the proxy would drop when it re-frames the body.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n2\r\nxx\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\nxx",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ),
        // Chunks inside chunks: de-chunked once, the body would still be chunked.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ),
        // A length that would be wherever the backend closes the connection.
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nxx",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ),
        // No HTTP status.
        (
            b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nxx",
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
        ),
    ] {
        let a = canned_backend(answer).await;
        let proxy =
            TestProxy::start(&single_pool(a)).await;
        let mut closed = request[..request.len() - 2].to_vec();
        closed.extend_from_slice(b"Connection: close\r\n\r\n");
        let got = raw_exchange(proxy.addr, &closed).await;
        assert!(
            got.starts_with("HTTP/1.1 502"),
            "{}: {got}",
            String::from_utf8_lossy(answer)
        );
        let rt = proxy.runtime.load();
        let stats = &rt.pools[0].members[0].backend.stats;
        assert!(stats.responses(5) >= 1, "{}", String::from_utf8_lossy(answer));
    }
}

#[tokio::test]
async fn a_response_head_larger_than_max_header_bytes_is_502() {
    let cfg = |a| {
        config(&format!(
            "[server.limits]\nmax_header_bytes = 8192\n[pools.p]\nbackends = [\"{a}\"]\n"
        ))
    };
    let answer = |field: usize| -> &'static [u8] {
        let head = format!(
            "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
            "a".repeat(field)
        );
        Box::leak(head.into_bytes().into_boxed_slice())
    };
    let request = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let small = TestProxy::start(&cfg(canned_backend(answer(4096)).await)).await;
    let got = raw_exchange(small.addr, request).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{}", &got[..64]);
    let big = TestProxy::start(&cfg(canned_backend(answer(16 * 1024)).await)).await;
    let got = raw_exchange(big.addr, request).await;
    assert!(
        got.starts_with("HTTP/1.1 502"),
        "{}",
        &got[..got.len().min(64)]
    );
}

#[tokio::test]
async fn a_204_reaches_an_http2_client_without_a_length() {
    let a = canned_backend(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let req = Request::get("http://a.example/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // With the length beside no data, an HTTP/2 client takes the response as malformed.
    let resp = h2.send_request(req).await.expect("a well-formed response");
    assert_eq!(resp.status(), 204);
    assert!(resp.headers().get("content-length").is_none(), "{resp:?}");
}

#[tokio::test]
async fn trailers_reach_an_http2_client_without_connection_fields() {
    for answer in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Ok\r\n\r\n5\r\nhello\r\n0\r\n\
          Content-Length: 99\r\nConnection: close\r\nKeep-Alive: 5\r\nTransfer-Encoding: chunked\r\nX-Ok: 1\r\n\r\n"[..],
        // Framing fields that would be refused in a head, beside connection fields.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Ok\r\n\r\n5\r\nhello\r\n0\r\n\
          Transfer-Encoding: gzip\r\nContent-Length: 1, 2\r\nConnection: close\r\nUpgrade: x\r\nTE: trailers\r\nX-Ok: 1\r\n\r\n",
    ] {
        let a = canned_backend(answer).await;
        let proxy =
            TestProxy::start(&single_pool(a)).await;
        let (mut h2, _conn) = h2_connect(proxy.addr).await;
        let req = Request::get("http://a.example/")
            .header("te", "trailers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        // Relayed as they came, the connection fields would make the proxy's HTTP/2 side
        // reset the stream instead of ending it.
        let body = resp.into_body().collect().await.expect("a whole body");
        let trailers = body.trailers().cloned().expect("trailers");
        assert_eq!(body.to_bytes(), "hello");
        assert_eq!(trailers.len(), 1, "{trailers:?}");
        assert_eq!(trailers["x-ok"], "1");
    }
}

/// A backend that answers every request on a connection with `answer`, keeping the
/// connection open; `conns` counts the connections accepted.
async fn keep_alive_canned_backend(
    answer: &'static [u8],
) -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            n.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => pending.extend_from_slice(&buf[..k]),
                    }
                }
            });
        }
    });
    (a, conns)
}

#[tokio::test]
async fn a_connection_whose_response_had_trailers_is_used_again() {
    let (a, conns) = keep_alive_canned_backend(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Ok\r\n\r\n5\r\nhello\r\n0\r\nX-Ok: 1\r\n\r\n",
    )
    .await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    for _ in 0..3 {
        let req = Request::get("http://a.example/")
            .header("te", "trailers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        let body = resp.into_body().collect().await.expect("a whole body");
        assert_eq!(body.trailers().expect("trailers")["x-ok"], "1");
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_connection_whose_204_announced_a_length_is_not_used_again() {
    // Were the announced bytes to come, they would be read as the next request's
    // response. However the announcement came: a length, a length in a field that
    // `Connection` names (and so is removed), chunks.
    for answer in [
        &b"HTTP/1.1 204 No Content\r\nContent-Length: 8\r\n\r\n"[..],
        b"HTTP/1.1 204 No Content\r\nConnection: content-length\r\nContent-Length: 8\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
    ] {
        let (a, conns) = keep_alive_canned_backend(answer).await;
        let proxy = TestProxy::start(&single_pool(a)).await;
        let mut client = Client::connect(proxy.addr).await;
        for _ in 0..2 {
            let got = client.get("/").await;
            assert_eq!(got.status, 204);
            assert!(
                got.headers.get("content-length").is_none(),
                "{:?}",
                got.headers
            );
        }
        let what = String::from_utf8_lossy(answer);
        assert_eq!(conns.load(Ordering::SeqCst), 2, "{what}");
    }
    // A 204 that announces nothing leaves its connection fit for the next request.
    let (a, conns) = keep_alive_canned_backend(b"HTTP/1.1 204 No Content\r\n\r\n").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..2 {
        assert_eq!(client.get("/").await.status, 204);
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

/// A backend that answers each request with `answer` and then holds the connection
/// open, sending nothing more.
async fn stalling_backend(answer: &'static [u8]) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(answer).await;
                // Reads until the proxy lets go of the connection.
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    a
}

#[tokio::test]
async fn a_backend_that_stalls_mid_body_is_cut_off_after_the_idle_timeout() {
    let a = stalling_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789").await;
    let proxy = TestProxy::start(&idle_limited(a, "300ms")).await;
    // HTTP/1.1: the connection closes with the body short of its length.
    let got = raw_exchange(proxy.addr, b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("\r\n\r\n0123456789"), "{got}");
    // HTTP/2: the stream is reset; the connection stays.
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let req = Request::get("http://a.example/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let body = tokio::time::timeout(LIMIT, resp.into_body().collect())
        .await
        .expect("the body ended");
    assert!(body.is_err(), "{body:?}");
    let req = Request::get("http://a.example/")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h2.send_request(req).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_body_that_trickles_for_longer_than_the_idle_timeout_passes_while_it_moves() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n")
            .await;
        // Three times the idle timeout in all, a quarter of it between bytes.
        for b in b"hello, world" {
            tokio::time::sleep(Duration::from_millis(75)).await;
            let _ = s.write_all(&[*b]).await;
        }
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let proxy = TestProxy::start(&idle_limited(a, "300ms")).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "hello, world");
}

/// One pool of `a`, with client connections' `idle_timeout` set to `idle`.
fn idle_limited(a: std::net::SocketAddr, idle: &str) -> String {
    config(&format!(
        "[server.limits]\nidle_timeout = \"{idle}\"\n[pools.p]\nbackends = [\"{a}\"]\n"
    ))
}

/// Asserts that a [`gigabyte_backend`] is still sending, `got` bytes having reached the
/// client.
fn still_sending(failed: &mut tokio::sync::oneshot::Receiver<u64>, got: usize) {
    assert!(
        matches!(
            failed.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty)
        ),
        "the backend was cut off after {got} bytes reached the client"
    );
}

/// A backend with a gigabyte to send to its first request, with a length or chunked,
/// which says how much it had sent when a write failed (or all of it).
async fn gigabyte_backend(
    chunked: bool,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<u64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let (failed_tx, failed) = tokio::sync::oneshot::channel::<u64>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let mut sent = 0u64;
        let total = 1u64 << 30;
        let (head, chunk) = if chunked {
            let mut chunk = b"10000\r\n".to_vec();
            chunk.extend_from_slice(&[7u8; 0x10000]);
            chunk.extend_from_slice(b"\r\n");
            ("Transfer-Encoding: chunked".to_owned(), chunk)
        } else {
            (format!("Content-Length: {total}"), vec![7u8; 0x10000])
        };
        let head = format!("HTTP/1.1 200 OK\r\n{head}\r\n\r\n");
        if s.write_all(head.as_bytes()).await.is_ok() {
            while sent < total && s.write_all(&chunk).await.is_ok() {
                sent += 0x10000;
            }
        }
        let _ = failed_tx.send(sent);
    });
    (a, failed)
}

#[tokio::test]
async fn a_client_that_stops_reading_its_response_is_cut_off_after_the_idle_timeout() {
    let (a, failed) = gigabyte_backend(false).await;
    let proxy = TestProxy::start(&idle_limited(a, "300ms")).await;
    // The client asks, then reads nothing: its socket and the proxy's fill up.
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .unwrap();
    let sent = tokio::time::timeout(LIMIT, failed)
        .await
        .expect("the proxy let go of the backend")
        .unwrap();
    assert!(sent < 1 << 30, "{sent}");
    // And of the client: what it was sent ends early.
    let mut got = Vec::new();
    let _ = tokio::time::timeout(LIMIT, c.read_to_end(&mut got))
        .await
        .expect("the proxy closed the connection");
    assert!((got.len() as u64) < 1 << 30, "{}", got.len());
}

#[tokio::test]
async fn a_client_that_reads_its_response_steadily_keeps_it_past_the_idle_timeout() {
    let (a, mut failed) = gigabyte_backend(false).await;
    let proxy = TestProxy::start(&idle_limited(a, "400ms")).await;
    let mut c = TcpStream::connect(proxy.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .unwrap();
    // Four idle timeouts of a reader that never stops for long; the backend, faster than
    // the client, always has the next part ready.
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0usize;
    let until = tokio::time::Instant::now() + Duration::from_millis(1600);
    while tokio::time::Instant::now() < until {
        let n = tokio::time::timeout(LIMIT, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the response ended after {got} bytes");
        got += n;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    still_sending(&mut failed, got);
}

/// `GET path` over a new HTTP/2 connection whose client grants each stream a 16 KiB
/// window, and again only as the body is read.
async fn narrow_h2_get(
    addr: std::net::SocketAddr,
    path: &str,
) -> http::Response<hyper::body::Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .adaptive_window(false)
            .handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get(format!("http://a.example:{}{path}", addr.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    tokio::time::timeout(LIMIT, h2.send_request(req))
        .await
        .expect("a response head in time")
        .unwrap()
}

#[tokio::test]
async fn an_http2_client_that_grants_no_window_is_cut_off_after_the_idle_timeout() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&idle_limited(a, "300ms")).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(0)
            .adaptive_window(false)
            .handshake::<_, Full<Bytes>>(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let resp = tokio::time::timeout(LIMIT, h2.send_request(get("/")))
        .await
        .expect("a response head in time")
        .unwrap();
    assert_eq!(resp.status(), 200);
    // No room for a byte of the body, ever: the connection is cut, and with it the
    // request's hold on the backend.
    let _ = tokio::time::timeout(LIMIT, conn)
        .await
        .expect("the connection outlived its stalled response");
    let deadline = tokio::time::Instant::now() + LIMIT;
    while proxy.runtime.load().pools[0].members[0].backend.in_flight() != 0 {
        assert!(tokio::time::Instant::now() < deadline, "still in flight");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(resp);
}

#[tokio::test]
async fn an_http2_client_that_resets_every_stream_it_opens_is_sent_away() {
    // Holds every request, and says when one arrives.
    let (arrived_tx, mut arrived) = mpsc::unbounded_channel::<()>();
    let a = backend(move |_req| {
        let arrived_tx = arrived_tx.clone();
        async move {
            let _ = arrived_tx.send(());
            std::future::pending::<()>().await;
            text("never")
        }
    })
    .await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let (h2, conn) = h2_connect::<Full<Bytes>>(proxy.addr).await;
    let mut reached = 0;
    for _ in 0..400 {
        let mut h2 = h2.clone();
        let request = tokio::spawn(async move { h2.send_request(get("/")).await });
        // Taken up and sent to the backend, then reset (the request dropped).
        match tokio::time::timeout(LIMIT, arrived.recv()).await {
            Ok(Some(())) => reached += 1,
            _ => panic!("a request did not reach the backend"),
        }
        request.abort();
        let _ = request.await;
        if conn.is_finished() {
            break;
        }
        if reached > unanswered_limit() {
            // Sent away: the next request finds the connection closing.
            break;
        }
    }
    let _ = tokio::time::timeout(LIMIT, conn)
        .await
        .expect("the connection stayed open");
    assert!(
        reached <= unanswered_limit() + 1,
        "{reached} requests reached the backend"
    );
    // Other clients are served as before.
    let (mut other, _c) = h2_connect::<Full<Bytes>>(proxy.addr).await;
    let req = Request::get("http://a.example/healthz")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let pending = tokio::spawn(async move { other.send_request(req).await });
    tokio::time::timeout(LIMIT, arrived.recv())
        .await
        .expect("a new connection is served")
        .unwrap();
    pending.abort();
}

/// The requests a connection may see end unanswered before it is sent away.
fn unanswered_limit() -> usize {
    switchyard::server::idle::MAX_UNANSWERED as usize
}

#[tokio::test]
async fn an_http2_stream_read_slowly_but_steadily_keeps_its_backend() {
    let (a, mut failed) = gigabyte_backend(false).await;
    let proxy = TestProxy::start(&idle_limited(a, "600ms")).await;
    // A 16 KiB window, granted again as frames are read, one every 40 ms: about
    // 130 KB/s here, far more than the 16 KiB parts the proxy hands on per idle
    // timeout, less than one read from the backend (up to hyper's 400 KiB) per idle
    // timeout.
    let mut body = narrow_h2_get(proxy.addr, "/").await.into_body();
    let mut got = 0usize;
    let until = tokio::time::Instant::now() + Duration::from_millis(2400);
    while tokio::time::Instant::now() < until {
        let frame = tokio::time::timeout(LIMIT, body.frame())
            .await
            .expect("a frame in time")
            .expect("the body went on");
        got += frame
            .unwrap_or_else(|e| panic!("the body failed after {got} bytes: {e}"))
            .into_data()
            .map_or(0, |d| d.len());
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    still_sending(&mut failed, got);
}

#[tokio::test]
async fn a_backend_connection_is_free_once_its_body_is_read_though_the_client_lags() {
    let a = backend(|req| async move {
        let n = if req.uri().path() == "/big" {
            1 << 20
        } else {
            48 * 1024
        };
        text(Bytes::from(vec![b'x'; n]))
    })
    .await;
    let proxy = TestProxy::start(&idle_limited(a, "1h")).await;
    // Large responses first: hyper's read buffer grows, so that the next body comes
    // from the backend in one frame larger than the parts the proxy hands on.
    for _ in 0..2 {
        assert_eq!(fetch(proxy.addr, get("/big")).await.body.len(), 1 << 20);
    }
    let rt = proxy.runtime.load();
    let b = &rt.pools[0].members[0].backend;
    assert_eq!(b.pool.idle_count(), 1);
    // A client with a 16 KiB window that reads nothing of a 48 KiB body.
    let resp = narrow_h2_get(proxy.addr, "/mid").await;
    assert_eq!(resp.status(), 200);
    // The backend's body has been read: its connection goes back to the pool and the
    // request stops counting against the backend, whatever the client still owes.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while (b.pool.idle_count(), b.in_flight()) != (1, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle {}, in flight {}",
            b.pool.idle_count(),
            b.in_flight()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(b.pool.connections_opened(), 1);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body.len(), 48 * 1024);
}

#[tokio::test]
async fn upstream_connections_leave_no_task_behind() {
    let a = named_backend("a").await;
    // No idle connection kept: every request opens one, which closes after it.
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nbackends = [\"{a}\"]\nmax_idle_per_backend = 0\n"
    )))
    .await;
    let tasks = || {
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks()
    };
    let before = tasks();
    for _ in 0..50 {
        assert_eq!(fetch(proxy.addr, get("/")).await.status, 200);
    }
    // Each connection's tasks end soon after it closes, not a timer's period later: a
    // few tasks started on first use may stay, not one per connection.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while tasks() > before + 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} tasks alive, {before} before 50 requests",
            tasks()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_http2_stream_that_gets_no_window_lets_go_of_its_backend_after_the_idle_timeout() {
    // Chunked: with no length to check, only an error tells the client that the body
    // it got was cut short.
    let (a, failed) = gigabyte_backend(true).await;
    let proxy = TestProxy::start(&idle_limited(a, "300ms")).await;
    // The client keeps reading its connection but not the body, so the stream's window
    // closes once the first megabytes are in: nothing blocks on the TCP socket.
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let req = Request::get(format!("http://a.example:{}/", proxy.addr.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(LIMIT, h2.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let sent = tokio::time::timeout(LIMIT, failed)
        .await
        .expect("the proxy let go of the backend")
        .unwrap();
    assert!(sent < 1 << 30, "{sent}");
    // Read now, the body ends in an error, not as if it were complete; the connection
    // still serves other streams.
    let got = tokio::time::timeout(LIMIT, resp.into_body().collect())
        .await
        .expect("the stream ended");
    assert!(
        got.is_err(),
        "a body of {} bytes",
        got.unwrap().to_bytes().len()
    );
}

#[tokio::test]
async fn a_content_length_is_passed_on_as_one_plain_number() {
    let a =
        canned_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 002\r\nContent-Length: 2\r\n\r\nok")
            .await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let got = raw_exchange(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let lengths: Vec<_> = got
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
        .collect();
    assert_eq!(lengths, ["content-length: 2"], "{got}");
    assert!(got.ends_with("\r\n\r\nok"), "{got}");
}

/// An address whose listener never accepts and whose accept queue is full, so that a
/// further connection attempt hangs (the kernel drops its SYN) instead of failing.
async fn unanswering_addr() -> (
    std::net::SocketAddr,
    tokio::net::TcpListener,
    Vec<TcpStream>,
) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(1).unwrap();
    let a = l.local_addr().unwrap();
    let mut held = Vec::new();
    // Fill the queue: connections complete until it is full, then one hangs.
    loop {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(a)).await {
            Ok(Ok(s)) => held.push(s),
            Ok(Err(e)) => panic!("connect failed instead of hanging: {e}"),
            Err(_) => break,
        }
        assert!(held.len() < 64, "the accept queue never filled");
    }
    (a, l, held)
}

// Relies on Linux dropping a SYN when the accept queue is full.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn connect_timeout_is_enforced() {
    let (hanging, _listener, _held) = unanswering_addr().await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nconnect_timeout = \"300ms\"\nretries = 0\nbackends = [\"{hanging}\"]\n"
    )))
    .await;
    let started = std::time::Instant::now();
    let got = tokio::time::timeout(LIMIT, fetch(proxy.addr, get("/")))
        .await
        .expect("answered within the connect timeout, not the kernel's");
    // The pool's only backend could not be reached.
    assert_eq!(got.status, 503);
    // Not refused at once: the proxy waited for the connection as long as configured.
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn a_reset_then_an_unreachable_backend_is_502_and_no_backend_is_tried_twice() {
    let (reset, resets) = resetting_backend().await;
    let dead = dead_addr().await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nbackends = [\"{reset}\", \"{dead}\"]\n[pools.p.outlier]\nconsecutive_failures = 0\n"
    )))
    .await;
    for n in 1..=6 {
        // Whichever comes first, a backend was reached: not "none could be reached".
        assert_eq!(fetch(proxy.addr, get("/")).await.status, 502);
        assert_eq!(resets.load(Ordering::SeqCst), n);
    }
}

/// A backend that answers "flaky" until `broken` is set, then reads each request head and
/// closes the connection; `hits` counts request heads.
async fn flaky_backend() -> (
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicBool>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (b, h) = (broken.clone(), hits.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let (b, h) = (b.clone(), h.clone());
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                loop {
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        h.fetch_add(1, Ordering::SeqCst);
                        if b.load(Ordering::SeqCst) {
                            return;
                        }
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nflaky";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (a, broken, hits)
}

#[tokio::test]
async fn a_reset_on_the_pinned_backend_is_502_and_keeps_the_pin() {
    let (flaky, broken, flaky_hits) = flaky_backend().await;
    let (good, good_hits) = counting_backend().await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\npolicy = \"sticky_cookie\"\nbackends = [\"{flaky}\", \"{good}\"]\n\
         [pools.p.outlier]\nconsecutive_failures = 0\n"
    )))
    .await;
    // New clients alternate between the two: find one pinned to the flaky backend.
    let cookie = loop {
        let got = fetch(proxy.addr, get("/")).await;
        assert_eq!(got.status, 200);
        if got.body == "flaky" {
            let set = got.headers["set-cookie"].to_str().unwrap();
            break set.split(';').next().unwrap().to_owned();
        }
        assert!(
            good_hits.load(Ordering::SeqCst) < 10,
            "never pinned to the flaky backend"
        );
    };
    broken.store(true, Ordering::SeqCst);
    let (flaky_before, good_before) = (
        flaky_hits.load(Ordering::SeqCst),
        good_hits.load(Ordering::SeqCst),
    );
    let got = fetch(proxy.addr, get_with_cookie("/", &cookie)).await;
    assert_eq!(got.status, 502);
    assert!(
        !got.headers.contains_key("set-cookie"),
        "the client was moved"
    );
    // On the pooled connection, and once more on a fresh one, to the same backend.
    assert_eq!(flaky_hits.load(Ordering::SeqCst), flaky_before + 2);
    assert_eq!(good_hits.load(Ordering::SeqCst), good_before);
}

#[tokio::test]
async fn an_idle_tunnel_is_closed_after_idle_timeout() {
    use futures_util::StreamExt;

    let a = ws_echo_backend().await;
    let proxy = TestProxy::start(&format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\n[server.limits]\nidle_timeout = \"300ms\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n[pools.p]\nbackends = [\"{a}\"]\n"
    ))
    .await;
    let mut ws = ws_connect(proxy.addr).await;
    ws_echo(&mut ws, "before going quiet").await;
    let end = tokio::time::timeout(LIMIT, ws.next())
        .await
        .expect("the idle tunnel was closed");
    assert!(!matches!(&end, Some(Ok(m)) if m.is_text()), "{end:?}");
}

#[tokio::test]
async fn access_log_has_one_line_per_request_with_every_field() {
    let a = named_backend("a").await;
    for format in ["json", "text"] {
        let toml = format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\naccess_log = \"{format}\"\n\
             [pools.web]\nbackends = [{{ address = \"{a}\", id = \"web-1\" }}]\n"
        );
        let (mut proxy, mut lines) = TestProxy::start_logging(&toml).await;
        let req = Request::get("/cart/7?x=1")
            .header("host", "x")
            .header("x-request-id", "rid-42")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = fetch(proxy.addr, req).await;
        assert_eq!(got.status, 200);
        let line = tokio::time::timeout(LIMIT, lines.recv())
            .await
            .expect("an access log line")
            .expect("the proxy is running");
        let bytes = got.body.len();
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
            assert_eq!(v["method"], "GET", "{line}");
            assert_eq!(v["path"], "/cart/7", "{line}");
            assert_eq!(v["status"], 200, "{line}");
            assert_eq!(v["pool"], "web", "{line}");
            assert_eq!(v["backend"], "web-1", "{line}");
            assert_eq!(v["bytes"], bytes, "{line}");
            assert_eq!(v["request_id"], "rid-42", "{line}");
            assert_eq!(v["client"], "127.0.0.1", "{line}");
            let time = humantime::parse_rfc3339(v["time"].as_str().expect(&line)).expect(&line);
            assert!(time <= std::time::SystemTime::now(), "{line}");
            let upstream = v["upstream_seconds"].as_f64().expect(&line);
            let total = v["total_seconds"].as_f64().expect(&line);
            assert!(upstream > 0.0 && upstream <= total, "{line}");
        } else {
            let (time, rest) = line.split_once(' ').expect(&line);
            humantime::parse_rfc3339(time).expect(&line);
            assert!(
                rest.starts_with("GET /cart/7 200 pool=web backend=web-1 upstream="),
                "{line}"
            );
            assert!(
                line.ends_with(&format!(" bytes={bytes} id=rid-42 client=127.0.0.1")),
                "{line}"
            );
        }
        // A request that reached no backend has its line too.
        let req = Request::get("/")
            .header("host", "x")
            .header("host", "y")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(fetch(proxy.addr, req).await.status, 400);
        let line = tokio::time::timeout(LIMIT, lines.recv())
            .await
            .expect("an access log line")
            .expect("the proxy is running");
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(&line).expect(&line);
            assert_eq!(v["status"], 400, "{line}");
            assert_eq!(v["backend"], serde_json::Value::Null, "{line}");
        } else {
            assert!(
                line.split_once(' ')
                    .is_some_and(|(_, rest)| rest.starts_with("GET / 400 pool=- backend=- ")),
                "{line}"
            );
        }
        // Shutdown writes whatever is queued: two requests, two lines, no more.
        tokio::time::timeout(LIMIT, proxy.shutdown())
            .await
            .expect("the proxy stopped")
            .expect("the proxy task");
        assert!(lines.try_recv().is_err(), "a line too many");
    }
}

#[tokio::test]
async fn a_request_its_client_gave_up_on_is_logged_as_499() {
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let a = holding_backend("a", held_tx, release.clone()).await;
    let dead = dead_addr().await;
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\naccess_log = \"json\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n\
         [pools.web]\nretries = 0\nbackends = [{{ address = \"{a}\", id = \"web-1\" }}]\n\
         [[routes]]\npath_prefix = \"/dead\"\npool = \"gone\"\n[[routes]]\npool = \"web\"\n\
         [pools.gone]\nretries = 0\nbackends = [{{ address = \"{dead}\", id = \"gone-1\" }}]\n"
    );
    let (proxy, mut lines) = TestProxy::start_logging(&toml).await;
    let mut next_line = async || -> serde_json::Value {
        let line = tokio::time::timeout(LIMIT, lines.recv())
            .await
            .expect("an access log line")
            .expect("the proxy is running");
        serde_json::from_str(&line).expect(&line)
    };
    // An HTTP/2 client resets its stream while the backend holds the request.
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let req = Request::get("http://x/hold")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let pending = tokio::spawn(h2.send_request(req));
    tokio::time::timeout(LIMIT, held_rx.recv())
        .await
        .expect("the request never reached the backend");
    pending.abort();
    let v = next_line().await;
    assert_eq!(v["status"], 499, "{v}");
    assert_eq!(v["path"], "/hold", "{v}");
    assert_eq!(v["backend"], "web-1", "{v}");
    assert_eq!(v["upstream_seconds"], serde_json::Value::Null, "{v}");
    // Counted in its pool, as a backend's answer it never got is no backend's.
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains("switchyard_requests_total{backend=\"\",code=\"4xx\",pool=\"web\"} 1"),
        "{text}"
    );
    release.notify_waiters();
    // A backend that could not be reached is named too.
    assert_eq!(fetch(proxy.addr, get("/dead")).await.status, 503);
    let v = next_line().await;
    assert_eq!(v["status"], 503, "{v}");
    assert_eq!(v["backend"], "gone-1", "{v}");
}

/// A backend that reads each request body to its end and answers with its length.
async fn body_length_backend() -> std::net::SocketAddr {
    backend(|req: Request<hyper::body::Incoming>| async move {
        match req.into_body().collect().await {
            Ok(body) => text(format!("{}", body.to_bytes().len())),
            Err(_) => text("body failed"),
        }
    })
    .await
}

/// Two backends that one failure would eject.
fn touchy_pool(a: std::net::SocketAddr, b: std::net::SocketAddr, rest: &str) -> String {
    config(&format!(
        "[pools.p]\nbackends = [\"{a}\", \"{b}\"]\n{rest}\n[pools.p.outlier]\nconsecutive_failures = 1\nmax_ejected_percent = 100\n"
    ))
}

fn assert_none_ejected(proxy: &TestProxy) {
    let rt = proxy.runtime.load();
    for m in &rt.pools[0].members {
        assert!(
            !m.backend.health.is_ejected(),
            "{} was ejected",
            m.backend.id
        );
        assert_eq!(m.backend.stats.resets(), 0, "{}", m.backend.id);
    }
}

#[tokio::test]
async fn a_malformed_request_body_is_400_and_not_the_backends_failure() {
    let (a, b) = (body_length_backend().await, body_length_backend().await);
    let proxy = TestProxy::start(&touchy_pool(a, b, "")).await;
    // The chunk size line ends in a bare LF; round robin sends one to each backend.
    let bad =
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\nabcd\r\n0\r\n\r\n";
    for _ in 0..2 {
        let got = raw_exchange(proxy.addr, bad).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{got}");
    }
    assert_none_ejected(&proxy);
    assert_eq!(fetch(proxy.addr, get("/")).await.status, 200);
}

#[tokio::test]
async fn a_client_that_stops_sending_its_body_gets_408_and_the_backend_is_not_blamed() {
    let (a, b) = (body_length_backend().await, body_length_backend().await);
    let proxy = TestProxy::start(&touchy_pool(a, b, "response_timeout = \"300ms\"")).await;
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
            .await
            .unwrap();
        // The rest of the body never comes.
        let got = read_response(&mut s).await;
        assert!(got.starts_with("HTTP/1.1 408"), "{got}");
        // The body was cut short: the connection carries nothing more.
        let mut rest = Vec::new();
        tokio::time::timeout(LIMIT, s.read_to_end(&mut rest))
            .await
            .expect("the proxy closed the connection")
            .unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }
    assert_none_ejected(&proxy);
    assert_eq!(fetch(proxy.addr, get("/")).await.status, 200);
}

#[tokio::test]
async fn an_upload_slower_than_the_response_timeout_passes_while_it_moves() {
    let a = body_length_backend().await;
    let cfg = format!("[pools.p]\nresponse_timeout = \"200ms\"\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\n")
        .await
        .unwrap();
    // Six parts 100 ms apart: the upload takes three times the response timeout, and no
    // wait within it is longer than half of it. The slowness is what is under test.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(b"0123456789").await.unwrap();
    }
    let got = read_response(&mut s).await;
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("\r\n\r\n60"),
        "{got}"
    );
}

#[tokio::test]
async fn a_backend_that_stops_reading_the_body_is_504() {
    // Accepts, and never reads: once the socket buffers are full the upload stops.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let cfg = format!("[pools.p]\nresponse_timeout = \"300ms\"\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let s = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut rd, mut wr) = s.into_split();
    const SIZE: usize = 256 << 20;
    let upload = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let chunk = vec![b'x'; 1 << 16];
        for _ in 0..SIZE / chunk.len() {
            wr.write_all(&chunk).await?;
        }
        std::io::Result::Ok(())
    });
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(LIMIT, rd.read(&mut buf))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    upload.abort();
    let sent = upload.await;
    assert!(
        !matches!(sent, Ok(Ok(()))),
        "the whole body went through: {sent:?}"
    );
}

/// A backend that answers with what it read: the request line's method and target, each
/// header field as `name: value` on a line, and `body N` (N the body's length).
async fn head_echo_backend() -> std::net::SocketAddr {
    backend(|req: Request<hyper::body::Incoming>| async move {
        let mut out = format!("{} {}\n", req.method(), req.uri());
        for (n, v) in req.headers() {
            out.push_str(&format!("{n}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        match req.into_body().collect().await {
            Ok(body) => out.push_str(&format!("body {}\n", body.to_bytes().len())),
            Err(_) => out.push_str("body failed\n"),
        }
        text(out)
    })
    .await
}

#[tokio::test]
async fn request_framing_reaches_the_backend_as_one_reading() {
    let (a, hits) = counting_backend().await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    // A coding the proxy would drop when it re-frames the body: not implemented.
    for codings in ["gzip, chunked", "chunked, chunked"] {
        let request = format!(
            "POST / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: {codings}\r\n\r\n2\r\nxx\r\n0\r\n\r\n"
        );
        let got = raw_exchange(proxy.addr, request.as_bytes()).await;
        assert!(got.starts_with("HTTP/1.1 501"), "{codings}: {got}");
        assert!(
            got.to_ascii_lowercase().contains("connection: close"),
            "{got}"
        );
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);

    let e = head_echo_backend().await;
    let proxy = TestProxy::start(&single_pool(e)).await;
    for (request, want) in [
        // A chunked body on a method that rarely has one still arrives.
        (
            &b"GET / HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"[..],
            &["GET /\n", "transfer-encoding: chunked\n", "body 5\n"][..],
        ),
        // One length, in plain decimal.
        (
            b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 005\r\nConnection: close\r\n\r\nhello",
            &["content-length: 5\n", "body 5\n"],
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
            &["content-length: 5\n", "body 5\n"],
        ),
        // An absolute-form target with no path gets the path `/`.
        (
            b"GET http://a.example?x=1 HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            &["GET /?x=1\n"],
        ),
        // A question to the server as a whole goes to the pool of its root.
        (
            b"OPTIONS * HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
            &["OPTIONS *\n"],
        ),
        // An h2c upgrade is the proxy's hop to decline: the request is served as it is,
        // without the upgrade's settings even when `Connection` does not name them, and
        // whichever `Upgrade` field names h2c.
        (
            b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            &["GET /\n", "body 0\n"],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\nUpgrade: h2c\r\n\r\n",
            &["GET /\n", "body 0\n"],
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
            &["GET /\n", "body 0\n"],
        ),
    ] {
        let got = raw_exchange(proxy.addr, request).await;
        let what = String::from_utf8_lossy(request);
        assert!(got.starts_with("HTTP/1.1 200"), "{what}: {got}");
        for line in want {
            assert!(got.contains(line), "{what}: {line:?} in {got}");
        }
        // What the backend read, after the response's own head.
        let lower = got[got.find("\r\n\r\n").unwrap()..].to_ascii_lowercase();
        assert!(lower.matches("content-length:").count() <= 1, "{what}: {got}");
        for gone in ["upgrade:", "http2-settings:"] {
            assert!(!lower.contains(gone), "{what}: {got}");
        }
    }
    // HTTP/2: a GET body without a length, and split cookie fields.
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    let parts =
        ["hel", "lo"].map(|p| Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(p))));
    let req = Request::get("http://a.example/")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(StreamBody::new(futures_util::stream::iter(parts)))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    let got = String::from_utf8_lossy(&got);
    for line in ["GET /\n", "cookie: a=1; b=2\n", "body 5\n"] {
        assert!(got.contains(line), "{line:?} in {got}");
    }
    assert_eq!(got.matches("cookie:").count(), 1, "{got}");
    // HTTP/2's `OPTIONS *` goes on as it came.
    let uri = asterisk_target();
    let none = ["", ""].map(|p| Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(p))));
    let req = Request::options(uri)
        .body(StreamBody::new(futures_util::stream::iter(none)))
        .unwrap();
    let resp = h2.send_request(req).await.unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert!(got.starts_with(b"OPTIONS *\n"), "{got:?}");
}

/// A backend that answers `POST /early` with a 401 at once, without reading the body,
/// and then never reads from that connection again; other requests get a 200.
async fn early_answering_backend() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                loop {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        match s.read(&mut byte).await {
                            Ok(0) | Err(_) => return,
                            Ok(_) => head.push(byte[0]),
                        }
                    }
                    if head.starts_with(b"POST /early ") {
                        let no = b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n";
                        let _ = s.write_all(no).await;
                        // Holds the connection, reading nothing more.
                        std::future::pending::<()>().await;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if s.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    a
}

#[tokio::test]
async fn a_connection_answered_before_its_upload_ended_is_not_reused() {
    let backend = early_answering_backend().await;
    // Were the connection pooled, the next request would wait out the connect timeout
    // for it to become ready, far beyond LIMIT.
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nconnect_timeout = \"60s\"\nbackends = [\"{backend}\"]\n"
    )))
    .await;
    let mut upload = TcpStream::connect(proxy.addr).await.unwrap();
    let mut req =
        b"POST /early HTTP/1.1\r\nHost: a.example\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    req.extend_from_slice(&[b'x'; 1000]);
    upload.write_all(&req).await.unwrap();
    // The client goes quiet mid-body, its connection open.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    tokio::time::timeout(LIMIT, async {
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(upload.read(&mut byte).await.unwrap(), 1, "closed early");
            head.push(byte[0]);
        }
    })
    .await
    .expect("no answer to the upload");
    assert!(
        head.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    for _ in 0..2 {
        let got = tokio::time::timeout(LIMIT, fetch(proxy.addr, get("/")))
            .await
            .expect("the next request waited for the busy connection");
        assert_eq!(got.status, 200);
        assert_eq!(got.body, "ok");
    }
    drop(upload);
}

#[tokio::test]
async fn an_http2_connection_may_wait_for_its_first_request_past_the_header_timeout() {
    let a = named_backend("a").await;
    let cfg = format!("[server.limits]\nidle_timeout = \"1h\"\nheader_read_timeout = \"200ms\"\n[pools.p]\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    // Opened ahead of need, as HTTP/2 clients do: the preface is no request head.
    let (mut tx, _conn) = h2_connect(proxy.addr).await;
    // What is under test is the passing of time itself.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let req = Request::get(format!("http://h2.example.com:{}/", proxy.addr.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tx
        .send_request(req)
        .await
        .expect("the connection stayed open");
    assert_eq!(resp.status(), 200);
}

/// Reads HTTP/2 frames from `s` until one of type `kind` arrives: the types read, and
/// the payload of the last.
async fn frames_until(s: &mut TcpStream, kind: u8) -> (Vec<u8>, Vec<u8>) {
    let mut types = Vec::new();
    let mut payload = Vec::new();
    tokio::time::timeout(LIMIT, async {
        loop {
            let mut head = [0u8; 9];
            if s.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            payload = vec![0u8; len];
            if s.read_exact(&mut payload).await.is_err() {
                return;
            }
            types.push(head[3]);
            if head[3] == kind {
                return;
            }
        }
    })
    .await
    .expect("no such frame in time");
    (types, payload)
}

/// Opens a raw HTTP/2 connection: the preface, an empty SETTINGS frame and the
/// acknowledgement of the proxy's.
async fn raw_h2_connect(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 4, 1, 0, 0, 0, 0]);
    s.write_all(&hello).await.unwrap();
    s
}

/// Sends a request on stream 1 of a raw HTTP/2 connection: one HEADERS frame with
/// END_STREAM and END_HEADERS, carrying the HPACK `block`.
async fn raw_h2_request(s: &mut TcpStream, block: &[u8]) {
    let mut headers = vec![0, 0, u8::try_from(block.len()).unwrap(), 1, 5, 0, 0, 0, 1];
    headers.extend_from_slice(block);
    s.write_all(&headers).await.unwrap();
}

#[tokio::test]
async fn a_request_that_crosses_the_idle_goaway_is_answered() {
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let a = holding_backend("a", held_tx, release.clone()).await;
    let cfg = format!("[server.limits]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"1h\"\n[pools.p]\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let mut s = raw_h2_connect(proxy.addr).await;
    let (types, _) = frames_until(&mut s, 7).await;
    assert_eq!(types.last(), Some(&7), "no GOAWAY: {types:?}");
    // A GET /hold on stream 1 (END_STREAM | END_HEADERS), sent after the first GOAWAY,
    // which still accepts every stream: HPACK's static :method GET, :scheme http,
    // :path /, then :path /hold and :authority as literals.
    let mut block = vec![0x82, 0x86, 0x04, 0x05];
    block.extend_from_slice(b"/hold");
    block.extend_from_slice(&[0x01, 0x09]);
    block.extend_from_slice(b"a.example");
    raw_h2_request(&mut s, &block).await;
    tokio::time::timeout(LIMIT, held_rx.recv())
        .await
        .expect("the request never reached the backend");
    // Held past the grace that closes an idle connection: the passing of time is what
    // is under test.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    release.notify_waiters();
    let (types, _) = frames_until(&mut s, 1).await;
    assert_eq!(types.last(), Some(&1), "no response: {types:?}");
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_goaway() {
    let a = named_backend("a").await;
    let cfg = format!("[server.limits]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"1h\"\n[pools.p]\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    // The preface and an empty SETTINGS frame, then nothing.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    s.write_all(&hello).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut got))
        .await
        .expect("the idle connection stayed open")
        .unwrap();
    // The frame types the proxy sent: 9-byte headers, a 24-bit length first.
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= got.len() {
        let len =
            usize::from(got[at]) << 16 | usize::from(got[at + 1]) << 8 | usize::from(got[at + 2]);
        types.push(got[at + 3]);
        at += 9 + len;
    }
    assert!(
        types.contains(&7),
        "no GOAWAY among frames of types {types:?}"
    );
}

#[tokio::test]
async fn pings_do_not_keep_an_idle_http2_connection_open() {
    let a = named_backend("a").await;
    let cfg = format!("[server.limits]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"1h\"\n[pools.p]\nbackends = [\"{a}\"]\n");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    s.write_all(&hello).await.unwrap();
    // A PING every 100 ms, three times as often as the idle timeout, and no request:
    // traffic, but no use of the connection.
    let ping = [0, 0, 8, 6, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8];
    let (mut rd, mut wr) = s.into_split();
    let pinger = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            if wr.write_all(&ping).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let closed = tokio::time::timeout(LIMIT, rd.read_to_end(&mut got)).await;
    pinger.abort();
    assert!(closed.is_ok(), "PINGs kept the connection open");
}

#[tokio::test]
async fn a_client_that_shuts_its_side_down_after_its_requests_gets_every_answer() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(
        b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n\
          POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await
    .unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(LIMIT, s.read_to_end(&mut got))
        .await
        .expect("the proxy kept the connection open")
        .unwrap();
    let got = String::from_utf8_lossy(&got);
    assert_eq!(got.matches("HTTP/1.1 200").count(), 2, "{got}");
    assert!(
        got.contains("\"/one\"") && got.contains("\"/two\""),
        "{got}"
    );
}

#[tokio::test]
async fn http2_uploads_that_end_in_a_frame_of_their_own_keep_the_backend_connection() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&single_pool(a)).await;
    let (mut h2, _conn) = h2_connect(proxy.addr).await;
    // The declared bytes, then the end of the stream in an empty DATA frame.
    for body in ["abc", "abc", "", "abc"] {
        let parts = [Ok::<_, std::io::Error>(http_body::Frame::data(
            Bytes::from(body),
        ))];
        let req = Request::post("http://a.example/up")
            .header("content-length", body.len())
            .body(StreamBody::new(futures_util::stream::iter(parts)))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.unwrap();
    }
    let rt = proxy.runtime.load();
    assert_eq!(rt.pools[0].members[0].backend.pool.connections_opened(), 1);
}
