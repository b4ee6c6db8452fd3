//! `/metrics` after known traffic: values, label sets, and what reloads do to series.

mod common;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;

async fn scrape(proxy: &TestProxy) -> String {
    let got = fetch(proxy.admin.unwrap(), get("/metrics")).await;
    assert_eq!(got.status, 200);
    assert!(got.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    String::from_utf8(got.body.to_vec()).unwrap()
}

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .map(|v| v.trim().parse().unwrap())
}

/// Asserts that the sample `series` is present with value `want`.
#[track_caller]
fn assert_sample(text: &str, series: &str, want: f64) {
    assert_eq!(sample(text, series), Some(want), "{series}");
}

#[tokio::test]
async fn metrics_count_known_traffic() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let dead = dead_addr().await;
    let cfg = format!(
        "[[routes]]\npath_prefix = \"/dead\"\npool = \"gone\"\n[[routes]]\npool = \"web\"\n\
         [pools.web]\nbackends = [{{ address = \"{a}\", id = \"a\" }}, {{ address = \"{b}\", id = \"b\" }}]\n\
         [pools.gone]\nretries = 0\nbackends = [{{ address = \"{dead}\", id = \"d\" }}]\n"
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..10 {
        assert_eq!(client.get("/").await.status, 200);
    }
    for _ in 0..3 {
        assert_eq!(client.get("/dead").await.status, 503);
    }
    let text = scrape(&proxy).await;
    for family in [
        "switchyard_requests_total",
        "switchyard_request_duration_seconds",
        "switchyard_upstream_connect_errors_total",
        "switchyard_upstream_connections_opened_total",
        "switchyard_upstream_connections_open",
        "switchyard_backend_up",
        "switchyard_backend_in_flight",
        "switchyard_downstream_connections_active",
        "switchyard_config_reloads_total",
        "switchyard_config_generation",
        "switchyard_config_last_reload_success_timestamp_seconds",
        "switchyard_build_info",
        "switchyard_access_log_dropped_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing:\n{text}"
        );
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "{family} has no HELP"
        );
    }
    let ok = |id: &str| {
        sample(
            &text,
            &format!("switchyard_requests_total{{backend=\"{id}\",code=\"2xx\",pool=\"web\"}}"),
        )
    };
    assert_eq!(ok("a"), Some(5.0));
    assert_eq!(ok("b"), Some(5.0));
    assert_sample(
        &text,
        "switchyard_requests_total{backend=\"d\",code=\"5xx\",pool=\"gone\"}",
        3.0,
    );
    assert_sample(
        &text,
        "switchyard_upstream_connect_errors_total{backend=\"d\",pool=\"gone\"}",
        3.0,
    );
    // One keep-alive client: one upstream connection per backend, reused.
    assert_sample(
        &text,
        "switchyard_upstream_connections_opened_total{backend=\"a\",pool=\"web\"}",
        1.0,
    );
    assert_sample(
        &text,
        "switchyard_request_duration_seconds_count{backend=\"a\",pool=\"web\"}",
        5.0,
    );
    assert!(text.contains(
        "switchyard_request_duration_seconds_bucket{backend=\"a\",pool=\"web\",le=\"0.0001\"}"
    ));
    assert!(text.contains(
        "switchyard_request_duration_seconds_bucket{backend=\"a\",pool=\"web\",le=\"30\"}"
    ));
    assert_sample(
        &text,
        "switchyard_backend_up{backend=\"a\",pool=\"web\"}",
        1.0,
    );
    assert_sample(
        &text,
        &format!(
            "switchyard_downstream_connections_active{{listener=\"{}\"}}",
            proxy.addr
        ),
        1.0,
    );
    assert_sample(&text, "switchyard_config_generation", 1.0);
    assert_sample(&text, "switchyard_access_log_dropped_total", 0.0);
    assert_sample(
        &text,
        &format!(
            "switchyard_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        ),
        1.0,
    );
}

#[tokio::test]
async fn counters_survive_reloads_and_removed_series_disappear_after_draining() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let cfg = |backends: &str| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [pools.web]\npolicy = \"sticky_cookie\"\ndrain_timeout = \"50ms\"\nbackends = [{backends}]\n"
        )
    };
    let both = format!("{{ address = \"{a}\", id = \"a\" }}, {{ address = \"{b}\", id = \"b\" }}");
    std::fs::write(&path, cfg(&both)).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    for _ in 0..4 {
        fetch(proxy.addr, get("/")).await;
    }
    // Same id a, new address (b's): the counters stay.
    std::fs::write(&path, cfg(&format!("{{ address = \"{b}\", id = \"a\" }}"))).unwrap();
    reloader.reload_async().await.unwrap();
    let text = scrape(&proxy).await;
    assert_sample(
        &text,
        "switchyard_requests_total{backend=\"a\",code=\"2xx\",pool=\"web\"}",
        2.0,
    );
    assert_sample(
        &text,
        "switchyard_affinity_total{outcome=\"new\",pool=\"web\"}",
        4.0,
    );
    assert_sample(
        &text,
        "switchyard_config_reloads_total{result=\"success\"}",
        1.0,
    );
    assert_sample(&text, "switchyard_config_generation", 2.0);
    // b left the config and drains: listed until it has drained.
    assert!(text.contains("backend=\"b\""));
    fetch(proxy.addr, get("/")).await;
    // What is under test is the drain timeout running out.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = reloader.clone();
    tokio::task::spawn_blocking(move || r.compact())
        .await
        .unwrap();
    let text = scrape(&proxy).await;
    assert!(
        !text.contains("backend=\"b\""),
        "b's series outlived its drain:\n{text}"
    );
    assert_sample(
        &text,
        "switchyard_requests_total{backend=\"a\",code=\"2xx\",pool=\"web\"}",
        3.0,
    );
    // A bad file counts as a failure.
    std::fs::write(&path, "[pools.web\n").unwrap();
    assert!(reloader.reload_async().await.is_err());
    let text = scrape(&proxy).await;
    assert!(sample(&text, "switchyard_config_reloads_total{result=\"failure\"}").unwrap() >= 1.0);
}

#[tokio::test]
async fn metrics_off_records_no_requests_and_a_reload_turns_them_on() {
    let a = named_backend("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let cfg = |metrics: bool| {
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nmetrics = {metrics}\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [pools.web]\npolicy = \"sticky_cookie\"\nbackends = [{{ address = \"{a}\", id = \"a\" }}]\n"
        )
    };
    std::fs::write(&path, cfg(false)).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    for _ in 0..3 {
        assert_eq!(fetch(proxy.addr, get("/")).await.status, 200);
    }
    let text = scrape(&proxy).await;
    for family in [
        "switchyard_requests_total",
        "switchyard_request_duration_seconds",
        "switchyard_affinity_total",
    ] {
        assert!(
            !text.contains(family),
            "{family} is recorded with metrics off:\n{text}"
        );
    }
    // What is not per-request stays.
    assert_sample(
        &text,
        "switchyard_backend_up{backend=\"a\",pool=\"web\"}",
        1.0,
    );
    assert_sample(
        &text,
        "switchyard_upstream_connections_opened_total{backend=\"a\",pool=\"web\"}",
        1.0,
    );

    std::fs::write(&path, cfg(true)).unwrap();
    reloader.reload_async().await.unwrap();
    for _ in 0..2 {
        assert_eq!(fetch(proxy.addr, get("/")).await.status, 200);
    }
    let text = scrape(&proxy).await;
    assert_sample(
        &text,
        "switchyard_requests_total{backend=\"a\",code=\"2xx\",pool=\"web\"}",
        2.0,
    );
    assert_sample(
        &text,
        "switchyard_request_duration_seconds_count{backend=\"a\",pool=\"web\"}",
        2.0,
    );
    assert_sample(
        &text,
        "switchyard_affinity_total{outcome=\"new\",pool=\"web\"}",
        2.0,
    );
}

#[tokio::test]
async fn admin_endpoints_answer_get_and_head_and_name_the_methods_they_take() {
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\npolicy = \"consistent_hash\"\nhash_key = [\"client_ip\"]\nbackends = [\"{a}\"]\n"
    )))
    .await;
    let admin = proxy.admin.unwrap();
    let with = |method: &str, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let got = fetch(admin, with("GET", "/healthz")).await;
    assert_eq!((got.status, &got.body[..]), (200, &b"ok\n"[..]));
    assert_eq!(fetch(admin, with("GET", "/readyz")).await.status, 200);
    for path in [
        "/healthz",
        "/readyz",
        "/status",
        "/metrics",
        "/pools/p/owner?key=k",
    ] {
        let got = fetch(admin, with("HEAD", path)).await;
        assert_eq!(got.status, 200, "HEAD {path}");
        assert!(got.body.is_empty(), "HEAD {path}");
    }
    for (method, path, allow) in [
        ("DELETE", "/status", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PUT", "/pools/p/owner", "GET, HEAD"),
        ("GET", "/reload", "POST"),
    ] {
        let got = fetch(admin, with(method, path)).await;
        assert_eq!(got.status, 405, "{method} {path}");
        assert_eq!(got.headers["allow"], allow, "{method} {path}");
    }
    assert_eq!(fetch(admin, with("GET", "/nowhere")).await.status, 404);
}

#[tokio::test]
async fn admin_connections_keep_to_the_header_timeout_and_a_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let a = named_backend("a").await;
    let proxy = TestProxy::start(&config(&format!(
        "[server.limits]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"1h\"\n\
         [pools.p]\nbackends = [\"{a}\"]\n"
    )))
    .await;
    let admin = proxy.admin.unwrap();
    let limit = std::time::Duration::from_secs(10);
    // Half a request head, then nothing: cut off after the header timeout.
    let mut half = TcpStream::connect(admin).await.unwrap();
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, half.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "half a request held the admin connection open"
    );
    // As many connections as the cap, idle: one more is not served until one closes.
    let mut held = Vec::new();
    for _ in 0..switchyard::admin::MAX_CONNECTIONS {
        held.push(TcpStream::connect(admin).await.unwrap());
    }
    // Each is accepted (and takes its slot) as soon as its first request is answered.
    for s in &mut held {
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = tokio::time::timeout(limit, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }
    let mut extra = TcpStream::connect(admin).await.unwrap();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    // Waiting for something not to happen can only be bounded in time: an answer within
    // this long would mean that the cap let it in.
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), extra.read(&mut buf));
    assert!(early.await.is_err(), "a connection over the cap was served");
    drop(held.pop());
    let n = tokio::time::timeout(limit, extra.read(&mut buf))
        .await
        .expect("the connection waiting for a slot was not served")
        .unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
}

#[tokio::test]
async fn admin_connections_close_after_the_idle_timeout_when_it_is_below_the_cap() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    let a = named_backend("a").await;
    let idle = Duration::from_millis(300);
    let proxy = TestProxy::start(&config(&format!(
        "[server.limits]\nidle_timeout = \"300ms\"\nheader_read_timeout = \"1h\"\n\
         [pools.p]\nbackends = [\"{a}\"]\n"
    )))
    .await;
    let admin = proxy.admin.unwrap();
    // The passing of the idle timeout is what is under test, so these waits are timed:
    // each connection must close after the idle timeout, and well before the cap of
    // 10 s that applies when the idle timeout is longer.
    let within = Duration::from_secs(5);
    // One that sends nothing.
    let started = Instant::now();
    let mut silent = TcpStream::connect(admin).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(within, silent.read_to_end(&mut rest))
        .await
        .expect("an admin connection that sent nothing stayed open")
        .unwrap();
    assert!(rest.is_empty());
    assert!(
        started.elapsed() >= idle,
        "closed after {:?}",
        started.elapsed()
    );
    // One that idles after a request.
    let mut kept = TcpStream::connect(admin).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let answered = Instant::now();
    tokio::time::timeout(within, kept.read_to_end(&mut rest))
        .await
        .expect("an idle admin connection stayed open")
        .unwrap();
    assert!(
        answered.elapsed() >= idle,
        "closed after {:?}",
        answered.elapsed()
    );
}

/// Sends `request` on a connection of its own, expects `status` back, and returns the
/// access log line it made, which must carry the same status.
async fn refused_and_logged(
    proxy: &TestProxy,
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    request: &[u8],
    status: u16,
) -> serde_json::Value {
    let got = raw_exchange(proxy.addr, request).await;
    assert!(got.starts_with(&format!("HTTP/1.1 {status}")), "{got}");
    let line = tokio::time::timeout(std::time::Duration::from_secs(10), lines.recv())
        .await
        .expect("no access log line")
        .unwrap();
    let line: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(line["status"], status, "{line}");
    assert_eq!(line["client"], "127.0.0.1", "{line}");
    line
}

#[tokio::test]
async fn heads_refused_by_the_parser_are_logged_and_counted_with_the_status_sent() {
    let (a, hits) = counting_backend().await;
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\naccess_log = \"json\"\n\
         [server.limits]\nmax_header_bytes = 131072\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [pools.p]\nbackends = [\"{a}\"]\n"
    );
    let (proxy, mut lines) = TestProxy::start_logging(&toml).await;
    // hyper's parser takes request targets of at most 65,534 bytes, whatever the room
    // for the head.
    let long_target = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(140_000)
    );
    for (request, status) in [(long_target, 414), (big_head, 431)] {
        refused_and_logged(&proxy, &mut lines, request.as_bytes(), status).await;
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    let text = scrape(&proxy).await;
    assert_sample(
        &text,
        "switchyard_requests_total{backend=\"\",code=\"4xx\",pool=\"\"}",
        2.0,
    );
}

#[tokio::test]
async fn requests_refused_after_routing_count_for_their_pool() {
    let (a, hits) = counting_backend().await;
    let proxy = TestProxy::start(&config(&format!("[pools.p]\nbackends = [\"{a}\"]\n"))).await;
    for (request, status) in [
        // An unknown transfer coding (501), CONNECT (405), an asterisk target (400).
        (
            &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"[..],
            "501",
        ),
        (b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", "405"),
        (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ] {
        let got = raw_exchange(proxy.addr, request).await;
        assert!(got.starts_with(&format!("HTTP/1.1 {status}")), "{got}");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    let text = scrape(&proxy).await;
    assert_sample(
        &text,
        "switchyard_requests_total{backend=\"\",code=\"4xx\",pool=\"p\"}",
        2.0,
    );
    assert_sample(
        &text,
        "switchyard_requests_total{backend=\"\",code=\"5xx\",pool=\"p\"}",
        1.0,
    );
}

#[tokio::test]
async fn requests_outside_any_pool_are_counted_and_logged() {
    let (a, hits) = counting_backend().await;
    let toml = format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\naccess_log = \"json\"\n\
         [server.limits]\nmax_header_bytes = 8192\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [[routes]]\nhost = \"only.example\"\npool = \"p\"\n[pools.p]\nbackends = [\"{a}\"]\n"
    );
    let (proxy, mut lines) = TestProxy::start_logging(&toml).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(16384)
    );
    for (request, status) in [
        // No route for this host (404); refused by the parser (400, 431).
        (
            &b"GET /nowhere HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n"[..],
            404,
        ),
        (b"GET /a\x01 HTTP/1.1\r\nHost: only.example\r\n\r\n", 400),
        (big.as_bytes(), 431),
    ] {
        let line = refused_and_logged(&proxy, &mut lines, request, status).await;
        assert_eq!(line["pool"], serde_json::Value::Null, "{line}");
        if status != 404 {
            assert_eq!((&line["method"], &line["path"]), (&"-".into(), &"-".into()));
        }
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    let text = scrape(&proxy).await;
    assert_sample(
        &text,
        "switchyard_requests_total{backend=\"\",code=\"4xx\",pool=\"\"}",
        3.0,
    );
}
