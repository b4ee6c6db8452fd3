# Shared by benches/compare.sh, benches/reload_load.sh and benches/pgo.sh; sourced, not run.
# shellcheck shell=bash
# The sourcing script sets BENCH (its name, for messages) before sourcing, and KEEP_TMP
# before calling bench_bookkeeping.

log() { echo "[$BENCH] $*" >&2; }
die() {
    echo "[$BENCH] error: $*" >&2
    exit 1
}

# Dies unless command $1 exists; $2 names the Debian package that has it.
need() { command -v "$1" >/dev/null 2>&1 || die "$1 not found (apt-get install -y $2)"; }

# --- process bookkeeping -------------------------------------------------------

# Creates the temporary directory TMP (named after $1), empties PIDS and installs the
# traps: on exit every pid in PIDS is sent TERM, then KILL, and TMP is removed unless
# KEEP_TMP=1.
bench_bookkeeping() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    PIDS=()
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

cleanup() {
    local pid alive
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # Give them a moment to exit (valgrind writes its output on exit), then force.
    for _ in $(seq 1 50); do
        alive=0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    if [ "$KEEP_TMP" = 1 ]; then
        log "kept $TMP"
    else
        rm -rf "$TMP"
    fi
}

forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# Starts a command in the background; its pid is left in STARTED_PID and added to PIDS.
start_bg() {
    local logfile=$1
    shift
    "$@" >"$logfile" 2>&1 </dev/null &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
}

# Sends SIGTERM and waits up to $2 seconds for the process to exit, then SIGKILL.
# Returns 1 if the process had to be killed.
stop_pid() {
    local pid=$1 limit=${2:-10} i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    local rc=0
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
        rc=1
    fi
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
    return $rc
}

# Waits until URL $1 answers 200 (at most $2 seconds); $3 = pid to watch.
wait_ready() {
    local url=$1 limit=$2 pid=$3 i
    for ((i = 0; i < limit * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        if [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$url" 2>/dev/null)" = 200 ]; then
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# --- ports -----------------------------------------------------------------------

# True if a TCP socket uses port $1, listening or connected (sockets in TIME-WAIT, which
# a new listener may reuse, do not count).
port_in_use() {
    local out
    # Not `ss | grep -q`: grep's early exit can end ss with SIGPIPE, which pipefail
    # turns into "free".
    if out=$(ss -Htan exclude time-wait "sport = :$1" 2>/dev/null); then
        [ -n "$out" ]
    else
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

# Prints the first port from $1 (stepping by $2) that begins $2 consecutive free ports.
find_ports() {
    local base=$1 count=$2 p ok
    for ((; base + count <= 65000; base += count)); do
        ok=1
        for ((p = base; p < base + count; p++)); do
            if port_in_use "$p"; then
                ok=0
                break
            fi
        done
        if ((ok)); then
            echo "$base"
            return 0
        fi
    done
    return 1
}

# --- number helpers (awk) ------------------------------------------------------

# Median of the arguments ("-" entries ignored); prints "-" if none.
median() {
    printf '%s\n' "$@" | awk '$1 != "-"' | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "-"; exit }
            if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2
        }'
}
minmax() {
    printf '%s\n' "$@" | awk '$1 != "-"' | sort -g | awk '
        NR == 1 { lo = $1 } { hi = $1 }
        END { if (NR == 0) print "-"; else printf "%.3f..%.3f", lo, hi }'
}
fmt() { awk -v v="$1" -v f="$2" 'BEGIN { if (v == "-" || v == "") print "-"; else printf f, v }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.4f", a / b }'; }

# wrk latency value ("812.00us", "1.23ms", "2.01s") -> milliseconds.
to_ms() {
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); printf "%.4f", v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.4f", v }
        else if (v ~ /m$/) { sub(/m$/, "", v); printf "%.4f", v * 60000 }
        else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.4f", v * 1000 }
        else print "-"
    }'
}
