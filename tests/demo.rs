//! `switchyard demo`: the built-in backends and the proxy in front of them do what the
//! printed commands promise.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use switchyard::demo::Demo;

/// Upper bound for waits that should end much sooner; a failure, never a sync point.
const LIMIT: Duration = Duration::from_secs(10);

/// The `name=value` pairs of a response's `Set-Cookie` fields.
fn cookies(got: &Got) -> Vec<String> {
    got.headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_demo_balances_web_keeps_carts_sticky_and_stops() {
    // The preferred proxy port is taken: the demo takes another.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let preferred = taken.local_addr().unwrap();
    let demo = Demo::bind(preferred, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    assert_ne!(demo.proxy, preferred);
    let (proxy, admin) = (demo.proxy, demo.admin);
    let text = demo.instructions();
    assert!(text.contains(&format!("http://{proxy}/")), "{text}");
    assert!(text.contains(&format!("http://{admin}/status")), "{text}");
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(demo.run(async {
        let _ = stop.await;
    }));

    // Round robin: six requests, two for each web backend.
    let mut seen = Vec::new();
    for _ in 0..6 {
        seen.push(fetch(proxy, get("/")).await.backend());
    }
    let distinct: HashSet<_> = seen.iter().cloned().collect();
    let expected: HashSet<_> = ["web-1", "web-2", "web-3"].map(String::from).into();
    assert_eq!(distinct, expected, "{seen:?}");

    // Sticky: with its cookies sent back, a client stays on one cart backend, whose
    // visit counter counts up.
    let mut jar: Vec<String> = Vec::new();
    let mut backends = HashSet::new();
    for visit in 1..=4 {
        let mut req = http::Request::get("/cart").header("host", "localhost");
        if !jar.is_empty() {
            req = req.header("cookie", jar.join("; "));
        }
        let got = fetch(proxy, req.body(Default::default()).unwrap()).await;
        assert_eq!(got.status, 200);
        for c in cookies(&got) {
            let name = c.split('=').next().unwrap().to_owned();
            jar.retain(|j| !j.starts_with(&format!("{name}=")));
            jar.push(c);
        }
        assert_eq!(got.json()["visits"], visit, "{:?}", got.json());
        backends.insert(got.backend());
    }
    assert_eq!(backends.len(), 1, "{backends:?}");
    assert!(
        backends.iter().all(|b| b.starts_with("cart-")),
        "{backends:?}"
    );

    let status = fetch(admin, get("/status")).await.json();
    let pools: HashSet<_> = status["pools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(pools, ["carts", "web"].map(String::from).into());

    stop_tx.send(()).unwrap();
    tokio::time::timeout(LIMIT, running)
        .await
        .expect("the demo did not stop")
        .unwrap();
    drop(taken);
}

#[tokio::test]
async fn the_built_in_backend_shows_every_value_of_a_repeated_field() {
    let a = named_backend("b").await;
    let req = http::Request::get("/echo")
        .header("host", "localhost")
        .header("x-a", "one")
        .header("x-a", "two")
        .body(Default::default())
        .unwrap();
    let got = fetch(a, req).await.json();
    assert_eq!(got["headers"]["x-a"], "one, two", "{got}");
    assert_eq!(got["path"], "/echo");
    assert_eq!(got["method"], "GET");
}
