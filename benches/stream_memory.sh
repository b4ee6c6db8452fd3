#!/usr/bin/env bash
# Streams 1 GiB down and 1 GiB up through Switchyard and reports the proxy's peak
# resident memory (VmHWM) before and after: bodies are streamed, so it stays flat.
# Everything runs on 127.0.0.1 and stops by itself.
#
#   benches/stream_memory.sh            # 1 GiB each way
#   SIZE=268435456 benches/stream_memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${SIZE:-1073741824}
BIN=target/release/switchyard
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
