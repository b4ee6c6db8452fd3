//! Configuration: every rejection names the right key, line and column; defaults and the
//! example files are what the documentation says; `switchyard check` exits as promised.
//!
//! No sockets are opened. Each rejecting test builds its TOML so that the offending key
//! sits alone on its line, and asserts that line.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use switchyard::balance::key::KeySource;
use switchyard::config::{
    load, parse, AccessLog, AffinityConfig, BackendAddr, Config, ConfigError, HashConfig,
    HostMatch, LearnConfig, LoadError, OnUnavailable, Policy, SameSite, Secret, SecureMode,
    StickyConfig,
};

const FILE: &str = "test.toml";

fn ok(text: &str) -> Config {
    parse(text, FILE).unwrap_or_else(|e| panic!("expected a valid config, got: {e}\n---\n{text}"))
}

fn err(text: &str) -> ConfigError {
    match parse(text, FILE) {
        Ok(c) => panic!("expected a rejection, got: {c:?}\n---\n{text}"),
        Err(e) => {
            assert_eq!(e.file, FILE, "{e}");
            e
        }
    }
}

/// Asserts the key path, the line, the column (when given) and a fragment of the message.
#[track_caller]
fn assert_err(text: &str, key: &str, line: usize, column: Option<usize>, fragment: &str) {
    let e = err(text);
    assert_eq!(e.key, key, "key path of: {e}");
    assert_located(&e, line, column, fragment);
}

/// As [`assert_err`] without the key path (key paths of parse-level errors are checked
/// in `serde_error_key_paths_are_clean`).
#[track_caller]
fn assert_located(e: &ConfigError, line: usize, column: Option<usize>, fragment: &str) {
    assert_eq!(e.line, line, "line of: {e}");
    if let Some(column) = column {
        assert_eq!(e.column, column, "column of: {e}");
    }
    assert!(
        e.message.contains(fragment),
        "message of: {e}\nexpected it to contain: {fragment}"
    );
    let shown = e.to_string();
    let prefix = format!("{}:{}:{}: {}: ", e.file, e.line, e.column, e.key);
    assert!(shown.starts_with(&prefix), "display: {shown}");
}

/// A valid pool, two lines, for files whose error lies elsewhere.
const WEB: &str = "[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n";

// ---------------------------------------------------------------------------------------
// Unknown keys

#[test]
fn unknown_top_level_key() {
    let text = format!("# comment\nbogus = 1\n{WEB}");
    assert_err(&text, "bogus", 2, Some(1), "unknown field `bogus`");
}

#[test]
fn unknown_key_in_server() {
    let text = format!("[server]\nlisten = [\"127.0.0.1:8080\"]\nlsten = 1\nworkers = 2\n{WEB}");
    assert_err(&text, "server.lsten", 3, Some(1), "unknown field `lsten`");
}

#[test]
fn unknown_key_in_server_limits() {
    let text = format!(
        "[server.limits]\nmax_connections = 5\nmax_conns = 1\nidle_timeout = \"5s\"\n{WEB}"
    );
    assert_err(
        &text,
        "server.limits.max_conns",
        3,
        Some(1),
        "unknown field `max_conns`",
    );
}

#[test]
fn unknown_key_in_admin() {
    let text = format!("{WEB}[admin]\nlisten = \"127.0.0.1:9090\"\nport = 9090\n");
    assert_err(&text, "admin.port", 5, Some(1), "unknown field `port`");
}

#[test]
fn unknown_key_in_pool() {
    // Key path should be `pools.x.retry`: see serde_error_key_paths_are_clean.
    let text = "[pools.x]\nbackends = [\"127.0.0.1:9001\"]\nretry = 1\nretries = 1\n";
    let e = err(text);
    assert_located(&e, 3, Some(1), "unknown field `retry`");
    assert!(e.message.contains("`retries`"), "lists the known keys: {e}");
}

#[test]
fn unknown_key_in_backend_table() {
    // Key path should be `pools.x.backends[1].wieght`: see serde_error_key_paths_are_clean.
    let text = "[pools.x]\nbackends = [\n  \"127.0.0.1:9001\",\n  { address = \"127.0.0.1:9002\", wieght = 2 },\n]\n";
    let e = err(text);
    assert_located(&e, 4, Some(33), "unknown field `wieght`");
    assert!(e.message.contains("`weight`"), "lists the known keys: {e}");
}

#[test]
fn unknown_key_in_route() {
    // Key path should be `routes[0].prefix`: see serde_error_key_paths_are_clean.
    let text = format!("{WEB}[[routes]]\npool = \"web\"\nprefix = \"/\"\n");
    let e = err(&text);
    assert_located(&e, 5, Some(1), "unknown field `prefix`");
}

// ---------------------------------------------------------------------------------------
// Syntax and types

#[test]
fn toml_syntax_error() {
    let text =
        "[pools.web]\nbackends = [\"127.0.0.1:9001\"]\nretries = = 2\nconnect_timeout = \"2s\"\n";
    assert_err(text, "(file)", 3, Some(11), "extra `=`");
}

#[test]
fn toml_duplicate_key() {
    let text = format!("{WEB}retries = 1\nretries = 2\n");
    assert_err(&text, "pools.web.retries", 4, Some(1), "duplicate key");
    let text = format!("[server]\nworkers = 1\n{WEB}[server]\nworkers = 2\n");
    assert_err(&text, "server", 5, Some(2), "duplicate key");
    let text = format!("{WEB}[[routes]]\npool = \"web\"\npool = \"web\"\n");
    assert_err(&text, "routes.pool", 5, Some(1), "duplicate key");
}

#[test]
fn wrong_type() {
    // Key path should be `pools.x.retries`: see serde_error_key_paths_are_clean.
    let text = "[pools.x]\nbackends = [\"127.0.0.1:9001\"]\nretries = \"two\"\n";
    let e = err(text);
    assert_located(&e, 3, Some(11), "invalid type: string \"two\"");
}

#[test]
fn wrong_type_listen_not_a_list() {
    // Key path should be `server.listen`: see serde_error_key_paths_are_clean.
    let text = format!("[server]\nlisten = \"127.0.0.1:8080\"\n{WEB}");
    let e = err(&text);
    assert_located(&e, 2, Some(10), "expected a sequence");
}

// ---------------------------------------------------------------------------------------
// Pools, backends, routes

#[test]
fn duplicate_backend_addresses() {
    let text = "[pools.x]\nbackends = [\n  \"127.0.0.1:9001\",\n  \"127.0.0.1:9001\",\n]\n";
    assert_err(
        text,
        "pools.x.backends[1].id",
        4,
        Some(3),
        "duplicate backend id \"127.0.0.1:9001\"",
    );
}

#[test]
fn duplicate_backend_explicit_ids() {
    let text = "[pools.x]\nbackends = [\n  { address = \"127.0.0.1:9001\", id = \"a\" },\n  { address = \"127.0.0.1:9002\", id = \"a\" },\n]\n";
    assert_err(
        text,
        "pools.x.backends[1].id",
        4,
        None,
        "duplicate backend id \"a\"",
    );
}

#[test]
fn explicit_id_colliding_with_an_address() {
    let text = "[pools.x]\nbackends = [\n  \"127.0.0.1:9001\",\n  { address = \"127.0.0.1:9002\", id = \"127.0.0.1:9001\" },\n]\n";
    assert_err(
        text,
        "pools.x.backends[1].id",
        4,
        None,
        "duplicate backend id \"127.0.0.1:9001\"",
    );
}

#[test]
fn same_address_in_two_pools_is_fine() {
    let c = ok("[pools.a]\nbackends = [\"127.0.0.1:9001\"]\n[pools.b]\nbackends = [\"127.0.0.1:9001\"]\n[[routes]]\npool = \"a\"\n");
    assert_eq!(c.pools.len(), 2);
}

#[test]
fn route_naming_a_missing_pool() {
    let text = format!("{WEB}[[routes]]\npool = \"nope\"\n");
    assert_err(
        &text,
        "routes[0].pool",
        4,
        Some(8),
        "no pool named \"nope\"",
    );
}

#[test]
fn empty_backends() {
    let text = "[pools.x]\npolicy = \"round_robin\"\nbackends = []\n";
    assert_err(
        text,
        "pools.x.backends",
        3,
        Some(12),
        "at least one backend",
    );
}

#[test]
fn pool_without_backends_key() {
    // Key path should be `pools.x`: see serde_error_key_paths_are_clean.
    let e = err("[pools.x]\npolicy = \"round_robin\"\n");
    assert_located(&e, 1, None, "missing field `backends`");
}

#[test]
fn no_pools() {
    // A rule about the whole file: it points at the start.
    assert_err(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n",
        "pools",
        1,
        Some(1),
        "at least one pool is required",
    );
    assert_err("", "pools", 1, Some(1), "at least one pool is required");
}

#[test]
fn several_pools_and_no_routes() {
    let text =
        "[pools.a]\nbackends = [\"127.0.0.1:9001\"]\n[pools.b]\nbackends = [\"127.0.0.1:9002\"]\n";
    assert_err(
        text,
        "routes",
        1,
        Some(1),
        "with more than one pool, [[routes]] must say",
    );
}

#[test]
fn invalid_pool_name() {
    let text = "[pools.\"a b\"]\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_err(
        text,
        "pools.a b",
        1,
        None,
        "pool names use only letters, digits",
    );
}

// ---------------------------------------------------------------------------------------
// Durations

#[test]
fn duration_with_unknown_unit() {
    let text = format!("{WEB}connect_timeout = \"10 parsecs\"\n");
    assert_err(
        &text,
        "pools.web.connect_timeout",
        3,
        Some(19),
        "invalid duration \"10 parsecs\"",
    );
}

#[test]
fn empty_duration() {
    let text = format!("{WEB}response_timeout = \"\"\nretries = 1\n");
    assert_err(
        &text,
        "pools.web.response_timeout",
        3,
        Some(20),
        "invalid duration \"\"",
    );
}

#[test]
fn zero_duration() {
    let text = format!("[server]\nworkers = 1\nshutdown_grace = \"0s\"\n{WEB}");
    assert_err(
        &text,
        "server.shutdown_grace",
        3,
        Some(18),
        "must be greater than zero",
    );
}

#[test]
fn durations_below_a_millisecond() {
    let text = format!("{WEB}connect_timeout = \"500us\"\n");
    assert_err(
        &text,
        "pools.web.connect_timeout",
        3,
        Some(19),
        "must be at least 1ms",
    );
    let text = format!("{WEB}[pools.web.health]\ninterval = \"5ms\"\ntimeout = \"1ms\"\n");
    assert_err(
        &text,
        "pools.web.health.interval",
        4,
        Some(12),
        "must be at least 10ms",
    );
}

#[test]
fn duration_beyond_ten_years() {
    // Now plus it must be a time the clock can hold.
    let text = format!("{WEB}response_timeout = \"500000000000y\"\n");
    assert_err(
        &text,
        "pools.web.response_timeout",
        3,
        Some(20),
        "must be at most 10 years",
    );
    let ten_years = format!("{WEB}response_timeout = \"3650days\"\n");
    ok(&ten_years);
    // As duration strings count years (365.25 days each).
    ok(&format!("{WEB}response_timeout = \"10y\"\n"));
    let text = format!("{WEB}response_timeout = \"10y 1s\"\n");
    assert_err(
        &text,
        "pools.web.response_timeout",
        3,
        Some(20),
        "must be at most 10 years",
    );
}

#[test]
fn bad_duration_in_limits() {
    let text = format!("[server.limits]\nidle_timeout = \"60\"\n{WEB}");
    assert_err(
        &text,
        "server.limits.idle_timeout",
        2,
        Some(16),
        "invalid duration \"60\"",
    );
}

// ---------------------------------------------------------------------------------------
// Addresses

#[test]
fn bad_listen_address() {
    let text = format!("[server]\nlisten = [\"127.0.0.1:8080\", \"localhost:80\"]\n{WEB}");
    assert_err(
        &text,
        "server.listen[1]",
        2,
        Some(29),
        "invalid listen address \"localhost:80\"",
    );
}

#[test]
fn listen_address_twice() {
    let text = format!("[server]\nlisten = [\"127.0.0.1:8080\", \"127.0.0.1:8080\"]\n{WEB}");
    assert_err(&text, "server.listen[1]", 2, Some(29), "listed twice");
}

#[test]
fn empty_listen_list() {
    let text = format!("[server]\nlisten = []\n{WEB}");
    assert_err(
        &text,
        "server.listen",
        2,
        Some(10),
        "at least one listen address",
    );
}

/// A pool whose second backend, alone on line 4 at column 3, is `backend`.
fn second_backend(backend: &str) -> String {
    format!("[pools.x]\nbackends = [\n  \"127.0.0.1:9001\",\n  {backend},\n]\n")
}

#[track_caller]
fn assert_bad_backend_address(address: &str) {
    let text = second_backend(&format!("\"{address}\""));
    let fragment = format!("invalid backend address \"{address}\"");
    assert_err(&text, "pools.x.backends[1].address", 4, Some(3), &fragment);
}

#[test]
fn backend_address_without_port() {
    assert_bad_backend_address("localhost");
}

#[test]
fn backend_address_port_out_of_range() {
    assert_bad_backend_address("1.2.3.4:99999");
}

#[test]
fn backend_ipv6_without_brackets() {
    assert_bad_backend_address("::1");
    assert_bad_backend_address("::1:80");
}

#[test]
fn backend_address_with_space() {
    assert_bad_backend_address("a b:80");
}

#[test]
fn backend_address_with_a_bad_name() {
    assert_bad_backend_address("-web:80");
    assert_bad_backend_address("web..api:80");
    assert_bad_backend_address("web/api:80");
}

#[test]
fn backend_names_as_container_runtimes_give_them() {
    let c = ok("[pools.x]\nbackends = [\"web_api:8080\", \"shop_web_1.internal:80\"]\n");
    assert_eq!(c.pools[0].backends.len(), 2);
}

#[test]
fn backend_address_port_zero() {
    assert_bad_backend_address("127.0.0.1:0");
}

#[test]
fn backend_address_in_table() {
    let text = second_backend("{ address = \"a b:80\", weight = 2 }");
    assert_err(
        &text,
        "pools.x.backends[1].address",
        4,
        None,
        "invalid backend address \"a b:80\"",
    );
}

#[test]
fn admin_listen_equal_to_server_listen() {
    let text = format!("[server]\nlisten = [\"127.0.0.1:8081\", \"127.0.0.1:8080\"]\n[admin]\nlisten = \"127.0.0.1:8080\"\n{WEB}");
    assert_err(
        &text,
        "admin.listen",
        4,
        Some(10),
        "must differ from every server.listen",
    );
}

#[test]
fn admin_listen_equal_to_default_listen() {
    let text = format!("[admin]\nlisten = \"127.0.0.1:8080\"\n{WEB}");
    assert_err(
        &text,
        "admin.listen",
        2,
        Some(10),
        "must differ from every server.listen",
    );
}

#[test]
fn listen_addresses_that_take_the_same_port() {
    let text = format!("[server]\nlisten = [\"127.0.0.1:8080\", \"0.0.0.0:8080\"]\n{WEB}");
    assert_err(
        &text,
        "server.listen[1]",
        2,
        Some(29),
        "overlaps 127.0.0.1:8080",
    );
    let text = format!("[server]\nlisten = [\"[::]:8080\", \"127.0.0.2:8080\"]\n{WEB}");
    assert_err(&text, "server.listen[1]", 2, Some(24), "overlaps [::]:8080");
    let text = format!(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\n[admin]\nlisten = \"0.0.0.0:8080\"\n{WEB}"
    );
    assert_err(
        &text,
        "admin.listen",
        4,
        Some(10),
        "must differ from every server.listen address: 0.0.0.0:8080 takes the port of 127.0.0.1:8080",
    );
    // Different ports, or an IPv4 wildcard beside an IPv6 address, do not overlap.
    ok(&format!("[server]\nlisten = [\"0.0.0.0:8080\", \"[::1]:8080\", \"127.0.0.1:8081\"]\n[admin]\nlisten = \"127.0.0.1:9090\"\n{WEB}"));
}

#[test]
fn bad_admin_listen() {
    let text = format!("[admin]\nlisten = \"localhost:9090\"\n{WEB}");
    assert_err(&text, "admin.listen", 2, Some(10), "invalid listen address");
}

// ---------------------------------------------------------------------------------------
// Weights

#[test]
fn weight_zero() {
    // Line is right; the column is the backend table's, not the weight's: see
    // backend_field_errors_point_at_the_field.
    let text = second_backend("{ address = \"127.0.0.1:9002\", weight = 0 }");
    assert_err(
        &text,
        "pools.x.backends[1].weight",
        4,
        None,
        "weight 0 is not allowed",
    );
}

#[test]
fn weight_above_1000() {
    let text = second_backend("{ address = \"127.0.0.1:9002\", weight = 1001 }");
    assert_err(
        &text,
        "pools.x.backends[1].weight",
        4,
        None,
        "weight 1001 is out of range; expected 1 to 1000",
    );
}

#[test]
fn empty_backend_id() {
    let text = second_backend("{ address = \"127.0.0.1:9002\", id = \" \" }");
    assert_err(
        &text,
        "pools.x.backends[1].id",
        4,
        None,
        "must not be empty",
    );
}

#[test]
fn backend_id_with_a_space_or_a_line_break() {
    for id in ["be x", "be\\nGET /forged 200", "tab\\there"] {
        let text = second_backend(&format!(
            "{{ address = \"127.0.0.1:9002\", id = \"{id}\" }}"
        ));
        assert_err(
            &text,
            "pools.x.backends[1].id",
            4,
            None,
            "has a space or control character",
        );
    }
}

// ---------------------------------------------------------------------------------------
// Enumerations and features of later versions

#[test]
fn unknown_policy() {
    let text = format!("{WEB}policy = \"random\"\nretries = 1\n");
    assert_err(
        &text,
        "pools.web.policy",
        3,
        Some(10),
        "unknown policy \"random\"",
    );
}

#[test]
fn server_tls_not_available() {
    let text = format!("{WEB}[[server.tls]]\nlisten = \"127.0.0.1:8443\"\n");
    assert_err(
        &text,
        "server.tls",
        3,
        Some(1),
        "TLS listeners are not available in this version",
    );
}

#[test]
fn health_and_outlier_defaults() {
    let c = ok(&format!("{WEB}[pools.web.health]\n"));
    let h = c.pools[0].health.clone().unwrap();
    assert_eq!(h.path, "/healthz");
    assert_eq!(h.interval, Duration::from_secs(2));
    assert_eq!(h.timeout, Duration::from_secs(1));
    assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (2, 3));
    assert_eq!(h.expect_status, 200..=399);
    let o = &c.pools[0].outlier;
    assert_eq!(o.consecutive_failures, 5);
    assert_eq!(o.base_ejection, Duration::from_secs(30));
    assert_eq!(o.max_ejection, Duration::from_secs(300));
    assert_eq!(o.max_ejected_percent, 50);
    assert_eq!(c.pools[0].all_down, switchyard::config::AllDown::FailOpen);
    assert_eq!(c.pools[0].retry_budget, 0.2);
    let c = ok(&format!(
        "{WEB}all_down = \"reject\"\n[pools.web.health]\nexpect_status = \"204\"\n"
    ));
    assert_eq!(c.pools[0].health.clone().unwrap().expect_status, 204..=204);
    assert_eq!(c.pools[0].all_down, switchyard::config::AllDown::Reject);
    assert!(ok(WEB).pools[0].health.is_none());
}

#[test]
fn health_rejections() {
    let cases = [
        (
            "[pools.web.health]\npath = \"healthz\"\n",
            "pools.web.health.path",
            "must start with '/'",
        ),
        (
            "[pools.web.health]\nexpect_status = \"600\"\n",
            "pools.web.health.expect_status",
            "invalid status range",
        ),
        (
            "[pools.web.health]\nexpect_status = \"399-200\"\n",
            "pools.web.health.expect_status",
            "invalid status range",
        ),
        (
            "[pools.web.health]\ninterval = \"1s\"\ntimeout = \"2s\"\n",
            "pools.web.health.timeout",
            "must not exceed interval",
        ),
        (
            "[pools.web.health]\ninterval = \"500ms\"\n",
            "pools.web.health.interval",
            "must not be shorter than timeout (1s by default)",
        ),
        (
            "[pools.web.health]\nhealthy_threshold = 0\n",
            "pools.web.health.healthy_threshold",
            "out of range",
        ),
        (
            "[pools.web.health]\nport = 80\n",
            "pools.web.health.port",
            "unknown field",
        ),
        (
            "[pools.web.outlier]\nmax_ejected_percent = 101\n",
            "pools.web.outlier.max_ejected_percent",
            "out of range",
        ),
        (
            "[pools.web.outlier]\nbase_ejection = \"1m\"\nmax_ejection = \"10s\"\n",
            "pools.web.outlier.max_ejection",
            "at least base_ejection",
        ),
        ("all_down = \"panic\"\n", "pools.web.all_down", "fail_open"),
        (
            "retry_budget = 1.5\n",
            "pools.web.retry_budget",
            "0.0 to 1.0",
        ),
        (
            "retry_budget = \"lots\"\n",
            "pools.web.retry_budget",
            "0.0 to 1.0",
        ),
    ];
    for (tail, key, fragment) in cases {
        let e = err(&format!("{WEB}{tail}"));
        assert_eq!(e.key, key, "{e}");
        assert!(e.message.contains(fragment), "{e}");
        assert!(e.line >= 3, "{e}");
    }
}

#[test]
fn sticky_table_needs_sticky_policy() {
    let text = format!("{WEB}[pools.web.sticky]\ncookie = \"SWITCHYARD\"\n");
    assert_err(
        &text,
        "pools.web.sticky",
        3,
        Some(1),
        "only used with policy = \"sticky_cookie\"",
    );
}

#[test]
fn hash_key_needs_hash_policy() {
    let text = format!("{WEB}hash_key = [\"client_ip\"]\n");
    assert_err(
        &text,
        "pools.web.hash_key",
        3,
        Some(12),
        "only used with policy = \"consistent_hash\"",
    );
}

#[test]
fn unknown_access_log() {
    let text = format!("[server]\nworkers = 1\naccess_log = \"verbose\"\n{WEB}");
    assert_err(
        &text,
        "server.access_log",
        3,
        Some(14),
        "unknown value \"verbose\"",
    );
}

#[test]
fn metrics_must_be_a_boolean() {
    let text = format!("[server]\nworkers = 1\nmetrics = \"off\"\n{WEB}");
    assert_err(
        &text,
        "server.metrics",
        3,
        Some(11),
        "invalid type: string \"off\", expected a boolean",
    );
}

#[test]
fn metrics_can_be_switched_off() {
    assert!(
        !ok(&format!("[server]\nmetrics = false\n{WEB}"))
            .server
            .metrics
    );
}

// ---------------------------------------------------------------------------------------
// Session affinity: sticky cookies, learned sessions, consistent hashing

/// A `sticky_cookie` pool whose `[pools.x.sticky]` header is line 4: its keys start on
/// line 5.
const STICKY: &str =
    "[pools.x]\npolicy = \"sticky_cookie\"\nbackends = [\"127.0.0.1:9001\"]\n[pools.x.sticky]\n";

/// A `sticky_learn` pool whose `[pools.x.learn]` header is line 4: its keys start on
/// line 5.
const LEARN: &str =
    "[pools.x]\npolicy = \"sticky_learn\"\nbackends = [\"127.0.0.1:9001\"]\n[pools.x.learn]\n";

/// A `consistent_hash` pool on lines 1 to 3: further pool keys start on line 4.
const HASH: &str = "[pools.x]\npolicy = \"consistent_hash\"\nbackends = [\"127.0.0.1:9001\"]\n";

/// `[pools.x.sticky]` holding `cookie = "SID"` on line 5, then `line` alone on line 6.
fn sticky_line(line: &str) -> String {
    format!("{STICKY}cookie = \"SID\"\n{line}\n")
}

/// A TOML literal string naming `path` (no escapes, so any path separator is fine).
fn toml_path(path: &Path) -> String {
    format!("'{}'", path.display())
}

#[test]
fn unknown_key_in_sticky() {
    let text = sticky_line("cokie = \"x\"");
    assert_err(
        &text,
        "pools.x.sticky.cokie",
        6,
        Some(1),
        "unknown field `cokie`",
    );
    assert!(
        err(&text).message.contains("`cookie`"),
        "lists the known keys"
    );
}

#[test]
fn unknown_key_in_learn() {
    let text = format!("{LEARN}cookie = \"JSESSIONID\"\nmax_entry = 5\n");
    assert_err(
        &text,
        "pools.x.learn.max_entry",
        6,
        Some(1),
        "unknown field `max_entry`",
    );
    assert!(
        err(&text).message.contains("`max_entries`"),
        "lists the known keys"
    );
}

#[test]
fn learn_table_needs_learn_policy() {
    let text = format!("{WEB}[pools.web.learn]\ncookie = \"JSESSIONID\"\n");
    assert_err(
        &text,
        "pools.web.learn",
        3,
        Some(1),
        "only used with policy = \"sticky_learn\", but this pool's policy is \"round_robin\"",
    );
    // Another stateful policy is no better.
    let text = "[pools.x]\npolicy = \"sticky_cookie\"\nbackends = [\"127.0.0.1:9001\"]\n[pools.x.learn]\ncookie = \"JSESSIONID\"\n";
    assert_err(
        text,
        "pools.x.learn",
        4,
        Some(1),
        "but this pool's policy is \"sticky_cookie\"",
    );
}

#[test]
fn sticky_table_with_another_stateful_policy() {
    let text = format!("{HASH}[pools.x.sticky]\ncookie = \"SID\"\n");
    assert_err(
        &text,
        "pools.x.sticky",
        4,
        Some(1),
        "only used with policy = \"sticky_cookie\", but this pool's policy is \"consistent_hash\"",
    );
}

#[test]
fn hash_key_with_a_sticky_policy() {
    let text = format!("{STICKY}cookie = \"SID\"\n[pools.y]\npolicy = \"sticky_learn\"\nhash_key = [\"path\"]\nbackends = [\"127.0.0.1:9002\"]\n[pools.y.learn]\ncookie = \"JSESSIONID\"\n");
    assert_err(
        &text,
        "pools.y.hash_key",
        8,
        Some(12),
        "only used with policy = \"consistent_hash\", but this pool's policy is \"sticky_learn\"",
    );
}

#[test]
fn bounded_load_needs_hash_policy() {
    let text = format!("{WEB}bounded_load = 1.5\n");
    assert_err(
        &text,
        "pools.web.bounded_load",
        3,
        Some(16),
        "only used with policy = \"consistent_hash\"",
    );
}

#[test]
fn bad_sticky_cookie_name() {
    for name in ["my cookie", "a;b", "a=b", "", "caf\u{e9}"] {
        let text = format!("{STICKY}ttl = \"2h\"\ncookie = \"{name}\"\n");
        let fragment = format!("invalid cookie name {name:?}");
        assert_err(&text, "pools.x.sticky.cookie", 6, Some(10), &fragment);
    }
}

#[test]
fn two_sticky_pools_sharing_one_cookie() {
    let pool = |name: &str, port: u16, sticky: &str| {
        format!("[pools.{name}]\npolicy = \"sticky_cookie\"\nbackends = [\"127.0.0.1:{port}\"]\n{sticky}")
    };
    let routes = "[[routes]]\npath_prefix = \"/a\"\npool = \"a\"\n[[routes]]\npool = \"b\"\n";
    // Both with the default name: pointed at the second pool's table.
    let text = format!(
        "{routes}{}{}",
        pool("a", 9001, ""),
        pool("b", 9002, "[pools.b.sticky]\nttl = \"1h\"\n")
    );
    assert_err(
        &text,
        "pools.b.sticky.cookie",
        12,
        Some(1),
        "pools \"a\" and \"b\" would share the cookie \"SWITCHYARD\"",
    );
    // The same name given, at its key; domains compare without case.
    let text = format!(
        "{routes}{}{}",
        pool(
            "a",
            9001,
            "[pools.a.sticky]\ncookie = \"SY\"\ndomain = \"Example.com\"\n"
        ),
        pool(
            "b",
            9002,
            "[pools.b.sticky]\ncookie = \"SY\"\ndomain = \"example.com\"\n"
        )
    );
    assert_err(
        &text,
        "pools.b.sticky.cookie",
        16,
        Some(10),
        "give one a cookie of its own",
    );
    // Another name, path or domain keeps them apart.
    for (a, b) in [
        ("cookie = \"SY_A\"", "cookie = \"SY_B\""),
        ("path = \"/a\"", "path = \"/\""),
        ("domain = \"a.example.com\"", "domain = \"example.com\""),
        ("domain = \"example.com\"", ""),
    ] {
        ok(&format!(
            "{routes}{}{}",
            pool("a", 9001, &format!("[pools.a.sticky]\n{a}\n")),
            pool("b", 9002, &format!("[pools.b.sticky]\n{b}\n"))
        ));
    }
}

#[test]
fn bad_learn_cookie_name() {
    let text = format!("{LEARN}ttl = \"30m\"\ncookie = \"JSESSION ID\"\n");
    assert_err(
        &text,
        "pools.x.learn.cookie",
        6,
        Some(10),
        "invalid cookie name \"JSESSION ID\"",
    );
}

#[test]
fn sticky_learn_without_learn_table() {
    let text = "[pools.x]\npolicy = \"sticky_learn\"\nbackends = [\"127.0.0.1:9001\"]\n";
    assert_err(
        text,
        "pools.x.learn",
        1,
        Some(1),
        "policy sticky_learn needs [pools.NAME.learn] with cookie = \"NAME\"",
    );
}

#[test]
fn learn_table_without_cookie() {
    let text = format!("{LEARN}ttl = \"30m\"\n");
    assert_err(
        &text,
        "pools.x.learn.cookie",
        4,
        Some(1),
        "the name of the application's session cookie is required",
    );
}

#[test]
fn secret_env_naming_an_unset_variable() {
    let name = "SWITCHYARD_CONFIG_TEST_UNSET_SECRET";
    std::env::remove_var(name);
    let text = sticky_line(&format!("secret_env = \"{name}\""));
    let fragment = format!("environment variable {name} is not set or empty");
    assert_err(&text, "pools.x.sticky.secret_env", 6, Some(14), &fragment);

    let name = "SWITCHYARD_CONFIG_TEST_EMPTY_SECRET";
    std::env::set_var(name, "");
    let text = sticky_line(&format!("secret_env = \"{name}\""));
    let fragment = format!("environment variable {name} is not set or empty");
    assert_err(&text, "pools.x.sticky.secret_env", 6, Some(14), &fragment);
}

#[test]
fn secret_env_shorter_than_16_bytes() {
    let name = "SWITCHYARD_CONFIG_TEST_SHORT_SECRET";
    std::env::set_var(name, "fifteen-bytes!!");
    let text = sticky_line(&format!("secret_env = \"{name}\""));
    let fragment =
        format!("the secret in environment variable {name} is 15 bytes; at least 16 are required");
    assert_err(&text, "pools.x.sticky.secret_env", 6, Some(14), &fragment);
}

#[test]
fn secret_env_of_wrong_type() {
    for value in [
        "42",
        "[]",
        "[\"\"]",
        "\"\"",
        "[\"A_VAR\", 1]",
        "{ name = \"A_VAR\" }",
    ] {
        let text = sticky_line(&format!("secret_env = {value}"));
        assert_err(
            &text,
            "pools.x.sticky.secret_env",
            6,
            Some(14),
            "expected a string or a list of strings",
        );
    }
}

#[test]
fn secret_file_missing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.secret");
    let text = sticky_line(&format!("secret_file = {}", toml_path(&path)));
    let fragment = format!("cannot read {}", path.display());
    assert_err(&text, "pools.x.sticky.secret_file", 6, Some(15), &fragment);
}

#[test]
fn secret_file_empty() {
    let dir = tempfile::tempdir().unwrap();
    for (i, content) in ["", "\n", "  \n\t\n\r\n"].into_iter().enumerate() {
        let path = dir.path().join(format!("empty-{i}.secret"));
        std::fs::write(&path, content).unwrap();
        let text = sticky_line(&format!("secret_file = {}", toml_path(&path)));
        let fragment = format!("{} holds no secret", path.display());
        assert_err(&text, "pools.x.sticky.secret_file", 6, Some(15), &fragment);
    }
}

#[test]
fn secret_file_with_a_short_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sticky.secret");
    std::fs::write(&path, "0123456789abcdef-long-enough\nshort\n").unwrap();
    let text = sticky_line(&format!("secret_file = {}", toml_path(&path)));
    let fragment = format!(
        "the secret in {} is 5 bytes; at least 16 are required",
        path.display()
    );
    assert_err(&text, "pools.x.sticky.secret_file", 6, Some(15), &fragment);
}

#[test]
fn secret_file_of_wrong_type() {
    for value in ["true", "[]", "[\"\"]"] {
        let text = sticky_line(&format!("secret_file = {value}"));
        assert_err(
            &text,
            "pools.x.sticky.secret_file",
            6,
            Some(15),
            "expected a string or a list of strings",
        );
    }
}

#[test]
fn secret_file_is_relative_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("sticky.secret"),
        "\n  a-secret-of-more-than-16-bytes  \n\n",
    )
    .unwrap();
    let config = dir.path().join("switchyard.toml");
    std::fs::write(&config, sticky_line("secret_file = \"sticky.secret\"")).unwrap();
    let c = load(&config).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        sticky_of(&c).secrets,
        [Secret(b"a-secret-of-more-than-16-bytes".to_vec())]
    );

    // Relative to the file, not to the working directory: elsewhere it is not found.
    let other = tempfile::tempdir().unwrap();
    let moved = other.path().join("switchyard.toml");
    std::fs::copy(&config, &moved).unwrap();
    match load(&moved) {
        Err(LoadError::Invalid(e)) => {
            assert_eq!(e.key, "pools.x.sticky.secret_file", "{e}");
            assert_eq!((e.line, e.column), (6, 15), "{e}");
            let expected = other.path().join("sticky.secret");
            assert!(
                e.message
                    .contains(&format!("cannot read {}", expected.display())),
                "{e}"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn unknown_on_unavailable() {
    let text = sticky_line("on_unavailable = \"retry\"");
    assert_err(
        &text,
        "pools.x.sticky.on_unavailable",
        6,
        Some(18),
        "unknown value \"retry\"; expected \"redispatch\" or \"reject\"",
    );
}

#[test]
fn secure_of_wrong_type_or_value() {
    for value in ["\"yes\"", "\"true\"", "\"Auto\"", "1", "[]"] {
        let text = sticky_line(&format!("secure = {value}"));
        assert_err(
            &text,
            "pools.x.sticky.secure",
            6,
            Some(10),
            "expected \"auto\", true or false",
        );
    }
}

#[test]
fn unknown_same_site() {
    let text = sticky_line("same_site = \"lenient\"");
    assert_err(
        &text,
        "pools.x.sticky.same_site",
        6,
        Some(13),
        "unknown value \"lenient\"; expected \"lax\", \"strict\" or \"none\"",
    );
}

#[test]
fn cookie_path_without_leading_slash() {
    for value in ["cart", "", "/a;b"] {
        let text = sticky_line(&format!("path = \"{value}\""));
        assert_err(
            &text,
            "pools.x.sticky.path",
            6,
            Some(8),
            "a cookie path starts with '/' and holds no ';'",
        );
    }
}

#[test]
fn bad_cookie_domain() {
    for value in [
        "exa mple.com",
        "a..b",
        "example.com:443",
        "",
        ".",
        "*.example.com",
    ] {
        let text = sticky_line(&format!("domain = \"{value}\""));
        let fragment = format!("invalid cookie domain {value:?}");
        assert_err(&text, "pools.x.sticky.domain", 6, Some(10), &fragment);
    }
}

#[test]
fn sticky_ttl_over_400_days() {
    let text = sticky_line("ttl = \"401days\"");
    assert_err(&text, "pools.x.sticky.ttl", 6, Some(7), "at most 400 days");
    let c = ok(&sticky_line("ttl = \"400days\""));
    assert_eq!(sticky_of(&c).ttl, Duration::from_secs(400 * 24 * 3600));
}

#[test]
fn sticky_ttl_zero() {
    let text = sticky_line("ttl = \"0s\"");
    assert_err(
        &text,
        "pools.x.sticky.ttl",
        6,
        Some(7),
        "must be greater than zero",
    );
}

#[test]
fn drain_timeout_in_pool_and_in_sticky() {
    let text = "[pools.x]\npolicy = \"sticky_cookie\"\nbackends = [\"127.0.0.1:9001\"]\ndrain_timeout = \"1m\"\n[pools.x.sticky]\ndrain_timeout = \"2m\"\n";
    assert_err(
        text,
        "pools.x.drain_timeout",
        4,
        Some(17),
        "drain_timeout is set both here and in [sticky]; keep one",
    );
}

#[test]
fn bad_drain_timeout() {
    let text = format!("{WEB}drain_timeout = \"soon\"\n");
    assert_err(
        &text,
        "pools.web.drain_timeout",
        3,
        Some(17),
        "invalid duration \"soon\"",
    );
    let text = format!("{WEB}drain_timeout = \"0s\"\n");
    assert_err(
        &text,
        "pools.web.drain_timeout",
        3,
        Some(17),
        "must be greater than zero",
    );
    let text = sticky_line("drain_timeout = \"5\"");
    assert_err(
        &text,
        "pools.x.sticky.drain_timeout",
        6,
        Some(17),
        "invalid duration \"5\"",
    );
}

#[test]
fn empty_hash_key() {
    let text = format!("{HASH}hash_key = []\n");
    assert_err(
        &text,
        "pools.x.hash_key",
        4,
        Some(12),
        "at least one key source is required",
    );
}

#[test]
fn unknown_hash_key_source() {
    let text = format!("{HASH}hash_key = [\"header:X-User-Id\", \"ip\"]\n");
    assert_err(
        &text,
        "pools.x.hash_key[1]",
        4,
        Some(33),
        "unknown key source \"ip\"; expected header:NAME, cookie:NAME, query:NAME, path or client_ip",
    );
}

#[test]
fn hash_key_source_without_name() {
    for what in ["header", "cookie", "query"] {
        let text = format!("{HASH}hash_key = [\"{what}:\"]\n");
        let fragment = format!("{what} needs a name");
        assert_err(&text, "pools.x.hash_key[0]", 4, Some(13), &fragment);
    }
}

#[test]
fn hash_key_invalid_header_name() {
    let text = format!("{HASH}hash_key = [\"client_ip\", \"header:X User\"]\n");
    assert_err(
        &text,
        "pools.x.hash_key[1]",
        4,
        Some(26),
        "invalid header name \"X User\"",
    );
}

#[test]
fn bounded_load_out_of_range_or_not_a_number() {
    for value in [
        "1.0", "1", "0.5", "0", "-2", "101", "100.5", "\"high\"", "nan", "inf",
    ] {
        let text = format!("{HASH}bounded_load = {value}\n");
        assert_err(
            &text,
            "pools.x.bounded_load",
            4,
            Some(16),
            "expected a number above 1.0 (e.g. 1.25) and at most 100",
        );
    }
}

#[test]
fn learn_max_entries_zero() {
    let text = format!("{LEARN}cookie = \"JSESSIONID\"\nmax_entries = 0\n");
    assert_err(
        &text,
        "pools.x.learn.max_entries",
        6,
        Some(15),
        "0 is out of range; expected 1 to",
    );
}

// ---------------------------------------------------------------------------------------
// Ranges

#[test]
fn max_header_bytes_below_8192() {
    let text = format!("[server.limits]\nmax_connections = 5\nmax_header_bytes = 4096\n{WEB}");
    assert_err(
        &text,
        "server.limits.max_header_bytes",
        3,
        Some(20),
        "4096 is out of range; expected 8192",
    );
}

#[test]
fn retries_out_of_range() {
    let text = format!("{WEB}retries = 11\n");
    assert_err(
        &text,
        "pools.web.retries",
        3,
        Some(11),
        "11 is out of range; expected 0 to 10",
    );
}

#[test]
fn max_connections_per_backend_out_of_range() {
    for (value, message) in [
        ("0", "0 is out of range; expected 1 to 1000000"),
        ("1000001", "1000001 is out of range; expected 1 to 1000000"),
    ] {
        let text = format!("{WEB}max_connections_per_backend = {value}\n");
        assert_err(
            &text,
            "pools.web.max_connections_per_backend",
            3,
            Some(31),
            message,
        );
    }
}

#[test]
fn negative_workers() {
    let text = format!("[server]\nworkers = -1\n{WEB}");
    assert_err(&text, "server.workers", 2, Some(11), "-1 is out of range");
}

#[test]
fn zero_max_connections() {
    let text = format!("[server.limits]\nmax_connections = 0\n{WEB}");
    assert_err(
        &text,
        "server.limits.max_connections",
        2,
        Some(19),
        "0 is out of range",
    );
}

// ---------------------------------------------------------------------------------------
// Route hosts and paths

#[test]
fn route_host_with_port() {
    let text = format!("{WEB}[[routes]]\nhost = \"shop.example.com:8080\"\npool = \"web\"\n");
    assert_err(
        &text,
        "routes[0].host",
        4,
        Some(8),
        "invalid host \"shop.example.com:8080\"",
    );
}

#[test]
fn route_host_with_empty_label() {
    let text = format!("{WEB}[[routes]]\nhost = \"a..b\"\npool = \"web\"\n");
    assert_err(&text, "routes[0].host", 4, Some(8), "invalid host \"a..b\"");
}

#[test]
fn path_prefix_without_leading_slash() {
    let text = format!(
        "{WEB}[[routes]]\npool = \"web\"\n[[routes]]\npath_prefix = \"api\"\npool = \"web\"\n"
    );
    assert_err(
        &text,
        "routes[1].path_prefix",
        6,
        Some(15),
        "invalid path prefix \"api\"",
    );
    for bad in ["/caf\u{e9}", "/a b", "/tab\t"] {
        let text = format!("{WEB}[[routes]]\npath_prefix = {bad:?}\npool = \"web\"\n");
        assert_err(
            &text,
            "routes[0].path_prefix",
            4,
            Some(15),
            "percent-encode other characters",
        );
    }
}

// ---------------------------------------------------------------------------------------
// Key paths and positions of parse-level and backend-field errors.

/// Parse-level errors (unknown keys, wrong types, missing keys) name the plain key path,
/// with no serde internals in it, and the pool by its name.
#[test]
fn serde_error_key_paths_are_clean() {
    let cases = [
        ("[pools.x]\nbackends = [\"127.0.0.1:9001\"]\nretry = 1\n", "pools.x.retry"),
        ("[pools.x]\nbackends = [\"127.0.0.1:9001\"]\nretries = \"two\"\n", "pools.x.retries"),
        ("[pools.x]\npolicy = \"round_robin\"\n", "pools.x"),
        (
            "[pools.x]\nbackends = [\n  \"127.0.0.1:9001\",\n  { address = \"127.0.0.1:9002\", wieght = 2 },\n]\n",
            "pools.x.backends[1].wieght",
        ),
        ("[pools.x]\nbackends = [\n  { weight = 2 },\n]\n", "pools.x.backends[0]"),
        ("[pools.x]\nbackends = [\"127.0.0.1:9001\"]\n[[routes]]\npool = \"x\"\nprefix = \"/\"\n", "routes[0].prefix"),
        ("[pools.x]\nbackends = [\"127.0.0.1:9001\"]\n[[routes]]\nhost = \"a\"\n", "routes[0]"),
        ("[server]\nlisten = \"127.0.0.1:8080\"\n[pools.x]\nbackends = [\"127.0.0.1:9001\"]\n", "server.listen"),
        ("[server]\nworkers = 1.5\n[pools.x]\nbackends = [\"127.0.0.1:9001\"]\n", "server.workers"),
    ];
    let mut wrong = Vec::new();
    for (text, key) in cases {
        let e = err(text);
        if e.key != key {
            wrong.push(format!("expected key {key:?}, got: {e}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Validation errors about a backend's address, weight or id point at the field itself,
/// in inline tables, multi-line inline tables and `[[pools.x.backends]]` tables.
#[test]
fn backend_field_errors_point_at_the_field() {
    let inline = second_backend("{ address = \"127.0.0.1:9002\", weight = 0 }");
    let e = err(&inline);
    assert_eq!((e.line, e.column), (4, 42), "{e}");

    let multi_line =
        "[pools.x]\nbackends = [\n  { address = \"127.0.0.1:9001\",\n    weight = 0 },\n]\n";
    let e = err(multi_line);
    assert_eq!((e.line, e.column), (4, 14), "{e}");

    let tables = "[[pools.x.backends]]\naddress = \"127.0.0.1:9001\"\nweight = 0\n";
    let e = err(tables);
    assert_eq!((e.line, e.column), (3, 10), "{e}");

    let tables = "[[pools.x.backends]]\naddress = \"127.0.0.1:9001\"\n[[pools.x.backends]]\naddress = \"127.0.0.1:9002\"\nid = \"127.0.0.1:9001\"\n";
    let e = err(tables);
    assert_eq!((e.line, e.column), (5, 6), "{e}");
}

// ---------------------------------------------------------------------------------------
// Accepted configurations

#[test]
fn defaults() {
    let c = ok("[pools.web]\nbackends = [\"127.0.0.1:9001\"]\n");
    let s = &c.server;
    assert_eq!(s.listen, vec![SocketAddr::from(([127, 0, 0, 1], 8080))]);
    assert_eq!(s.workers, 0);
    assert_eq!(s.shutdown_grace, Duration::from_secs(30));
    assert_eq!(s.access_log, AccessLog::Off);
    assert!(s.metrics);
    assert_eq!(s.limits.max_connections, 10_000);
    assert_eq!(s.limits.header_read_timeout, Duration::from_secs(10));
    assert_eq!(s.limits.idle_timeout, Duration::from_secs(60));
    assert_eq!(s.limits.max_header_bytes, 65_536);
    assert!(c.admin.is_none());
    assert_eq!(c.pools.len(), 1);
    let p = &c.pools[0];
    assert_eq!(p.name, "web");
    assert_eq!(p.policy, Policy::RoundRobin);
    assert_eq!(p.connect_timeout, Duration::from_secs(2));
    assert_eq!(p.response_timeout, Duration::from_secs(30));
    assert_eq!(p.retries, 2);
    assert_eq!(p.upstream_idle_timeout, Duration::from_secs(60));
    assert_eq!(p.max_idle_per_backend, 256);
    assert_eq!(p.max_connections_per_backend, None);
    assert_eq!(p.backends.len(), 1);
    assert_eq!(p.backends[0].weight, 1);
    assert!(c.source.is_none());
}

#[test]
fn every_key_set() {
    let text = r#"
[server]
listen = ["127.0.0.1:8080", "[::1]:8080"]
workers = 4
shutdown_grace = "5s"
access_log = "json"

[server.limits]
max_connections = 100
header_read_timeout = "250ms"
idle_timeout = "2m"
max_header_bytes = 8192

[admin]
listen = "127.0.0.1:9090"

[[routes]]
host = "Shop.Example.com"
path_prefix = "/cart"
pool = "web"

[pools.web]
policy = "least_request"
backends = ["127.0.0.1:9001"]
connect_timeout = "1s"
response_timeout = "1h"
retries = 0
upstream_idle_timeout = "90s"
max_idle_per_backend = 0
max_connections_per_backend = 500
"#;
    let c = ok(text);
    let s = &c.server;
    assert_eq!(
        s.listen,
        vec![
            "127.0.0.1:8080".parse::<SocketAddr>().unwrap(),
            "[::1]:8080".parse().unwrap()
        ]
    );
    assert_eq!(s.workers, 4);
    assert_eq!(s.shutdown_grace, Duration::from_secs(5));
    assert_eq!(s.access_log, AccessLog::Json);
    assert_eq!(s.limits.max_connections, 100);
    assert_eq!(s.limits.header_read_timeout, Duration::from_millis(250));
    assert_eq!(s.limits.idle_timeout, Duration::from_secs(120));
    assert_eq!(s.limits.max_header_bytes, 8192);
    assert_eq!(
        c.admin.as_ref().map(|a| a.listen),
        Some("127.0.0.1:9090".parse().unwrap())
    );
    assert_eq!(c.routes.len(), 1);
    assert_eq!(
        c.routes[0].host,
        HostMatch::Exact("shop.example.com".into())
    );
    assert_eq!(c.routes[0].path_prefix, "/cart");
    assert_eq!(c.routes[0].pool, "web");
    let p = &c.pools[0];
    assert_eq!(p.policy, Policy::LeastRequest);
    assert_eq!(p.connect_timeout, Duration::from_secs(1));
    assert_eq!(p.response_timeout, Duration::from_secs(3600));
    assert_eq!(p.retries, 0);
    assert_eq!(p.upstream_idle_timeout, Duration::from_secs(90));
    assert_eq!(p.max_idle_per_backend, 0);
    assert_eq!(p.max_connections_per_backend, Some(500));
}

#[test]
fn one_pool_and_no_routes_makes_a_catch_all_route() {
    let c = ok("[pools.only]\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n");
    assert_eq!(c.routes.len(), 1);
    let r = &c.routes[0];
    assert_eq!(r.host, HostMatch::Any);
    assert_eq!(r.path_prefix, "/");
    assert_eq!(r.pool, "only");
}

#[test]
fn backend_ids_default_to_the_address_and_explicit_ids_are_used() {
    let c = ok(r#"
[pools.x]
backends = [
    "127.0.0.1:9001",
    { address = "127.0.0.1:9002" },
    { address = "127.0.0.1:9003", id = "third" },
]
"#);
    let ids: Vec<&str> = c.pools[0].backends.iter().map(|b| b.id.as_str()).collect();
    assert_eq!(ids, ["127.0.0.1:9001", "127.0.0.1:9002", "third"]);
    assert_eq!(
        c.pools[0].backends[2].address,
        BackendAddr::Ip("127.0.0.1:9003".parse().unwrap())
    );
}

#[test]
fn weights() {
    let c = ok(r#"
[pools.x]
backends = [
    "127.0.0.1:9001",
    { address = "127.0.0.1:9002", weight = 1 },
    { address = "127.0.0.1:9003", weight = 3 },
    { address = "127.0.0.1:9004", weight = 1000 },
]
"#);
    let weights: Vec<u32> = c.pools[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [1, 1, 3, 1000]);
}

#[test]
fn backend_host_names_are_accepted() {
    let c = ok(r#"
[pools.x]
backends = ["app-1:8080", "db.internal.example:5432", "[::1]:9001"]
"#);
    let b = &c.pools[0].backends;
    assert_eq!(
        b[0].address,
        BackendAddr::Name {
            host: "app-1".into(),
            port: 8080
        }
    );
    assert_eq!(b[0].id, "app-1:8080");
    assert_eq!(b[0].address.to_string(), "app-1:8080");
    assert_eq!(
        b[1].address,
        BackendAddr::Name {
            host: "db.internal.example".into(),
            port: 5432
        }
    );
    assert_eq!(b[2].address, BackendAddr::Ip("[::1]:9001".parse().unwrap()));
}

#[test]
fn route_hosts() {
    let c = ok(r#"
[pools.web]
backends = ["127.0.0.1:9001"]

[[routes]]
host = "*.example.com"
pool = "web"

[[routes]]
host = "*"
path_prefix = "/api"
pool = "web"

[[routes]]
pool = "web"
"#);
    let hosts: Vec<&HostMatch> = c.routes.iter().map(|r| &r.host).collect();
    assert_eq!(
        hosts,
        [
            &HostMatch::Suffix(".example.com".into()),
            &HostMatch::Any,
            &HostMatch::Any
        ]
    );
    let prefixes: Vec<&str> = c.routes.iter().map(|r| r.path_prefix.as_str()).collect();
    assert_eq!(prefixes, ["/", "/api", "/"]);
}

#[test]
fn content_hash_follows_the_text() {
    let a = ok(WEB);
    let b = ok(WEB);
    let c = ok(&format!("{WEB}retries = 2\n"));
    assert_eq!(a.content_hash, b.content_hash);
    assert_ne!(a.content_hash, c.content_hash);
}

// ---------------------------------------------------------------------------------------
// Accepted session affinity configurations

#[track_caller]
fn sticky_of(c: &Config) -> &StickyConfig {
    match &c.pools[0].affinity {
        AffinityConfig::Cookie(s) => s,
        other => panic!("expected sticky cookie affinity, got {other:?}"),
    }
}

#[track_caller]
fn learn_of(c: &Config) -> &LearnConfig {
    match &c.pools[0].affinity {
        AffinityConfig::Learn(l) => l,
        other => panic!("expected learned affinity, got {other:?}"),
    }
}

#[track_caller]
fn hash_of(c: &Config) -> &HashConfig {
    match &c.pools[0].affinity {
        AffinityConfig::Hash(h) => h,
        other => panic!("expected consistent hashing, got {other:?}"),
    }
}

fn key_sources(spec: &[&str]) -> Vec<KeySource> {
    spec.iter().map(|s| KeySource::parse(s).unwrap()).collect()
}

#[test]
fn sticky_defaults() {
    let expected = StickyConfig {
        cookie: "SWITCHYARD".into(),
        ttl: Duration::from_secs(3600),
        secrets: vec![],
        on_unavailable: OnUnavailable::Redispatch,
        sliding: false,
        http_only: true,
        secure: SecureMode::Auto,
        same_site: SameSite::Lax,
        path: "/".into(),
        domain: None,
    };
    // Without a [sticky] table, and with an empty one.
    let without = "[pools.x]\npolicy = \"sticky_cookie\"\nbackends = [\"127.0.0.1:9001\"]\n";
    for text in [without, STICKY] {
        let c = ok(text);
        assert_eq!(c.pools[0].policy, Policy::StickyCookie);
        assert_eq!(sticky_of(&c), &expected, "{text}");
        assert_eq!(c.pools[0].drain_timeout, Duration::from_secs(300));
    }
}

#[test]
fn sticky_every_key_set() {
    let name = "SWITCHYARD_CONFIG_TEST_EVERY_KEY_SECRET";
    std::env::set_var(name, "an-environment-secret");
    let c = ok(&format!(
        r#"
[pools.x]
policy = "sticky_cookie"
backends = ["127.0.0.1:9001"]
[pools.x.sticky]
cookie = "cart_srv"
ttl = "2h"
secret_env = "{name}"
on_unavailable = "reject"
drain_timeout = "90s"
sliding = true
http_only = false
secure = true
same_site = "Strict"
path = "/cart"
domain = ".Shop.Example.com"
"#
    ));
    assert_eq!(
        sticky_of(&c),
        &StickyConfig {
            cookie: "cart_srv".into(),
            ttl: Duration::from_secs(7200),
            secrets: vec![Secret(b"an-environment-secret".to_vec())],
            on_unavailable: OnUnavailable::Reject,
            sliding: true,
            http_only: false,
            secure: SecureMode::Always,
            same_site: SameSite::Strict,
            path: "/cart".into(),
            domain: Some("shop.example.com".into()),
        }
    );
    // drain_timeout given in [sticky] is the pool's.
    assert_eq!(c.pools[0].drain_timeout, Duration::from_secs(90));

    let c = ok(&sticky_line("secure = false\nsame_site = \"strict\""));
    assert_eq!(sticky_of(&c).secure, SecureMode::Never);
    let c = ok(&sticky_line("secure = true\nsame_site = \"none\""));
    assert_eq!(sticky_of(&c).same_site, SameSite::None);
    let c = ok(&sticky_line("secure = \"auto\""));
    assert_eq!(sticky_of(&c).secure, SecureMode::Auto);
}

#[test]
fn learn_defaults() {
    let c = ok(&format!("{LEARN}cookie = \"JSESSIONID\"\n"));
    assert_eq!(c.pools[0].policy, Policy::StickyLearn);
    assert_eq!(
        learn_of(&c),
        &LearnConfig {
            cookie: "JSESSIONID".into(),
            ttl: Duration::from_secs(1800),
            max_entries: 1_000_000,
        }
    );
    assert_eq!(c.pools[0].drain_timeout, Duration::from_secs(300));

    let c = ok(&format!(
        "{LEARN}cookie = \"PHPSESSID\"\nttl = \"2h\"\nmax_entries = 5\n"
    ));
    assert_eq!(
        learn_of(&c),
        &LearnConfig {
            cookie: "PHPSESSID".into(),
            ttl: Duration::from_secs(7200),
            max_entries: 5,
        }
    );
}

#[test]
fn hash_defaults() {
    let c = ok(HASH);
    assert_eq!(c.pools[0].policy, Policy::ConsistentHash);
    assert_eq!(
        hash_of(&c),
        &HashConfig {
            key: vec![KeySource::ClientIp],
            bounded_load: None,
        }
    );
    assert_eq!(c.pools[0].drain_timeout, Duration::from_secs(300));
}

#[test]
fn hash_key_chain_and_bounded_load() {
    let c = ok(&format!(
        "{HASH}hash_key = [\"header:X-User-Id\", \"cookie:uid\", \"query:user\", \"client_ip\"]\nbounded_load = 1.25\n"
    ));
    let h = hash_of(&c);
    assert_eq!(
        h.key,
        key_sources(&["header:X-User-Id", "cookie:uid", "query:user", "client_ip"])
    );
    assert_eq!(h.key[3], KeySource::ClientIp);
    assert_eq!(h.bounded_load, Some(1.25));
    let c = ok(&format!("{HASH}bounded_load = 100\n"));
    assert_eq!(hash_of(&c).bounded_load, Some(100.0));
}

#[test]
fn integer_bounded_load_is_a_float() {
    let c = ok(&format!("{HASH}bounded_load = 2\n"));
    assert_eq!(hash_of(&c).bounded_load, Some(2.0));
}

#[test]
fn drain_timeout_default_and_explicit() {
    assert_eq!(ok(WEB).pools[0].drain_timeout, Duration::from_secs(300));
    let c = ok(&format!("{WEB}drain_timeout = \"30s\"\n"));
    assert_eq!(c.pools[0].drain_timeout, Duration::from_secs(30));
    let c = ok(&format!("{HASH}drain_timeout = \"10m\"\n"));
    assert_eq!(c.pools[0].drain_timeout, Duration::from_secs(600));
}

#[test]
fn backend_drain_flag() {
    let c = ok(r#"
[pools.x]
policy = "consistent_hash"
backends = [
    "127.0.0.1:9001",
    { address = "127.0.0.1:9002", drain = true },
    { address = "127.0.0.1:9003", drain = false, id = "c" },
]

[[pools.y.backends]]
address = "127.0.0.1:9101"
drain = true

[[routes]]
pool = "x"
"#);
    let drains: Vec<bool> = c.pools[0].backends.iter().map(|b| b.drain).collect();
    assert_eq!(drains, [false, true, false]);
    assert_eq!(c.pools[1].name, "y");
    assert!(c.pools[1].backends[0].drain);
}

#[test]
fn drain_must_be_a_boolean() {
    let text = second_backend("{ address = \"127.0.0.1:9002\", drain = \"yes\" }");
    let e = err(&text);
    assert_located(
        &e,
        4,
        None,
        "invalid type: string \"yes\", expected a boolean",
    );
}

#[test]
fn secret_env_list_keeps_its_order() {
    let (a, b) = (
        "SWITCHYARD_CONFIG_TEST_LIST_SECRET_A",
        "SWITCHYARD_CONFIG_TEST_LIST_SECRET_B",
    );
    std::env::set_var(a, "the-current-secret-signs");
    std::env::set_var(b, "the-previous-secret-verifies");
    let c = ok(&sticky_line(&format!("secret_env = [\"{a}\", \"{b}\"]")));
    assert_eq!(
        sticky_of(&c).secrets,
        [
            Secret(b"the-current-secret-signs".to_vec()),
            Secret(b"the-previous-secret-verifies".to_vec()),
        ]
    );
    let c = ok(&sticky_line(&format!("secret_env = [\"{b}\", \"{a}\"]")));
    assert_eq!(
        sticky_of(&c).secrets[0],
        Secret(b"the-previous-secret-verifies".to_vec())
    );
}

#[test]
fn secrets_from_env_come_before_secrets_from_files() {
    let name = "SWITCHYARD_CONFIG_TEST_COMBINED_SECRET";
    std::env::set_var(name, "secret-from-the-environment");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rotation.secret");
    std::fs::write(
        &file,
        "first-secret-in-the-file\r\n\r\nsecond-secret-in-the-file",
    )
    .unwrap();
    // The file is named first in the table: the order is still env, then file.
    let c = ok(&sticky_line(&format!(
        "secret_file = {}\nsecret_env = \"{name}\"",
        toml_path(&file)
    )));
    assert_eq!(
        sticky_of(&c).secrets,
        [
            Secret(b"secret-from-the-environment".to_vec()),
            Secret(b"first-secret-in-the-file".to_vec()),
            Secret(b"second-secret-in-the-file".to_vec()),
        ]
    );
}

#[test]
fn secrets_are_not_printed() {
    let s = Secret(b"do-not-print-this-secret".to_vec());
    let shown = format!("{s:?}");
    assert!(!shown.contains("do-not-print"), "{shown}");
    assert!(shown.contains("24 bytes"), "{shown}");
}

// ---------------------------------------------------------------------------------------
// The example files

fn example_files() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_file_is_valid() {
    let files = example_files();
    assert!(
        files.len() >= 2,
        "expected at least 2 example files, found {files:?}"
    );
    for path in &files {
        match load(path) {
            Ok(c) => assert_eq!(c.source.as_deref(), Some(path.as_path())),
            Err(e) => panic!("{} is invalid: {e}", path.display()),
        }
    }
}

#[test]
fn the_documented_example_says_what_it_shows() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/switchyard.toml");
    let c = load(&path).unwrap();
    assert_eq!(
        c.server.listen,
        vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(
        c.admin.map(|a| a.listen),
        Some("127.0.0.1:9090".parse().unwrap())
    );
    let pools: Vec<(&str, Policy)> = c
        .pools
        .iter()
        .map(|p| (p.name.as_str(), p.policy))
        .collect();
    assert_eq!(
        pools,
        [
            ("api", Policy::LeastRequest),
            ("cache", Policy::ConsistentHash),
            ("carts", Policy::StickyCookie),
            ("sessions", Policy::StickyLearn),
            ("web", Policy::RoundRobin),
        ]
    );
    assert!(
        c.routes
            .iter()
            .any(|r| matches!(r.host, HostMatch::Exact(_))),
        "routes by host"
    );
    assert!(
        c.routes.iter().any(|r| r.path_prefix != "/"),
        "routes by path"
    );
    assert!(
        c.routes
            .iter()
            .any(|r| r.host == HostMatch::Any && r.path_prefix == "/"),
        "a catch-all route"
    );
}

#[test]
fn the_stateful_example_says_what_it_shows() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/stateful.toml");
    let c = load(&path).unwrap_or_else(|e| panic!("{e}"));
    let pools: Vec<(&str, Policy)> = c
        .pools
        .iter()
        .map(|p| (p.name.as_str(), p.policy))
        .collect();
    assert_eq!(
        pools,
        [
            ("cache", Policy::ConsistentHash),
            ("carts", Policy::StickyCookie),
            ("sessions", Policy::StickyLearn),
        ]
    );
    for p in &c.pools {
        assert!(
            c.routes.iter().any(|r| r.pool == p.name),
            "a route to {}",
            p.name
        );
    }
    let pool = |name: &str| c.pools.iter().find(|p| p.name == name).unwrap();

    let carts = pool("carts");
    let AffinityConfig::Cookie(sticky) = &carts.affinity else {
        panic!("{:?}", carts.affinity)
    };
    // It must load on any machine: no secret from the environment or a file.
    assert!(sticky.secrets.is_empty(), "{sticky:?}");
    let draining: Vec<&str> = c
        .pools
        .iter()
        .flat_map(|p| &p.backends)
        .filter(|b| b.drain)
        .map(|b| b.id.as_str())
        .collect();
    assert_eq!(draining, ["cart-3"]);
    assert_eq!(carts.drain_timeout, Duration::from_secs(300));

    let sessions = pool("sessions");
    let AffinityConfig::Learn(learn) = &sessions.affinity else {
        panic!("{:?}", sessions.affinity)
    };
    assert_eq!(learn.cookie, "JSESSIONID");

    let cache = pool("cache");
    let AffinityConfig::Hash(hash) = &cache.affinity else {
        panic!("{:?}", cache.affinity)
    };
    assert_eq!(
        hash.key,
        key_sources(&["header:X-User-Id", "cookie:uid", "query:user", "client_ip"])
    );
    assert_eq!(hash.bounded_load, Some(1.25));
}

// ---------------------------------------------------------------------------------------
// The command line

fn switchyard() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.env_remove("SWITCHYARD_CONFIG").env("RUST_LOG", "off");
    cmd
}

#[test]
fn check_accepts_a_valid_file() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/minimal.toml");
    let out = switchyard()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("valid"), "stdout: {stdout}");
}

#[test]
fn check_rejects_an_invalid_file_with_its_location() {
    use std::io::Write;
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        file,
        "[pools.web]\nbackends = [\"127.0.0.1:9001\"]\nretries = 1\npolicy = \"fastest\"\n"
    )
    .unwrap();
    file.flush().unwrap();
    let out = switchyard()
        .arg("check")
        .arg("--config")
        .arg(file.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let location = format!("{}:4:10:", file.path().display());
    assert!(
        stderr.contains(&location),
        "stderr: {stderr}\nexpected: {location}"
    );
    assert!(stderr.contains("pools.web.policy"), "stderr: {stderr}");
    assert!(
        stderr.contains("unknown policy \"fastest\""),
        "stderr: {stderr}"
    );
}

#[test]
fn check_rejects_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let out = switchyard()
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&path.display().to_string()),
        "stderr: {stderr}"
    );
}

#[test]
fn check_reads_the_config_from_the_environment() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/switchyard.toml");
    let out = switchyard()
        .arg("check")
        .env("SWITCHYARD_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_built_in_servers_refuse_a_config_flag_and_say_where_they_cannot_listen() {
    let out = switchyard()
        .args(["demo", "--config", "/nonexistent.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("no --config"), "stderr: {stderr}");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = switchyard()
        .args(["backend", "--listen", &addr, "--name", "x"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on {addr}")),
        "stderr: {stderr}"
    );
}

#[test]
fn version() {
    let out = switchyard().arg("--version").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(env!("CARGO_PKG_VERSION")),
        "stdout: {stdout}"
    );
}

#[test]
fn sticky_ttl_below_a_second() {
    assert_err(
        &sticky_line("ttl = \"500ms\""),
        "pools.x.sticky.ttl",
        6,
        Some(7),
        "at least 1s",
    );
}

#[test]
fn same_site_none_needs_secure() {
    assert_err(
        &sticky_line("same_site = \"none\"\nsecure = false"),
        "pools.x.sticky.secure",
        7,
        Some(10),
        "requires Secure",
    );
}

#[test]
fn hash_sources_after_an_always_present_one() {
    let text = format!("{HASH}hash_key = [\"client_ip\", \"header:X-User\"]\n");
    assert_err(&text, "pools.x.hash_key[1]", 4, None, "never used");
}

#[test]
fn hash_cookie_source_name_must_be_a_cookie_name() {
    let text = format!("{HASH}hash_key = [\"cookie:a b\"]\n");
    assert_err(&text, "pools.x.hash_key[0]", 4, None, "invalid cookie name");
}

#[test]
fn environment_secrets_are_trimmed_like_file_secrets() {
    let name = "SWITCHYARD_CONFIG_TEST_TRIMMED_SECRET";
    std::env::set_var(name, "  a secret with a newline\n");
    let c = ok(&sticky_line(&format!("secret_env = \"{name}\"")));
    assert_eq!(
        sticky_of(&c).secrets,
        vec![Secret(b"a secret with a newline".to_vec())]
    );
}

/// `[pools.x]` with `policy` and backends on `127.0.0.1`, ports from 1 up, with `weight(i)`.
fn big_pool(policy: &str, n: usize, weight: impl Fn(usize) -> u32) -> String {
    let list: Vec<String> = (0..n)
        .map(|i| {
            format!(
                "{{ address = \"127.0.0.1:{}\", weight = {} }}",
                i + 1,
                weight(i)
            )
        })
        .collect();
    let key = if policy == "consistent_hash" {
        "hash_key = [\"client_ip\"]\n"
    } else {
        ""
    };
    format!(
        "[pools.x]\npolicy = \"{policy}\"\n{key}backends = [{}]\n",
        list.join(", ")
    )
}

#[test]
fn pools_with_too_many_backends() {
    let line = |text: &str| {
        text.lines()
            .position(|l| l.starts_with("backends"))
            .unwrap()
            + 1
    };
    for (policy, most) in [("round_robin", 10_000), ("consistent_hash", 1000)] {
        ok(&big_pool(policy, most, |_| 1));
        let text = big_pool(policy, most + 1, |_| 1);
        assert_err(
            &text,
            "pools.x.backends",
            line(&text),
            Some(12),
            &format!(
                "{} backends; a {policy} pool takes at most {most}",
                most + 1
            ),
        );
    }
}

#[test]
fn weights_that_make_too_long_a_round_robin_cycle() {
    // A cycle of about a million picks over a thousand backends.
    let text = big_pool("round_robin", 1000, |i| 999 + (i % 2) as u32);
    assert_err(
        &text,
        "pools.x.backends",
        3,
        Some(12),
        "round-robin cycle too long to build",
    );
    // The same spread over fewer backends builds in time.
    ok(&big_pool("round_robin", 100, |i| 999 + (i % 2) as u32));
}
