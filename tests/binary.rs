//! The `switchyard` binary itself: starts from a file, serves, and exits 0 on SIGTERM
//! after letting the in-flight request finish; a second signal cuts the drain short.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

/// A running `switchyard` binary and the lines it logs.
struct Proc {
    /// `None` once waited for.
    child: Option<Child>,
    addr: SocketAddr,
    log: std::sync::mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

impl Proc {
    /// Starts the binary on a file with `config` (its `[server]` table, then the rest).
    fn start(server: &str, rest: &str) -> Proc {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.toml");
        std::fs::write(
            &path,
            format!("[server]\nlisten = [\"127.0.0.1:0\"]\nworkers = 1\n{server}\n{rest}"),
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
        let stderr = child.stderr.take().unwrap();
        let (log_tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = log_tx.send(line);
            }
        });
        let mut p = Proc {
            child: Some(child),
            addr: "127.0.0.1:0".parse().unwrap(),
            log,
            _dir: dir,
        };
        // The proxy logs the address it bound; port 0 means we learn it from there.
        let line = p.wait_for("serving");
        p.addr = line
            .split("listen=")
            .nth(1)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        p
    }

    /// The next line that contains `needle`.
    fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .log
                .recv_timeout(Duration::from_secs(30))
                .expect("log line");
            if line.contains(needle) {
                return line;
            }
        }
    }

    fn signal(&self, name: &str) {
        let kill = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.as_ref().unwrap().id().to_string())
            .status()
            .unwrap();
        assert!(kill.success());
    }

    async fn exit_status(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        tokio::task::spawn_blocking(move || child.wait())
            .await
            .unwrap()
            .unwrap()
    }
}

impl Drop for Proc {
    /// A test that failed leaves no process behind.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A backend that holds each request for `/hold` until `release` is notified, and says
/// when one arrives.
async fn holding_backend() -> (SocketAddr, mpsc::UnboundedReceiver<()>, Arc<Notify>) {
    let (held_tx, held_rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let r = release.clone();
    let addr = backend(move |req| {
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
    (addr, held_rx, release)
}

#[tokio::test]
async fn binary_serves_and_exits_cleanly_on_sigterm() {
    let (a, mut held_rx, release) = holding_backend().await;
    let p = Proc::start("", &format!("[pools.p]\nbackends = [\"{a}\"]\n"));
    let addr = p.addr;

    let got = fetch(addr, get("/")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "from-backend");

    let slow = tokio::spawn(async move { fetch(addr, get("/hold")).await });
    held_rx.recv().await.unwrap();
    p.signal("TERM");
    // Shutdown has begun while the held request is still in flight.
    p.wait_for("shutting down");
    release.notify_waiters();
    let got = slow.await.unwrap();
    assert_eq!(got.status, 200);
    let status = p.exit_status().await;
    assert!(status.success(), "exit status {status:?}");
}

#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let (a, mut held_rx, _release) = holding_backend().await;
    // A grace period no test waits out: the process can only end early by the second
    // signal.
    let p = Proc::start(
        "shutdown_grace = \"1h\"",
        &format!("[pools.p]\nbackends = [\"{a}\"]\n"),
    );
    let mut held = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    held.write_all(b"GET /hold HTTP/1.1\r\nhost: test.local\r\n\r\n")
        .await
        .unwrap();
    held_rx.recv().await.unwrap();
    p.signal("TERM");
    p.wait_for("shutting down");
    p.signal("INT");
    p.wait_for("asked again to stop");
    let status = p.exit_status().await;
    assert!(status.success(), "exit status {status:?}");
    // The held request was cut: its connection closed with no response.
    let mut answer = Vec::new();
    let _ = held.read_to_end(&mut answer).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
}

#[tokio::test]
async fn a_reload_stuck_reading_its_file_does_not_keep_the_process_alive() {
    let a = named_backend("a").await;
    let mut p = Proc::start("", &format!("[pools.p]\nbackends = [\"{a}\"]\n"));
    // A file that blocks its reader, as one on a mount that hangs does.
    let path = p._dir.path().join("switchyard.toml");
    let fifo = p._dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    std::fs::rename(&fifo, &path).unwrap();
    p.signal("HUP");
    p.wait_for("SIGHUP");
    p.signal("TERM");
    p.wait_for("stopped");
    // Polled, so that a process that never ends is still killed when the test fails.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the process outlived its stop"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    p.child = None;
    assert!(status.success(), "exit status {status:?}");
}
