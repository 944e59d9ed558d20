#!/usr/bin/env bash
# Starts N federated relays on loopback: relay 0 is everyone's bootstrap.
# Free ports are chosen by the relays themselves; data, logs and the relay
# table live under $MW_TESTNET_DIR (default target/testnet).
#
#   testnet/up.sh 5                  # five relays
#   MW_RELAY_ARGS="--log debug" testnet/up.sh 3
#
# Prints one line per relay: index, PeerId, HTTP base, libp2p address.
set -euo pipefail
source "$(dirname "$0")/common.sh"

N="${1:-3}"
if ! [[ "$N" =~ ^[0-9]+$ ]] || [ "$N" -lt 1 ]; then
  echo "usage: $0 N   (N >= 1 relays)" >&2
  exit 2
fi
if [ -f "$RELAYS" ]; then
  echo "a testnet is already up in $RUN_DIR (testnet/down.sh stops it)" >&2
  exit 1
fi
BIN="$(mw_bin)"
mkdir -p "$RUN_DIR"
: > "$RELAYS.tmp"

start_relay() { # index bootstrap
  local i="$1" boot="$2" dir="$RUN_DIR/relay-$1"
  mkdir -p "$dir"
  local args=(relay --data-dir "$dir/data" --http 127.0.0.1:0 --listen /ip4/127.0.0.1/tcp/0)
  if [ -n "$boot" ]; then args+=(--bootstrap "$boot"); fi
  # shellcheck disable=SC2086
  "$BIN" "${args[@]}" ${MW_RELAY_ARGS:-} >"$dir/stdout.log" 2>"$dir/stderr.log" &
  local pid=$!
  # The relay prints its addresses once it listens (bounded wait).
  local http="" listen="" peer=""
  for _ in $(seq 1 200); do
    http="$(sed -n 's/^http=//p' "$dir/stdout.log" | head -n1)"
    listen="$(sed -n 's/^listen=//p' "$dir/stdout.log" | head -n1)"
    peer="$(sed -n 's/^peer_id=//p' "$dir/stdout.log" | head -n1)"
    if [ -n "$http" ] && [ -n "$listen" ]; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "relay $i exited; see $dir/stderr.log" >&2
      tail -n 20 "$dir/stderr.log" >&2 || true
      return 1
    fi
    sleep 0.1
  done
  if [ -z "$http" ] || [ -z "$listen" ]; then
    echo "relay $i did not start within 20 s; see $dir/stderr.log" >&2
    kill "$pid" 2>/dev/null || true
    return 1
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$i" "$pid" "$peer" "$http" "$listen" >>"$RELAYS.tmp"
}

cleanup_on_error() {
  if [ -f "$RELAYS.tmp" ]; then
    cut -f2 "$RELAYS.tmp" | xargs -r kill 2>/dev/null || true
    rm -f "$RELAYS.tmp"
  fi
}
trap cleanup_on_error ERR

start_relay 0 ""
BOOT="$(cut -f5 "$RELAYS.tmp" | head -n1)"
for i in $(seq 1 $((N - 1))); do
  start_relay "$i" "$BOOT"
done
mv "$RELAYS.tmp" "$RELAYS"
trap - ERR

# Wait (bounded) until every relay has federated with at least one other.
if [ "$N" -gt 1 ]; then
  for _ in $(seq 1 300); do
    ok=1
    while IFS=$'\t' read -r _ _ _ http _; do
      h="$(curl -fsS --max-time 2 "$http/health" 2>/dev/null || true)"
      peers="$(json_field "$h" federationPeersConnected)"
      if [ -z "$peers" ] || [ "$peers" -lt 1 ]; then ok=0; break; fi
    done <"$RELAYS"
    if [ "$ok" = 1 ]; then break; fi
    sleep 0.1
  done
  if [ "$ok" != 1 ]; then
    echo "warning: not every relay federated within 30 s (testnet/status.sh shows which)" >&2
  fi
fi
echo "testnet up: $N relays, run directory $RUN_DIR"
while IFS=$'\t' read -r i _ peer http listen; do
  printf 'relay %s  %s  %s  %s\n' "$i" "$peer" "$http" "$listen"
done <"$RELAYS"
