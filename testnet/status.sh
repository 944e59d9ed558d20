#!/usr/bin/env bash
# Shows each testnet relay: PeerId, HTTP base, whether it is up, federated
# peers and address records known.
set -euo pipefail
source "$(dirname "$0")/common.sh"

if [ ! -f "$RELAYS" ]; then
  echo "no testnet in $RUN_DIR (testnet/up.sh N starts one)" >&2
  exit 1
fi
printf '%-5s %-54s %-24s %-5s %-6s %-8s\n' relay peer_id http up peers records
while IFS=$'\t' read -r i pid peer http _; do
  up=no peers=- records=-
  if kill -0 "$pid" 2>/dev/null; then
    h="$(curl -fsS --max-time 2 "$http/health" 2>/dev/null || true)"
    if [ -n "$h" ]; then
      up=yes
      peers="$(json_field "$h" federationPeersConnected)"
      records="$(json_field "$h" addressRecords)"
    fi
  fi
  printf '%-5s %-54s %-24s %-5s %-6s %-8s\n' "$i" "$peer" "$http" "$up" "$peers" "$records"
done <"$RELAYS"
