#!/usr/bin/env bash
# Stops the testnet's relays (SIGTERM, then SIGKILL after 10 s) and forgets
# the relay table. Data and logs stay in the run directory; pass --clean to
# remove them too.
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [ ! -f "$RELAYS" ]; then
  echo "no testnet in $RUN_DIR" >&2
else
  pids="$(cut -f2 "$RELAYS")"
  kill $pids 2>/dev/null || true
  for _ in $(seq 1 100); do
    alive=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
  rm -f "$RELAYS"
  echo "testnet stopped"
fi
if [ "${1:-}" = "--clean" ]; then
  rm -rf "$RUN_DIR"
fi
