//! Hot-reload latency: from the moment a configuration file write returns to the new
//! snapshot serving, the watcher's debounce included.
//!
//! ```sh
//! cargo bench --bench reload_latency
//! RELOAD_ITERATIONS=200 cargo bench --bench reload_latency
//! ```
//!
//! Two built-in backends (`a`, `b`) and the proxy run in-process on 127.0.0.1:0; the
//! proxy starts from a file in a temporary folder and watches it. Each iteration
//! rewrites the file so the pool switches backend (a ↔ b) with a varying weight, takes
//! an `Instant` right after the write returns, then measures
//!
//! - write → generation: until `Reloader::subscribe()` announces the next generation;
//! - write → served: until a GET through the proxy (one keep-alive connection) is
//!   answered by the new backend.
//!
//! Three write styles, each with its own proxy: `in-place` (`std::fs::write` on the
//! file), `rename` (write a temporary file in the same folder, rename it over the file)
//! and `symlink` (Kubernetes ConfigMap layout: the file is `..data/switchyard.toml`,
//! `..data` a symlink to `..vN`; an update writes `..vN+1`, renames a new `..data`
//! symlink over the old one, then removes `..vN`; the clock starts after the rename).
//!
//! Also printed: how long the write call itself took (`write call`), and from before the
//! call to served (`start → served`). A write → generation well under the debounce
//! means a reload that was already due when the write happened read the new file: the
//! watcher reacted to some earlier event, not to this write.
//!
//! Target: write → served ≤ 100 ms (the debounce is 40 ms). Results are printed, never
//! asserted; the run fails only if a reload does not happen or the wrong backend answers.
//! Under `cargo test --benches` (no `--bench` argument) it runs 3 iterations per style.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Upper bound for one reload to become visible; exceeding it is a failure.
const LIMIT: Duration = Duration::from_secs(5);
/// Quiet time between iterations, so each one starts with the watcher idle.
const PAUSE: Duration = Duration::from_millis(120);
/// Unrecorded reloads per style before measuring.
const WARMUP: usize = 2;
/// The target for write → served.
const TARGET: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Style {
    InPlace,
    Rename,
    Symlink,
}

impl Style {
    const ALL: [Style; 3] = [Style::InPlace, Style::Rename, Style::Symlink];

    fn name(self) -> &'static str {
        match self {
            Style::InPlace => "in-place",
            Style::Rename => "rename",
            Style::Symlink => "symlink",
        }
    }
}

/// The configuration file and how it is updated.
struct ConfigFile {
    style: Style,
    /// The path the proxy is started with.
    path: PathBuf,
    dir: PathBuf,
    /// Current `..vN` of the symlink layout.
    version: u32,
}

impl ConfigFile {
    fn create(style: Style, dir: &Path, text: &str) -> ConfigFile {
        let path = dir.join("switchyard.toml");
        let mut f = ConfigFile {
            style,
            path: path.clone(),
            dir: dir.to_path_buf(),
            version: 0,
        };
        match style {
            Style::InPlace | Style::Rename => std::fs::write(&path, text).expect("write config"),
            Style::Symlink => {
                f.write_version(text);
                std::os::unix::fs::symlink("..v0", dir.join("..data")).expect("..data symlink");
                std::os::unix::fs::symlink("..data/switchyard.toml", &path)
                    .expect("config symlink");
            }
        }
        f
    }

    fn write_version(&mut self, text: &str) {
        let v = self.dir.join(format!("..v{}", self.version));
        std::fs::create_dir(&v).expect("version folder");
        std::fs::write(v.join("switchyard.toml"), text).expect("write config");
    }

    /// Replaces the content; returns when the update began and the instant the new
    /// content became visible at `path` (right after the write or rename returned).
    fn update(&mut self, text: &str) -> (Instant, Instant) {
        let start = Instant::now();
        let visible = match self.style {
            Style::InPlace => {
                std::fs::write(&self.path, text).expect("write config");
                Instant::now()
            }
            Style::Rename => {
                let tmp = self.dir.join(".switchyard.toml.tmp");
                std::fs::write(&tmp, text).expect("write temporary config");
                std::fs::rename(&tmp, &self.path).expect("rename config");
                Instant::now()
            }
            Style::Symlink => {
                let old = self.dir.join(format!("..v{}", self.version));
                self.version += 1;
                self.write_version(text);
                let tmp = self.dir.join("..data_tmp");
                std::os::unix::fs::symlink(format!("..v{}", self.version), &tmp)
                    .expect("..data_tmp symlink");
                std::fs::rename(&tmp, self.dir.join("..data")).expect("swap ..data");
                let t0 = Instant::now();
                std::fs::remove_dir_all(old).expect("remove old version");
                t0
            }
        };
        (start, visible)
    }
}

fn config(backend: (&str, SocketAddr), weight: u32) -> String {
    let (id, addr) = backend;
    format!(
        "[server]\nlisten = [\"127.0.0.1:0\"]\nshutdown_grace = \"1s\"\n\
         [pools.p]\npolicy = \"round_robin\"\n\
         backends = [{{ address = \"{addr}\", id = \"{id}\", weight = {weight} }}]\n"
    )
}

/// One keep-alive HTTP/1.1 connection to the proxy.
struct Client {
    tx: SendRequest<Full<Bytes>>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect to proxy");
        let _ = stream.set_nodelay(true);
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        Client { tx }
    }

    /// The `backend` field of the demo backend's answer to `GET /`.
    async fn backend(&mut self) -> String {
        let req = http::Request::get("/")
            .header("host", "bench.local")
            .body(Full::new(Bytes::new()))
            .expect("request");
        self.tx.ready().await.expect("connection ready");
        let resp = self.tx.send_request(req).await.expect("response");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(status.is_success(), "proxy answered {status}: {body:?}");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON body");
        json["backend"].as_str().unwrap_or_default().to_owned()
    }
}

async fn start_backend(name: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let addr = listener.local_addr().expect("backend address");
    tokio::spawn(switchyard::demo::backend(
        listener,
        name.to_owned(),
        std::future::pending(),
    ));
    addr
}

/// Samples of one style.
#[derive(Default)]
struct Samples {
    generation: Vec<Duration>,
    served: Vec<Duration>,
    /// How long the write (or write + rename, or the symlink swap) itself took.
    write_call: Vec<Duration>,
    /// From the start of the write (before the call) to served.
    start_served: Vec<Duration>,
    /// GETs answered by the old backend after the generation was visible.
    stale_answers: usize,
}

async fn measure(style: Style, backends: [(&str, SocketAddr); 2], iterations: usize) -> Samples {
    let dir = tempfile::tempdir().expect("temporary folder");
    let mut file = ConfigFile::create(style, dir.path(), &config(backends[0], 1));
    let cfg = switchyard::config::load(&file.path).expect("valid config");
    let server = switchyard::Server::bind(cfg).await.expect("bind proxy");
    let addr = server.local_addrs()[0];
    let reloader = server.reloader();
    let mut rx: watch::Receiver<u64> = reloader.subscribe();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));
    let mut client = Client::connect(addr).await;
    assert_eq!(client.backend().await, backends[0].0, "initial backend");

    let mut samples = Samples::default();
    for i in 1..=WARMUP + iterations {
        let (id, _) = backends[i % 2];
        // Weights 1..=7 cycle alongside the backend switch: every write is a change.
        let weight = (i % 7) as u32 + 1;
        let text = config(backends[i % 2], weight);
        let next = *rx.borrow_and_update() + 1;
        tokio::time::sleep(PAUSE).await;

        // Blocking file I/O: let the runtime move this worker's other tasks elsewhere.
        let (start, t0) = tokio::task::block_in_place(|| file.update(&text));
        tokio::time::timeout(LIMIT, rx.wait_for(|g| *g >= next))
            .await
            .unwrap_or_else(|_| panic!("{}: reload {i} not applied within {LIMIT:?}", style.name()))
            .expect("reloader alive");
        let generation = t0.elapsed();
        let mut stale = 0;
        loop {
            let got = client.backend().await;
            if got == id {
                break;
            }
            stale += 1;
            assert!(
                t0.elapsed() < LIMIT,
                "{}: reload {i}: still answered by {got}, expected {id}",
                style.name()
            );
        }
        let served_at = Instant::now();
        let served = served_at - t0;
        if i > WARMUP {
            samples.generation.push(generation);
            samples.served.push(served);
            samples.write_call.push(t0 - start);
            samples.start_served.push(served_at - start);
            samples.stale_answers += stale;
        }
    }
    let _ = stop_tx.send(());
    drop(client);
    let _ = tokio::time::timeout(LIMIT, task).await;
    samples
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn row(style: &str, metric: &str, samples: &[Duration], target: Option<Duration>) {
    let mut s = samples.to_vec();
    s.sort();
    let max = s[s.len() - 1];
    let verdict = match target {
        Some(t) if max <= t => "max within target",
        Some(t) if percentile(&s, 95.0) <= t => "p95 within target, max above",
        Some(_) => "ABOVE TARGET",
        None => "",
    };
    println!(
        "{style:<9} {metric:<18} {:>4} {:>8} {:>8} {:>8} {:>8}  {verdict}",
        s.len(),
        ms(s[0]),
        ms(percentile(&s, 50.0)),
        ms(percentile(&s, 95.0)),
        ms(max),
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let iterations = match std::env::var("RELOAD_ITERATIONS") {
        Ok(v) => v.parse().expect("RELOAD_ITERATIONS: a number"),
        Err(_) if bench => 50,
        Err(_) => 3,
    };
    assert!(iterations > 0, "RELOAD_ITERATIONS must be positive");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let a = start_backend("a").await;
        let b = start_backend("b").await;
        let backends = [("a", a), ("b", b)];
        let mut all: Vec<(Style, Samples)> = Vec::new();
        for style in Style::ALL {
            eprintln!("reload_latency: {} x {iterations}", style.name());
            all.push((style, measure(style, backends, iterations).await));
        }

        println!();
        println!(
            "reload latency: config write → new snapshot, {iterations} reloads per write style \
             (+{WARMUP} warm-up), debounce {} ms, target write → served ≤ {} ms",
            switchyard::reload::DEBOUNCE.as_millis(),
            TARGET.as_millis()
        );
        println!(
            "{:<9} {:<18} {:>4} {:>8} {:>8} {:>8} {:>8}",
            "style", "metric (ms)", "n", "min", "median", "p95", "max"
        );
        let (mut gen_all, mut served_all, mut stale_all) = (Vec::new(), Vec::new(), 0);
        for (style, s) in &all {
            row(style.name(), "write → generation", &s.generation, None);
            row(style.name(), "write → served", &s.served, Some(TARGET));
            row(style.name(), "write call", &s.write_call, None);
            row(style.name(), "start → served", &s.start_served, None);
            gen_all.extend_from_slice(&s.generation);
            served_all.extend_from_slice(&s.served);
            stale_all += s.stale_answers;
        }
        row("all", "write → generation", &gen_all, None);
        row("all", "write → served", &served_all, Some(TARGET));
        println!(
            "GETs answered by the previous backend after the generation was visible: {stale_all}"
        );
    });
}
