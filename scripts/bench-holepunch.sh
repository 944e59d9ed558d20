#!/usr/bin/env bash
# Hole-punch success rate and time to a direct connection, between site A
# and site B of testnet/nat.sh (both behind NAT routers that drop
# unsolicited packets), through pub1's anchor service. Each attempt is a
# fresh pair of `meshwhisper bench holepunch` processes (fresh keys, fresh
# ports, so fresh NAT mappings): B reserves on pub1, A dials B through the
# circuit, DCUtR punches. Needs root.
#
#   sudo scripts/bench-holepunch.sh [ATTEMPTS]     # default 50 per transport
#
# It brings up its own NAT testnet (MW_NAT_DIR, default
# target/bench-holepunch) and takes it down at the end. pub1's per-IP
# reservation rate is raised for the run (every attempt reserves anew from
# site B's one address; the limits are not what is measured here).
set -Eeuo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
N="${1:-50}"
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces)" >&2; exit 1; }
BIN="${MW_BIN:-$REPO/target/release/meshwhisper}"
if [ ! -x "$BIN" ]; then
  (cd "$REPO" && cargo build --release --locked -p meshwhisper)
fi
export MW_BIN="$BIN"
export MW_NAT_DIR="${MW_NAT_DIR:-$REPO/target/bench-holepunch}"
mkdir -p "$(dirname "$MW_NAT_DIR")"
CONF="$MW_NAT_DIR.pub1.toml" # beside the run directory, which up empties
printf '[nat]\nreservations_per_ip_per_min = 6000\nreservations_per_peer_per_min = 6000\n' >"$CONF"
export MW_RELAY_ARGS_pub1="--config $CONF"
"$REPO/testnet/nat.sh" down >/dev/null 2>&1 || true
"$REPO/testnet/nat.sh" up >/dev/null
trap '"$REPO/testnet/nat.sh" down >/dev/null 2>&1 || true' EXIT
PUB1="$(awk -F'\t' '$1=="pub1"{print $4}' "$MW_NAT_DIR/relays.tsv")"
OUT="$MW_NAT_DIR/attempts.jsonl"
: >"$OUT"
for t in tcp quic; do
  if [ "$t" = tcp ]; then A="/ip4/203.0.113.10/tcp/4001/p2p/$PUB1"; else A="/ip4/203.0.113.10/udp/4001/quic-v1/p2p/$PUB1"; fi
  for i in $(seq 1 "$N"); do
    L="$MW_NAT_DIR/listen.out"
    : >"$L"
    ip netns exec mwn-b "$BIN" bench holepunch --role listen --anchor "$A" --transport "$t" --secs 60 >"$L" 2>/dev/null &
    lp=$!
    peer=""
    for _ in $(seq 1 100); do
      peer="$(sed -n 's/^reserved=//p' "$L" | head -n1)"
      [ -n "$peer" ] && break
      sleep 0.1
    done
    if [ -z "$peer" ]; then
      echo "{\"transport\":\"$t\",\"ok\":false,\"ms\":0,\"error\":\"no reservation within 10 s\"}" >>"$OUT"
    else
      r="$(ip netns exec mwn-a "$BIN" bench holepunch --role dial --anchor "$A" --peer "$peer" --transport "$t" --secs 20 2>/dev/null | tail -n1)"
      echo "{\"transport\":\"$t\",${r#\{}" >>"$OUT"
    fi
    kill "$lp" 2>/dev/null || true
    wait "$lp" 2>/dev/null || true
  done
done
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for t in ("tcp", "quic"):
    r = [x for x in rows if x["transport"] == t]
    ok = sorted(x["ms"] for x in r if x.get("ok"))
    pct = lambda p: ok[min(len(ok) - 1, int(len(ok) * p))] if ok else 0
    print(f"{t}: {len(ok)}/{len(r)} hole punches succeeded; time to direct connection ms: median {pct(0.5)}, p90 {pct(0.9)}, max {ok[-1] if ok else 0}")
    errs = {}
    for x in r:
        if not x.get("ok"):
            errs[x.get("error", "?")[:80]] = errs.get(x.get("error", "?")[:80], 0) + 1
    for e, n in errs.items():
        print(f"  failed {n}x: {e}")
PY
