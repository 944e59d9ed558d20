#!/usr/bin/env bash
# Shows each testnet relay: PeerId, HTTP base, whether it is up, federated
# peers and address records known. For a testnet up.sh has not finished
# (still starting, or failed and left relays) it says so, shows the relays
# started so far and exits 1.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "$0")/common.sh"

show() { # relay table
  printf '%-5s %-54s %-24s %-5s %-6s %-8s\n' relay peer_id http up peers records
  while IFS=$'\t' read -r i pid peer http _; do
    up=no peers=- records=-
    if kill -0 "$pid" 2>/dev/null; then
      h="$(curl -fsS --max-time 2 "${http%/}/health" 2>/dev/null || true)"
      if [ -n "$h" ]; then
        up=yes
        peers="$(json_field "$h" federationPeersConnected)"
        records="$(json_field "$h" addressRecords)"
      fi
    fi
    printf '%-5s %-54s %-24s %-5s %-6s %-8s\n' "$i" "$peer" "$http" "$up" "$peers" "$records"
  done <"$1"
}

if [ ! -f "$RELAYS" ]; then
  up="$(running_up)"
  left="$(testnet_relays | tr '\n' ' ')"
  left="${left% }"
  if [ -n "$up" ]; then
    echo "testnet in $RUN_DIR not up yet: testnet/up.sh (pid $up) is still starting it" >&2
  elif [ -n "$left" ]; then
    echo "no complete testnet in $RUN_DIR, but an unfinished up.sh left relays running (pids $left; testnet/down.sh stops them)" >&2
  else
    echo "no testnet in $RUN_DIR (testnet/up.sh N starts one)" >&2
    exit 1
  fi
  if [ -s "$PARTIAL" ]; then show "$PARTIAL" 2>/dev/null || true; fi
  exit 1
fi
show "$RELAYS"
