#!/usr/bin/env bash
# Streams 1 GiB down and 1 GiB up through Switchyard and reports the proxy's peak
# resident memory (VmHWM) before and after: bodies are streamed, so it stays flat.
# Everything runs on 127.0.0.1 and stops by itself.
#
# Then KEEP client connections each download EACH bytes and stay open, idle: what the
# proxy keeps per open keep-alive connection after a large response (VmRSS growth).
#
#   benches/stream_memory.sh            # 1 GiB each way; 50 connections x 8 MiB
#   SIZE=268435456 KEEP=200 benches/stream_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1073741824}
KEEP=${KEEP:-50}
EACH=${EACH:-8388608}
BIN=${SWITCHYARD_BIN:-target/release/switchyard}
[ -x "$BIN" ] || cargo build --release
command -v curl >/dev/null || { echo "curl is required" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BPORT=$(free_port); PPORT=$(free_port)
DIR=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$DIR"; }
trap cleanup EXIT

cat > "$DIR/switchyard.toml" <<TOML
[server]
listen = ["127.0.0.1:$PPORT"]
workers = 1
[pools.p]
backends = ["127.0.0.1:$BPORT"]
TOML
"$BIN" backend --listen "127.0.0.1:$BPORT" --name big 2>/dev/null & pids+=($!)
RUST_LOG=warn "$BIN" --config "$DIR/switchyard.toml" & PROXY=$!; pids+=($PROXY)
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PPORT/healthz" >/dev/null && break; sleep 0.05; done

hwm() { awk '/VmHWM/ {print $2}' "/proc/$PROXY/status"; }
before=$(hwm)
down=$(curl -s -o /dev/null -w '%{size_download} %{time_total}' "http://127.0.0.1:$PPORT/bytes/$SIZE")
after_down=$(hwm)
up=$(head -c "$SIZE" /dev/zero | curl -s -T - -H 'Transfer-Encoding: chunked' "http://127.0.0.1:$PPORT/upload" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["body_bytes"])')
after_up=$(hwm)
echo "download: ${down%% *} bytes in ${down##* } s"
echo "upload:   $up bytes received by the backend"
echo "proxy peak RSS (VmHWM): start ${before} kB, after download ${after_down} kB, after upload ${after_up} kB"
[ "${down%% *}" = "$SIZE" ] && [ "$up" = "$SIZE" ] || { echo "size mismatch" >&2; exit 1; }

rss() { awk '/VmRSS/ {print $2}' "/proc/$PROXY/status"; }
rss_before=$(rss)
# Downloads EACH bytes on each of KEEP connections in turn, then holds them all open
# until told to let go (a line on stdin).
coproc HOLD {
    python3 -c '
import socket, sys
port, n, each = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: x\r\n\r\n" % each)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("closed before the response head")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length:"))
    got = len(body)
    while got < length:
        chunk = s.recv(1 << 20)
        if not chunk:
            sys.exit("closed mid-body")
        got += len(chunk)
    held.append(s)
print("held", len(held), flush=True)
sys.stdin.readline()
' "$PPORT" "$KEEP" "$EACH"
}
read -r -t 300 held count <&"${HOLD[0]}" || { echo "keep-alive downloads failed" >&2; exit 1; }
rss_held=$(rss)
echo done >&"${HOLD[1]}"
wait "$HOLD_PID" 2>/dev/null || true
echo "$count keep-alive connections held open after $EACH bytes each: RSS ${rss_before} kB -> ${rss_held} kB, $(((rss_held - rss_before) / count)) kB per connection"
