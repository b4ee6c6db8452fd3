//! Active health checks, passive ejection and what happens when nothing is healthy.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A backend named `name` whose `/healthz` answers 200 while `healthy` holds, else 500,
/// and whose other paths answer 500 while `failing` holds, else 200.
async fn switchable(
    name: &'static str,
    healthy: Arc<AtomicBool>,
    failing: Arc<AtomicBool>,
) -> std::net::SocketAddr {
    backend(move |req| {
        let (healthy, failing) = (healthy.clone(), failing.clone());
        async move {
            let bad = if req.uri().path() == "/healthz" {
                !healthy.load(Ordering::SeqCst)
            } else {
                failing.load(Ordering::SeqCst)
            };
            let mut r = text(name);
            if bad {
                *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            }
            r
        }
    })
    .await
}

fn flag(v: bool) -> Arc<AtomicBool> {
    Arc::new(AtomicBool::new(v))
}

/// Waits (bounded) until backend `id` of the first pool reports `healthy == want`.
/// Health checks run on their own clock, so this polls `/status`.
async fn wait_health(proxy: &TestProxy, id: &str, want: bool) {
    for _ in 0..400 {
        let b = backend_status(&status(proxy).await, id);
        if b["healthy"] == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{id} never became healthy={want}");
}

fn pool(backends: &[(&str, std::net::SocketAddr)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(id, a)| format!("{{ address = \"{a}\", id = \"{id}\" }}"))
        .collect();
    config(&format!(
        "[pools.p]\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    ))
}

const CHECKS: &str = "[pools.p.health]\ninterval = \"50ms\"\ntimeout = \"50ms\"\nhealthy_threshold = 2\nunhealthy_threshold = 2\n";

#[tokio::test]
async fn active_checks_take_a_backend_out_and_bring_it_back() {
    let (ha, hb) = (flag(true), flag(true));
    let a = switchable("a", ha.clone(), flag(false)).await;
    let b = switchable("b", hb.clone(), flag(false)).await;
    let proxy = TestProxy::start(&pool(&[("a", a), ("b", b)], CHECKS)).await;
    hb.store(false, Ordering::SeqCst);
    wait_health(&proxy, "b", false).await;
    for _ in 0..20 {
        assert_eq!(fetch(proxy.addr, get("/")).await.body, "a");
    }
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains("switchyard_backend_up{backend=\"b\",pool=\"p\"} 0"),
        "{text}"
    );
    hb.store(true, Ordering::SeqCst);
    wait_health(&proxy, "b", true).await;
    let mut seen = HashMap::new();
    for _ in 0..20 {
        *seen
            .entry(fetch(proxy.addr, get("/")).await.body)
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "b did not come back: {seen:?}");
}

#[tokio::test]
async fn failing_backend_is_ejected_within_the_cap() {
    let bad = switchable("bad", flag(true), flag(true)).await;
    let (g1, g2) = (named_backend("g1").await, named_backend("g2").await);
    let outlier = "[pools.p.outlier]\nconsecutive_failures = 3\nbase_ejection = \"1h\"\n";
    let proxy = TestProxy::start(&pool(&[("bad", bad), ("g1", g1), ("g2", g2)], outlier)).await;
    let mut errors = 0;
    for _ in 0..60 {
        if fetch(proxy.addr, get("/")).await.status == 500 {
            errors += 1;
        }
    }
    assert_eq!(
        errors, 3,
        "the failing backend kept receiving requests after 3 failures"
    );
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["backends"][0]["ejected"], true);

    // Two of two failing with a 50% cap: only one may be ejected.
    let (x, y) = (
        switchable("x", flag(true), flag(true)).await,
        switchable("y", flag(true), flag(true)).await,
    );
    let proxy = TestProxy::start(&pool(&[("x", x), ("y", y)], outlier)).await;
    for _ in 0..40 {
        fetch(proxy.addr, get("/")).await;
    }
    let s = status(&proxy).await;
    let ejected = s["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["ejected"] == true)
        .count();
    assert_eq!(ejected, 1, "{s}");
}

#[tokio::test]
async fn no_healthy_backend_fails_open_or_rejects() {
    let (ha, hb) = (flag(false), flag(false));
    let a = switchable("a", ha, flag(false)).await;
    let b = switchable("b", hb, flag(false)).await;
    let open = TestProxy::start(&pool(&[("a", a), ("b", b)], CHECKS)).await;
    let closed = TestProxy::start(&pool(
        &[("a", a), ("b", b)],
        &format!("all_down = \"reject\"\n{CHECKS}"),
    ))
    .await;
    for p in [&open, &closed] {
        wait_health(p, "a", false).await;
        wait_health(p, "b", false).await;
    }
    for _ in 0..5 {
        assert_eq!(fetch(open.addr, get("/")).await.status, 200);
        assert_eq!(fetch(closed.addr, get("/")).await.status, 503);
    }
    let text = metrics_text(&open).await;
    assert!(
        text.contains("switchyard_pool_fail_open_total{pool=\"p\"} 5"),
        "{text}"
    );
}

#[tokio::test]
async fn retry_budget_caps_retries_of_requests_already_sent() {
    let (reset, hits) = resetting_backend().await;
    let live = named_backend("live").await;
    let cfg = |budget: &str| {
        pool(
            &[("reset", reset), ("live", live)],
            &format!("retries = 1\nretry_budget = {budget}\n[pools.p.outlier]\nconsecutive_failures = 0\n"),
        )
    };
    // No budget beyond the reserve of ten: half the requests start at the backend that
    // closes the connection on them, and only ten of those twenty may go on.
    let stingy = TestProxy::start(&cfg("0.0")).await;
    let mut ok = 0;
    for _ in 0..40 {
        if fetch(stingy.addr, get("/")).await.status == 200 {
            ok += 1;
        }
    }
    assert_eq!(ok, 30);
    assert_eq!(hits.load(Ordering::SeqCst), 20);
    let text = metrics_text(&stingy).await;
    assert!(
        text.contains("switchyard_retries_refused_total{pool=\"p\"} 10"),
        "{text}"
    );
    // A budget of one retry per request never runs out.
    let generous = TestProxy::start(&cfg("1.0")).await;
    for _ in 0..40 {
        assert_eq!(fetch(generous.addr, get("/")).await.status, 200);
    }
}

#[tokio::test]
async fn retries_after_failed_connects_spend_no_budget() {
    // Two backends that refuse connections, one that answers, and no ejection: a
    // third of the requests start at each dead one, and every one of them must reach
    // the live backend, budget or not.
    let (d1, d2) = (dead_addr().await, dead_addr().await);
    let live = named_backend("live").await;
    let proxy = TestProxy::start(&pool(
        &[("d1", d1), ("d2", d2), ("live", live)],
        "retries = 2\nretry_budget = 0.0\n[pools.p.outlier]\nconsecutive_failures = 0\n",
    ))
    .await;
    for _ in 0..60 {
        assert_eq!(fetch(proxy.addr, get("/")).await.status, 200);
    }
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains("switchyard_retries_refused_total{pool=\"p\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_backend_added_by_reload_starts_slowly() {
    let (a, b, c) = (
        named_backend("a").await,
        named_backend("b").await,
        named_backend("c").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let cfg = |list: &[(&str, std::net::SocketAddr)]| pool(list, "slow_start = \"1h\"");
    std::fs::write(&path, cfg(&[("a", a), ("b", b)])).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    // Backends present from the start take their full share at once.
    let mut seen = HashMap::new();
    for _ in 0..100 {
        *seen
            .entry(fetch(proxy.addr, get("/")).await.backend())
            .or_insert(0) += 1;
    }
    assert_eq!((seen["a"], seen["b"]), (50, 50));
    std::fs::write(&path, cfg(&[("a", a), ("b", b), ("c", c)])).unwrap();
    reloader.reload_async().await.unwrap();
    let mut seen = HashMap::<String, usize>::new();
    for _ in 0..300 {
        *seen
            .entry(fetch(proxy.addr, get("/")).await.backend())
            .or_insert(0) += 1;
    }
    // At the very start of an hour-long ramp, c takes almost nothing of its third, and
    // what it does not take is shared (about 150 each), not left to its neighbour.
    let c_share = seen.get("c").copied().unwrap_or(0);
    assert!(c_share <= 5, "{seen:?}");
    assert!(seen["a"] >= 120 && seen["b"] >= 120, "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 300);
}

#[tokio::test]
async fn the_share_of_a_backend_that_is_out_goes_to_all_the_others() {
    for policy in ["round_robin", "least_request"] {
        let ha = flag(true);
        let a = switchable("a", ha.clone(), flag(false)).await;
        let b = switchable("b", flag(true), flag(false)).await;
        let c = switchable("c", flag(true), flag(false)).await;
        let d = switchable("d", flag(true), flag(false)).await;
        let proxy = TestProxy::start(&pool(
            &[("a", a), ("b", b), ("c", c), ("d", d)],
            &format!("policy = \"{policy}\"\n{CHECKS}"),
        ))
        .await;
        ha.store(false, Ordering::SeqCst);
        wait_health(&proxy, "a", false).await;
        let mut seen = HashMap::<String, usize>::new();
        for _ in 0..400 {
            *seen
                .entry(
                    String::from_utf8_lossy(&fetch(proxy.addr, get("/")).await.body).into_owned(),
                )
                .or_insert(0) += 1;
        }
        // About 133 each. Handed to the next in the list, a's share would give b 200.
        assert_eq!(seen.get("a"), None, "{policy}: {seen:?}");
        for id in ["b", "c", "d"] {
            let n = seen.get(id).copied().unwrap_or(0);
            assert!((95..175).contains(&n), "{policy}: {seen:?}");
        }
    }
}

#[tokio::test]
async fn switching_checks_off_forgets_their_verdict() {
    let a = switchable("a", flag(true), flag(false)).await;
    let b = switchable("b", flag(false), flag(false)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, pool(&[("a", a), ("b", b)], CHECKS)).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    wait_health(&proxy, "b", false).await;
    std::fs::write(&path, pool(&[("a", a), ("b", b)], "")).unwrap();
    reloader.reload_async().await.unwrap();
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["backends"][1]["healthy"], true, "{s}");
}

#[tokio::test]
async fn a_pool_whose_backends_all_drain_does_not_fail_open() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let proxy = TestProxy::start(&config(&format!(
        "[pools.p]\nbackends = [{{ address = \"{a}\", drain = true }}, {{ address = \"{b}\", drain = true }}]\n"
    )))
    .await;
    for _ in 0..3 {
        assert_eq!(fetch(proxy.addr, get("/")).await.status, 503);
    }
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains("switchyard_pool_fail_open_total{pool=\"p\"} 0"),
        "{text}"
    );
}

#[tokio::test]
async fn a_check_under_way_when_checks_are_switched_off_decides_nothing() {
    let a = named_backend("a").await;
    // b answers its check only when told to, with a failure; and says when the check's
    // connection has closed, by which time the checker has taken the result.
    let probed = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let closed = Arc::new(tokio::sync::Notify::new());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = l.local_addr().unwrap();
    {
        let (probed, release, closed) = (probed.clone(), release.clone(), closed.clone());
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut head = read_head(&mut s).await.unwrap_or_default();
                if !head.starts_with(b"GET /healthz ") {
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\nb",
                        )
                        .await;
                    continue;
                }
                probed.notify_one();
                release.notified().await;
                let _ = s
                    .write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n")
                    .await;
                let _ = s.read_to_end(&mut head).await;
                closed.notify_one();
            }
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let checks = "[pools.p.health]\ninterval = \"2s\"\ntimeout = \"2s\"\nunhealthy_threshold = 1\n";
    std::fs::write(&path, pool(&[("a", a), ("b", b)], checks)).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    tokio::time::timeout(Duration::from_secs(10), probed.notified())
        .await
        .expect("no check came");
    // Checks off while that one is under way; then it fails.
    std::fs::write(&path, pool(&[("a", a), ("b", b)], "")).unwrap();
    reloader.reload_async().await.unwrap();
    release.notify_one();
    tokio::time::timeout(Duration::from_secs(10), closed.notified())
        .await
        .expect("the check's connection stayed open");
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["backends"][1]["healthy"], true, "{s}");
}

#[tokio::test]
async fn a_shorter_interval_applies_at_once() {
    let a = switchable("a", flag(true), flag(false)).await;
    let b = switchable("b", flag(false), flag(false)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let hourly = "[pools.p.health]\ninterval = \"1h\"\nunhealthy_threshold = 1\n";
    std::fs::write(&path, pool(&[("a", a), ("b", b)], hourly)).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["backends"][1]["healthy"], true, "{s}");
    // Not an hour from now: b is found failing within moments.
    std::fs::write(&path, pool(&[("a", a), ("b", b)], CHECKS)).unwrap();
    reloader.reload_async().await.unwrap();
    wait_health(&proxy, "b", false).await;
}

#[tokio::test]
async fn with_every_backend_down_a_pool_failing_open_keeps_pinned_clients_where_they_are() {
    let (ha, hb) = (flag(true), flag(true));
    let a = switchable("a", ha.clone(), flag(false)).await;
    let b = switchable("b", hb.clone(), flag(false)).await;
    let sticky = format!(
        "policy = \"sticky_cookie\"\n{CHECKS}[pools.p.sticky]\non_unavailable = \"reject\"\n"
    );
    let proxy = TestProxy::start(&pool(&[("a", a), ("b", b)], &sticky)).await;
    let mut pins = HashMap::new();
    while pins.len() < 2 {
        let got = fetch(proxy.addr, get("/")).await;
        let cookie = got.headers["set-cookie"].to_str().unwrap();
        let pair = cookie.split(';').next().unwrap().to_owned();
        pins.insert(String::from_utf8_lossy(&got.body).into_owned(), pair);
    }
    // Every health check fails: the pool fails open, for pinned clients too.
    ha.store(false, Ordering::SeqCst);
    hb.store(false, Ordering::SeqCst);
    wait_health(&proxy, "a", false).await;
    wait_health(&proxy, "b", false).await;
    for (owner, pair) in &pins {
        for _ in 0..10 {
            let got = fetch(proxy.addr, get_with_cookie("/", pair)).await;
            assert_eq!(got.status, 200, "{owner}");
            assert_eq!(String::from_utf8_lossy(&got.body), *owner);
        }
    }
    let text = metrics_text(&proxy).await;
    assert!(
        text.contains("switchyard_pool_fail_open_total{pool=\"p\"} 20"),
        "{text}"
    );
}

#[tokio::test]
async fn failing_open_a_pinned_client_whose_backend_is_gone_goes_elsewhere() {
    let mut k = Killable::start("k").await;
    let b = switchable("b", flag(true), flag(false)).await;
    // Both answer their checks, neither with the one status that passes: all down.
    let extra = format!("policy = \"sticky_cookie\"\n{CHECKS}expect_status = \"204\"\n");
    let proxy = TestProxy::start(&pool(&[("b", b), ("k", k.addr)], &extra)).await;
    wait_health(&proxy, "k", false).await;
    wait_health(&proxy, "b", false).await;
    // Failing open, round robin still takes turns (it once sent every request to one).
    let mut seen = HashMap::<String, usize>::new();
    let mut pair = None;
    for _ in 0..40 {
        let got = fetch(proxy.addr, get("/")).await;
        let body = String::from_utf8_lossy(&got.body).into_owned();
        if body == "k" {
            let cookie = got.headers["set-cookie"].to_str().unwrap();
            pair = Some(cookie.split(';').next().unwrap().to_owned());
        }
        *seen.entry(body).or_insert(0) += 1;
    }
    assert!(
        seen.get("b") >= Some(&10) && seen.get("k") >= Some(&10),
        "{seen:?}"
    );
    // k goes away: its client goes to b, as the pool fails open, rather than get 503.
    k.kill().await;
    let got = fetch(proxy.addr, get_with_cookie("/", &pair.unwrap())).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "b");
}

#[tokio::test]
async fn with_every_backend_down_learned_sessions_stay_where_they_are() {
    let (x, y) = (Killable::start("x").await, Killable::start("y").await);
    // Both answer their checks, neither with the one status that passes: all down.
    let extra = format!(
        "policy = \"sticky_learn\"\n{CHECKS}expect_status = \"204\"\n\
         [pools.p.learn]\ncookie = \"JSESSIONID\"\n"
    );
    let proxy = TestProxy::start(&pool(&[("x", x.addr), ("y", y.addr)], &extra)).await;
    wait_health(&proxy, "x", false).await;
    wait_health(&proxy, "y", false).await;
    let mut sessions = HashMap::new();
    for _ in 0..40 {
        let got = fetch(proxy.addr, get("/")).await;
        let cookie = got.headers["set-cookie"].to_str().unwrap();
        let pair = cookie.split(';').next().unwrap().to_owned();
        sessions.insert(String::from_utf8_lossy(&got.body).into_owned(), pair);
    }
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    for (owner, pair) in &sessions {
        for _ in 0..10 {
            let got = fetch(proxy.addr, get_with_cookie("/", pair)).await;
            assert_eq!(String::from_utf8_lossy(&got.body), *owner);
        }
    }
    // Each went to its own backend as a hit, not by way of a redispatch that bound it
    // there again.
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["affinity"]["redispatched"], 0, "{s}");
    assert_eq!(s["pools"][0]["affinity"]["hit"], 20, "{s}");
    drop((x, y));
}
