//! Switchyard and Prometheus together, for real: a `prometheus` server scrapes the admin
//! listener of an in-process proxy, `promtool` lints the live exposition, and
//! `promtool test rules` checks that the alerting rules in `config/alerts.yml` fire on
//! the series they are about, and only then.
//!
//! `prometheus` and `promtool` come from Debian's `prometheus` package, which `.ci/run`
//! installs. Without them these tests print a note and pass, so that the suite runs on a
//! developer's machine; under CI (the environment variable `CI` is set) they fail.

mod common;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const REQUESTS: u64 = 37;

/// How long Prometheus gets to start, scrape and evaluate the rules.
const PATIENCE: Duration = Duration::from_secs(60);

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// Whether `program` can be run. Under CI its absence fails the test.
fn available(program: &str) -> bool {
    match Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!(
            "`{program}` cannot be run ({e}), and CI needs it: install Debian's `prometheus` \
             package (apt-get install prometheus), as .ci/run does"
        ),
        Err(e) => {
            eprintln!(
                "note: skipped: `{program}` cannot be run ({e}); install Debian's `prometheus` \
                 package to run this test"
            );
            false
        }
    }
}

/// A YAML string (JSON is YAML) holding `s`.
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// A child process that is killed when this is dropped, panics included.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `prometheus` server on 127.0.0.1 with its data in a temporary folder.
struct Prometheus {
    // Declared first, so the process is gone before its folder is removed.
    _process: KillOnDrop,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Whether a Prometheus server on `addr` answers `/-/ready` with 200. While it starts,
/// it may refuse the connection, or accept it and reset it: both mean not yet.
async fn answers_ready(addr: SocketAddr) -> bool {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let io = hyper_util::rt::TokioIo::new(stream);
    let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(io).await else {
        return false;
    };
    tokio::spawn(conn);
    matches!(tx.send_request(get("/-/ready")).await, Ok(r) if r.status() == 200)
}

impl Prometheus {
    /// Starts Prometheus with `config` (YAML) and waits until it answers `/-/ready`.
    async fn start(config: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        // The port is found free, released, then given to Prometheus: if another process
        // takes it meanwhile, Prometheus exits and another port is tried.
        for _ in 0..5 {
            let addr = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let child = Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start prometheus");
            let mut process = KillOnDrop(child);
            let deadline = Instant::now() + PATIENCE;
            while Instant::now() < deadline {
                if process.0.try_wait().unwrap().is_some() {
                    break;
                }
                if answers_ready(addr).await {
                    return Prometheus {
                        _process: process,
                        addr,
                        dir,
                    };
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if process.0.try_wait().unwrap().is_none() {
                let p = Prometheus {
                    _process: process,
                    addr,
                    dir,
                };
                panic!(
                    "prometheus did not get ready within {PATIENCE:?}\n{}",
                    p.log()
                );
            }
            eprintln!(
                "prometheus exited at start, trying another port:\n{}",
                std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
            );
        }
        panic!("prometheus would not start; see the logs above");
    }

    /// Prometheus's own log, for failure messages.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str) -> serde_json::Value {
        let got = fetch(self.addr, get(path)).await;
        assert_eq!(got.status, 200, "GET {path}: {:?}", got.body);
        got.json()
    }

    /// The result of an instant query.
    async fn query(&self, promql: &str) -> serde_json::Value {
        let q = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        self.api(&format!("/api/v1/query?{q}")).await["data"]["result"].clone()
    }

    /// The value of a query that should give one sample.
    async fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql).await;
        match result.as_array().map(Vec::as_slice) {
            Some([one]) => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }
}

/// `(name, health, last error)` of every rule Prometheus has loaded.
fn rules_of(doc: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for group in doc["data"]["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            out.push((
                rule["name"].as_str().unwrap_or_default().to_owned(),
                rule["health"].as_str().unwrap_or_default().to_owned(),
                rule["lastError"].as_str().unwrap_or_default().to_owned(),
            ));
        }
    }
    out
}

/// The names of the alerts in `config/alerts.yml`, in file order.
fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

#[tokio::test]
async fn prometheus_scrapes_the_admin_listener_and_evaluates_the_alerts() {
    if !available("prometheus") {
        return;
    }
    let (a, b) = (named_backend("a").await, named_backend("b").await);
    let proxy = TestProxy::start(&config(&format!(
        "[pools.web]\nbackends = [{{ address = \"{a}\", id = \"a\" }}, {{ address = \"{b}\", id = \"b\" }}]\n"
    )))
    .await;
    let admin = proxy.admin.expect("admin listener");
    let rules_path = repo_file("config/alerts.yml");
    let expected_rules = alert_names(&std::fs::read_to_string(&rules_path).unwrap());
    assert!(!expected_rules.is_empty());
    let prometheus = Prometheus::start(&format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: switchyard\n    static_configs:\n      - targets: [{}]\n",
        yaml_str(&rules_path.display().to_string()),
        yaml_str(&admin.to_string()),
    ))
    .await;

    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..REQUESTS {
        assert_eq!(client.get("/").await.status, 200);
    }

    // Prometheus scrapes every second and evaluates the rules every second; wait until it
    // has seen all the requests and evaluated every rule at least once.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let up = prometheus.value("up{job=\"switchyard\"}").await;
        let total = prometheus.value("sum(switchyard_requests_total)").await;
        let rules = rules_of(&prometheus.api("/api/v1/rules").await);
        let evaluated = rules.len() == expected_rules.len()
            && rules.iter().all(|(_, health, _)| health != "unknown");
        if up == Some(1.0) && total == Some(REQUESTS as f64) && evaluated {
            let names: Vec<_> = rules.iter().map(|(n, _, _)| n.clone()).collect();
            assert_eq!(names, expected_rules);
            for (name, health, error) in &rules {
                assert_eq!(health, "ok", "rule {name}: {error}");
            }
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "after {PATIENCE:?}: up = {up:?}, sum(switchyard_requests_total) = {total:?} \
                 (want {REQUESTS}), rules = {rules:?}\ntargets: {}\nprometheus log:\n{}",
                prometheus.api("/api/v1/targets").await["data"]["activeTargets"],
                prometheus.log()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The series carry the labels the alerts group by, and the target's address. (Only
    // the non-zero ones: classes that saw no response may be exported at 0.)
    let by_backend = prometheus
        .query("sum by (job, instance, pool, backend, code) (switchyard_requests_total) > 0")
        .await;
    let by_backend = by_backend.as_array().unwrap();
    assert_eq!(by_backend.len(), 2, "{by_backend:?}");
    for series in by_backend {
        let m = &series["metric"];
        assert_eq!(m["job"], "switchyard");
        assert_eq!(m["instance"], admin.to_string());
        assert_eq!(m["pool"], "web");
        assert_eq!(m["code"], "2xx");
        assert!(m["backend"] == "a" || m["backend"] == "b", "{m}");
    }
    assert_eq!(
        prometheus
            .value("sum by (pool) (switchyard_backend_up)")
            .await,
        Some(2.0)
    );
    assert_eq!(
        prometheus
            .value("sum(switchyard_request_duration_seconds_count)")
            .await,
        Some(REQUESTS as f64)
    );
    // A healthy proxy raises no alert, not even a pending one.
    let alerts = prometheus.api("/api/v1/alerts").await;
    assert_eq!(
        alerts["data"]["alerts"],
        serde_json::json!([]),
        "alerts on a healthy proxy"
    );
}

#[tokio::test]
async fn promtool_accepts_the_live_exposition_and_the_config_files() {
    if !available("promtool") {
        return;
    }
    let backend = named_backend("a").await;
    let dead = dead_addr().await;
    let proxy = TestProxy::start(&config(&format!(
        "[[routes]]\npath_prefix = \"/dead\"\npool = \"gone\"\n[[routes]]\npool = \"web\"\n\
         [pools.web]\npolicy = \"sticky_cookie\"\nbackends = [\"{backend}\"]\n\
         [pools.gone]\nretries = 0\nbackends = [\"{dead}\"]\n"
    )))
    .await;
    let mut client = Client::connect(proxy.addr).await;
    for _ in 0..3 {
        assert_eq!(client.get("/").await.status, 200);
        assert_eq!(client.get("/dead").await.status, 503);
    }
    let metrics = fetch(proxy.admin.unwrap(), get("/metrics")).await;
    assert_eq!(metrics.status, 200);

    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin.take().unwrap().write_all(&metrics.body).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&metrics.body)
    );

    for (what, file) in [
        ("rules", "config/alerts.yml"),
        ("config", "config/prometheus.yml"),
    ] {
        let out = Command::new("promtool")
            .args(["check", what])
            .arg(repo_file(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check {what} {file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn every_alert_has_a_duration_a_severity_a_summary_and_a_description() {
    let rules = std::fs::read_to_string(repo_file("config/alerts.yml")).unwrap();
    let names = alert_names(&rules);
    assert!(names.len() >= 6, "{names:?}");
    for (i, block) in rules.split("- alert:").skip(1).enumerate() {
        for key in ["expr:", "for:", "severity:", "summary:", "description:"] {
            assert!(
                block.lines().any(|l| l.trim_start().starts_with(key)),
                "alert {} has no {key}",
                names[i]
            );
        }
    }
}

/// `rules` without the `annotations:` blocks: `promtool test rules` compares annotations
/// in full, and these tests are about when alerts fire and with which labels, not
/// about their wording.
fn without_annotations(rules: &str) -> String {
    let mut out = String::new();
    let mut inside: Option<usize> = None;
    for line in rules.lines() {
        let indent = line.len() - line.trim_start().len();
        if let Some(depth) = inside {
            if line.trim().is_empty() || indent > depth {
                continue;
            }
            inside = None;
        }
        if line.trim_start().starts_with("annotations:") {
            inside = Some(indent);
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Series and expected alerts for `promtool test rules`, one sample a minute. Instance
/// `a` is healthy throughout; the others go wrong in the ways the alerts are about.
const RULE_TESTS: &str = r#"
evaluation_interval: 1m
tests:
  # The proxy itself, its backends and its pools.
  - interval: 1m
    input_series:
      - series: 'up{job="switchyard",instance="a"}'
        values: '1x20'
      - series: 'up{job="switchyard",instance="b"}'
        values: '1 1 0x18'
      - series: 'switchyard_backend_up{job="switchyard",instance="a",pool="web",backend="web-1"}'
        values: '1 1 0x18'
      - series: 'switchyard_backend_up{job="switchyard",instance="a",pool="web",backend="web-2"}'
        values: '1x20'
      - series: 'switchyard_backend_up{job="switchyard",instance="a",pool="carts",backend="cart-1"}'
        values: '1 1 0x18'
      - series: 'switchyard_backend_up{job="switchyard",instance="a",pool="carts",backend="cart-2"}'
        values: '1 1 0x18'
    alert_rule_test:
      - eval_time: 3m
        alertname: SwitchyardDown
        exp_alerts: []
      - eval_time: 5m
        alertname: SwitchyardDown
        exp_alerts:
          - exp_labels: {severity: critical, job: switchyard, instance: b}
      - eval_time: 4m
        alertname: SwitchyardBackendDown
        exp_alerts: []
      - eval_time: 6m
        alertname: SwitchyardBackendDown
        exp_alerts:
          - exp_labels: {severity: warning, job: switchyard, instance: a, pool: web, backend: web-1}
          - exp_labels: {severity: warning, job: switchyard, instance: a, pool: carts, backend: cart-1}
          - exp_labels: {severity: warning, job: switchyard, instance: a, pool: carts, backend: cart-2}
      - eval_time: 2m
        alertname: SwitchyardPoolNoHealthyBackend
        exp_alerts: []
      - eval_time: 4m
        alertname: SwitchyardPoolNoHealthyBackend
        exp_alerts:
          - exp_labels: {severity: critical, job: switchyard, instance: a, pool: carts}

  # Errors, retries and latency. Pool web: 1 request in 11 is a 5xx, and retries are
  # refused. Pool carts: 1 in 61. Pool rare: half are 5xx, but it serves 2 requests a
  # minute.
  - interval: 1m
    input_series:
      - series: 'switchyard_requests_total{job="switchyard",instance="a",pool="web",backend="web-1",code="2xx"}'
        values: '0+60x30'
      - series: 'switchyard_requests_total{job="switchyard",instance="a",pool="web",backend="web-1",code="5xx"}'
        values: '0+3x30'
      - series: 'switchyard_requests_total{job="switchyard",instance="a",pool="web",backend="",code="5xx"}'
        values: '0+3x30'
      - series: 'switchyard_requests_total{job="switchyard",instance="a",pool="carts",backend="cart-1",code="2xx"}'
        values: '0+60x30'
      - series: 'switchyard_requests_total{job="switchyard",instance="a",pool="carts",backend="cart-1",code="5xx"}'
        values: '0+1x30'
      - series: 'switchyard_requests_total{job="switchyard",instance="a",pool="rare",backend="r-1",code="2xx"}'
        values: '0+1x30'
      - series: 'switchyard_requests_total{job="switchyard",instance="a",pool="rare",backend="r-1",code="5xx"}'
        values: '0+1x30'
      - series: 'switchyard_upstream_connect_errors_total{job="switchyard",instance="a",pool="web",backend="web-1"}'
        values: '0+5x30'
      - series: 'switchyard_upstream_connect_errors_total{job="switchyard",instance="a",pool="web",backend="web-2"}'
        values: '0+1x30'
      - series: 'switchyard_upstream_connect_errors_total{job="switchyard",instance="a",pool="carts",backend="cart-1"}'
        values: '0x30'
      - series: 'switchyard_retries_refused_total{job="switchyard",instance="a",pool="web"}'
        values: '0+2x30'
      - series: 'switchyard_retries_refused_total{job="switchyard",instance="a",pool="carts"}'
        values: '0x30'
      # Pool web: 9 in 10 requests take 2.5 s to 10 s. Pool carts: all under 0.1 s.
      - series: 'switchyard_request_duration_seconds_bucket{job="switchyard",instance="a",pool="web",backend="web-1",le="0.1"}'
        values: '0+6x30'
      - series: 'switchyard_request_duration_seconds_bucket{job="switchyard",instance="a",pool="web",backend="web-1",le="2.5"}'
        values: '0+6x30'
      - series: 'switchyard_request_duration_seconds_bucket{job="switchyard",instance="a",pool="web",backend="web-1",le="10"}'
        values: '0+60x30'
      - series: 'switchyard_request_duration_seconds_bucket{job="switchyard",instance="a",pool="web",backend="web-1",le="+Inf"}'
        values: '0+60x30'
      - series: 'switchyard_request_duration_seconds_bucket{job="switchyard",instance="a",pool="carts",backend="cart-1",le="0.1"}'
        values: '0+60x30'
      - series: 'switchyard_request_duration_seconds_bucket{job="switchyard",instance="a",pool="carts",backend="cart-1",le="2.5"}'
        values: '0+60x30'
      - series: 'switchyard_request_duration_seconds_bucket{job="switchyard",instance="a",pool="carts",backend="cart-1",le="10"}'
        values: '0+60x30'
      - series: 'switchyard_request_duration_seconds_bucket{job="switchyard",instance="a",pool="carts",backend="cart-1",le="+Inf"}'
        values: '0+60x30'
    alert_rule_test:
      - eval_time: 4m
        alertname: SwitchyardHigh5xxRatio
        exp_alerts: []
      - eval_time: 10m
        alertname: SwitchyardHigh5xxRatio
        exp_alerts:
          - exp_labels: {severity: critical, job: switchyard, instance: a, pool: web}
      - eval_time: 3m
        alertname: SwitchyardUpstreamConnectErrors
        exp_alerts: []
      - eval_time: 10m
        alertname: SwitchyardUpstreamConnectErrors
        exp_alerts:
          - exp_labels: {severity: warning, job: switchyard, instance: a, pool: web, backend: web-1}
      - eval_time: 3m
        alertname: SwitchyardRetryBudgetExhausted
        exp_alerts: []
      - eval_time: 10m
        alertname: SwitchyardRetryBudgetExhausted
        exp_alerts:
          - exp_labels: {severity: warning, job: switchyard, instance: a, pool: web}
      - eval_time: 8m
        alertname: SwitchyardHighLatency
        exp_alerts: []
      - eval_time: 15m
        alertname: SwitchyardHighLatency
        exp_alerts:
          - exp_labels: {severity: warning, job: switchyard, instance: a, pool: web}

  # Configuration reloads. a: started at 0, one bad edit at 3m, never fixed, never
  # reloaded since. b: started at 0, bad edits from 60m on. c: a bad edit at 65m, fixed
  # at 70m.
  - interval: 1m
    input_series:
      - series: 'switchyard_config_reloads_total{job="switchyard",instance="a",result="failure"}'
        values: '0 0 0 1x100'
      - series: 'switchyard_config_reloads_total{job="switchyard",instance="a",result="success"}'
        values: '0x103'
      - series: 'switchyard_config_last_reload_success_timestamp_seconds{job="switchyard",instance="a"}'
        values: '0x103'
      - series: 'switchyard_config_reloads_total{job="switchyard",instance="b",result="failure"}'
        values: '0x59 1+1x43'
      - series: 'switchyard_config_reloads_total{job="switchyard",instance="b",result="success"}'
        values: '0x103'
      - series: 'switchyard_config_last_reload_success_timestamp_seconds{job="switchyard",instance="b"}'
        values: '0x103'
      - series: 'switchyard_config_reloads_total{job="switchyard",instance="c",result="failure"}'
        values: '0x64 1x38'
      - series: 'switchyard_config_reloads_total{job="switchyard",instance="c",result="success"}'
        values: '0x69 1x33'
      - series: 'switchyard_config_last_reload_success_timestamp_seconds{job="switchyard",instance="c"}'
        values: '0x69 4200x33'
    alert_rule_test:
      - eval_time: 2m
        alertname: SwitchyardConfigReloadFailed
        exp_alerts: []
      - eval_time: 5m
        alertname: SwitchyardConfigReloadFailed
        exp_alerts:
          - exp_labels: {severity: warning, job: switchyard, instance: a, result: failure}
      - eval_time: 30m
        alertname: SwitchyardConfigReloadFailed
        exp_alerts: []
      - eval_time: 30m
        alertname: SwitchyardConfigStale
        exp_alerts: []
      - eval_time: 70m
        alertname: SwitchyardConfigStale
        exp_alerts: []
      - eval_time: 80m
        alertname: SwitchyardConfigStale
        exp_alerts:
          - exp_labels: {severity: critical, job: switchyard, instance: b}
      - eval_time: 78m
        alertname: SwitchyardConfigReloadFailed
        exp_alerts:
          - exp_labels: {severity: warning, job: switchyard, instance: b, result: failure}
          - exp_labels: {severity: warning, job: switchyard, instance: c, result: failure}
"#;

#[test]
fn the_alerts_fire_on_what_they_are_about_and_only_then() {
    if !available("promtool") {
        return;
    }
    let rules = std::fs::read_to_string(repo_file("config/alerts.yml")).unwrap();
    // Every alert is tested.
    for name in alert_names(&rules) {
        assert!(
            RULE_TESTS.contains(&format!("alertname: {name}\n")),
            "no promtool test for {name}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let rules_copy = dir.path().join("alerts.yml");
    std::fs::write(&rules_copy, without_annotations(&rules)).unwrap();
    let tests = dir.path().join("alerts_test.yml");
    std::fs::write(
        &tests,
        format!(
            "rule_files:\n  - {}\n{RULE_TESTS}",
            yaml_str(&rules_copy.display().to_string())
        ),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&tests)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool test rules: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
