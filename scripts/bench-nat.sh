#!/usr/bin/env bash
# Messages/s and latency between two relays behind NAT (testnet/nat.sh's
# sites A and B), over an anchor's circuit and after the hole punch, with
# two public relays (pub2 -> pub3, directly on the "internet" bridge) as the
# practical limit, in one run. Needs root.
#
#   sudo scripts/bench-nat.sh [PAIRS] [MSGS]     # default 20 pairs x 1000 packets
#
# For each case it brings up its own NAT testnet with a management network
# (MW_NAT_MGMT=1: the load generator in mwn-mgmt reaches every relay's
# gateway; federation never uses that network), sends a warm-up round (the
# relays connect), checks how sender and home relay are connected, then
# runs `meshwhisper bench relay --sender-url <A> --url <B> --home-relay <B>`
# (hinted packets: each goes from A straight to B). The circuit case runs
# relays a and b with `[nat] hole_punch = false`.
set -Eeuo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PAIRS="${1:-20}"
MSGS="${2:-1000}"
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
BIN="${MW_BIN:-$REPO/target/release/meshwhisper}"
if [ ! -x "$BIN" ]; then
  (cd "$REPO" && cargo build --release --locked -p meshwhisper)
fi
export MW_BIN="$BIN" MW_NAT_MGMT=1
export MW_NAT_DIR="${MW_NAT_DIR:-$REPO/target/bench-nat}"
NOPUNCH="$MW_NAT_DIR.nopunch.toml"
mkdir -p "$(dirname "$MW_NAT_DIR")"
printf '[nat]\nhole_punch = false\n' >"$NOPUNCH"
trap '"$REPO/testnet/nat.sh" down >/dev/null 2>&1 || true' EXIT

health() { ip netns exec mwn-mgmt curl -fsS --max-time 3 "http://$1:8080/health"; }
key_of() { health "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["federation"]["relayKey"])'; }
peer_of() { health "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["peerId"])'; }
via_circuit() { # relay-ip peer: "circuit", "direct" or "none"
  health "$1" | python3 -c '
import json,sys
h=json.load(sys.stdin); p=sys.argv[1]
print("circuit" if p in h["nat"]["peersViaCircuit"] else "direct" if p in h["federation"]["peers"] else "none")' "$2"
}

run_case() { # name sender-ip home-ip expected-connection
  local name="$1" from="$2" to="$3" want="$4" home peer
  home="$(key_of "$to")"
  peer="$(peer_of "$to")"
  # Warm-up: the relays connect (and punch, unless told not to).
  ip netns exec mwn-mgmt "$BIN" bench relay --sender-url "ws://$from:8080/" --url "ws://$to:8080/" \
    --home-relay "$home" --pairs 2 --msgs 50 --json >/dev/null
  local conn
  for _ in $(seq 1 100); do
    conn="$(via_circuit "$from" "$peer")"
    [ "$conn" = "$want" ] && break
    sleep 0.1
  done
  local out
  out="$(ip netns exec mwn-mgmt "$BIN" bench relay --sender-url "ws://$from:8080/" --url "ws://$to:8080/" \
    --home-relay "$home" --pairs "$PAIRS" --msgs "$MSGS" --json | tail -n1)"
  python3 - "$name" "$conn" "$out" <<'PY'
import json, sys
name, conn, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
print(f"| {name} | {conn} | {out['msgs_per_sec']:.0f} | {out['p50_ms']:.1f} | {out['p99_ms']:.1f} | {out.get('delivered', '?')} |")
PY
}

echo "| case | connection | msg/s | p50 ms | p99 ms | delivered |"
echo "|---|---|---|---|---|---|"
for case in circuit direct; do
  "$REPO/testnet/nat.sh" down >/dev/null 2>&1 || true
  if [ "$case" = circuit ]; then
    MW_RELAY_ARGS_a="--config $NOPUNCH" MW_RELAY_ARGS_b="--config $NOPUNCH" "$REPO/testnet/nat.sh" up >/dev/null
  else
    "$REPO/testnet/nat.sh" up >/dev/null
  fi
  run_case "A -> B, $case" 172.31.0.2 172.31.0.3 "$case"
  if [ "$case" = direct ]; then
    run_case "pub2 -> pub3 (limit)" 172.31.0.11 172.31.0.12 direct
  fi
done
