#!/usr/bin/env bash
# The relay benchmark against several relay builds, alternating, in one
# run: each build is started on a fresh data directory (loopback,
# federation off) and loaded with `meshwhisper bench relay` from this
# checkout's release build. One line per build and round:
#   BIN msg/s p99_ms lost duplicates peak_rss_MiB
#
#   scripts/bench-compare.sh [--msgs N] [--rounds R] BIN...   (defaults 20000, 3)
#
# e.g. an older build: git worktree add /tmp/old <commit> &&
#   (cd /tmp/old && cargo build --release -p meshwhisper) &&
#   scripts/bench-compare.sh /tmp/old/target/release/meshwhisper target/release/meshwhisper
set -Eeuo pipefail
cd "$(dirname "$0")/.."
MSGS=20000 ROUNDS=3
while [ $# -gt 0 ]; do
  case $1 in
    --msgs) MSGS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--msgs N] [--rounds R] BIN..." >&2; exit 2; }
LOADER=$PWD/target/release/meshwhisper
[ -x "$LOADER" ] || { echo "build first: cargo build --release -p meshwhisper" >&2; exit 2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for _ in $(seq 1 "$ROUNDS"); do
  for BIN in "$@"; do
    RUN=$(mktemp -d)
    PORT=$(free_port)
    "$BIN" relay --data-dir "$RUN/d" --http "127.0.0.1:$PORT" --listen /ip4/127.0.0.1/tcp/0 \
      --federation off >"$RUN/log" 2>&1 &
    PID=$!
    for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 0.05; done
    R=$("$LOADER" bench relay --url "ws://127.0.0.1:$PORT/" --pairs 50 --msgs "$MSGS" --size 1024 \
      --window 32 --relay-pid "$PID" --json)
    echo "$BIN $(echo "$R" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(int(d["msgs_per_sec"]), d["p99_ms"], d["lost"], d["duplicates"], d["relay_peak_rss_kib"]//1024)')"
    kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
    rm -rf "$RUN"
  done
done
