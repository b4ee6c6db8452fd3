#!/usr/bin/env bash
# Compare switchyard with nginx and HAProxy as reverse proxies in front of the same
# pool of two fast nginx backends (`return 200 "ok"`), everything on 127.0.0.1.
#
#   benches/compare.sh             wrk throughput / p99 / requests per CPU-second
#   benches/compare.sh callgrind   user-space instructions per request (valgrind)
#   PROXIES="switchyard switchyard-nometrics" benches/compare.sh [callgrind]
#                                  the cost of recording metrics (server.metrics)
#   SWITCHYARD_BASE_BIN=/path/to/old/switchyard PROXIES="switchyard switchyard-base" \
#       benches/compare.sh [callgrind]
#                                  a change against an earlier build, paired per round
#
# Throughput mode: each proxy runs with one worker, pinned alone on PROXY_CPU; wrk and
# the backends share LOAD_CPU. Runs are interleaved (nginx, haproxy, switchyard, then
# again) for ROUNDS rounds; the summary gives medians per proxy and medians of the
# per-round (paired) ratios of switchyard to each other proxy measured.
#
# Callgrind mode: each proxy runs under `valgrind --tool=callgrind` twice, once serving
# CG_BASE requests and once CG_N requests (keep-alive HTTP/1.1, CG_CONNS connections);
# instructions per request = (Ir(CG_N) - Ir(CG_BASE)) / (CG_N - CG_BASE), so startup,
# connection setup and shutdown cancel out.
#
# Environment (defaults in brackets):
#   ROUNDS [3]  DURATION [10s]  WARMUP [1s, 0 = none]  CONNS [64]
#   PROXY_CPU [1]  LOAD_CPU [0]  BASE_PORT [18001]  (uses BASE_PORT .. BASE_PORT+6)
#   CG_BASE [2000]  CG_N [12000]  CG_CONNS [8]
#   CG_CACHE_SIM [0]  1 = callgrind also simulates the caches and reports first-level
#   instruction and data cache misses per request (I1mr, D1mr + D1mw) beside Ir
#   SWITCHYARD_BIN [target/release/switchyard, built if missing]
#   KEEP_TMP [0]  (1 = keep configs, logs and callgrind files)
#   PROXIES ["nginx haproxy switchyard"]  any of those, switchyard-nometrics
#   (switchyard with server.metrics = false) and switchyard-base (SWITCHYARD_BASE_BIN
#   with switchyard's configuration); ratios need switchyard in the list
#   SWITCHYARD_BASE_BIN  the build switchyard-base runs
#   ACCESS_LOG [off]  switchyard's server.access_log (off, json or text); the lines go
#   to the proxy's run log in the temp folder
#   SAME_HEADERS [0]  1 = nginx and HAProxy apply the request and response header rules
#   that switchyard always applies: keep Host, append X-Forwarded-For, set
#   X-Forwarded-Proto and X-Forwarded-Host, pass on the client's X-Request-Id or make
#   one, and return it on the response. 0 = they forward with their plainest setup.
#   2 = as 1, but nginx makes ids from its connection number and request count instead
#   of $request_id, which costs a call into OpenSSL's random generator per request.
#   REQUEST [minimal]  the request wrk and the callgrind client send: minimal = a GET
#   of / with only Host; browser = the same GET with ten more fields, as a browser
#   sends them (User-Agent, Accept, Accept-Language, Accept-Encoding, Referer, Cookie,
#   and four more)
#
# Needs: nginx, haproxy, wrk, curl, taskset, python3 (callgrind client), valgrind.
# Start/stop is self-contained: temp prefixes and configs, no system services touched.

set -euo pipefail

MODE=${1:-throughput}
case "$MODE" in
throughput | callgrind) ;;
-h | --help | help)
    sed -n '2,47p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
*)
    echo "usage: $0 [throughput|callgrind]" >&2
    exit 2
    ;;
esac

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
BASE_PORT=${BASE_PORT:-18001}
CG_BASE=${CG_BASE:-2000}
CG_N=${CG_N:-12000}
CG_CONNS=${CG_CONNS:-8}
CG_CACHE_SIM=${CG_CACHE_SIM:-0}
case "$CG_CACHE_SIM" in 0 | 1) ;; *) echo "CG_CACHE_SIM must be 0 or 1" >&2 && exit 2 ;; esac
KEEP_TMP=${KEEP_TMP:-0}
ACCESS_LOG=${ACCESS_LOG:-off}
SAME_HEADERS=${SAME_HEADERS:-0}
case "$SAME_HEADERS" in 0 | 1 | 2) ;; *) echo "SAME_HEADERS must be 0, 1 or 2" >&2 && exit 2 ;; esac
REQUEST=${REQUEST:-minimal}
# The request's fields besides Host, one per line.
case "$REQUEST" in
minimal) REQUEST_FIELDS="" ;;
browser)
    REQUEST_FIELDS="User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0
Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8
Accept-Language: en-GB,en;q=0.5
Accept-Encoding: gzip, deflate, br, zstd
Referer: https://shop.example/
Cookie: session=8f14e45fceea167a5a36dedd4bea2543; theme=dark
Upgrade-Insecure-Requests: 1
Sec-Fetch-Dest: document
Sec-Fetch-Mode: navigate
Priority: u=0, i"
    ;;
*) echo "REQUEST must be minimal or browser" >&2 && exit 2 ;;
esac
export REQUEST_FIELDS
# The same fields as wrk options.
WRK_FIELDS=()
while IFS= read -r field; do
    [ -n "$field" ] && WRK_FIELDS+=(-H "$field")
done <<<"$REQUEST_FIELDS"
export RUST_LOG=${RUST_LOG:-warn}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SWITCHYARD_BIN=${SWITCHYARD_BIN:-$REPO/target/release/switchyard}

BACKEND1_PORT=$BASE_PORT
BACKEND2_PORT=$((BASE_PORT + 1))
NGINX_PORT=$((BASE_PORT + 2))
HAPROXY_PORT=$((BASE_PORT + 3))
SWITCHYARD_PORT=$((BASE_PORT + 4))
NOMETRICS_PORT=$((BASE_PORT + 5))
BASELINE_PORT=$((BASE_PORT + 6))
read -ra PROXIES <<<"${PROXIES:-nginx haproxy switchyard}"
has_proxy() {
    local p
    for p in "${PROXIES[@]}"; do [ "$p" = "$1" ] && return 0; done
    return 1
}

BENCH=compare
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# --- prerequisites -----------------------------------------------------------

need nginx nginx
if has_proxy haproxy; then need haproxy haproxy; fi
need curl curl
need taskset util-linux
if [ "$MODE" = throughput ]; then
    need wrk wrk
else
    need valgrind valgrind
    need python3 python3
fi

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
((${#PROXIES[@]} > 0)) || die "PROXIES is empty"
for p in "${PROXIES[@]}"; do
    case $p in
    nginx | haproxy | switchyard | switchyard-nometrics) ;;
    switchyard-base) [ -x "${SWITCHYARD_BASE_BIN:-}" ] || die "switchyard-base needs SWITCHYARD_BASE_BIN, an executable" ;;
    *) die "unknown proxy in PROXIES: $p" ;;
    esac
done
[[ $CG_BASE =~ ^[0-9]+$ && $CG_N =~ ^[0-9]+$ ]] || die "CG_BASE and CG_N must be integers"
((CG_N > CG_BASE)) || die "CG_N must be larger than CG_BASE"

NCPU=$(getconf _NPROCESSORS_ONLN)
if ((NCPU < 2)); then
    log "only $NCPU CPU online: proxy and load generator share CPU 0"
    PROXY_CPU=0
    LOAD_CPU=0
fi
CLK_TCK=$(getconf CLK_TCK)

if [ ! -x "$SWITCHYARD_BIN" ]; then
    log "building switchyard (release): $SWITCHYARD_BIN is missing"
    (cd "$REPO" && cargo build --release --bin switchyard) >&2
    [ -x "$SWITCHYARD_BIN" ] || die "build did not produce $SWITCHYARD_BIN"
fi

for p in "$BACKEND1_PORT" "$BACKEND2_PORT" "$NGINX_PORT" "$HAPROXY_PORT" "$SWITCHYARD_PORT" "$NOMETRICS_PORT" "$BASELINE_PORT"; do
    ! port_in_use "$p" || die "port $p is already in use (set BASE_PORT to use other ports)"
done

# --- process bookkeeping -----------------------------------------------------

bench_bookkeeping switchyard-compare

# --- configs -----------------------------------------------------------------

write_configs() {
    mkdir -p "$TMP/backend/logs" "$TMP/nginx/logs" "$TMP/haproxy" "$TMP/switchyard" "$TMP/switchyard-nometrics" "$TMP/switchyard-base"

    # nginx needs writable temp paths inside its prefix; these keep it off /var/lib/nginx.
    local temps='client_body_temp_path temp/body; proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi; uwsgi_temp_path temp/uwsgi; scgi_temp_path temp/scgi;'
    mkdir -p "$TMP/backend/temp" "$TMP/nginx/temp"

    cat >"$TMP/backend/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/backend/nginx.pid;
error_log $TMP/backend/logs/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    $temps
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {
        listen 127.0.0.1:$BACKEND1_PORT;
        location / { return 200 "ok"; }
    }
    server {
        listen 127.0.0.1:$BACKEND2_PORT;
        location / { return 200 "ok"; }
    }
}
EOF

    # Proxy nginx, throughput mode: master + 1 worker. Callgrind mode: one process.
    local nginx_proc='worker_processes 1;
daemon off;'
    if [ "$MODE" = callgrind ]; then
        nginx_proc="$nginx_proc
master_process off;"
    fi
    # The header rules switchyard applies, for SAME_HEADERS=1 or 2.
    local nginx_http='' nginx_location='' haproxy_frontend='' nginx_new_id='$request_id'
    [ "$SAME_HEADERS" = 2 ] && nginx_new_id='$connection-$connection_requests'
    if [ "$SAME_HEADERS" != 0 ]; then
        nginx_http="map \$http_x_request_id \$rid { \"\" $nginx_new_id; default \$http_x_request_id; }"
        nginx_location='proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $http_host;
            proxy_set_header X-Request-Id $rid;
            add_header X-Request-Id $rid always;'
        haproxy_frontend='option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Request-Id %[uuid] unless { req.hdr(x-request-id),length gt 0 }
    http-request set-var(txn.rid) req.hdr(x-request-id)
    http-after-response set-header X-Request-Id %[var(txn.rid)]'
    fi

    cat >"$TMP/nginx/nginx.conf" <<EOF
$nginx_proc
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 10240; }
http {
    access_log off;
    $temps
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    $nginx_http
    upstream pool {
        server 127.0.0.1:$BACKEND1_PORT;
        server 127.0.0.1:$BACKEND2_PORT;
        keepalive 64;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            $nginx_location
        }
    }
}
EOF

    cat >"$TMP/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always

frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    $haproxy_frontend
    default_backend pool

backend pool
    balance roundrobin
    server b1 127.0.0.1:$BACKEND1_PORT
    server b2 127.0.0.1:$BACKEND2_PORT
EOF

    cat >"$TMP/switchyard/switchyard.toml" <<EOF
[server]
listen = ["127.0.0.1:$SWITCHYARD_PORT"]
workers = 1
shutdown_grace = "1s"
access_log = "$ACCESS_LOG"
[server.limits]
max_connections = 10000
[pools.web]
policy = "round_robin"
backends = ["127.0.0.1:$BACKEND1_PORT", "127.0.0.1:$BACKEND2_PORT"]
EOF
    # The same proxy with per-request metric recording off.
    sed -e "s/:$SWITCHYARD_PORT\"/:$NOMETRICS_PORT\"/" -e 's/^workers = 1$/workers = 1\nmetrics = false/' \
        "$TMP/switchyard/switchyard.toml" >"$TMP/switchyard-nometrics/switchyard.toml"
    grep -q '^metrics = false$' "$TMP/switchyard-nometrics/switchyard.toml" ||
        die "could not write the metrics-off configuration"
    # The same configuration for the earlier build.
    sed -e "s/:$SWITCHYARD_PORT\"/:$BASELINE_PORT\"/" \
        "$TMP/switchyard/switchyard.toml" >"$TMP/switchyard-base/switchyard.toml"
}

# --- starting processes --------------------------------------------------------

# start_bg (lib.sh) leaves the pid in STARTED_PID.
# `taskset -c N cmd` and `valgrind cmd` exec (or stay as the tracked parent), so the
# pid is the process to signal.

start_backends() {
    local pin=()
    [ "$MODE" = throughput ] && pin=(taskset -c "$LOAD_CPU")
    start_bg "$TMP/backend/stdout.log" "${pin[@]}" nginx -p "$TMP/backend/" -e "$TMP/backend/logs/error.log" -c "$TMP/backend/nginx.conf"
    BACKEND_PID=$STARTED_PID
    wait_ready "http://127.0.0.1:$BACKEND1_PORT/" 10 "$BACKEND_PID" && wait_ready "http://127.0.0.1:$BACKEND2_PORT/" 10 "$BACKEND_PID" ||
        die "backends did not start: $(cat "$TMP/backend/logs/error.log" "$TMP/backend/stdout.log" 2>/dev/null)"
}

proxy_port() {
    case $1 in
    nginx) echo "$NGINX_PORT" ;;
    haproxy) echo "$HAPROXY_PORT" ;;
    switchyard) echo "$SWITCHYARD_PORT" ;;
    switchyard-nometrics) echo "$NOMETRICS_PORT" ;;
    switchyard-base) echo "$BASELINE_PORT" ;;
    esac
}

# Sets PROXY_CMD to the command line of proxy $1.
proxy_cmd() {
    case $1 in
    nginx) PROXY_CMD=(nginx -p "$TMP/nginx/" -e "$TMP/nginx/logs/error.log" -c "$TMP/nginx/nginx.conf") ;;
    haproxy) PROXY_CMD=(haproxy -db -f "$TMP/haproxy/haproxy.cfg") ;;
    switchyard | switchyard-nometrics) PROXY_CMD=("$SWITCHYARD_BIN" --config "$TMP/$1/switchyard.toml") ;;
    switchyard-base) PROXY_CMD=("$SWITCHYARD_BASE_BIN" --config "$TMP/$1/switchyard.toml") ;;
    esac
}

# Starts proxy $1 (optionally wrapped by the words in $2..), waits until it answers.
start_proxy() {
    local name=$1 limit=10
    shift
    local wrap=("$@")
    proxy_cmd "$name"
    [ "${#wrap[@]}" -gt 0 ] && limit=120
    start_bg "$TMP/$name/run.log" taskset -c "$PROXY_CPU" "${wrap[@]}" "${PROXY_CMD[@]}"
    PROXY_PID=$STARTED_PID
    wait_ready "http://127.0.0.1:$(proxy_port "$name")/" "$limit" "$PROXY_PID" ||
        die "$name did not start: $(tail -n 20 "$TMP/$name/run.log" 2>/dev/null)"
}

# utime+stime (clock ticks) of a process; 0 if it is gone.
ticks_of() {
    local stat rest f
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || {
        echo 0
        return
    }
    rest=${stat##*) }
    read -ra f <<<"$rest"
    echo $((f[11] + f[12]))
}

# Ticks of a process and its direct children (nginx master + workers).
tree_ticks() {
    local total child
    total=$(ticks_of "$1")
    for child in $(pgrep -P "$1" 2>/dev/null || true); do
        total=$((total + $(ticks_of "$child")))
    done
    echo "$total"
}

# One line describing the tools and the exact switchyard binary measured.
versions() {
    local sum rev
    sum=$(sha256sum "$SWITCHYARD_BIN" | cut -c1-12)
    rev=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo "?")
    echo "versions: $(nginx -v 2>&1 | sed 's/.*: //'), haproxy $( (haproxy -v 2>/dev/null || echo "? ? none") | awk 'NR==1{print $3}'), $("$SWITCHYARD_BIN" --version 2>/dev/null || echo switchyard)$*"
    echo "switchyard binary: $SWITCHYARD_BIN sha256 $sum, built $(date -u -r "$SWITCHYARD_BIN" '+%F %T UTC'), tree $rev"
    if [ "$SAME_HEADERS" != 0 ]; then
        echo "header rules: nginx and HAProxy set the same forwarding and request-id headers as switchyard"
        [ "$SAME_HEADERS" = 1 ] || echo "nginx's new ids: \$connection-\$connection_requests, not \$request_id"
    else
        echo "header rules: switchyard's own; nginx and HAProxy forward with their plainest setup"
    fi
    echo "request: $REQUEST, GET / with $((${#WRK_FIELDS[@]} / 2 + 1)) fields"
    if has_proxy switchyard-base; then
        echo "switchyard-base binary: $SWITCHYARD_BASE_BIN sha256 $(sha256sum "$SWITCHYARD_BASE_BIN" | cut -c1-12)"
    fi
}

# --- throughput mode ------------------------------------------------------------

declare -A RPS P99 RPCPU

run_wrk() {
    local name=$1 round=$2 port out pid t0 t1 secs requests rps p99 errors
    port=$(proxy_port "$name")
    start_proxy "$name"
    pid=$PROXY_PID
    if [ "$WARMUP" != 0 ]; then
        timeout 60 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$WARMUP" "${WRK_FIELDS[@]}" \
            "http://127.0.0.1:$port/" >/dev/null 2>&1 || true
    fi
    t0=$(tree_ticks "$pid")
    out=$(timeout "$(($(dur_secs "$DURATION") + 60))" taskset -c "$LOAD_CPU" \
        wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${WRK_FIELDS[@]}" "http://127.0.0.1:$port/" 2>&1) || true
    t1=$(tree_ticks "$pid")
    kill -0 "$pid" 2>/dev/null || log "warning: $name exited during the run"
    stop_pid "$pid" 10 || log "warning: $name had to be killed"
    echo "$out" >"$TMP/wrk-$name-$round.txt"

    requests=$(awk '/requests in/ { print $1; exit }' <<<"$out")
    rps=$(awk '/^Requests\/sec:/ { print $2; exit }' <<<"$out")
    p99=$(awk '$1 == "99%" { print $2; exit }' <<<"$out")
    errors=$(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ' | paste -sd ';' || true)
    [ -n "$requests" ] && [ -n "$rps" ] && [ -n "$p99" ] || {
        log "warning: could not parse wrk output for $name round $round:"
        echo "$out" >&2
        requests=- rps=- p99=-
    }
    [ -z "$errors" ] || log "warning: $name round $round:$errors"
    p99=$([ "$p99" = - ] && echo - || to_ms "$p99")
    secs=$(awk -v d="$((t1 - t0))" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", d / hz }')
    RPS[$name,$round]=$rps
    P99[$name,$round]=$p99
    RPCPU[$name,$round]=$([ "$requests" = - ] && echo - || div "$requests" "$secs")
    printf '  round %d  %-10s  %8s req/s  p99 %8s ms  cpu %6s s  %8s req/cpu-s\n' \
        "$round" "$name" "$(fmt "$rps" %.0f)" "$(fmt "$p99" %.3f)" "$secs" "$(fmt "${RPCPU[$name,$round]}" %.0f)" >&2
}

# "10s" / "2m" / "500" -> whole seconds (for timeouts only).
dur_secs() {
    local d=$1
    case $d in
    *ms) echo 1 ;;
    *s) echo "${d%s}" ;;
    *m) echo $((${d%m} * 60)) ;;
    *h) echo $((${d%h} * 3600)) ;;
    *) echo "$d" ;;
    esac
}

throughput() {
    local r name
    log "throughput: $ROUNDS rounds x ${PROXIES[*]}, wrk -t1 -c$CONNS -d$DURATION (warm-up $WARMUP)"
    log "proxy on CPU $PROXY_CPU, wrk + backends on CPU $LOAD_CPU, CLK_TCK=$CLK_TCK"
    for ((r = 1; r <= ROUNDS; r++)); do
        log "round $r/$ROUNDS (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
        for name in "${PROXIES[@]}"; do
            run_wrk "$name" "$r"
        done
    done

    local rps p99 cpu
    echo
    echo "switchyard compare: wrk -t1 -c$CONNS -d$DURATION --latency, $ROUNDS rounds interleaved, medians"
    echo "proxy on CPU $PROXY_CPU (one worker), wrk + 2 nginx backends on CPU $LOAD_CPU"
    echo "host: $(uname -r), $NCPU CPUs, loadavg now $(cut -d' ' -f1-3 /proc/loadavg)"
    versions
    echo
    printf '%-22s %12s %12s %14s\n' proxy "req/s" "p99 ms" "req/cpu-s"
    for name in "${PROXIES[@]}"; do
        rps=() p99=() cpu=()
        for ((r = 1; r <= ROUNDS; r++)); do
            rps+=("${RPS[$name,$r]}") p99+=("${P99[$name,$r]}") cpu+=("${RPCPU[$name,$r]}")
        done
        printf '%-22s %12s %12s %14s\n' "$name" "$(fmt "$(median "${rps[@]}")" %.0f)" \
            "$(fmt "$(median "${p99[@]}")" %.3f)" "$(fmt "$(median "${cpu[@]}")" %.0f)"
    done

    echo
    echo "paired ratios (per round, then median; range in brackets)"
    printf '%-22s %24s %24s %24s\n' ratio "req/s" "p99 (lower=better)" "req/cpu-s"
    local other a b c
    for other in "${PROXIES[@]}"; do
        has_proxy switchyard && [ "$other" != switchyard ] || continue
        a=() b=() c=()
        for ((r = 1; r <= ROUNDS; r++)); do
            a+=("$(div "${RPS[switchyard,$r]}" "${RPS[$other,$r]}")")
            b+=("$(div "${P99[switchyard,$r]}" "${P99[$other,$r]}")")
            c+=("$(div "${RPCPU[switchyard,$r]}" "${RPCPU[$other,$r]}")")
        done
        printf '%-22s %24s %24s %24s\n' "switchyard/$other" \
            "$(fmt "$(median "${a[@]}")" %.3f) [$(minmax "${a[@]}")]" \
            "$(fmt "$(median "${b[@]}")" %.3f) [$(minmax "${b[@]}")]" \
            "$(fmt "$(median "${c[@]}")" %.3f) [$(minmax "${c[@]}")]"
    done
    echo
    echo "per run:"
    printf '%-6s %-22s %12s %10s %12s\n' round proxy "req/s" "p99 ms" "req/cpu-s"
    for ((r = 1; r <= ROUNDS; r++)); do
        for name in "${PROXIES[@]}"; do
            printf '%-6s %-22s %12s %10s %12s\n' "$r" "$name" "$(fmt "${RPS[$name,$r]}" %.0f)" \
                "$(fmt "${P99[$name,$r]}" %.3f)" "$(fmt "${RPCPU[$name,$r]}" %.0f)"
        done
    done
}

# --- callgrind mode ---------------------------------------------------------------

# Count-bounded keep-alive HTTP/1.1 client: CONNS connections, one request in flight
# on each, exactly N responses in total. Fails on non-200 or a closed connection.
write_client() {
    cat >"$TMP/client.py" <<'EOF'
import os, selectors, socket, sys

port, total, conns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
fields = "".join(f + "\r\n" for f in os.environ.get("REQUEST_FIELDS", "").splitlines() if f)
req = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n" % (port, fields.encode())
sel = selectors.DefaultSelector()
sent = done = 0

def parse(buf):
    """Returns (bytes consumed, status) for one complete response, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].decode("latin-1").split("\r\n")
    status = int(head[0].split()[1])
    hdrs = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        hdrs[k.strip().lower()] = v.strip().lower()
    if hdrs.get("connection") == "close":
        sys.exit("server closed keep-alive connection")
    pos = end + 4
    if "content-length" in hdrs:
        n = pos + int(hdrs["content-length"])
        return (n, status) if len(buf) >= n else None
    if hdrs.get("transfer-encoding") == "chunked":
        while True:
            le = buf.find(b"\r\n", pos)
            if le < 0:
                return None
            size = int(buf[pos:le].split(b";")[0], 16)
            pos = le + 2 + size + 2
            if len(buf) < pos:
                return None
            if size == 0:
                return pos, status
    sys.exit("response without length")

for _ in range(min(conns, total)):
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(req)
    sent += 1
    sel.register(s, selectors.EVENT_READ, bytearray())

while done < total:
    events = sel.select(timeout=60)
    if not events:
        sys.exit("timed out after %d responses" % done)
    for key, _ in events:
        s, buf = key.fileobj, key.data
        data = s.recv(65536)
        if not data:
            sys.exit("connection closed by server after %d responses" % done)
        buf += data
        while True:
            r = parse(bytes(buf))
            if r is None:
                break
            n, status = r
            if status != 200:
                sys.exit("status %d" % status)
            del buf[:n]
            done += 1
            if sent < total:
                s.sendall(req)
                sent += 1
for key in list(sel.get_map().values()):
    key.fileobj.close()
print(done)
EOF
}

# Total Ir of one callgrind run of proxy $1 serving $2 requests, left in CG_IR; with
# CG_CACHE_SIM=1, also its first-level instruction and data cache misses, in CG_I1 and
# CG_D1.
callgrind_run() {
    local name=$1 count=$2 port out ir tag
    local sim=()
    [ "$CG_CACHE_SIM" = 1 ] && sim=(--cache-sim=yes)
    tag="$name-$count"
    port=$(proxy_port "$name")
    out="$TMP/callgrind.$tag.out"
    start_proxy "$name" valgrind --tool=callgrind "${sim[@]}" --collect-atstart=yes --callgrind-out-file="$out"
    timeout 900 python3 "$TMP/client.py" "$port" "$count" "$CG_CONNS" >"$TMP/client.$tag.txt" 2>&1 ||
        die "client failed against $name: $(cat "$TMP/client.$tag.txt")"
    stop_pid "$PROXY_PID" 120 || die "$name under valgrind did not exit on SIGTERM"
    [ -s "$out" ] || die "no callgrind output from $name ($(tail -n 5 "$TMP/$name/run.log"))"
    # One count per event; Ir is the first (and by default only) event.
    ir=$(awk '/^(summary|totals):/ { print $2; exit }' "$out")
    [ -n "$ir" ] || die "no summary/totals line in $out"
    CG_IR=$ir
    if [ "$CG_CACHE_SIM" = 1 ]; then
        # The events line names the summary's columns.
        CG_I1='' CG_D1=''
        read -r CG_I1 CG_D1 < <(awk '
            /^events:/ && !n { for (i = 2; i <= NF; i++) col[$i] = i; n = 1 }
            /^(summary|totals):/ && n {
                if (!col["I1mr"] || !col["D1mr"] || !col["D1mw"]) exit
                printf "%s %.0f\n", $col["I1mr"], $col["D1mr"] + $col["D1mw"]; exit
            }' "$out") || true
        [ -n "${CG_D1:-}" ] || die "no cache miss counts in $out"
    fi
}

# Per request: the difference between counts at CG_N and CG_BASE requests, over their
# difference.
per_request() {
    awk -v a="$1" -v b="$2" -v n="$((CG_N - CG_BASE))" 'BEGIN { printf "%.0f", (a - b) / n }'
}

callgrind() {
    local name ir_base ir_n per
    write_client
    log "callgrind: Ir difference between $CG_N and $CG_BASE requests, $CG_CONNS keep-alive connections"
    log "proxy pinned on CPU $PROXY_CPU under valgrind; backends unpinned"
    declare -A BASE NN PER I1 D1
    local i1_base d1_base
    for name in "${PROXIES[@]}"; do
        log "$name: $CG_BASE requests"
        callgrind_run "$name" "$CG_BASE"
        ir_base=$CG_IR i1_base=${CG_I1:-} d1_base=${CG_D1:-}
        log "$name: $CG_N requests"
        callgrind_run "$name" "$CG_N"
        ir_n=$CG_IR
        per=$(per_request "$ir_n" "$ir_base")
        BASE[$name]=$ir_base NN[$name]=$ir_n PER[$name]=$per
        log "$name: $per instructions/request"
        if [ "$CG_CACHE_SIM" = 1 ]; then
            I1[$name]=$(per_request "$CG_I1" "$i1_base")
            D1[$name]=$(per_request "$CG_D1" "$d1_base")
        fi
    done
    echo
    echo "switchyard compare, callgrind: user-space instructions per proxied request"
    echo "(Ir[$CG_N requests] - Ir[$CG_BASE requests]) / $((CG_N - CG_BASE)), HTTP/1.1 keep-alive, $CG_CONNS connections, one worker"
    versions ", $(valgrind --version)"
    echo
    printf '%-22s %16s %16s %12s\n' proxy "Ir[$CG_BASE]" "Ir[$CG_N]" "Ir/request"
    for name in "${PROXIES[@]}"; do
        printf '%-22s %16s %16s %12s\n' "$name" "${BASE[$name]}" "${NN[$name]}" "${PER[$name]}"
    done
    if [ "$CG_CACHE_SIM" = 1 ]; then
        echo
        echo "first-level cache misses per request (callgrind's cache simulation)"
        printf '%-22s %16s %16s\n' proxy "I1mr/request" "D1mr+D1mw/request"
        for name in "${PROXIES[@]}"; do
            printf '%-22s %16s %16s\n' "$name" "${I1[$name]}" "${D1[$name]}"
        done
    fi
    echo
    for name in "${PROXIES[@]}"; do
        has_proxy switchyard && [ "$name" != switchyard ] || continue
        printf '%-33s %s\n' "switchyard/$name" "$(fmt "$(div "${PER[switchyard]}" "${PER[$name]}")" %.3f)"
    done
}

# --- main --------------------------------------------------------------------------

write_configs
start_backends
if [ "$MODE" = throughput ]; then
    throughput
else
    callgrind
fi
