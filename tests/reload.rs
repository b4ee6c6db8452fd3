//! Hot reload end to end: the file on disk, SIGHUP-free triggers (the watcher and
//! `POST /reload`), and traffic that must not notice.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::net::TcpStream;

/// Upper bound for waits that should end much sooner; a failure, never a sync point.
const LIMIT: Duration = Duration::from_secs(10);

fn base(admin: bool) -> String {
    let admin = if admin {
        "[admin]\nlisten = \"127.0.0.1:0\"\n"
    } else {
        ""
    };
    format!("[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"5s\"\n{admin}")
}

fn one_pool(backends: &[(&str, std::net::SocketAddr)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(id, a)| format!("{{ address = \"{a}\", id = \"{id}\" }}"))
        .collect();
    format!(
        "{}[pools.p]\n{extra}\nbackends = [{}]\n",
        base(true),
        list.join(", ")
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

async fn post_reload(proxy: &TestProxy) -> Got {
    let req = Request::post("/reload")
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    fetch(proxy.admin.unwrap(), req).await
}

/// Starts the proxy on `switchyard.toml` in `dir`, written with `text`; also returns the
/// file's path and a follower of the serving generation.
async fn start_in(
    dir: &Path,
    text: &str,
) -> (
    PathBuf,
    TestProxy,
    Arc<switchyard::reload::Reloader>,
    tokio::sync::watch::Receiver<u64>,
) {
    let path = dir.join("switchyard.toml");
    write(&path, text);
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    let rx = reloader.subscribe();
    (path, proxy, reloader, rx)
}

/// Waits until `generation` serves, and checks that a request then goes to `backend`.
async fn serves(
    rx: &mut tokio::sync::watch::Receiver<u64>,
    generation: u64,
    proxy: &TestProxy,
    backend: &str,
) {
    self::generation(rx, generation).await;
    assert_eq!(fetch(proxy.addr, get("/")).await.backend(), backend);
}

/// Waits until the serving generation reaches `generation`.
async fn generation(rx: &mut tokio::sync::watch::Receiver<u64>, generation: u64) {
    tokio::time::timeout(LIMIT, rx.wait_for(|g| *g >= generation))
        .await
        .expect("reload applied in time")
        .unwrap();
}

#[tokio::test]
async fn post_reload_applies_a_valid_file_and_refuses_an_invalid_one() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    write(&path, &one_pool(&[("a", a)], ""));
    let (proxy, _reloader) = TestProxy::start_file(&path).await;
    assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "a");

    // A form that a web page elsewhere made the browser send is refused; one from the
    // admin listener's own origin is taken.
    for origin in ["http://evil.example", "null", "http://admin.evil.example"] {
        let req = Request::post("/reload")
            .header("host", "admin")
            .header("origin", origin)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = fetch(proxy.admin.unwrap(), req).await;
        assert_eq!(got.status, 403, "{origin}: {:?}", got.body);
    }
    let req = Request::post("/reload")
        .header("host", "admin")
        .header("origin", "http://admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(fetch(proxy.admin.unwrap(), req).await.status, 200);
    // Over HTTP/2 the host is in `:authority`: the same origin there is taken too, and
    // another refused.
    let admin = proxy.admin.unwrap();
    let stream = TcpStream::connect(admin).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for (origin, status) in [
        (format!("http://{admin}"), 200),
        ("http://evil.example".into(), 403),
    ] {
        let req = Request::post(format!("http://{admin}/reload"))
            .header("origin", origin.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), status, "{origin} over HTTP/2");
    }

    // The same bytes again: nothing to do.
    let got = post_reload(&proxy).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["changed"], false);
    assert_eq!(got.json()["generation"], 1);

    write(&path, &one_pool(&[("b", b)], ""));
    let got = post_reload(&proxy).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.json()["generation"], 2);
    assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "b");

    let file = path.display().to_string();
    let invalid = [
        ("[pools.p\nbackends = []\n".to_owned(), "pools.p"),
        (one_pool(&[("a", a)], "colour = \"blue\""), "pools.p.colour"),
        (
            format!("{}[[routes]]\npool = \"nope\"\n", one_pool(&[("a", a)], "")),
            "routes[0].pool",
        ),
        (
            one_pool(&[("a", a)], "policy = \"fastest\""),
            "pools.p.policy",
        ),
        (one_pool(&[("a", a)], "retries = -1"), "pools.p.retries"),
        (
            one_pool(&[("a", a)], "").replace(
                "listen = [\"127.0.0.1:0\"]",
                "listen = [\"127.0.0.1:0\", \"127.0.0.2:0\"]",
            ),
            "server.listen",
        ),
        (
            one_pool(&[("a", a)], "").replace("shutdown_grace = \"5s\"", "workers = 3"),
            "server.workers",
        ),
        (
            one_pool(&[("a", a)], "").replace(
                "shutdown_grace = \"5s\"",
                "shutdown_grace = \"5s\"\n[server.limits]\nidle_timeout = \"7s\"",
            ),
            "server.limits.idle_timeout",
        ),
    ];
    let mut last_failures = 0;
    for (i, (text, key)) in invalid.iter().enumerate() {
        write(&path, text);
        let got = post_reload(&proxy).await;
        assert_eq!(got.status, 400, "{text}");
        let msg = String::from_utf8_lossy(&got.body).to_string();
        assert!(msg.contains(key), "{msg} does not name {key}");
        assert!(msg.contains(&file), "{msg} does not name the file");
        // Routing is unchanged.
        assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "b");
        let s = status(&proxy).await;
        assert_eq!(s["generation"], 2);
        assert_eq!(s["last_reload"]["result"], "failure");
        assert!(s["last_reload"]["error"].as_str().unwrap().contains(key));
        // The file watcher may also have tried the same bad file: at least one per write.
        let failures = s["reloads"]["failure"].as_u64().unwrap();
        assert!(
            failures > last_failures && failures > i as u64,
            "{failures} failures after {} bad writes",
            i + 1
        );
        last_failures = failures;
    }
    // The running file written back: nothing to apply, but the failure no longer
    // stands.
    write(&path, &one_pool(&[("b", b)], ""));
    let got = post_reload(&proxy).await;
    assert_eq!(got.json()["changed"], false, "{:?}", got.body);
    let s = status(&proxy).await;
    assert_eq!(s["generation"], 2);
    assert_eq!(s["last_reload"]["result"], "success");
    assert_eq!(s["last_reload"]["error"], serde_json::Value::Null);
    // The next valid write applies normally.
    write(&path, &one_pool(&[("a", a), ("b", b)], ""));
    assert_eq!(post_reload(&proxy).await.json()["generation"], 3);
    let s = status(&proxy).await;
    assert_eq!(s["last_reload"]["result"], "success");
    assert!(s["reloads"]["success"].as_u64().unwrap() >= 2);
}

#[tokio::test]
async fn files_beside_the_configuration_neither_delay_nor_cause_a_reload() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let dir = tempfile::tempdir().unwrap();
    let (path, proxy, reloader, mut rx) = start_in(dir.path(), &one_pool(&[("a", a)], "")).await;
    // A log written beside the configuration every few milliseconds, faster than the
    // debounce period.
    let stop = Arc::new(AtomicBool::new(false));
    let log = dir.path().join("switchyard.log");
    let writer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                std::fs::write(&log, format!("line {n}\n")).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let attempts = reloader.attempts.load(Ordering::Relaxed);
    // What is under test is that nothing happens over several debounce periods.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(reloader.attempts.load(Ordering::Relaxed), attempts);
    // An edit of the configuration is applied while the log goes on.
    write(&path, &one_pool(&[("b", b)], ""));
    serves(&mut rx, 2, &proxy, "b").await;
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
}

#[tokio::test]
async fn links_and_folders_replaced_along_the_way_are_followed() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let dir = tempfile::tempdir().unwrap();
    let release = |name: &str, text: &str| -> PathBuf {
        let d = dir.path().join("releases").join(name).join("config");
        std::fs::create_dir_all(&d).unwrap();
        write(&d.join("switchyard.toml"), text);
        d.join("switchyard.toml")
    };
    // A release layout: etc/sw -> ../current/config, current -> releases/v1.
    release("v1", &one_pool(&[("a", a)], ""));
    let v2 = release("v2", &one_pool(&[("b", b)], ""));
    std::os::unix::fs::symlink("releases/v1", dir.path().join("current")).unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    std::os::unix::fs::symlink("../current/config", dir.path().join("etc/sw")).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&dir.path().join("etc/sw/switchyard.toml")).await;
    let mut rx = reloader.subscribe();
    assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "a");
    // `current` pointed at the next release, the old one deleted.
    std::os::unix::fs::symlink("releases/v2", dir.path().join("tmp")).unwrap();
    std::fs::rename(dir.path().join("tmp"), dir.path().join("current")).unwrap();
    serves(&mut rx, 2, &proxy, "b").await;
    std::fs::remove_dir_all(dir.path().join("releases/v1")).unwrap();
    // An edit in place in the release now served is seen.
    write(&v2, &one_pool(&[("a", a)], ""));
    serves(&mut rx, 3, &proxy, "a").await;
    drop(proxy);

    // A folder replaced by renaming another over it.
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    write(&conf.join("switchyard.toml"), &one_pool(&[("a", a)], ""));
    let (proxy, reloader) = TestProxy::start_file(&conf.join("switchyard.toml")).await;
    let mut rx = reloader.subscribe();
    let next = dir.path().join("conf.next");
    std::fs::create_dir(&next).unwrap();
    write(&next.join("switchyard.toml"), &one_pool(&[("b", b)], ""));
    std::fs::rename(&conf, dir.path().join("conf.old")).unwrap();
    std::fs::rename(&next, &conf).unwrap();
    serves(&mut rx, 2, &proxy, "b").await;
    // And the new folder is the one watched.
    write(&conf.join("switchyard.toml"), &one_pool(&[("a", a)], ""));
    serves(&mut rx, 3, &proxy, "a").await;
}

#[tokio::test]
async fn a_symlink_pointed_at_another_folder_is_followed_there() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let dir = tempfile::tempdir().unwrap();
    let folder = |name: &str, text: &str| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let f = d.join("switchyard.toml");
        write(&f, text);
        f
    };
    let first = folder("first", &one_pool(&[("a", a)], ""));
    let second = folder("second", &one_pool(&[("b", b)], ""));
    let links = dir.path().join("links");
    std::fs::create_dir(&links).unwrap();
    let path = links.join("switchyard.toml");
    std::os::unix::fs::symlink(&first, &path).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    let mut rx = reloader.subscribe();
    assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "a");
    // `ln -sfn`: a new link renamed over the old one.
    std::os::unix::fs::symlink(&second, links.join("tmp")).unwrap();
    std::fs::rename(links.join("tmp"), &path).unwrap();
    serves(&mut rx, 2, &proxy, "b").await;
    // An edit in place in the new target's folder is seen.
    write(&second, &one_pool(&[("a", a)], ""));
    serves(&mut rx, 3, &proxy, "a").await;
}

#[tokio::test]
async fn watcher_sees_in_place_writes_renames_and_symlink_swaps() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let dir = tempfile::tempdir().unwrap();

    // In place, then an editor's write-to-temp-and-rename.
    let (path, proxy, reloader, mut rx) = start_in(dir.path(), &one_pool(&[("a", a)], "")).await;
    write(&path, &one_pool(&[("b", b)], ""));
    serves(&mut rx, 2, &proxy, "b").await;
    // Reading the file to reload it is not a change: no reload may follow by itself.
    let attempts = reloader.attempts.load(Ordering::Relaxed);
    // What is under test is that nothing happens over several debounce periods.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        reloader.attempts.load(Ordering::Relaxed),
        attempts,
        "a reload triggered another"
    );
    let tmp = dir.path().join(".switchyard.toml.swp");
    write(&tmp, &one_pool(&[("a", a)], ""));
    std::fs::rename(&tmp, &path).unwrap();
    serves(&mut rx, 3, &proxy, "a").await;
    drop(proxy);

    // Kubernetes ConfigMap layout: file -> ..data/file, ..data -> ..v1; an update
    // writes ..v2 and renames a new ..data symlink over the old one.
    let k8s = dir.path().join("k8s");
    std::fs::create_dir(&k8s).unwrap();
    let version = |n: u32, text: &str| -> PathBuf {
        let v = k8s.join(format!("..v{n}"));
        std::fs::create_dir(&v).unwrap();
        write(&v.join("switchyard.toml"), text);
        v
    };
    version(1, &one_pool(&[("a", a)], ""));
    std::os::unix::fs::symlink("..v1", k8s.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/switchyard.toml", k8s.join("switchyard.toml")).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&k8s.join("switchyard.toml")).await;
    let mut rx = reloader.subscribe();
    assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "a");
    version(2, &one_pool(&[("b", b)], ""));
    std::os::unix::fs::symlink("..v2", k8s.join("..data_tmp")).unwrap();
    std::fs::rename(k8s.join("..data_tmp"), k8s.join("..data")).unwrap();
    std::fs::remove_dir_all(k8s.join("..v1")).unwrap();
    serves(&mut rx, 2, &proxy, "b").await;
}

#[tokio::test]
async fn affinity_of_surviving_backends_holds_across_reloads() {
    let names = ["a", "b", "c", "d"];
    let mut addrs = Vec::new();
    for n in names {
        addrs.push((n, named_backend(n).await));
    }
    let env = "SWITCHYARD_TEST_RELOAD_SECRET";
    std::env::set_var(env, "a secret for the reload tests");
    let cfg = |ids: &[usize]| {
        let list: Vec<(&str, std::net::SocketAddr)> = ids.iter().map(|&i| addrs[i]).collect();
        let sticky: Vec<String> = list
            .iter()
            .map(|(id, a)| format!("{{ address = \"{a}\", id = \"{id}\" }}"))
            .collect();
        format!(
            "{}[[routes]]\npath_prefix = \"/s\"\npool = \"s\"\n[[routes]]\npool = \"h\"\n\
             [pools.s]\npolicy = \"sticky_cookie\"\nbackends = [{l}]\n[pools.s.sticky]\nsecret_env = \"{env}\"\n\
             [pools.h]\npolicy = \"consistent_hash\"\nhash_key = [\"header:X-User\"]\nbackends = [{l}]\n",
            base(true),
            l = sticky.join(", ")
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    write(&path, &cfg(&[0, 1, 2]));
    let (proxy, _reloader) = TestProxy::start_file(&path).await;

    // Cookies for a, b and c; owners of 200 hash keys.
    let mut cookies = Vec::new();
    for _ in 0..3 {
        let got = fetch(proxy.addr, get("/s")).await;
        let sc: Vec<_> = got
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect();
        let ours = sc
            .iter()
            .find(|v| v.starts_with("SWITCHYARD="))
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_owned();
        cookies.push((ours, got.backend()));
    }
    let user = |u: usize| {
        Request::get("/")
            .header("host", "t")
            .header("x-user", format!("u{u}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    let mut owners = Vec::new();
    for u in 0..200 {
        owners.push(fetch(proxy.addr, user(u)).await.backend());
    }

    // Remove b, add d, reweight nothing else.
    write(&path, &cfg(&[0, 2, 3]));
    assert_eq!(post_reload(&proxy).await.status, 200);
    for (cookie, backend) in &cookies {
        let got = fetch(proxy.addr, get_with_cookie("/s", cookie)).await;
        // b drains (default 5m): its clients stay too.
        assert_eq!(&got.backend(), backend);
    }
    let mut moved_to = HashSet::new();
    let mut still_b = 0;
    for (u, owner) in owners.iter().enumerate() {
        let now = fetch(proxy.addr, user(u)).await.backend();
        if owner == "b" && now == "b" {
            still_b += 1;
        }
        // b still drains and keeps its keys, except those the new backend d takes,
        // as d takes some keys of every backend.
        if &now != owner {
            moved_to.insert(now);
        }
    }
    assert!(
        moved_to.iter().all(|m| m == "d"),
        "keys moved elsewhere than to the new backend: {moved_to:?}"
    );
    assert!(still_b > 0, "the draining backend lost all its keys");
    let s = status(&proxy).await;
    let s_pool = s["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "s")
        .unwrap();
    let b = s_pool["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["id"] == "b")
        .unwrap();
    assert_eq!(b["draining"], true);
    assert_eq!(b["removed"], true);
}

#[tokio::test]
async fn websocket_survives_a_reload_that_removes_its_backend() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ws_addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                while let Some(Ok(m)) = ws.next().await {
                    if m.is_text() {
                        ws.send(m).await.unwrap();
                    }
                }
            });
        }
    });
    let other = named_backend("other").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    write(&path, &one_pool(&[("ws", ws_addr)], ""));
    let (proxy, _r) = TestProxy::start_file(&path).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/", proxy.addr))
        .await
        .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "before"
    );
    write(&path, &one_pool(&[("other", other)], ""));
    assert_eq!(post_reload(&proxy).await.status, 200);
    assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "other");
    for i in 0..5 {
        ws.send(Message::text(format!("after {i}"))).await.unwrap();
        let m = tokio::time::timeout(LIMIT, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(m.into_text().unwrap().as_str(), format!("after {i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_fail_no_request() {
    let names = ["a", "b", "c", "d"];
    let mut addrs = Vec::new();
    for n in names {
        addrs.push((n, named_backend(n).await));
    }
    let policies = [
        "round_robin",
        "least_request",
        "consistent_hash",
        "sticky_cookie",
        "sticky_learn",
    ];
    let cfg = |round: usize| {
        // A non-empty subset of backends with varying weights, and a policy.
        let mut list = Vec::new();
        for (i, (id, a)) in addrs.iter().enumerate() {
            if (round + i) % 4 != 3 {
                list.push(format!(
                    "{{ address = \"{a}\", id = \"{id}\", weight = {} }}",
                    1 + (round * 7 + i) % 5
                ));
            }
        }
        let policy = policies[round % policies.len()];
        let extra = match policy {
            "consistent_hash" => {
                "hash_key = [\"header:X-User\", \"client_ip\"]\nbounded_load = 1.5\n"
            }
            "sticky_learn" => "[pools.p.learn]\ncookie = \"sid\"\n",
            _ => "",
        };
        // Sub-tables must come after the pool's own keys.
        let (keys, table) = if extra.starts_with('[') {
            ("", extra)
        } else {
            (extra, "")
        };
        format!(
            "{}[pools.p]\npolicy = \"{policy}\"\n{keys}backends = [{}]\n{table}",
            base(true),
            list.join(", ")
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    write(&path, &cfg(0));
    let (proxy, _r) = TestProxy::start_file(&path).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    // Keep-alive HTTP/1.1 clients.
    for _ in 0..3 {
        let (stop, ok, addr) = (stop.clone(), ok.clone(), proxy.addr);
        clients.push(tokio::spawn(async move {
            let mut c = Client::connect(addr).await;
            while !stop.load(Ordering::Relaxed) {
                let got = c.get("/").await;
                assert_eq!(got.status, 200, "{:?}", got.body);
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // A new connection per request.
    for _ in 0..2 {
        let (stop, ok, addr) = (stop.clone(), ok.clone(), proxy.addr);
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let got = fetch(addr, get("/")).await;
                assert_eq!(got.status, 200, "{:?}", got.body);
                ok.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // h2c, several streams on one connection.
    {
        let (stop, ok, addr) = (stop.clone(), ok.clone(), proxy.addr);
        clients.push(tokio::spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (tx, conn) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                let mut batch = Vec::new();
                for _ in 0..4 {
                    let mut tx = tx.clone();
                    batch.push(tokio::spawn(async move {
                        let req = Request::get(format!("http://{addr}/h2"))
                            .body(Full::new(Bytes::new()))
                            .unwrap();
                        let resp = tx.send_request(req).await.unwrap();
                        assert_eq!(resp.status(), 200);
                        resp.into_body().collect().await.unwrap();
                    }));
                }
                for b in batch {
                    b.await.unwrap();
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }

    for round in 1..=50 {
        write(&path, &cfg(round));
        let got = post_reload(&proxy).await;
        assert_eq!(
            got.status,
            200,
            "round {round}: {}",
            String::from_utf8_lossy(&got.body)
        );
        // Let traffic flow on each configuration before the next change.
        let before = ok.load(Ordering::Relaxed);
        while ok.load(Ordering::Relaxed) < before + 20 {
            tokio::task::yield_now().await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(LIMIT, c)
            .await
            .expect("client finished")
            .expect("no failed request");
    }
    assert!(ok.load(Ordering::Relaxed) >= 1000);
    assert_eq!(status(&proxy).await["generation"], 51);
}

#[tokio::test]
async fn a_thousand_reloads_leave_nothing_behind() {
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let cfg = |w: usize| {
        one_pool(&[("a", a), ("b", b)], "").replace(
            "id = \"b\" }",
            &format!("id = \"b\", weight = {} }}", 1 + w % 7),
        )
    };
    write(&path, &cfg(0));
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    let mut client = Client::connect(proxy.addr).await;
    assert_eq!(client.get("/").await.status, 200);
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let mut old = Vec::new();
    for i in 1..=1000 {
        old.push(Arc::downgrade(&proxy.runtime.load_full()));
        write(&path, &cfg(i));
        reloader.reload_async().await.unwrap();
        if i % 100 == 0 {
            assert_eq!(client.get("/").await.status, 200);
        }
    }
    assert_eq!(client.get("/").await.status, 200);
    let alive = old.iter().filter(|w| w.strong_count() > 0).count();
    assert_eq!(alive, 0, "{alive} old snapshots are still alive");
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    // At most: a connection to the second backend (its task and its watchdog's), and
    // one to spare.
    assert!(
        tasks_after <= tasks_before + 3,
        "tasks grew from {tasks_before} to {tasks_after}"
    );
    let rt = proxy.runtime.load();
    let opened: u64 = rt.pools[0]
        .members
        .iter()
        .map(|m| m.backend.pool.connections_opened())
        .sum();
    assert!(
        opened <= 2,
        "{opened} upstream connections opened: pools were not carried over"
    );
}

#[tokio::test]
async fn a_backend_removed_from_a_stateless_pool_stays_until_its_requests_end() {
    // b holds its first request until told to answer.
    let (b, arrived_rx, release) = holding_first_backend("b").await;
    let (a, c) = (named_backend("a").await, named_backend("c").await);
    let dir = tempfile::tempdir().unwrap();
    // The drain timeout is not what ends the drain of a pool that pins no clients.
    let extra = "drain_timeout = \"1h\"";
    let (path, proxy, reloader, _rx) = start_in(
        dir.path(),
        &one_pool(&[("a", a), ("b", b), ("c", c)], extra),
    )
    .await;
    let addr = proxy.addr;
    let mut client = Client::connect(proxy.addr).await;
    assert_eq!(client.get("/").await.backend(), "a");
    let slow = tokio::spawn(async move { fetch(addr, get("/")).await });
    tokio::time::timeout(LIMIT, arrived_rx)
        .await
        .expect("a request reached b")
        .unwrap();

    // b and c leave; c has nothing in flight and goes at once, b drains.
    write(&path, &one_pool(&[("a", a)], extra));
    assert_eq!(post_reload(&proxy).await.status, 200);
    let s = status(&proxy).await;
    assert!(
        find_backend_status(&s, "c").is_none(),
        "c listed with nothing to drain: {s}"
    );
    let b_entry = find_backend_status(&s, "b").expect("b listed while its request runs");
    assert_eq!(b_entry["draining"], true);
    assert_eq!(b_entry["removed"], true);
    assert_eq!(b_entry["in_flight"], 1);
    for _ in 0..10 {
        assert_eq!(
            client.get("/").await.backend(),
            "a",
            "a removed backend took a new request"
        );
    }
    let weak_b = Arc::downgrade(&proxy.runtime.load().pools[0].members[1].backend);

    release.notify_one();
    let got = tokio::time::timeout(LIMIT, slow).await.unwrap().unwrap();
    assert_eq!((got.status, &got.body[..]), (200, &b"b"[..]));
    // The count drops when the proxy is done with the body, which may be just after
    // the client has it all; the next compaction then drops b.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let r = reloader.clone();
        tokio::task::spawn_blocking(move || r.compact())
            .await
            .unwrap();
        let s = status(&proxy).await;
        if find_backend_status(&s, "b").is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b still listed: {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Nothing holds b any more: its idle upstream connections are closed with it.
    assert_eq!(weak_b.strong_count(), 0);
}

#[tokio::test]
async fn a_reload_changes_the_connection_settings_of_a_backend_it_keeps() {
    let a = named_backend("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    write(&path, &one_pool(&[("a", a)], ""));
    let (proxy, _reloader) = TestProxy::start_file(&path).await;
    let opened = |s: &serde_json::Value| s["pools"][0]["backends"][0]["connections_opened"].clone();
    for _ in 0..3 {
        assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "a");
    }
    assert_eq!(opened(&status(&proxy).await), 1);

    // No idle connection kept: each request now opens one.
    write(&path, &one_pool(&[("a", a)], "max_idle_per_backend = 0"));
    let got = post_reload(&proxy).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    for _ in 0..3 {
        assert_eq!(fetch(proxy.addr, get("/")).await.backend(), "a");
    }
    let s = status(&proxy).await;
    assert_eq!(opened(&s), 4, "{s}");
    assert_eq!(s["pools"][0]["backends"][0]["idle_connections"], 0, "{s}");
}

#[tokio::test]
async fn a_reload_applies_a_rotated_secret_file_of_an_unchanged_config() {
    let a = named_backend("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let secret = dir.path().join("sticky.secret");
    write(&secret, "the first secret, long enough to sign\n");
    write(
        &path,
        &format!(
            "{}[pools.p]\npolicy = \"sticky_cookie\"\nbackends = [\"{a}\"]\n\
             [pools.p.sticky]\nsecret_file = \"sticky.secret\"\n",
            base(true)
        ),
    );
    let (proxy, _reloader) = TestProxy::start_file(&path).await;
    let first = fetch(proxy.addr, get("/")).await;
    let cookie = first
        .headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok()?.split(';').next())
        .find(|c| c.starts_with("SWITCHYARD="))
        .expect("a sticky cookie")
        .to_owned();
    fetch(proxy.addr, get_with_cookie("/", &cookie)).await;
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["affinity"]["hit"], 1, "{s}");

    // Only the secret changes (the old one is dropped, say after a leak).
    let shown = status(&proxy).await["config_hash"].clone();
    write(&secret, "a second secret, just as long as the first\n");
    let got = post_reload(&proxy).await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.json()["generation"], 2, "{:?}", got.body);
    // The hash shown is the file's alone: it tells nothing of the secrets.
    assert_eq!(status(&proxy).await["config_hash"], shown);
    // A cookie signed with the dropped secret no longer holds.
    fetch(proxy.addr, get_with_cookie("/", &cookie)).await;
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["affinity"]["hit"], 1, "{s}");
    assert_eq!(s["pools"][0]["affinity"]["invalid"], 1, "{s}");
    // The same file and secret again: nothing to do.
    assert_eq!(post_reload(&proxy).await.json()["changed"], false);
}

#[tokio::test]
async fn round_robin_goes_on_where_it_was_across_reloads() {
    let (a, b, c) = (
        named_backend("a").await,
        named_backend("b").await,
        named_backend("c").await,
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let text = one_pool(&[("a", a), ("b", b), ("c", c)], "");
    write(&path, &text);
    let (proxy, _reloader) = TestProxy::start_file(&path).await;
    let mut seen = Vec::new();
    for round in 0..4 {
        seen.push(fetch(proxy.addr, get("/")).await.backend());
        // A change that leaves the pool as it was still builds a new snapshot.
        write(&path, &format!("{text}# edit {round}\n"));
        assert_eq!(post_reload(&proxy).await.json()["generation"], round + 2);
    }
    assert_eq!(seen, ["a", "b", "c", "a"]);
}

#[tokio::test]
async fn a_request_on_a_former_address_stays_in_flight_until_it_ends() {
    // The backend at the old address holds its request until told to answer.
    let (old, arrived_rx, release) = holding_first_backend("old").await;
    let new = named_backend("new").await;
    let dir = tempfile::tempdir().unwrap();
    let (path, proxy, _reloader, mut rx) = start_in(dir.path(), &one_pool(&[("a", old)], "")).await;
    let addr = proxy.addr;
    let slow = tokio::spawn(async move { fetch(addr, get("/")).await });
    tokio::time::timeout(LIMIT, arrived_rx)
        .await
        .expect("request reached the old address")
        .unwrap();

    // Same id, another address.
    write(&path, &one_pool(&[("a", new)], ""));
    assert_eq!(post_reload(&proxy).await.status, 200);
    serves(&mut rx, 2, &proxy, "new").await;
    let in_flight = |s: &serde_json::Value| s["pools"][0]["backends"][0]["in_flight"].clone();
    let s = status(&proxy).await;
    assert_eq!(
        in_flight(&s),
        1,
        "the request on the old address dropped out: {s}"
    );

    release.notify_one();
    let got = tokio::time::timeout(LIMIT, slow).await.unwrap().unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "old");
    // The count drops when the proxy is done with the body, which may be just after
    // the client has it all.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let s = status(&proxy).await;
        if in_flight(&s) == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A consistent-hash pool of `n` backends `{prefix}0`, `{prefix}1`, .. on `addr`, which
/// drain for an hour once removed.
fn hashed_pool(prefix: &str, n: usize, addr: std::net::SocketAddr) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| format!("{{ address = \"{addr}\", id = \"{prefix}{i}\" }}"))
        .collect();
    format!(
        "{}[pools.p]\npolicy = \"consistent_hash\"\nhash_key = [\"header:X-User\"]\ndrain_timeout = \"1h\"\nbackends = [{}]\n",
        base(true),
        list.join(", ")
    )
}

#[tokio::test]
async fn removed_backends_beyond_the_hash_table_bound_stop_draining_earliest_removed_first() {
    use switchyard::balance::consistent_hash::{MAX_BACKENDS, MAX_MEMBERS};
    // No request is sent: one address where nothing listens serves every backend.
    let addr = dead_addr().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    write(&path, &hashed_pool("a", MAX_BACKENDS, addr));
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    // The backends of /status, in order: (id, removed).
    let members = || async {
        let s = status(&proxy).await;
        s["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| (b["id"].as_str().unwrap().to_owned(), b["removed"] == true))
            .collect::<Vec<_>>()
    };
    let set = |prefix: &str, removed: bool| {
        (0..MAX_BACKENDS)
            .map(|i| (format!("{prefix}{i}"), removed))
            .collect::<Vec<_>>()
    };
    // Compared entry by entry: a failure names the first that differs, not thousands.
    let same = |got: &[(String, bool)], want: &[(String, bool)]| {
        if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
            panic!(
                "backend {i} of {}: {:?}, expected {:?} (of {})",
                got.len(),
                got.get(i),
                want.get(i),
                want.len()
            );
        }
    };

    // A whole new set: the old one drains beside it, within the bound.
    write(&path, &hashed_pool("b", MAX_BACKENDS, addr));
    reloader.reload_async().await.expect("the reload applies");
    same(
        &members().await,
        &[set("b", false), set("a", true)].concat(),
    );

    // Another: the first set, removed earliest, no longer fits and stops draining; the
    // configured backends and the set removed last stay.
    write(&path, &hashed_pool("c", MAX_BACKENDS, addr));
    reloader.reload_async().await.expect("the reload applies");
    let now = members().await;
    assert_eq!(now.len(), MAX_MEMBERS);
    same(&now, &[set("c", false), set("b", true)].concat());
}

#[test]
fn a_reload_asked_for_once_the_runtime_has_shut_down_is_refused_and_changes_nothing() {
    use futures_util::FutureExt;
    use switchyard::reload::{ReloadError, Reloader};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    // No request is sent: the backends' addresses only need to be valid.
    let addr = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    write(&path, &one_pool(&[("a", addr())], ""));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let handle = rt.handle().clone();
    let (reloader, snapshot) = rt.block_on(async {
        let config = switchyard::config::load(&path).unwrap();
        let snapshot = Arc::new(arc_swap::ArcSwap::from_pointee(
            switchyard::runtime::Runtime::build(config, 1, None),
        ));
        let reloader = Arc::new(Reloader::new(Some(path.clone()), snapshot.clone()));
        (reloader, snapshot)
    });
    // A change that a reload would apply.
    write(&path, &one_pool(&[("a", addr()), ("b", addr())], ""));
    // The runtime shuts down, its blocking pool with it: a reload asked for now has
    // nowhere to run. (The admin listener's tasks end with the runtime, so `POST
    // /reload` cannot be sent in this state; the library call shows what it answers.)
    drop(rt);
    let _entered = handle.enter();
    let result = reloader
        .reload_async()
        .now_or_never()
        .expect("the refusal comes at once");
    let e = result.expect_err("the reload cannot run");
    assert!(matches!(e, ReloadError::ShuttingDown), "{e:?}");
    // `POST /reload` would answer `400` with this text.
    assert_eq!(
        e.to_string(),
        "the reload did not run: the process is shutting down"
    );
    // Nothing ran: the running configuration stays, and no attempt is recorded.
    let now = snapshot.load();
    assert_eq!(now.generation, 1);
    assert_eq!(now.pool("p").unwrap().members.len(), 1);
    assert_eq!(reloader.attempts.load(Ordering::Relaxed), 0);
    assert!(reloader.last().is_none());
}
