//! The `switchyard` binary itself: starts from a file, serves, and exits 0 on SIGTERM
//! after letting the in-flight request finish.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::sync::{mpsc, Notify};

#[tokio::test]
async fn binary_serves_and_exits_cleanly_on_sigterm() {
    let (held_tx, mut held_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let a = backend(move |req| {
        let held_tx = held_tx.clone();
        let release = r.clone();
        async move {
            if req.uri().path() == "/hold" {
                let wait = release.notified();
                let _ = held_tx.send(());
                wait.await;
            }
            text("from-backend")
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n[pools.p]\nbackends = [\"{a}\"]\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // The proxy logs the address it bound; port 0 means we learn it from there.
    let stderr = child.stderr.take().unwrap();
    let (log_tx, log_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = log_tx.send(line);
        }
    });
    let wait_for = |needle: &str| loop {
        let line = log_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("log line");
        if line.contains(needle) {
            return line;
        }
    };
    let line = wait_for("serving");
    let addr: std::net::SocketAddr = line
        .split("listen=")
        .nth(1)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let got = fetch(addr, get("/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "from-backend");

    let slow = tokio::spawn(async move { fetch(addr, get("/hold")).await });
    held_rx.recv().await.unwrap();
    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    // Shutdown has begun while the held request is still in flight.
    wait_for("shutting down");
    release.notify_waiters();
    let got = slow.await.unwrap();
    assert_eq!(got.status, 200);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
}
