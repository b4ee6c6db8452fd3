//! Session affinity end to end: sticky cookies, learned sessions and consistent hashing
//! through the real proxy, against real backends on 127.0.0.1.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use common::*;
use switchyard::affinity::unix_now;
use switchyard::balance::sticky_cookie::{Codec, Verdict};

const SECRET: &str = "a test secret of more than sixteen bytes";

/// Sets a uniquely named environment variable to the test secret and returns its name.
fn secret_env(tag: &str) -> String {
    let name = format!("SWITCHYARD_TEST_SECRET_{tag}");
    std::env::set_var(&name, SECRET);
    name
}

fn sticky_pool(name: &str, backends: &[std::net::SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{{ address = \"{a}\", id = \"{name}-{}\" }}", i + 1))
        .collect();
    format!(
        "[pools.{name}]\npolicy = \"sticky_cookie\"\nbackends = [{}]\n[pools.{name}.sticky]\n{extra}\n",
        list.join(", ")
    )
}

/// Our cookie's `Set-Cookie` headers in a response.
fn our_cookies(got: &Got, name: &str) -> Vec<String> {
    got.headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|v| v.starts_with(&format!("{name}=")))
        .map(str::to_owned)
        .collect()
}

/// `NAME=value` of a `Set-Cookie` header.
fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_owned()
}

fn value(set_cookie: &str) -> String {
    pair(set_cookie).split_once('=').unwrap().1.to_owned()
}

#[tokio::test]
async fn sticky_cookie_pins_a_client_for_a_thousand_requests() {
    let b = [
        named_backend("c1").await,
        named_backend("c2").await,
        named_backend("c3").await,
    ];
    let proxy = TestProxy::start(&config(&sticky_pool("carts", &b, ""))).await;
    let mut client = Client::connect(proxy.addr).await;

    let first = client.get("/cart").await;
    assert_eq!(first.status, 200);
    let ours = our_cookies(&first, "SWITCHYARD");
    assert_eq!(ours.len(), 1, "{:?}", first.headers);
    let c = &ours[0];
    assert_eq!(value(c).len(), 40, "{c}");
    for attr in ["Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Lax"] {
        assert!(c.contains(attr), "{attr} missing from {c}");
    }
    assert!(
        !c.contains("Secure"),
        "plain-text client got a Secure cookie: {c}"
    );
    // The application's own cookie passes through untouched, beside ours.
    let app: Vec<_> = first
        .headers
        .get_all("set-cookie")
        .iter()
        .filter(|v| v.to_str().unwrap().starts_with("sid="))
        .collect();
    assert_eq!(app.len(), 1);
    assert!(app[0].to_str().unwrap().ends_with("; Path=/; HttpOnly"));

    let backend = first.backend();
    let cookie = pair(c);
    let mut visits = 0;
    for _ in 0..1000 {
        let got = client
            .send(get_with_cookie(
                "/cart",
                &format!("{cookie}; {}", pair(app[0].to_str().unwrap())),
            ))
            .await;
        assert_eq!(got.backend(), backend);
        assert!(
            our_cookies(&got, "SWITCHYARD").is_empty(),
            "a hit must not re-issue the cookie"
        );
        // The proxy's cookie is not forwarded; the application's is.
        let seen = got.json()["headers"]["cookie"].as_str().unwrap().to_owned();
        assert!(!seen.contains("SWITCHYARD"), "{seen}");
        visits = got.json()["visits"].as_u64().unwrap();
    }
    assert_eq!(
        visits, 1001,
        "the backend's session counter saw every request"
    );
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["affinity"]["hit"], 1000);
    assert_eq!(s["pools"][0]["affinity"]["new"], 1);
}

#[tokio::test]
async fn a_cookie_outside_ascii_beside_ours_changes_nothing() {
    let b = [named_backend("c1").await, named_backend("c2").await];
    let proxy = TestProxy::start(&config(&sticky_pool("carts", &b, ""))).await;
    let first = fetch(proxy.addr, get("/cart")).await;
    let ours = pair(&our_cookies(&first, "SWITCHYARD")[0]);
    // Browsers send UTF-8 in cookie values as it is.
    let cookie = format!("{ours}; pref=caf\u{e9}");
    for _ in 0..6 {
        let req = http::Request::get("/cart")
            .header("host", "test.local")
            .header(
                "cookie",
                http::HeaderValue::from_bytes(cookie.as_bytes()).unwrap(),
            )
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let got = fetch(proxy.addr, req).await;
        assert_eq!(got.backend(), first.backend());
        assert!(our_cookies(&got, "SWITCHYARD").is_empty());
        let seen = got.json()["headers"]["cookie"].as_str().unwrap().to_owned();
        assert_eq!(seen, "pref=caf\u{e9}");
    }
    assert_eq!(status(&proxy).await["pools"][0]["affinity"]["hit"], 6);
}

#[tokio::test]
async fn cookie_reveals_no_backend_address_or_port() {
    let b = [named_backend("c1").await, named_backend("c2").await];
    // Ids default to the addresses, the worst case for leaking them.
    let cfg = format!(
        "[pools.p]\npolicy = \"sticky_cookie\"\nbackends = [\"{}\", \"{}\"]\n",
        b[0], b[1]
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    for _ in 0..10 {
        let got = fetch(proxy.addr, get("/")).await;
        let v = value(&our_cookies(&got, "SWITCHYARD")[0]);
        let raw = URL_SAFE_NO_PAD.decode(&v).unwrap();
        for a in &b {
            let text = a.to_string();
            let port = a.port();
            let octets = match a.ip() {
                std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
                std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
            };
            let encodings = [
                text.clone(),
                port.to_string(),
                a.ip().to_string(),
                STANDARD.encode(&text),
                URL_SAFE.encode(&text),
                URL_SAFE_NO_PAD.encode(&text),
                hex(text.as_bytes()),
                format!("{port:x}"),
            ];
            for e in &encodings {
                assert!(!v.contains(e.as_str()), "cookie {v} contains {e}");
            }
            let needles = [
                port.to_be_bytes().to_vec(),
                port.to_le_bytes().to_vec(),
                octets.clone(),
                text.as_bytes().to_vec(),
            ];
            for n in &needles {
                assert!(
                    !raw.windows(n.len()).any(|w| w == n.as_slice()),
                    "cookie bytes {raw:?} contain {n:?}"
                );
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn forged_expired_foreign_and_garbage_cookies_are_treated_as_absent() {
    let env = secret_env("BAD_COOKIES");
    let b = [named_backend("c1").await, named_backend("c2").await];
    let cfg = format!(
        "[[routes]]\npath_prefix = \"/a\"\npool = \"a\"\n[[routes]]\npath_prefix = \"/b\"\npool = \"b\"\n{}{}",
        sticky_pool("a", &b, &format!("secret_env = \"{env}\"")),
        // A cookie of the same name on a path of its own: a browser keeps both.
        sticky_pool("b", &b, &format!("secret_env = \"{env}\"\npath = \"/b\""))
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let good = value(&our_cookies(&fetch(proxy.addr, get("/a")).await, "SWITCHYARD")[0]);

    // Forged: every single-character change of a valid cookie.
    let alphabet = ["A", "B", "-", "_", "z", "9"];
    let mut forged = 0;
    for i in 0..good.len() {
        for ch in alphabet {
            let mut f = good.clone();
            f.replace_range(i..i + 1, ch);
            if f == good {
                continue;
            }
            let got = fetch(
                proxy.addr,
                get_with_cookie("/a", &format!("SWITCHYARD={f}")),
            )
            .await;
            assert_eq!(got.status, 200);
            assert_eq!(
                our_cookies(&got, "SWITCHYARD").len(),
                1,
                "forged cookie {f} was accepted"
            );
            forged += 1;
        }
    }

    // Expired: minted with the real secret, valid but past its expiry.
    let codec = Codec::new("a", &[SECRET.as_bytes().to_vec()]);
    let expired = codec.encode("a-1", (unix_now() - 10) as u32);
    let got = fetch(
        proxy.addr,
        get_with_cookie("/a", &format!("SWITCHYARD={expired}")),
    )
    .await;
    assert_eq!(our_cookies(&got, "SWITCHYARD").len(), 1);
    // And a fresh one minted the same way is honoured: the test's codec is the proxy's.
    let fresh = codec.encode("a-2", (unix_now() + 600) as u32);
    for _ in 0..5 {
        let got = fetch(
            proxy.addr,
            get_with_cookie("/a", &format!("SWITCHYARD={fresh}")),
        )
        .await;
        assert_eq!(got.backend(), "c2");
        assert!(our_cookies(&got, "SWITCHYARD").is_empty());
    }

    // Foreign: a valid cookie of pool a, sent to pool b (same secret, same backends).
    let got = fetch(
        proxy.addr,
        get_with_cookie("/b", &format!("SWITCHYARD={good}")),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(our_cookies(&got, "SWITCHYARD").len(), 1);

    // Garbage of all kinds.
    let garbage = [
        "",
        "x",
        "%00%ff",
        "\"quoted\"",
        &"A".repeat(40),
        &"A".repeat(4000),
        "é",
        "a=b=c",
        "==",
    ];
    for g in garbage {
        let got = fetch(
            proxy.addr,
            get_with_cookie("/a", &format!("SWITCHYARD={g}")),
        )
        .await;
        assert_eq!(got.status, 200, "{g:?}");
    }

    let s = status(&proxy).await;
    let a = &s["pools"][0]["affinity"];
    assert_eq!(a["expired"], 1, "{s}");
    assert!(a["invalid"].as_u64().unwrap() >= forged, "{s}");
    assert_eq!(s["pools"][1]["affinity"]["invalid"], 1, "{s}");
}

#[tokio::test]
async fn down_backend_redispatches_and_reissues_the_cookie() {
    let mut x = Killable::start("x").await;
    let y = Killable::start("y").await;
    let proxy = TestProxy::start(&config(&sticky_pool("p", &[x.addr, y.addr], ""))).await;
    // Find a cookie for x.
    let mut cookie = None;
    for _ in 0..4 {
        let got = fetch(proxy.addr, get("/no-session")).await;
        if got.body == "x" {
            cookie = Some(pair(&our_cookies(&got, "SWITCHYARD")[0]));
            break;
        }
    }
    let cookie = cookie.expect("round robin reached x");
    x.kill().await;
    let got = fetch(proxy.addr, get_with_cookie("/no-session", &cookie)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "y");
    let reissued = our_cookies(&got, "SWITCHYARD");
    assert_eq!(reissued.len(), 1);
    let new_cookie = pair(&reissued[0]);
    assert_ne!(new_cookie, cookie);
    for _ in 0..10 {
        let got = fetch(proxy.addr, get_with_cookie("/no-session", &new_cookie)).await;
        assert_eq!(got.body, "y");
        assert!(our_cookies(&got, "SWITCHYARD").is_empty());
    }
    assert_eq!(
        status(&proxy).await["pools"][0]["affinity"]["redispatched"],
        1
    );
    drop(y);
}

#[tokio::test]
async fn reject_answers_503_and_keeps_the_cookie() {
    let mut x = Killable::start("x").await;
    let y = Killable::start("y").await;
    let proxy = TestProxy::start(&config(&sticky_pool(
        "p",
        &[x.addr, y.addr],
        "on_unavailable = \"reject\"",
    )))
    .await;
    let first = fetch(proxy.addr, get("/no-session")).await;
    assert_eq!(first.body, "x", "round robin starts with the first backend");
    let cookie = pair(&our_cookies(&first, "SWITCHYARD")[0]);
    x.kill().await;
    let got = fetch(proxy.addr, get_with_cookie("/no-session", &cookie)).await;
    assert_eq!(got.status, 503);
    assert!(our_cookies(&got, "SWITCHYARD").is_empty());
    x.revive().await;
    let got = fetch(proxy.addr, get_with_cookie("/no-session", &cookie)).await;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.body, "x",
        "the kept cookie leads back once the backend is up"
    );
    assert_eq!(status(&proxy).await["pools"][0]["affinity"]["rejected"], 1);
    drop(y);
}

#[tokio::test]
async fn a_backend_that_left_the_configuration_hands_its_clients_on_even_under_reject() {
    let env = secret_env("LEFT");
    let mut x = Killable::start("x").await;
    let y = Killable::start("y").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    // Ids of their own: the list's order must not rename y.
    let pool = |backends: &[(&str, std::net::SocketAddr)]| {
        let list: Vec<String> = backends
            .iter()
            .map(|(id, a)| format!("{{ address = \"{a}\", id = \"{id}\" }}"))
            .collect();
        config(&format!(
            "[pools.p]\npolicy = \"sticky_cookie\"\ndrain_timeout = \"1h\"\nbackends = [{}]\n\
             [pools.p.sticky]\non_unavailable = \"reject\"\nsecret_env = \"{env}\"\n",
            list.join(", ")
        ))
    };
    std::fs::write(&path, pool(&[("x", x.addr), ("y", y.addr)])).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    let first = fetch(proxy.addr, get("/no-session")).await;
    assert_eq!(first.body, "x", "round robin starts with the first backend");
    let cookie = pair(&our_cookies(&first, "SWITCHYARD")[0]);
    // x leaves the configuration (it would drain for an hour) and goes down.
    std::fs::write(&path, pool(&[("y", y.addr)])).unwrap();
    reloader.reload().unwrap();
    x.kill().await;
    let got = fetch(proxy.addr, get_with_cookie("/no-session", &cookie)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "y");
    assert_eq!(our_cookies(&got, "SWITCHYARD").len(), 1, "a new cookie");
    drop(y);
}

#[tokio::test]
async fn draining_backend_keeps_its_sessions_but_takes_no_new_ones() {
    let env = secret_env("DRAIN");
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let pool = |drain_timeout: &str| {
        format!(
            "[pools.p]\npolicy = \"sticky_cookie\"\nbackends = [{{ address = \"{a}\", id = \"a\" }}, {{ address = \"{b}\", id = \"b\", drain = true }}]\n\
             [pools.p.sticky]\nsecret_env = \"{env}\"\ndrain_timeout = \"{drain_timeout}\"\n"
        )
    };
    let codec = Codec::new("p", &[SECRET.as_bytes().to_vec()]);
    let on_b = format!(
        "SWITCHYARD={}",
        codec.encode("b", (unix_now() + 600) as u32)
    );

    let proxy = TestProxy::start(&config(&pool("1h"))).await;
    for _ in 0..50 {
        assert_eq!(
            fetch(proxy.addr, get("/")).await.backend(),
            "a",
            "a draining backend took a new session"
        );
    }
    for _ in 0..10 {
        let got = fetch(proxy.addr, get_with_cookie("/", &on_b)).await;
        assert_eq!(
            got.backend(),
            "b",
            "an existing session left its draining backend early"
        );
        assert!(our_cookies(&got, "SWITCHYARD").is_empty());
    }
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["backends"][1]["draining"], true);

    let short = TestProxy::start(&config(&pool("10ms"))).await;
    // What is under test is the drain timeout running out.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let got = fetch(short.addr, get_with_cookie("/", &on_b)).await;
    assert_eq!(got.backend(), "a");
    assert_eq!(our_cookies(&got, "SWITCHYARD").len(), 1);
    assert_eq!(
        status(&short).await["pools"][0]["affinity"]["redispatched"],
        1
    );
}

#[tokio::test]
async fn secure_and_same_site_none_attributes() {
    let a = named_backend("a").await;
    let cfg = sticky_pool(
        "p",
        &[a],
        "cookie = \"route\"\nsame_site = \"none\"\nhttp_only = false\npath = \"/shop\"\ndomain = \"example.com\"\nttl = \"10m\"",
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let got = fetch(proxy.addr, get("/")).await;
    let c = &our_cookies(&got, "route")[0];
    for attr in [
        "Path=/shop",
        "Domain=example.com",
        "Max-Age=600",
        "SameSite=None",
        "Secure",
    ] {
        assert!(c.contains(attr), "{attr} missing from {c}");
    }
    assert!(!c.contains("HttpOnly"), "{c}");
}

fn learn_pool(backends: &[std::net::SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{{ address = \"{a}\", id = \"s{}\" }}", i + 1))
        .collect();
    format!(
        "[pools.s]\npolicy = \"sticky_learn\"\nbackends = [{}]\n[pools.s.learn]\ncookie = \"JSESSIONID\"\n{extra}\n",
        list.join(", ")
    )
}

#[tokio::test]
async fn learned_sessions_stick_to_the_backend_that_issued_them() {
    let (x, y, z) = (
        Killable::start("x").await,
        Killable::start("y").await,
        Killable::start("z").await,
    );
    let proxy = TestProxy::start(&config(&learn_pool(&[x.addr, y.addr, z.addr], ""))).await;
    let mut owners = HashMap::new();
    for _ in 0..6 {
        let got = fetch(proxy.addr, get("/")).await;
        let set = got.headers["set-cookie"].to_str().unwrap().to_owned();
        owners.insert(pair(&set), String::from_utf8(got.body.to_vec()).unwrap());
    }
    assert_eq!(
        owners.values().collect::<HashSet<_>>().len(),
        3,
        "sessions spread by balancing"
    );
    for (session, owner) in &owners {
        for _ in 0..100 {
            let got = fetch(proxy.addr, get_with_cookie("/", session)).await;
            assert_eq!(&String::from_utf8(got.body.to_vec()).unwrap(), owner);
        }
    }
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["sessions_learned"], 6);
    assert_eq!(s["pools"][0]["affinity"]["hit"], 600);
    drop((x, y, z));
}

#[tokio::test]
async fn a_session_the_proxy_does_not_know_stays_where_it_was_first_sent() {
    let (x, y, z) = (
        Killable::start("x").await,
        Killable::start("y").await,
        Killable::start("z").await,
    );
    let proxy = TestProxy::start(&config(&learn_pool(&[x.addr, y.addr, z.addr], ""))).await;
    // A session issued before a restart, or through another proxy: the backends keep
    // it in a shared store and do not set it again. It is balanced once, then bound.
    let session = "JSESSIONID=issued-elsewhere";
    let first = fetch(proxy.addr, get_with_cookie("/", session)).await.body;
    for _ in 0..9 {
        assert_eq!(
            fetch(proxy.addr, get_with_cookie("/", session)).await.body,
            first
        );
    }
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["sessions_learned"], 1, "{s}");
    assert_eq!(s["pools"][0]["affinity"]["new"], 1, "{s}");
    assert_eq!(s["pools"][0]["affinity"]["hit"], 9, "{s}");
    // A value longer than any session id is balanced on every request and never kept.
    let long = format!("JSESSIONID={}", "v".repeat(300));
    let mut went = HashSet::new();
    for _ in 0..3 {
        went.insert(fetch(proxy.addr, get_with_cookie("/", &long)).await.body);
    }
    assert_eq!(went.len(), 3, "round robin over x, y and z");
    assert_eq!(status(&proxy).await["pools"][0]["sessions_learned"], 1);
    drop((x, y, z));
}

#[tokio::test]
async fn made_up_session_values_never_push_out_learned_ones() {
    let (x, y) = (Killable::start("x").await, Killable::start("y").await);
    let proxy = TestProxy::start(&config(&learn_pool(&[x.addr, y.addr], "max_entries = 4"))).await;
    let got = fetch(proxy.addr, get("/")).await;
    let session = pair(got.headers["set-cookie"].to_str().unwrap());
    for i in 0..20 {
        let made_up = format!("JSESSIONID=made-up-{i}");
        assert_eq!(
            fetch(proxy.addr, get_with_cookie("/", &made_up))
                .await
                .status,
            200
        );
    }
    let s = status(&proxy).await;
    assert_eq!(
        s["pools"][0]["sessions_learned"], 4,
        "bound while there was room: {s}"
    );
    assert_eq!(
        fetch(proxy.addr, get_with_cookie("/", &session)).await.body,
        got.body
    );
    let s = status(&proxy).await;
    assert_eq!(
        s["pools"][0]["affinity"]["hit"], 1,
        "the learned session stayed: {s}"
    );
    drop((x, y));
}

#[tokio::test]
async fn an_expired_session_is_bound_again_where_it_goes() {
    let (x, y) = (Killable::start("x").await, Killable::start("y").await);
    let proxy = TestProxy::start(&config(&learn_pool(&[x.addr, y.addr], "ttl = \"1s\""))).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.body, "x");
    let session = pair(got.headers["set-cookie"].to_str().unwrap());
    assert_eq!(status(&proxy).await["pools"][0]["sessions_learned"], 1);
    // The passage of time is what is under test: the session, last used within the
    // current second, expires with the next one (the table counts whole seconds).
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
    };
    let learned_by = unix().as_secs();
    tokio::time::sleep(std::time::Duration::from_secs(learned_by + 1) - unix()).await;
    let got = fetch(proxy.addr, get_with_cookie("/", &session)).await;
    assert_eq!(got.status, 200);
    assert!(!got.headers.contains_key("set-cookie"));
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["affinity"]["expired"], 1, "{s}");
    // Forgotten when found expired, then bound to the backend that served it.
    assert_eq!(s["pools"][0]["sessions_learned"], 1, "{s}");
    drop((x, y));
}

#[tokio::test]
async fn learned_table_is_bounded_and_follows_a_down_backend() {
    let (mut x, y) = (Killable::start("x").await, Killable::start("y").await);
    let proxy = TestProxy::start(&config(&learn_pool(&[x.addr, y.addr], "max_entries = 3"))).await;
    let mut sessions = Vec::new();
    for _ in 0..10 {
        let got = fetch(proxy.addr, get("/")).await;
        sessions.push((
            pair(got.headers["set-cookie"].to_str().unwrap()),
            got.body.clone(),
        ));
        let n = status(&proxy).await["pools"][0]["sessions_learned"]
            .as_u64()
            .unwrap();
        assert!(n <= 3, "{n} sessions learned with max_entries = 3");
    }
    // The newest session of x (round robin alternates x, y) is still known; x goes
    // down; the request is redispatched to y.
    let (session, owner) = sessions[8].clone();
    assert_eq!(owner, "x");
    assert_eq!(
        fetch(proxy.addr, get_with_cookie("/", &session)).await.body,
        "x"
    );
    x.kill().await;
    let got = fetch(proxy.addr, get_with_cookie("/", &session)).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "y");
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["affinity"]["hit"], 1);
    assert_eq!(s["pools"][0]["affinity"]["redispatched"], 1);
    drop(y);
}

#[tokio::test]
async fn a_redispatched_session_stays_where_it_went() {
    let (mut x, y, z) = (
        Killable::start("x").await,
        Killable::start("y").await,
        Killable::start("z").await,
    );
    // One failure ejects: then x is known to be out.
    let cfg =
        learn_pool(&[x.addr, y.addr, z.addr], "") + "[pools.s.outlier]\nconsecutive_failures = 1\n";
    let proxy = TestProxy::start(&config(&cfg)).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.body, "x", "round robin starts with the first backend");
    let session = pair(got.headers["set-cookie"].to_str().unwrap());
    x.kill().await;
    // A failed connect alone moves the request, not the session: x is tried first.
    let moved = fetch(proxy.addr, get_with_cookie("/", &session)).await;
    assert_ne!(moved.body, "x");
    // x is now ejected. The application does not issue the session anew (it is in a
    // shared store): the session is bound to where it went, not balanced on every
    // request.
    let first = fetch(proxy.addr, get_with_cookie("/", &session)).await.body;
    assert_ne!(first, "x");
    for _ in 0..10 {
        assert_eq!(
            fetch(proxy.addr, get_with_cookie("/", &session)).await.body,
            first
        );
    }
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["affinity"]["redispatched"], 2);
    assert_eq!(s["pools"][0]["affinity"]["hit"], 10);
    assert_eq!(s["pools"][0]["sessions_learned"], 1);
    drop((y, z));
}

#[tokio::test]
async fn a_session_is_not_bound_to_a_backend_that_answered_it_with_a_server_error() {
    let mut x = Killable::start("x").await;
    let failing = backend(|_| async {
        let mut r = text("failing");
        *r.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
        r
    })
    .await;
    let cfg = learn_pool(&[x.addr, failing], "") + "[pools.s.outlier]\nconsecutive_failures = 1\n";
    let proxy = TestProxy::start(&config(&cfg)).await;
    let got = fetch(proxy.addr, get("/")).await;
    assert_eq!(got.body, "x");
    let session = pair(got.headers["set-cookie"].to_str().unwrap());
    x.kill().await;
    // The failed connect ejects x; from then on the session is redispatched each time,
    // since the only other backend answers it with a 500.
    for _ in 0..4 {
        let got = fetch(proxy.addr, get_with_cookie("/", &session)).await;
        assert_eq!(got.status, 500);
    }
    let s = status(&proxy).await;
    assert_eq!(s["pools"][0]["affinity"]["redispatched"], 4, "{s}");
    assert_eq!(s["pools"][0]["affinity"]["hit"], 0, "{s}");
}

#[tokio::test]
async fn a_response_that_clears_the_session_cookie_forgets_the_session() {
    let a = backend(|req| async move {
        let mut r = session_answer("a", &req);
        let clear = match req.uri().path() {
            "/logout-empty" => Some("JSESSIONID=; Path=/; Max-Age=0"),
            "/logout-expired" => {
                Some("JSESSIONID=deleted; Path=/; Expires=Thu, 01 Jan 1970 00:00:00 GMT")
            }
            // The session set again, and the cookie of an old path cleared.
            "/migrate" => {
                let cookie = req.headers()["cookie"].to_str().unwrap().to_owned();
                r.headers_mut().append(
                    http::header::SET_COOKIE,
                    format!("{cookie}; Path=/").parse().unwrap(),
                );
                Some("JSESSIONID=; Path=/app; Max-Age=0")
            }
            _ => None,
        };
        if let Some(c) = clear {
            r.headers_mut()
                .append(http::header::SET_COOKIE, c.parse().unwrap());
        }
        r
    })
    .await;
    let proxy = TestProxy::start(&config(&learn_pool(&[a], ""))).await;
    let learned = async || {
        status(&proxy).await["pools"][0]["sessions_learned"]
            .as_u64()
            .unwrap()
    };
    for logout in ["/logout-empty", "/logout-expired"] {
        let got = fetch(proxy.addr, get("/")).await;
        let session = pair(got.headers["set-cookie"].to_str().unwrap());
        assert_eq!(learned().await, 1);
        let got = fetch(proxy.addr, get_with_cookie(logout, &session)).await;
        assert_eq!(got.status, 200);
        // The session the request carried is forgotten, and no `deleted` learned.
        assert_eq!(learned().await, 0, "{logout}");
    }
    let got = fetch(proxy.addr, get("/")).await;
    let session = pair(got.headers["set-cookie"].to_str().unwrap());
    let got = fetch(proxy.addr, get_with_cookie("/migrate", &session)).await;
    assert_eq!(got.headers.get_all("set-cookie").iter().count(), 2);
    assert_eq!(
        learned().await,
        1,
        "the session set again beside the clearing was kept"
    );
}

fn hash_pool(backends: &[(String, std::net::SocketAddr)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(id, a)| format!("{{ address = \"{a}\", id = \"{id}\" }}"))
        .collect();
    format!(
        "[pools.h]\npolicy = \"consistent_hash\"\nhash_key = [\"header:X-User-Id\", \"query:user\"]\nbackends = [{}]\n{extra}\n",
        list.join(", ")
    )
}

fn user(path: &str, id: &str) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::get(path)
        .header("host", "t")
        .header("x-user-id", id)
        .body(Default::default())
        .unwrap()
}

#[tokio::test]
async fn hash_placement_is_stable_and_independent_of_list_order() {
    let names = ["h1", "h2", "h3", "h4"];
    let mut backends = Vec::new();
    for n in names {
        backends.push((n.to_owned(), named_backend(n).await));
    }
    let p1 = TestProxy::start(&config(&hash_pool(&backends, ""))).await;
    let mut reversed = backends.clone();
    reversed.reverse();
    let p2 = TestProxy::start(&config(&hash_pool(&reversed, ""))).await;
    let mut used = HashSet::new();
    let admin = p1.admin.unwrap();
    for u in 0..200 {
        let id = format!("user-{u}");
        let a = fetch(p1.addr, user("/", &id)).await.backend();
        let b = fetch(p2.addr, user("/", &id)).await.backend();
        assert_eq!(a, b, "{id}");
        let again = fetch(p1.addr, user("/", &id)).await.backend();
        assert_eq!(a, again);
        let owner = fetch(admin, get(&format!("/pools/h/owner?key={id}")))
            .await
            .json();
        assert_eq!(owner["owner"], a.as_str());
        used.insert(a);
    }
    assert_eq!(used.len(), 4, "keys spread over every backend");
    // The query source is used when the header is absent.
    let by_query = fetch(p1.addr, get("/?user=user-7")).await.backend();
    assert_eq!(
        by_query,
        fetch(p1.addr, user("/", "user-7")).await.backend()
    );
}

#[tokio::test]
async fn hash_keys_fail_over_and_come_back() {
    let mut ks = Vec::new();
    for n in ["k1", "k2", "k3"] {
        ks.push(Killable::start(n).await);
    }
    let backends: Vec<(String, std::net::SocketAddr)> = ks
        .iter()
        .enumerate()
        .map(|(i, k)| (format!("k{}", i + 1), k.addr))
        .collect();
    let proxy = TestProxy::start(&config(&hash_pool(
        &backends,
        "[pools.h.outlier]\nconsecutive_failures = 0",
    )))
    .await;
    let body = |g: &Got| String::from_utf8(g.body.to_vec()).unwrap();
    let mut owner_of = HashMap::new();
    for u in 0..60 {
        let id = format!("u{u}");
        owner_of.insert(
            id.clone(),
            body(&fetch(proxy.addr, user("/no-session", &id)).await),
        );
    }
    ks[0].kill().await;
    for (id, owner) in &owner_of {
        let got = fetch(proxy.addr, user("/no-session", id)).await;
        assert_eq!(got.status, 200, "{id}");
        if owner == "k1" {
            assert_ne!(body(&got), "k1");
        } else {
            assert_eq!(&body(&got), owner, "a key whose backend is up moved");
        }
    }
    ks[0].revive().await;
    for (id, owner) in &owner_of {
        assert_eq!(
            &body(&fetch(proxy.addr, user("/no-session", id)).await),
            owner,
            "{id} did not come back"
        );
    }
    let s = status(&proxy).await;
    assert!(s["pools"][0]["affinity"]["redispatched"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn the_owner_endpoint_says_where_a_key_goes_while_its_owner_is_out() {
    let (mut k1, k2) = (Killable::start("k1").await, Killable::start("k2").await);
    let backends = [("k1".to_owned(), k1.addr), ("k2".to_owned(), k2.addr)];
    let cfg = hash_pool(&backends, "[pools.h.outlier]\nconsecutive_failures = 1");
    let proxy = TestProxy::start(&config(&cfg)).await;
    let admin = proxy.admin.unwrap();
    let ask = |id: String| async move {
        fetch(admin, get(&format!("/pools/h/owner?key={id}")))
            .await
            .json()
    };
    let mut key = None;
    for u in 0..100 {
        let id = format!("user-{u}");
        if ask(id.clone()).await["owner"] == "k1" {
            key = Some(id);
            break;
        }
    }
    let key = key.expect("some key of a hundred is k1's");
    let said = ask(key.clone()).await;
    assert_eq!(said["serving"], "k1", "{said}");
    // k1 goes down: the key's request fails over to k2, and ejects k1.
    k1.kill().await;
    assert_eq!(
        fetch(proxy.addr, user("/no-session", &key)).await.body,
        "k2"
    );
    let said = ask(key.clone()).await;
    assert_eq!(said["owner"], "k1", "placement does not change: {said}");
    assert_eq!(said["serving"], "k2", "{said}");
    assert_eq!(
        fetch(proxy.addr, user("/no-session", &key)).await.body,
        "k2"
    );
    drop(k2);
}

#[tokio::test]
async fn owner_endpoint_errors() {
    let a = named_backend("a").await;
    let cfg = format!(
        "[[routes]]\npool = \"rr\"\n[pools.rr]\nbackends = [\"{a}\"]\n{}",
        hash_pool(&[("a".into(), a)], "")
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let admin = proxy.admin.unwrap();
    assert_eq!(
        fetch(admin, get("/pools/nope/owner?key=1")).await.status,
        404
    );
    assert_eq!(fetch(admin, get("/pools/rr/owner?key=1")).await.status, 400);
    assert_eq!(fetch(admin, get("/pools/h/owner")).await.status, 400);
    assert_eq!(fetch(admin, get("/pools/owner")).await.status, 404);
    assert_eq!(
        fetch(admin, get("/pools/h/owner?key=1")).await.json()["owner"],
        "a"
    );
    for bad in ["?client_ip=nope", "?client_ip=127.0.0.1&key=1"] {
        let got = fetch(admin, get(&format!("/pools/h/owner{bad}"))).await;
        assert_eq!(got.status, 400, "{bad}");
    }
}

#[tokio::test]
async fn the_owner_of_a_client_address_is_where_its_requests_go() {
    let mut backends = Vec::new();
    for name in ["a", "b", "c", "d", "e"] {
        backends.push((name.to_owned(), named_backend(name).await));
    }
    let list: Vec<String> = backends
        .iter()
        .map(|(id, a)| format!("{{ address = \"{a}\", id = \"{id}\" }}"))
        .collect();
    // Several pools, each with its own placement of the one test client.
    let mut cfg = String::new();
    for p in 0..4 {
        cfg += &format!(
            "[[routes]]\npath_prefix = \"/p{p}\"\npool = \"p{p}\"\n\
             [pools.p{p}]\npolicy = \"consistent_hash\"\nbackends = [{}]\n",
            list.join(", ")
        );
        // A weight per pool moves the client between them.
        cfg = cfg.replacen("\"a\" }", &format!("\"a\", weight = {} }}", p + 1), 1);
    }
    let proxy = TestProxy::start(&config(&cfg)).await;
    let admin = proxy.admin.unwrap();
    for p in 0..4 {
        let served = fetch(proxy.addr, get(&format!("/p{p}"))).await.backend();
        let said = fetch(
            admin,
            get(&format!("/pools/p{p}/owner?client_ip=127.0.0.1")),
        )
        .await
        .json();
        assert_eq!(said["owner"], served.as_str(), "pool p{p}: {said}");
        // The same address written as IPv4 mapped into IPv6 is the same client.
        let mapped = fetch(
            admin,
            get(&format!("/pools/p{p}/owner?client_ip=::ffff:127.0.0.1")),
        )
        .await
        .json();
        assert_eq!(mapped["owner"], said["owner"]);
    }
}

#[tokio::test]
async fn sliding_cookies_are_renewed_after_half_their_ttl() {
    let env = secret_env("SLIDING");
    let a = named_backend("a").await;
    let cfg = sticky_pool(
        "p",
        &[a],
        &format!("secret_env = \"{env}\"\nttl = \"1h\"\nsliding = true"),
    );
    let proxy = TestProxy::start(&config(&cfg)).await;
    let codec = Codec::new("p", &[SECRET.as_bytes().to_vec()]);
    // Most of its life ahead: kept as is.
    let young = codec.encode("p-1", (unix_now() + 3500) as u32);
    let got = fetch(
        proxy.addr,
        get_with_cookie("/", &format!("SWITCHYARD={young}")),
    )
    .await;
    assert!(our_cookies(&got, "SWITCHYARD").is_empty());
    // Less than half left: renewed, still pointing at the same backend.
    let old = codec.encode("p-1", (unix_now() + 600) as u32);
    let got = fetch(
        proxy.addr,
        get_with_cookie("/", &format!("SWITCHYARD={old}")),
    )
    .await;
    let renewed = our_cookies(&got, "SWITCHYARD");
    assert_eq!(renewed.len(), 1);
    assert!(renewed[0].contains("Max-Age=3600"));
    let v = value(&renewed[0]);
    assert_ne!(v, old);
    let got = fetch(proxy.addr, get_with_cookie("/", &format!("SWITCHYARD={v}"))).await;
    assert!(our_cookies(&got, "SWITCHYARD").is_empty());
    assert_eq!(status(&proxy).await["pools"][0]["affinity"]["hit"], 3);
}

#[tokio::test]
async fn a_cookie_that_outlives_a_lowered_ttl_is_renewed_within_it() {
    let env = secret_env("LOWERED");
    let a = named_backend("a").await;
    let cfg = sticky_pool("p", &[a], &format!("secret_env = \"{env}\"\nttl = \"1h\""));
    let proxy = TestProxy::start(&config(&cfg)).await;
    let codec = Codec::new("p", &[SECRET.as_bytes().to_vec()]);
    // Issued while the ttl was a day: it is renewed with the hour the pool has now,
    // and keeps its backend.
    let issued = codec.encode("p-1", (unix_now() + 86_000) as u32);
    let got = fetch(
        proxy.addr,
        get_with_cookie("/", &format!("SWITCHYARD={issued}")),
    )
    .await;
    let renewed = our_cookies(&got, "SWITCHYARD");
    assert_eq!(renewed.len(), 1, "{:?}", got.headers);
    assert!(renewed[0].contains("Max-Age=3600"), "{}", renewed[0]);
    let v = value(&renewed[0]);
    match codec.decode(&v, unix_now() as u32) {
        Verdict::Valid { expires, .. } => assert!(u64::from(expires) <= unix_now() + 3600),
        other => panic!("{other:?}"),
    }
    // Within the ttl (not sliding): kept as is.
    let got = fetch(proxy.addr, get_with_cookie("/", &format!("SWITCHYARD={v}"))).await;
    assert!(our_cookies(&got, "SWITCHYARD").is_empty());
    assert_eq!(status(&proxy).await["pools"][0]["affinity"]["hit"], 2);
}

#[tokio::test]
async fn a_quoted_session_value_is_learned_as_it_comes_back() {
    // Each backend sets a quoted value (`JSESSIONID="a-1"`), as some frameworks do.
    let quoting = |name: &'static str| {
        backend(move |_req| async move {
            let mut r = text(name);
            let v = format!("JSESSIONID=\"{name}-1\"; Path=/");
            r.headers_mut()
                .insert("set-cookie", http::HeaderValue::from_str(&v).unwrap());
            r
        })
    };
    let (a, b) = (quoting("a").await, quoting("b").await);
    let proxy = TestProxy::start(&config(&learn_pool(&[a, b], ""))).await;
    let first = fetch(proxy.addr, get("/")).await;
    let owner = String::from_utf8(first.body.to_vec()).unwrap();
    let session = format!("JSESSIONID=\"{owner}-1\"");
    for _ in 0..10 {
        let got = fetch(proxy.addr, get_with_cookie("/", &session)).await;
        assert_eq!(String::from_utf8(got.body.to_vec()).unwrap(), owner);
    }
    assert_eq!(status(&proxy).await["pools"][0]["affinity"]["hit"], 10);
}

#[tokio::test]
async fn a_pool_that_stops_learning_forgets_its_sessions_and_shows_none() {
    let x = Killable::start("x").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let learning = config(&learn_pool(&[x.addr], ""));
    std::fs::write(&path, &learning).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    assert!(fetch(proxy.addr, get("/"))
        .await
        .headers
        .contains_key("set-cookie"));
    assert_eq!(status(&proxy).await["pools"][0]["sessions_learned"], 1);
    let plain = config(&format!(
        "[pools.s]\nbackends = [{{ address = \"{}\", id = \"s1\" }}]\n",
        x.addr
    ));
    std::fs::write(&path, plain).unwrap();
    reloader.reload_async().await.unwrap();
    let s = status(&proxy).await;
    assert!(s["pools"][0].get("sessions_learned").is_none(), "{s}");
    let text = metrics_text(&proxy).await;
    assert!(!text.contains("switchyard_learned_sessions{"), "{text}");
    // Learning again starts from nothing: the sessions of before were not kept.
    std::fs::write(&path, &learning).unwrap();
    reloader.reload_async().await.unwrap();
    assert_eq!(status(&proxy).await["pools"][0]["sessions_learned"], 0);
    drop(x);
}

#[tokio::test]
async fn a_response_that_crosses_the_turn_to_another_policy_learns_nothing() {
    let arrived = Arc::new(tokio::sync::Notify::new());
    let release = Arc::new(tokio::sync::Notify::new());
    let x = {
        let (arrived, release) = (arrived.clone(), release.clone());
        backend(move |req| {
            let (arrived, release) = (arrived.clone(), release.clone());
            async move {
                if req.uri().path() == "/slow" {
                    arrived.notify_one();
                    release.notified().await;
                }
                let mut r = text("x");
                r.headers_mut().insert(
                    http::header::SET_COOKIE,
                    http::HeaderValue::from_static("JSESSIONID=late; Path=/"),
                );
                r
            }
        })
        .await
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let learning = config(&learn_pool(&[x], ""));
    std::fs::write(&path, &learning).unwrap();
    let (proxy, reloader) = TestProxy::start_file(&path).await;
    let addr = proxy.addr;
    let slow = tokio::spawn(async move { fetch(addr, get("/slow")).await });
    tokio::time::timeout(Duration::from_secs(10), arrived.notified())
        .await
        .expect("the request reached the backend");
    // The pool stops learning while that request waits for its answer.
    let plain = config(&format!(
        "[pools.s]\nbackends = [{{ address = \"{x}\", id = \"s1\" }}]\n"
    ));
    std::fs::write(&path, plain).unwrap();
    reloader.reload_async().await.unwrap();
    release.notify_one();
    assert_eq!(slow.await.unwrap().status, 200);
    // Learning again: the answer that came under the other policy was not learned.
    std::fs::write(&path, &learning).unwrap();
    reloader.reload_async().await.unwrap();
    assert_eq!(status(&proxy).await["pools"][0]["sessions_learned"], 0);
}
