#!/usr/bin/env bash
# Build switchyard with profile-guided optimisation (PGO): a release binary whose code
# layout, inlining and branch order follow a profile of the proxy at work.
#
#   benches/pgo.sh        builds target/pgo/release/switchyard
#
# The steps are the ones the rustc book gives for PGO:
#   1. build an instrumented binary (-Cprofile-generate) in target/pgo-gen;
#   2. run it as the proxy under a training load, which writes its profile on exit;
#   3. merge the profiles with llvm-profdata and build again (-Cprofile-use) in
#      target/pgo.
# The result is the same code as `cargo build --release` builds, compiled differently:
# PGO moves inlining and code layout, not behaviour.
#
# The training load. Three built-in backends (`switchyard backend`, run from the same
# instrumented binary with their profiles thrown away) serve a proxy that has one pool
# per policy: round_robin with weights and health checks, least_request, sticky_cookie,
# sticky_learn, consistent_hash with bounded load, and a pool whose only backend is down.
# The proxy runs twice, with workers = 1 and workers = 2 (tokio's current-thread and
# multi-thread schedulers), the access log off the first time and JSON the second.
# Traffic, all on 127.0.0.1:
#   - wrk, HTTP/1.1 keep-alive, TRAIN_SECS seconds each: plain GETs; GETs with a
#     browser's fields; POSTs of 16 KiB; a consistent-hash key that changes per request;
#     sticky_cookie and sticky_learn requests with and without their session cookies;
#   - h2load, HTTP/2 with prior knowledge: many streams at once on a few connections;
#   - uploads and downloads of 8 MiB over both protocols (h2load, curl), a dead pool;
#   - the admin endpoints (/metrics, /status, /readyz, the owner of a key), a reload;
#   - malformed requests (400, 431).
# Code the training does not reach, such as WebSocket tunnels, is compiled as rarely
# run: it stays correct, but may be slower than in a plain release build.
#
# Environment (defaults in brackets):
#   TRAIN_SECS [2]  seconds per wrk phase (nine phases per run, two runs)
#   BASE_PORT [18201]  first of six consecutive free ports at or above it is used
#   KEEP_TMP [0]  1 = keep the configurations, logs and raw profiles
#   RUSTFLAGS  passed on to both builds, before the profile flags (as with any cargo
#   build, RUSTFLAGS replaces build.rustflags from a cargo configuration file)
#
# Needs: cargo; the llvm-tools component (rustup component add llvm-tools), whose
# llvm-profdata matches rustc's LLVM; wrk, curl and h2load (apt-get install -y wrk curl
# nghttp2-client).
# Takes two full release builds: about 10 minutes on 2 cores.

set -euo pipefail

case "${1:-}" in
"") ;;
-h | --help | help)
    sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0" >&2
    exit 2
    ;;
esac

TRAIN_SECS=${TRAIN_SECS:-2}
BASE_PORT=${BASE_PORT:-18201}
KEEP_TMP=${KEEP_TMP:-0}
case "$TRAIN_SECS" in '' | *[!0-9]* | 0) echo "TRAIN_SECS must be a whole number of seconds, at least 1" >&2 && exit 2 ;; esac
export RUST_LOG=${RUST_LOG:-warn}

BENCH=pgo
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
command -v cargo >/dev/null 2>&1 || die "cargo not found (install Rust with rustup)"
# The profile flags go in RUSTFLAGS, which CARGO_ENCODED_RUSTFLAGS would override; a
# path with a space would split them.
[ -z "${CARGO_ENCODED_RUSTFLAGS:-}" ] || die "unset CARGO_ENCODED_RUSTFLAGS: the profile flags go in RUSTFLAGS"
case "$REPO" in *' '*) die "the repository path has a space, which RUSTFLAGS cannot carry: $REPO" ;; esac
need wrk wrk
need curl curl
need h2load nghttp2-client

HOST_TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
PROFDATA=$(rustc --print sysroot)/lib/rustlib/$HOST_TRIPLE/bin/llvm-profdata
[ -x "$PROFDATA" ] || die "llvm-profdata not found at $PROFDATA (rustup component add llvm-tools)"

BASE=$(find_ports "$BASE_PORT" 6) || die "no 6 free consecutive ports from $BASE_PORT"
B1_PORT=$BASE
B2_PORT=$((BASE + 1))
B3_PORT=$((BASE + 2))
PROXY_PORT=$((BASE + 3))
ADMIN_PORT=$((BASE + 4))
# Nothing listens here: the dead pool's backend.
DEAD_PORT=$((BASE + 5))

bench_bookkeeping switchyard-pgo
mkdir -p "$TMP/profiles" "$TMP/discard"

GEN_DIR=$REPO/target/pgo-gen
USE_DIR=$REPO/target/pgo
GEN_BIN=$GEN_DIR/release/switchyard

# --- 1. the instrumented build ---------------------------------------------------

log "building the instrumented binary in $GEN_DIR"
(cd "$REPO" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$GEN_DIR/unused-profiles" \
    CARGO_TARGET_DIR=$GEN_DIR cargo build --release --bin switchyard) >&2
[ -x "$GEN_BIN" ] || die "the build did not produce $GEN_BIN"

# --- 2. training -----------------------------------------------------------------

# Everything but the proxy writes its profile where it is thrown away (the build scripts
# and procedural macros, run at build time, wrote theirs to $GEN_DIR/unused-profiles).
export LLVM_PROFILE_FILE=$TMP/discard/%p-%m.profraw

for i in 1 2 3; do
    port_var=B${i}_PORT
    start_bg "$TMP/backend-$i.log" "$GEN_BIN" backend --listen "127.0.0.1:${!port_var}" --name "b$i"
    wait_ready "http://127.0.0.1:${!port_var}/healthz" 10 "$STARTED_PID" ||
        die "backend b$i did not start: $(tail -n 5 "$TMP/backend-$i.log")"
done

# $1 = workers, $2 = access log.
write_config() {
    cat >"$TMP/switchyard.toml" <<EOF
[server]
listen = ["127.0.0.1:$PROXY_PORT"]
workers = $1
shutdown_grace = "2s"
access_log = "$2"

[server.limits]
header_read_timeout = "5s"
max_header_bytes = 16384

[admin]
listen = "127.0.0.1:$ADMIN_PORT"

[[routes]]
path_prefix = "/api"
pool = "api"

[[routes]]
path_prefix = "/cart"
pool = "carts"

[[routes]]
host = "app.example.com"
pool = "sessions"

[[routes]]
path_prefix = "/cache"
pool = "cache"

[[routes]]
host = "*.down.example.com"
pool = "down"

[[routes]]
host = "shop.example.com"
path_prefix = "/closed"
pool = "closed"

[[routes]]
pool = "web"

[pools.web]
policy = "round_robin"
backends = [
    "127.0.0.1:$B1_PORT",
    "127.0.0.1:$B2_PORT",
    { address = "127.0.0.1:$B3_PORT", weight = ${WEB_WEIGHT:-2}, id = "web-3" },
]
retries = 2

[pools.web.health]
path = "/healthz"
interval = "1s"

[pools.api]
policy = "least_request"
backends = ["127.0.0.1:$B1_PORT", "127.0.0.1:$B2_PORT", "127.0.0.1:$B3_PORT"]

[pools.carts]
policy = "sticky_cookie"
backends = ["127.0.0.1:$B1_PORT", "127.0.0.1:$B2_PORT", "127.0.0.1:$B3_PORT"]

[pools.sessions]
policy = "sticky_learn"
backends = ["127.0.0.1:$B1_PORT", "127.0.0.1:$B2_PORT", "127.0.0.1:$B3_PORT"]

[pools.sessions.learn]
cookie = "sid"

[pools.cache]
policy = "consistent_hash"
backends = ["127.0.0.1:$B1_PORT", "127.0.0.1:$B2_PORT", { address = "127.0.0.1:$B3_PORT", weight = 2 }]
hash_key = ["header:X-User-Id", "query:user", "client_ip"]
bounded_load = 1.25

[pools.down]
policy = "round_robin"
backends = ["127.0.0.1:$DEAD_PORT"]
connect_timeout = "1s"

[pools.closed]
policy = "round_robin"
backends = ["127.0.0.1:$DEAD_PORT"]
all_down = "reject"

[pools.closed.health]
path = "/healthz"
interval = "1s"
EOF
}

cat >"$TMP/post.lua" <<'EOF'
wrk.method = "POST"
wrk.path = "/api/orders"
wrk.body = string.rep("x", 16384)
wrk.headers["Content-Type"] = "application/octet-stream"
EOF
cat >"$TMP/hash.lua" <<'EOF'
request = function()
    return wrk.format(nil, "/cache/item", { ["X-User-Id"] = tostring(math.random(1, 100000)) })
end
EOF
head -c 8388608 /dev/zero >"$TMP/upload.bin"

URL=http://127.0.0.1:$PROXY_PORT
ADMIN=http://127.0.0.1:$ADMIN_PORT
BROWSER=(
    -H "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"
    -H "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    -H "Accept-Language: en-GB,en;q=0.5"
    -H "Accept-Encoding: gzip, deflate, br, zstd"
    -H "Referer: https://shop.example/"
    -H "Cookie: session=8f14e45fceea167a5a36dedd4bea2543; theme=dark"
)

# Each load must get only 2xx answers, with no socket errors: training on error pages
# would teach the build the wrong path.
train_wrk() {
    local out
    out=$(timeout $((TRAIN_SECS + 30)) wrk -t1 -c16 -d"${TRAIN_SECS}s" "$@" 2>&1) || die "wrk $* failed: $out"
    echo "$out" >>"$TMP/wrk.log"
    if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then die "wrk $* saw errors: $out"; fi
}

train_h2load() {
    local out
    out=$(timeout 120 h2load "$@" 2>&1) || die "h2load $* failed: $(tail -n 8 <<<"$out")"
    echo "$out" >>"$TMP/h2load.log"
    if ! grep -q ' 0 failed, 0 errored, 0 timeout' <<<"$out" ||
        ! grep -qE 'status codes: [1-9][0-9]* 2xx, 0 3xx, 0 4xx, 0 5xx' <<<"$out"; then
        die "h2load $* saw failed requests: $(tail -n 8 <<<"$out")"
    fi
}

# curl with a time limit; the output is thrown away (of every URL: -o would take only
# the first), a failure ends the script.
train_curl() {
    curl -sS -m 60 "$@" >/dev/null 2>>"$TMP/curl.log" || die "curl $* failed: $(tail -n 3 "$TMP/curl.log")"
}

# Prints the status code of one request; 000 if there was no answer.
status_of() {
    curl -s -m 30 -o /dev/null -w '%{http_code}' "$@" || true
}

# Prints the "backend" field of the built-in backend's answer to one request.
backend_of() {
    curl -s -m 30 "$@" | sed -n 's/^ *"backend": "\(.*\)",\{0,1\}$/\1/p' || true
}

# Dies unless six requests with cookie $3 (Host $1, path $2) all reach one backend.
expect_sticky() {
    local seen
    seen=$(for _ in 1 2 3 4 5 6; do backend_of -H "Host: $1" -H "Cookie: $3" "$URL$2"; done | sort -u)
    if [ -z "$seen" ] || [ "$(wc -l <<<"$seen")" != 1 ]; then
        die "requests with cookie ${3%%=*} went to backends: $(tr '\n' ' ' <<<"$seen")"
    fi
}

# Prints the value of cookie $2 that URL $1 sets (with Host $3).
cookie_from() {
    { curl -s -m 30 -o /dev/null -D - -H "Host: $3" "$1" || true; } | tr -d '\r' |
        sed -n "s/^[Ss]et-[Cc]ookie: $2=\([^;]*\).*/\1/p" | head -n 1
}

# Sends raw bytes $1 to the proxy and prints the status code it answers with.
raw_status() {
    {
        (
            exec 3<>"/dev/tcp/127.0.0.1/$PROXY_PORT" && printf '%b' "$1" >&3 && timeout 5 head -n 1 <&3
        ) 2>/dev/null || true
    } | awk '{ print $2 }'
}

# One training run; $1 = workers, $2 = access log.
train() {
    local workers=$1 access_log=$2 pid sticky sid code
    write_config "$workers" "$access_log"
    "$GEN_BIN" check --config "$TMP/switchyard.toml" >/dev/null || die "the training configuration is refused"
    # The access log (standard output) is thrown away: at TRAIN_SECS=2 it is some 80 MB.
    # shellcheck disable=SC2016 # $0 and $1 are the inner shell's
    LLVM_PROFILE_FILE=$TMP/profiles/proxy-%p.profraw start_bg "$TMP/proxy-$workers.log" \
        sh -c 'exec "$0" --config "$1" >/dev/null' "$GEN_BIN" "$TMP/switchyard.toml"
    pid=$STARTED_PID
    wait_ready "$URL/" 10 "$pid" || die "the proxy did not start: $(tail -n 20 "$TMP/proxy-$workers.log")"
    log "training with workers = $workers, access log $access_log"

    train_wrk "$URL/"
    train_wrk "${BROWSER[@]}" "$URL/products/42?color=red"
    train_wrk -s "$TMP/post.lua" "$URL"
    train_wrk -s "$TMP/hash.lua" "$URL"
    train_wrk -H "Host: app.example.com" -H "Cookie: sid=unknown" "$URL/account"

    sticky=$(cookie_from "$URL/cart" SWITCHYARD localhost)
    [ -n "$sticky" ] || die "the sticky_cookie pool set no cookie"
    sid=$(cookie_from "$URL/account" sid app.example.com)
    [ -n "$sid" ] || die "the sticky_learn pool's backend set no session cookie"
    # Both pools must keep their client on one backend, or the phases below train
    # the wrong path.
    expect_sticky localhost /cart/check "SWITCHYARD=$sticky"
    expect_sticky app.example.com /account "sid=$sid"
    train_wrk -H "Cookie: SWITCHYARD=$sticky" "$URL/cart/items"
    train_wrk -H "Host: app.example.com" -H "Cookie: theme=dark; sid=$sid" "$URL/account"
    train_wrk "$URL/cart/new"

    # HTTP/2 with prior knowledge: many streams at once on a few connections.
    train_h2load -n 20000 -c 4 -m 16 "$URL/h2/item"
    train_h2load -n 5000 -c 1 -m 8 "${BROWSER[@]}" "$URL/h2/page"
    train_h2load -n 5000 -c 2 -m 8 "$URL/cache/?user=42"
    # Large bodies both ways, over both protocols.
    train_h2load -n 2 -c 1 -d "$TMP/upload.bin" "$URL/api/upload"
    train_h2load -n 2 -c 1 "$URL/bytes/8388608"
    train_curl --http1.1 --data-binary @"$TMP/upload.bin" "$URL/api/upload"
    train_curl --http1.1 "$URL/bytes/8388608"
    # Keep-alive sessions with cookie jars, as a client holds them.
    train_curl -b "$TMP/jar-$workers" -c "$TMP/jar-$workers" "$URL/cart/[1-500]"
    train_curl -b "$TMP/jar-$workers" -c "$TMP/jar-$workers" -H "Host: app.example.com" "$URL/app/[1-500]"

    # Errors: a pool whose backend is down, a closed one, bad requests.
    code=$(status_of -H "Host: a.down.example.com" "$URL/")
    [ "$code" = 502 ] || [ "$code" = 503 ] || die "the dead pool answered $code, not 502 or 503"
    train_curl -H "Host: shop.example.com" "$URL/closed/[1-20]"
    code=$(raw_status 'GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n')
    [ "$code" = 400 ] || die "conflicting Content-Length fields got $code, not 400"
    code=$(raw_status 'GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n')
    [ "$code" = 400 ] || die "an unknown transfer coding got $code, not 400"
    code=$(raw_status 'GET / HTTP/1.1\r\n\r\n')
    [ "$code" = 400 ] || die "a request without Host got $code, not 400"
    code=$(status_of -H "X-Big: $(head -c 20000 /dev/zero | tr '\0' a)" "$URL/")
    [ "$code" = 431 ] || die "an oversized head got $code, not 431"

    # Admin: scrapes, status, the owner of a key, and a reload with new weights.
    train_curl "$ADMIN/metrics" "$ADMIN/status" "$ADMIN/readyz" "$ADMIN/pools/cache/owner?key=u42"
    WEB_WEIGHT=3 write_config "$workers" "$access_log"
    code=$(status_of -X POST "$ADMIN/reload")
    [ "$code" = 200 ] || die "the reload answered $code, not 200"
    train_wrk "$URL/after-reload"
    train_curl "$ADMIN/metrics"

    stop_pid "$pid" 15 || die "the proxy did not exit on SIGTERM, so it wrote no profile"
}

train 1 off
train 2 json
n=$(find "$TMP/profiles" -name '*.profraw' | wc -l)
[ "$n" = 2 ] || die "the two training runs wrote $n profiles, not 2"

# --- 3. merge and build with the profile -----------------------------------------

PROFILE=$REPO/target/pgo-switchyard.profdata
"$PROFDATA" merge -o "$PROFILE" "$TMP"/profiles/*.profraw
log "merged profile: $PROFILE"
log "building the optimised binary in $USE_DIR"
unset LLVM_PROFILE_FILE
(cd "$REPO" && RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILE" \
    CARGO_TARGET_DIR=$USE_DIR cargo build --release --bin switchyard) >&2
[ -x "$USE_DIR/release/switchyard" ] || die "the build did not produce $USE_DIR/release/switchyard"

# A last look that the binary proxies: one request through it to a training backend.
write_config 1 off
start_bg "$TMP/proxy-pgo.log" "$USE_DIR/release/switchyard" --config "$TMP/switchyard.toml"
wait_ready "$URL/" 10 "$STARTED_PID" || die "the optimised binary does not serve: $(tail -n 20 "$TMP/proxy-pgo.log")"
stop_pid "$STARTED_PID" 15 || die "the optimised binary did not exit on SIGTERM"

echo "$USE_DIR/release/switchyard"
