#!/usr/bin/env bash
# Throughput and p99 while the configuration is reloaded every second, against the same
# setup without reloads.
#
#   benches/reload_load.sh
#   ROUNDS=1 DURATION=3s benches/reload_load.sh     # quick check
#
# Setup, all on 127.0.0.1: two built-in backends (`switchyard backend`) and the proxy
# (`switchyard --config FILE`, `workers = 1`, an [admin] listener) in front of them,
# round robin. The proxy is pinned alone on PROXY_CPU; wrk, the backends and the
# reload loop share LOAD_CPU (as in benches/compare.sh).
#
# Each round runs `wrk -t1 -c$CONNS -d$DURATION --latency` twice, in alternating order
# (steady first in odd rounds, reloading first in even ones):
#   steady     the file is left alone;
#   reloading  a background loop rewrites the file (temporary file + rename) every
#              RELOAD_EVERY seconds, alternating the two weights and adding or removing
#              a third backend id (on the first backend's address), so every write is a
#              real change.
# Around every run `/status` on the admin listener is read: the generation must advance
# by about one per write in reloading runs (and not at all in steady ones), with no
# failed reload; wrk must report no non-2xx responses and no socket errors. Any
# violation is printed and makes the script exit 1 after the summary.
#
# Targets (reported, not enforced): p99 reloading <= 1.5 x p99 steady, req/s reloading
# >= 0.95 x req/s steady; ratios are computed per round (paired), then the median.
#
# Environment (defaults in brackets):
#   ROUNDS [3]  DURATION [10s]  WARMUP [2s, 0 = none]  CONNS [64]  URL_PATH [/healthz]
#   RELOAD_EVERY [1]  PROXY_CPU [1]  LOAD_CPU [0]
#   BASE_PORT [18101]  (first of 4 consecutive free ports, searched upwards from here)
#   SWITCHYARD_BIN [target/release/switchyard, built with cargo build --release]
#   MAX_RUNTIME [seconds; default ROUNDS x 2 x (DURATION + 30) + 300]
#   KEEP_TMP [0]  (1 = keep config, logs and wrk outputs)
#
# Needs: wrk, curl, jq, taskset. Nothing outside a temporary directory is touched, and
# every process started here is stopped on exit.

set -euo pipefail

case "${1:-}" in
-h | --help | help)
    sed -n '2,37p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
"") ;;
*)
    echo "usage: $0 [--help]" >&2
    exit 2
    ;;
esac

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNS=${CONNS:-64}
URL_PATH=${URL_PATH:-/healthz}
RELOAD_EVERY=${RELOAD_EVERY:-1}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
BASE_PORT=${BASE_PORT:-18101}
KEEP_TMP=${KEEP_TMP:-0}
export RUST_LOG=${RUST_LOG:-warn}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

BENCH=reload_load
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need wrk wrk
need curl curl
need jq jq
need taskset util-linux

[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive integer"
[[ $DURATION =~ ^[1-9][0-9]*s$ ]] || die "DURATION must be whole seconds, like 10s"
DUR_SECS=${DURATION%s}
MAX_RUNTIME=${MAX_RUNTIME:-$((ROUNDS * 2 * (DUR_SECS + 30) + 300))}

NCPU=$(getconf _NPROCESSORS_ONLN)
if ((NCPU < 2)); then
    log "only $NCPU CPU online: proxy and load share CPU 0"
    PROXY_CPU=0
    LOAD_CPU=0
fi

if [ -z "${SWITCHYARD_BIN:-}" ]; then
    SWITCHYARD_BIN=$REPO/target/release/switchyard
    log "building switchyard (release)"
    (cd "$REPO" && cargo build --release --bin switchyard) >&2 || die "release build failed"
fi
[ -x "$SWITCHYARD_BIN" ] || die "$SWITCHYARD_BIN is not an executable"

BASE=$(find_ports "$BASE_PORT" 4) || die "no 4 free consecutive ports from $BASE_PORT"
B1_PORT=$BASE
B2_PORT=$((BASE + 1))
PROXY_PORT=$((BASE + 2))
ADMIN_PORT=$((BASE + 3))

# --- process bookkeeping -------------------------------------------------------

bench_bookkeeping switchyard-reload-load
RELOADER_PID=

# Bounded runtime: a watchdog ends the script (and, through the trap, everything else).
MAIN_PID=$$
(
    sleeper=
    trap 'kill "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$MAX_RUNTIME" &
    sleeper=$!
    wait "$sleeper"
    echo "[reload_load] error: still running after ${MAX_RUNTIME}s; stopping" >&2
    kill -TERM "$MAIN_PID" 2>/dev/null
) &
PIDS+=("$!")

# --- configuration ---------------------------------------------------------------

CONFIG=$TMP/switchyard.toml

# Variant k: weights alternate every write, the third id is present every other pair.
config_text() {
    local k=$1 w1 w2 third=
    if ((k % 2)); then w1=2 w2=1; else w1=1 w2=2; fi
    if (((k / 2) % 2)); then
        third=", { address = \"127.0.0.1:$B1_PORT\", id = \"b3\", weight = 1 }"
    fi
    cat <<EOF
[server]
listen = ["127.0.0.1:$PROXY_PORT"]
workers = 1
shutdown_grace = "1s"
[server.limits]
max_connections = 10000
[admin]
listen = "127.0.0.1:$ADMIN_PORT"
[pools.web]
policy = "round_robin"
backends = [{ address = "127.0.0.1:$B1_PORT", id = "b1", weight = $w1 }, { address = "127.0.0.1:$B2_PORT", id = "b2", weight = $w2 }$third]
EOF
}

# Atomic replacement, as deployment tools do: temporary file, then rename.
write_config() {
    config_text "$1" >"$CONFIG.tmp"
    mv -f "$CONFIG.tmp" "$CONFIG"
}

VARIANT=0
write_config "$VARIANT"

# --- processes ----------------------------------------------------------------------

start_bg "$TMP/b1.log" taskset -c "$LOAD_CPU" "$SWITCHYARD_BIN" backend --listen "127.0.0.1:$B1_PORT" --name b1
B1_PID=$STARTED_PID
start_bg "$TMP/b2.log" taskset -c "$LOAD_CPU" "$SWITCHYARD_BIN" backend --listen "127.0.0.1:$B2_PORT" --name b2
B2_PID=$STARTED_PID
wait_ready "http://127.0.0.1:$B1_PORT/healthz" 10 "$B1_PID" || die "backend b1 did not start: $(tail -n 5 "$TMP/b1.log")"
wait_ready "http://127.0.0.1:$B2_PORT/healthz" 10 "$B2_PID" || die "backend b2 did not start: $(tail -n 5 "$TMP/b2.log")"

start_bg "$TMP/proxy.log" taskset -c "$PROXY_CPU" "$SWITCHYARD_BIN" --config "$CONFIG"
PROXY_PID=$STARTED_PID
wait_ready "http://127.0.0.1:$PROXY_PORT$URL_PATH" 10 "$PROXY_PID" || die "proxy did not start: $(tail -n 20 "$TMP/proxy.log")"

STATUS_URL="http://127.0.0.1:$ADMIN_PORT/status"
# "generation failures" from /status.
status_counts() {
    curl -s -m 5 "$STATUS_URL" | jq -r '"\(.generation) \(.reloads.failure)"' 2>/dev/null || echo "- -"
}

# The reload loop: one write every RELOAD_EVERY seconds until killed; lists its writes
# ("variant UTC-time") in $TMP/writes. Pinned with the load, off the proxy's CPU.
start_reloader() {
    : >"$TMP/writes"
    (
        # TERM only sets a flag (and cuts the sleep short): a write and its count are
        # never separated.
        stop=0 sleeper=
        trap 'stop=1; kill "$sleeper" 2>/dev/null' TERM
        k=$VARIANT
        while ((stop == 0)); do
            k=$((k + 1))
            write_config "$k"
            echo "$k $(date -u +%T.%6N)" >>"$TMP/writes"
            ((stop == 0)) || break
            sleep "$RELOAD_EVERY" &
            sleeper=$!
            wait "$sleeper" || true
        done
    ) &
    RELOADER_PID=$!
    PIDS+=("$RELOADER_PID")
    taskset -p -c "$LOAD_CPU" "$RELOADER_PID" >/dev/null
}

stop_reloader() {
    kill -TERM "$RELOADER_PID" 2>/dev/null || true
    wait "$RELOADER_PID" 2>/dev/null || true
    forget_pid "$RELOADER_PID"
    RELOADER_PID=
    if [ -s "$TMP/writes" ]; then
        VARIANT=$(tail -n 1 "$TMP/writes" | cut -d' ' -f1)
    fi
}

# --- runs ------------------------------------------------------------------------------

declare -A RPS P99 GENS WRITES
PROBLEMS=()
NOTES=()

run() {
    local mode=$1 round=$2 out rps p99 errors g0 f0 g1 f1 writes=0 advanced
    read -r g0 f0 <<<"$(status_counts)"
    [ "$mode" = reloading ] && start_reloader
    out=$(timeout "$((DUR_SECS + 30))" taskset -c "$LOAD_CPU" \
        wrk -t1 -c"$CONNS" -d"$DURATION" --latency "http://127.0.0.1:$PROXY_PORT$URL_PATH" 2>&1) || true
    if [ "$mode" = reloading ]; then
        stop_reloader
        writes=$(wc -l <"$TMP/writes")
        # Let the last write's debounce and swap finish before reading the generation.
        sleep 0.5
    fi
    read -r g1 f1 <<<"$(status_counts)"
    kill -0 "$PROXY_PID" 2>/dev/null || die "the proxy exited: $(tail -n 20 "$TMP/proxy.log")"
    echo "$out" >"$TMP/wrk-$mode-$round.txt"

    rps=$(awk '/^Requests\/sec:/ { print $2; exit }' <<<"$out")
    p99=$(awk '$1 == "99%" { print $2; exit }' <<<"$out")
    if [ -z "$rps" ] || [ -z "$p99" ]; then
        PROBLEMS+=("round $round $mode: could not parse wrk output")
        echo "$out" >&2
        rps=- p99=-
    else
        p99=$(to_ms "$p99")
    fi
    errors=$(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ' | paste -sd ';' || true)
    [ -z "$errors" ] || PROBLEMS+=("round $round $mode: wrk:$errors")

    if [ "$g0" = - ] || [ "$g1" = - ]; then
        advanced=-
        PROBLEMS+=("round $round $mode: /status unreadable")
    else
        advanced=$((g1 - g0))
        [ "$f1" = "$f0" ] || PROBLEMS+=("round $round $mode: $((f1 - f0)) failed reloads")
        if [ "$mode" = steady ] && ((advanced != 0)); then
            PROBLEMS+=("round $round steady: generation advanced by $advanced")
        fi
        # Every write is a change, so each should give a generation; a write landing
        # within the debounce of the next could merge with it, hence the tolerance of 1.
        if [ "$mode" = reloading ] && ((writes == 0 || advanced < writes - 1)); then
            PROBLEMS+=("round $round reloading: $writes writes but the generation advanced by $advanced")
        fi
        if [ "$mode" = reloading ] && ((advanced > writes)); then
            NOTES+=("round $round reloading: $writes writes, the generation advanced by $advanced")
        fi
    fi
    RPS[$mode,$round]=$rps
    P99[$mode,$round]=$p99
    GENS[$mode,$round]=$advanced
    WRITES[$mode,$round]=$writes
    printf '  round %d  %-9s  %8s req/s  p99 %8s ms  writes %3s  generation %s -> %s%s\n' \
        "$round" "$mode" "$(fmt "$rps" %.0f)" "$(fmt "$p99" %.3f)" "$writes" "$g0" "$g1" \
        "${errors:+  ($errors)}" >&2
}

log "binary $SWITCHYARD_BIN; ports b1 $B1_PORT b2 $B2_PORT proxy $PROXY_PORT admin $ADMIN_PORT"
log "$ROUNDS rounds x (steady, reloading), wrk -t1 -c$CONNS -d$DURATION --latency $URL_PATH; reload every ${RELOAD_EVERY}s"
log "proxy on CPU $PROXY_CPU, wrk + backends + reload loop on CPU $LOAD_CPU; runtime bound ${MAX_RUNTIME}s"
if [ "$WARMUP" != 0 ]; then
    timeout 60 taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$WARMUP" "http://127.0.0.1:$PROXY_PORT$URL_PATH" >/dev/null 2>&1 || true
fi
for ((r = 1; r <= ROUNDS; r++)); do
    log "round $r/$ROUNDS (loadavg $(cut -d' ' -f1-3 /proc/loadavg))"
    if ((r % 2)); then
        run steady "$r"
        run reloading "$r"
    else
        run reloading "$r"
        run steady "$r"
    fi
done

# --- summary ----------------------------------------------------------------------------

sum=$(sha256sum "$SWITCHYARD_BIN" | cut -c1-12)
rev=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo "?")
echo
echo "switchyard reload under load: wrk -t1 -c$CONNS -d$DURATION --latency $URL_PATH, $ROUNDS rounds, order alternating"
echo "reloading = config rewritten every ${RELOAD_EVERY}s (weights swapped, third backend id added/removed)"
echo "proxy on CPU $PROXY_CPU (workers = 1), wrk + 2 built-in backends + reload loop on CPU $LOAD_CPU"
echo "host: $(uname -r), $NCPU CPUs, loadavg now $(cut -d' ' -f1-3 /proc/loadavg)"
echo "binary: $SWITCHYARD_BIN sha256 $sum, built $(date -u -r "$SWITCHYARD_BIN" '+%F %T UTC'), tree $rev"
echo
printf '%-6s %-10s %10s %10s %8s %12s\n' round mode "req/s" "p99 ms" writes "generations"
for ((r = 1; r <= ROUNDS; r++)); do
    for mode in steady reloading; do
        printf '%-6s %-10s %10s %10s %8s %12s\n' "$r" "$mode" "$(fmt "${RPS[$mode,$r]}" %.0f)" \
            "$(fmt "${P99[$mode,$r]}" %.3f)" "${WRITES[$mode,$r]}" "${GENS[$mode,$r]}"
    done
done
echo
rps_s=() rps_r=() p99_s=() p99_r=() rr=() pr=()
for ((r = 1; r <= ROUNDS; r++)); do
    rps_s+=("${RPS[steady,$r]}") rps_r+=("${RPS[reloading,$r]}")
    p99_s+=("${P99[steady,$r]}") p99_r+=("${P99[reloading,$r]}")
    rr+=("$(div "${RPS[reloading,$r]}" "${RPS[steady,$r]}")")
    pr+=("$(div "${P99[reloading,$r]}" "${P99[steady,$r]}")")
done
printf '%-10s %10s %10s\n' median "req/s" "p99 ms"
printf '%-10s %10s %10s\n' steady "$(fmt "$(median "${rps_s[@]}")" %.0f)" "$(fmt "$(median "${p99_s[@]}")" %.3f)"
printf '%-10s %10s %10s\n' reloading "$(fmt "$(median "${rps_r[@]}")" %.0f)" "$(fmt "$(median "${p99_r[@]}")" %.3f)"
echo
rmed=$(median "${rr[@]}")
pmed=$(median "${pr[@]}")
verdict() { awk -v v="$1" -v t="$2" -v op="$3" 'BEGIN {
    if (v == "-") print "-"
    else if ((op == "ge" && v >= t) || (op == "le" && v <= t)) print "meets target"
    else print "MISSES TARGET" }'; }
echo "paired ratios reloading/steady (median of per-round ratios; range in brackets)"
printf '  req/s  %s [%s]   target >= 0.95: %s\n' "$(fmt "$rmed" %.3f)" "$(minmax "${rr[@]}")" "$(verdict "$rmed" 0.95 ge)"
printf '  p99    %s [%s]   target <= 1.5:  %s\n' "$(fmt "$pmed" %.3f)" "$(minmax "${pr[@]}")" "$(verdict "$pmed" 1.5 le)"
if ((${#NOTES[@]})); then
    echo
    echo "notes:"
    printf '  %s\n' "${NOTES[@]}"
fi
if ((${#PROBLEMS[@]})); then
    echo
    echo "problems:"
    printf '  %s\n' "${PROBLEMS[@]}"
    exit 1
fi
echo "checks: no wrk errors, no failed reloads, generations advanced with every write (and not in steady runs)"
