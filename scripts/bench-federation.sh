#!/usr/bin/env bash
# Packets/s through one relay and across two federated relays, in the same
# run: a 2-relay testnet (testnet/up.sh 2), then the same WebSocket load
#   1. senders and receivers on relay 1            (one relay)
#   2. senders on relay 0, receivers on relay 1, with the home-relay hint
#   3. the same without a hint (flooded)
# Prints one JSON line per case. Before them, one unreported pass of cases 1
# and 2 (WARMUP packets per pair, default 2000; 0 for none) brings both
# relays to their steady state (allocator, page cache, TCP and yamux
# windows): otherwise whichever case runs first pays for it.
#
#   WARMUP=N scripts/bench-federation.sh [PAIRS] [MSGS] [SIZE] [WINDOW]   (defaults 50 2000 1024 32)
#
# Needs a release build (cargo build --release -p meshwhisper).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
PAIRS=${1:-50} MSGS=${2:-2000} SIZE=${3:-1024} WINDOW=${4:-32}
BIN=$PWD/target/release/meshwhisper
[ -x "$BIN" ] || { echo "build first: cargo build --release -p meshwhisper" >&2; exit 2; }
export MW_BIN="$BIN" MW_TESTNET_DIR
MW_TESTNET_DIR=$(mktemp -d)
trap 'testnet/down.sh --clean >/dev/null 2>&1 || true' EXIT
testnet/up.sh 2 >/dev/null
row() { sed -n "$(($1 + 1))p" "$MW_TESTNET_DIR/relays.tsv"; }
HTTP0=$(row 0 | cut -f4) HTTP1=$(row 1 | cut -f4) PID1=$(row 1 | cut -f2)
KEY1=$(sed -n 's/^relay_key=//p' "$MW_TESTNET_DIR/relay-1/stdout.log")
ws() { echo "${1/http:/ws:}/"; }
load() {
  "$BIN" bench relay --url "$(ws "$HTTP1")" --pairs "$PAIRS" --msgs "$MSGS" --size "$SIZE" \
    --window "$WINDOW" --relay-pid "$PID1" --json "$@"
}
WARMUP=${WARMUP:-2000}
if [ "$WARMUP" -gt 0 ]; then
  MSGS_MEASURED=$MSGS MSGS=$WARMUP
  load >/dev/null
  load --sender-url "$(ws "$HTTP0")" --home-relay "$KEY1" >/dev/null
  MSGS=$MSGS_MEASURED
fi
echo "{\"case\":\"one relay\",\"result\":$(load)}"
echo "{\"case\":\"two relays, hinted\",\"result\":$(load --sender-url "$(ws "$HTTP0")" --home-relay "$KEY1")}"
echo "{\"case\":\"two relays, flooded\",\"result\":$(load --sender-url "$(ws "$HTTP0")")}"
for h in "$HTTP0" "$HTTP1"; do
  curl -fsS "$h/metrics" | grep -E '^meshwhisper_(federation_(forwards_sent|forwards_received|routed_acked|retries|unstored|kept|drops_[a-z_]+)|store_unlogged_(delivered|logged))_total ' |
    sed "s|^|# $h |"
done
