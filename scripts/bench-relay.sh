#!/usr/bin/env bash
# Loads our relay and the reference relay (@meshwhisper/node 0.2.1) with the
# same WebSocket workload, one after the other on this machine, and prints
# both summaries as JSON lines.
#
#   scripts/bench-relay.sh [PAIRS] [MSGS] [SIZE] [WINDOW]      (defaults 50 2000 1024 32)
#
# Needs: a release build (cargo build --release -p meshwhisper) and the
# reference installed under target/reference:
#   npm install --prefix target/reference @meshwhisper/node@0.2.1
set -Eeuo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-50} MSGS=${2:-2000} SIZE=${3:-1024} WINDOW=${4:-32}
BIN=target/release/meshwhisper
REF=target/reference/node_modules/@meshwhisper/node/dist/index.js
[ -x "$BIN" ] || { echo "build first: cargo build --release -p meshwhisper" >&2; exit 2; }
[ -f "$REF" ] || { echo "install the reference: npm install --prefix target/reference @meshwhisper/node@0.2.1" >&2; exit 2; }
RUN=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$RUN"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 0.05; done; echo "relay on $1 did not start" >&2; return 1; }
load() { "$BIN" bench relay --url "ws://127.0.0.1:$1/" --pairs "$PAIRS" --msgs "$MSGS" --size "$SIZE" --window "$WINDOW" --relay-pid "$2" --json; }

PORT=$(free_port)
"$BIN" relay --data-dir "$RUN/ours" --http "127.0.0.1:$PORT" --listen /ip4/127.0.0.1/tcp/0 >"$RUN/ours.log" 2>&1 &
PID=$!
wait_http "$PORT"
echo "{\"relay\":\"meshwhisper (ours)\",\"result\":$(load "$PORT" "$PID")}"
kill -TERM "$PID"; wait "$PID" || true

PORT=$(free_port)
PORT=$PORT DB_PATH="$RUN/ref.db" node "$REF" >"$RUN/ref.log" 2>&1 &
PID=$!
wait_http "$PORT"
echo "{\"relay\":\"@meshwhisper/node 0.2.1 (reference)\",\"result\":$(load "$PORT" "$PID")}"
kill -TERM "$PID"; wait "$PID" || true
