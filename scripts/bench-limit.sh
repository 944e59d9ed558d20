#!/usr/bin/env bash
# Our relay against the practical limit, side by side in one run: the same
# single-threaded WebSocket load generator (`bench relay --threads 1`)
# drives a minimal forwarder that stores nothing (`bench forwarder`, on the
# same WebSocket stack) and our relay (embedded defaults, its own data
# directory), at each window in WINDOWS. Before each measured pass, one
# unreported pass (WARMUP packets per pair, default 2000; 0 for none)
# brings the process to its steady state.
#
#   WINDOWS="32 8 1" WARMUP=N scripts/bench-limit.sh [PAIRS] [MSGS] [SIZE]   (defaults 50 20000 1024)
#
# Prints one JSON line per window: both results (msg/s, p50/p99/p999,
# CPU-seconds the process spent, per million packets, RSS, loss,
# duplicates) and the relay's ratios to the forwarder. 50 x 20 000 is one
# million packets a case. Then one line for the relay's offline path
# (`bench relay --offline`: everything stored while the receivers are
# away, then drained; each receiver registers enough hashes to keep under
# the relay's 500 packets per hash), which a forwarder does not have.
#
# Needs a release build (cargo build --release -p meshwhisper).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-50} MSGS=${2:-20000} SIZE=${3:-1024}
WINDOWS=${WINDOWS:-32 8 1} WARMUP=${WARMUP:-2000}
BIN=$PWD/target/release/meshwhisper
[ -x "$BIN" ] || { echo "build first: cargo build --release -p meshwhisper" >&2; exit 2; }
RUN=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.05; done; echo "relay on $1 did not start" >&2; return 1; }
wait_line() { for _ in $(seq 1 200); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.05; done; echo "no '$2' in $1" >&2; return 1; }
load() { # URL PID WINDOW MSGS
  "$BIN" bench relay --threads 1 --url "$1" --pairs "$PAIRS" --msgs "$4" --size "$SIZE" \
    --window "$3" --relay-pid "$2" --json
}

"$BIN" bench forwarder --http 127.0.0.1:0 >"$RUN/forwarder.log" 2>&1 &
FPID=$!
wait_line "$RUN/forwarder.log" '^listening='
FURL="ws://$(sed -n 's/^listening=//p' "$RUN/forwarder.log")/"

PORT=$(free_port)
RUST_LOG=warn "$BIN" relay --data-dir "$RUN/relay" --http "127.0.0.1:$PORT" \
  --listen /ip4/127.0.0.1/tcp/0 >"$RUN/relay.log" 2>&1 &
RPID=$!
wait_http "$PORT"
RURL="ws://127.0.0.1:$PORT/"

for w in $WINDOWS; do
  if [ "$WARMUP" -gt 0 ]; then
    load "$FURL" "$FPID" "$w" "$WARMUP" >/dev/null
    load "$RURL" "$RPID" "$w" "$WARMUP" >/dev/null
  fi
  f=$(load "$FURL" "$FPID" "$w" "$MSGS")
  r=$(load "$RURL" "$RPID" "$w" "$MSGS")
  python3 - "$w" "$f" "$r" <<'EOF'
import json, sys
w, f, r = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None
print(json.dumps({
    "window": w,
    "forwarder": f,
    "relay": r,
    "relay_vs_forwarder": {
        "msgs_per_sec": ratio(r["msgs_per_sec"], f["msgs_per_sec"]),
        "cpu_per_packet": ratio(r["relay_cpu_s_per_million"], f["relay_cpu_s_per_million"]),
        "p99": ratio(r["p99_ms"], f["p99_ms"]),
    },
}))
EOF
done

# The offline path: store everything, then drain it (relay only).
DESTS=$(( (MSGS + 399) / 400 ))
o=$("$BIN" bench relay --threads 1 --url "$RURL" --offline --pairs "$PAIRS" --msgs "$MSGS" \
  --size "$SIZE" --dests "$DESTS" --window 32 --relay-pid "$RPID" --json)
echo "{\"offline\": $o}"
